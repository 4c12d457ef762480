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
    """Write ``state`` atomically: a temporary file in the same folder, flushed to disk (``fsync``),
    renamed over ``path``, then the folder flushed. A crash at any point leaves either the previous
    file or the new one, never half a file. The file gets the mode a new file gets under the
    process's umask (e.g. 0644 under umask 022)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastcal-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
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
