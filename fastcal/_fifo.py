"""The one kind of cache fastcal keeps per process (plans, prepared prototypes): a bounded dict
that drops its oldest entry first. Reads take no lock (a dict lookup is atomic under the GIL);
writes do, a lock a forked child gets afresh (:class:`fastcal._process.Lock`)."""
from __future__ import annotations

from . import _process


class FifoCache:
    """At most ``size`` entries, the oldest dropped first; ``forget_in_forked_child``: emptied in
    every child forked from now on (what the parent kept may not hold there)."""

    def __init__(self, size: int, forget_in_forked_child: bool = False):
        self.size = size
        self._entries: dict = {}
        self._lock = _process.Lock()
        if forget_in_forked_child:
            _process.after_fork_in_child(self._entries.clear)

    def get(self, key, default=None):
        return self._entries.get(key, default)

    def put(self, key, value) -> None:
        """Keep ``value`` under ``key`` as the newest entry (replacing one under the same key)."""
        with self._lock:
            self._entries.pop(key, None)
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
