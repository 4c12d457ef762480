"""What this process may do with threads: whether it is a child forked from one that imported fastcal.

GNU OpenMP's thread pools (PyTorch's and the Numba loops') do not survive ``fork()``: a parallel
region in the child waits forever for threads that exist only in the parent, and any PyTorch
operation above its grain size (an add of two 182 x 182 tensors) opens one. The hook is registered
when ``fastcal`` is imported, before any op runs, so that a child forked after the parent ran any
multi-threaded PyTorch operation (with or without a fastcal call) knows it is one and sets
PyTorch to one thread, as PyTorch's own DataLoader workers do: every operation of the child then
runs inline, fastcal's (every op, every backend, any class count) and the program's own. A child
that knows its parent never ran a parallel region may raise the count again with
``torch.set_num_threads``. A program that imports fastcal only after forking must do so in a fresh
process (``multiprocessing``'s "spawn" or "forkserver"), as for any OpenMP code.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch

_forked = False
_fork_hooks: list = []  # called in the child, after ``_forked`` is set
_locks = weakref.WeakSet()  # every Lock, renewed in a forked child


def _after_fork_in_child() -> None:
    global _forked
    _forked = True
    torch.set_num_threads(1)
    for lock in list(_locks):
        lock._renew()
    for hook in _fork_hooks:
        hook()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forked_child() -> bool:
    """Whether this process was forked from one that had imported fastcal."""
    return _forked


def after_fork_in_child(hook) -> None:
    """Call ``hook()`` in every child forked from now on (e.g. to forget what the parent planned)."""
    _fork_hooks.append(hook)


class Lock:
    """A ``threading.Lock`` that a forked child gets afresh, since another thread of the parent may
    have held it at the fork and never lets go in the child; a copy or an unpickled object gets a
    new one too, so objects holding one copy and pickle as they are."""

    def __init__(self):
        self._renew()
        _locks.add(self)

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def __reduce__(self):
        return type(self), ()
