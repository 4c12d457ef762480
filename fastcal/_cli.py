"""Argument types of the ``fastcal`` commands: each option is checked while the command line is
parsed, before any work, and a bad one ends the command with argparse's one-line error (exit 2)."""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from ._checks import check_temperature


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def temperature(text: str) -> float:
    """A temperature: a positive number in float32's normal range, or ``inf`` (the limit)."""
    try:
        return check_temperature(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or inf, got {text!r}") from None


def device(text: str) -> str:
    """A device this machine has: ``cpu``, or ``cuda`` / ``cuda:N`` where CUDA sees that GPU."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if parsed.type == "cpu":
        return text
    if parsed.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here (use --device cpu)")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def output_folder(text: str) -> str:
    """A folder the command can write into: created if missing (with its parents), then probed
    with a temporary file, so that a run never fails at its end for want of a place to write."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    try:
        os.makedirs(text, exist_ok=True)
        with tempfile.TemporaryFile(dir=text):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {reason}") from None
    return text


def output_file(text: str) -> str:
    """A file the command can write: its folder exists and takes a new file, and the path is not
    a folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    if os.path.isdir(text) or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no folder {folder!r}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write into {folder!r}: {error.strerror or error}") from None
    return text
