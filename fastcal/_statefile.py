"""A calibrator's state on disk: written atomically, read with its integrity checked.

A state file is ``torch.save`` of a plain dict (tensors, numbers, strings: loadable with
``weights_only=True``). Two guards catch a file changed after it was written:

- every record of the zip archive ``torch.save`` writes carries a CRC32, which :func:`read` checks
  before unpickling (PyTorch's reader does not): this covers files of every version;
- since version 3 the state holds ``digest``, the SHA-256 of every other field (names, values,
  tensors' dtypes, shapes and bytes), which ``LabelCalibrator.load_state_dict`` checks, so a dict
  altered between ``state_dict()`` and ``load_state_dict()`` is refused too.

A flipped bit anywhere in a file therefore raises ``ValueError`` on load (or, where it breaks
the archive itself, the unpickler's error, reported as ``ValueError`` too).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile

import torch

from . import _checks, _space
from ._checks import check_class_names, is_int, is_number
from ._state import Sums
from ._version import __version__

STATE_FORMAT = "fastcal.LabelCalibrator"
# Each version adds fields; a reader takes every version up to its own and reads each field from
# the version that introduced it (FIELDS_SINCE), so a format bump never strands an older file.
STATE_VERSION = 3
FIELDS_SINCE = {
    2: ("confidence_power", "N"),                                  # the confidence power, pixel counts
    3: ("empty", "class_names", "fastcal_version", "digest"),      # empty policy, names, integrity
}


def since(field: str) -> int:
    """The state version that introduced ``field`` (1: every version has it)."""
    return next((version for version, fields in FIELDS_SINCE.items() if field in fields), 1)


def checked_version(state: dict, where: str = "state") -> int:
    """The version of a state of this format: an int from 1 to :data:`STATE_VERSION`."""
    version = state.get("version")
    if not is_int(version) or not 1 <= version <= STATE_VERSION:
        newer = " (saved by a newer fastcal: upgrade to read it)" if is_int(version) and version > 0 else ""
        raise ValueError(f"{where}: version {version!r} is not supported (expected 1 to {STATE_VERSION}){newer}")
    return version


def state_of(calibrator, sums: Sums) -> dict:
    """The saved form of a calibrator holding ``sums``: plain tensors, numbers and strings."""
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "fastcal_version": __version__,
        "num_classes": calibrator.num_classes,
        "temperature": calibrator.temperature,
        "momentum": calibrator.momentum,
        "confidence_power": calibrator.confidence_power,
        "empty": calibrator.empty,
        "class_names": None if calibrator.class_names is None else list(calibrator.class_names),
        **sums.to_dict(),
    }
    return {**state, "digest": digest(state)}


def checked_state(calibrator, state) -> tuple[Sums, tuple | None]:
    """``state``'s sums (a copy, on the state's device) and the class names the calibrator takes with them, after every
    check of ``LabelCalibrator.load_state_dict``; raises its ``TypeError`` / ``ValueError``."""
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"state: not a {STATE_FORMAT} state (format={state.get('format')!r})")
    version = checked_version(state)
    C = calibrator.num_classes
    if not is_int(state.get("num_classes")) or state.get("num_classes") != C:
        raise ValueError(f"state: num_classes={state.get('num_classes')!r}, but this calibrator has {C}")
    # states saved before the confidence power existed were taken at the paper's power, 1; before
    # version 3 the empty policy was not saved, and any is taken
    for name, value, what in (("temperature", state.get("temperature"), "taken at"),
                              ("confidence_power", state.get("confidence_power", 1.0), "taken at"),
                              ("momentum", state.get("momentum"), "decayed with")):
        if not (is_number(value) or (name == "momentum" and value is None)) or value != getattr(calibrator, name):
            raise ValueError(f"state: statistics were {what} {name} {value!r}, "
                             f"this calibrator uses {getattr(calibrator, name)}")
    class_names = calibrator.class_names
    if version >= since("empty"):
        if state.get("empty") != calibrator.empty:
            raise ValueError(f"state: saved to predict with empty={state.get('empty')!r}, this calibrator "
                             f"uses {calibrator.empty!r} (LabelCalibrator.from_file takes the file's)")
        saved_names = check_class_names(state.get("class_names"), C, "state['class_names']")
        if saved_names is not None and class_names is not None and saved_names != class_names:
            raise ValueError("state: class_names differ from this calibrator's")
        class_names = class_names or saved_names
    sums = Sums.from_dict(state, C, has_counts=version >= since("N"), signed=_space.is_limit(calibrator.temperature))
    if version >= since("digest") and state.get("digest") != digest(state):
        raise ValueError("state: the digest does not match the contents (the state was altered or "
                         "the file is corrupt)")
    return sums, class_names


def settings_of(state, path) -> dict:
    """The ``LabelCalibrator`` arguments a saved state describes (``LabelCalibrator.from_file``),
    each checked, and the sums' shapes checked against the class count, before anything is built
    from them: a foreign or altered file raises ``ValueError`` and allocates nothing."""
    where = f"path: {os.fspath(path)!r}"
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{where} is not a fastcal state file")
    version = checked_version(state, where)
    C = state.get("num_classes")
    if not is_int(C) or C < 2:
        raise ValueError(f"{where}: num_classes={C!r} is not an int >= 2")
    for name, shape in (("S", (C, C)), ("W", (C,))):
        tensor = state.get(name)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{where}: {name} should be {list(shape)} for num_classes={C}, got {found}")
    settings = {"num_classes": C, "temperature": state.get("temperature"), "momentum": state.get("momentum"),
                "confidence_power": state.get("confidence_power", 1.0) if version >= since("confidence_power") else 1.0,
                "empty": state.get("empty") if version >= since("empty") else "onehot"}
    try:
        _checks.check_temperature(settings["temperature"])
        _checks.check_momentum(settings["momentum"])
        _checks.check_confidence_power(settings["confidence_power"])
        _checks.check_choice("empty", settings["empty"], _checks.EMPTY_POLICIES)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: not a usable fastcal state file ({error})") from None
    return settings


def digest(state: dict) -> str:
    """SHA-256 (hex) of every field of ``state`` but ``digest``, in key order."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k != "digest"):
        value = state[key]
        h.update(repr(key).encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def read(path) -> dict:
    """The object saved at ``path``, after checking every zip record's CRC32. ``FileNotFoundError``
    for a missing file; ``ValueError`` for one that is torn, corrupt or not a torch file."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()  # reads every record, checking its CRC32
        if broken is not None:
            raise ValueError(f"record {broken!r} does not match its checksum")
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # a torn or foreign file: zipfile's and the unpickler's errors vary
        raise ValueError(f"path: {path!r} is not a readable fastcal state file ({error})") from error


def write(state: dict, path) -> None:
    """Write ``state`` atomically (see :func:`write_atomically`)."""
    write_atomically(path, lambda f: torch.save(state, f))


def write_atomically(path, write_to) -> None:
    """``write_to(f)`` into a temporary file in the same folder, flushed to disk (``fsync``), renamed
    over ``path``, then the folder flushed. A crash at any point leaves either the previous file or
    the new one, never half a file. The file gets the mode a new file gets under the process's
    umask (e.g. 0644 under umask 022). Used for state files and exported ONNX heads alike.

    A ``path`` that is a symbolic link is written through: the file it points to (at the end of a
    chain of links) is replaced, atomically, by a file written beside it, and the link stays."""
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastcal-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask
        with os.fdopen(fd, "wb") as f:
            write_to(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _umask_from_proc() -> int | None:
    """The process umask as Linux reports it (``Umask:`` in ``/proc/self/status``, since 4.7)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """Where the umask cannot be read, it can only be set: read it so once, at import, while no
    other thread of this library creates files (a file created elsewhere in that instant would
    get the mode of umask 0)."""
    if _umask_from_proc() is not None:
        return 0  # unused: /proc answers every call
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc``), else as it was at import."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX); where folders cannot be opened (Windows),
    the rename is as durable as the platform makes it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the file itself is already on disk
    finally:
        os.close(fd)
