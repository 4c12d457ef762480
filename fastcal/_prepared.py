"""What a backend prepares once per plan (the fused loops' walks, the upsampling's row tables),
kept beside the immutable plan and gone with it. Below the backends and the planner alike, so
neither imports the other for it."""
from __future__ import annotations

import weakref

_prepared = weakref.WeakKeyDictionary()  # plan -> {key: what a backend built for it}


def prepared(plan, key, build):
    """``build()`` on the first use of ``key`` with ``plan``, then kept beside the plan."""
    built = _prepared.get(plan)
    if built is None:
        built = _prepared[plan] = {}
    if key not in built:
        built[key] = build()
    return built[key]
