"""``LabelCalibrator``: prototype statistics accumulated over a stream of batches."""
from __future__ import annotations

import os
import tempfile

import torch

from . import _checks, api

STATE_FORMAT = "fastcal.LabelCalibrator"
STATE_VERSION = 1


class LabelCalibrator:
    """Accumulates ``S`` [C, C] and ``W`` [C] in float64 over ``update`` calls.

    Cumulative by default: every pixel seen counts the same. With
    ``momentum=m`` (0 < m <= 1) the calibrator follows a drifting stream: each
    ``update`` first scales the sums so far by ``1 - m``, so a batch seen ``t``
    updates ago weighs ``(1 - m)**t`` (a half-life of ``log(2) / -log(1 - m)``
    updates). A class missing from recent batches keeps its last prototype,
    since the decay scales its ``S`` and ``W`` alike.

    The sums live on the device of the first batch (loaded state moves with them);
    later batches must come on the same device. A rejected batch (bad shape, NaN
    logits...) changes nothing.
    """

    def __init__(self, num_classes: int, *, temperature: float = 1.0, empty: str = "onehot",
                 backend: str = "auto", momentum: float | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.temperature = _checks.check_temperature(temperature)
        _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
        _checks.check_choice("backend", backend, _checks.BACKENDS)
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0 < momentum <= 1):
                raise ValueError(f"momentum: expected None or a number in (0, 1], got {momentum!r}")
            momentum = float(momentum)
        self.empty, self.backend, self.momentum = empty, backend, momentum
        self.reset()

    def reset(self) -> None:
        """Forget every statistic; the next batch may come on any device."""
        device = getattr(self, "S", torch.empty(0)).device
        self.S = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=device)
        self.W = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        self.num_updates = 0
        self.num_pixels = 0
        self._device_fixed = False

    def _check_batch(self, logits: torch.Tensor) -> None:
        _checks.check_logits(logits)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits: expected C={self.num_classes} classes on dim 1, got {logits.shape[1]}")
        if self._device_fixed and logits.device != self.S.device:
            raise ValueError(f"logits: on {logits.device}, but this calibrator's sums are on {self.S.device}")

    def update(self, logits: torch.Tensor, valid: torch.Tensor | None = None) -> "LabelCalibrator":
        """Add a batch's statistics. Raises, changing nothing, on bad input or non-finite logits."""
        self._check_batch(logits)
        S, W = api.prototype_stats(logits, temperature=self.temperature, valid=valid, backend=self.backend)
        if not self._device_fixed:
            self.S, self.W = self.S.to(logits.device), self.W.to(logits.device)
            self._device_fixed = True
        if self.momentum is not None and self.num_updates:
            self.S.mul_(1.0 - self.momentum)
            self.W.mul_(1.0 - self.momentum)
        self.S += S
        self.W += W
        self.num_updates += 1
        self.num_pixels += int(valid.sum()) if valid is not None else api.pixel_count(logits)
        return self

    @property
    def prototypes(self) -> torch.Tensor:
        """[C, C] float32 prototypes from the sums so far (see :func:`fastcal.prototypes_from_stats`)."""
        return api.prototypes_from_stats(self.S, self.W, empty=self.empty)

    @property
    def missing_classes(self) -> list[int]:
        """Classes no pixel has been assigned to so far (``W == 0``)."""
        return torch.nonzero(self.W == 0).flatten().tolist()

    def predict(self, logits: torch.Tensor, *, label_dtype=torch.int64) -> torch.Tensor:
        """Calibrated labels [N, *spatial] with the current prototypes."""
        self._check_batch(logits)
        prototypes = self.prototypes.to(logits.device)
        return api.predict(logits, prototypes, temperature=self.temperature, backend=self.backend,
                           label_dtype=label_dtype)

    # ----- distributed -----------------------------------------------------------------
    def all_reduce(self, group=None) -> "LabelCalibrator":
        """Sum ``S`` and ``W`` (and the counters) over a ``torch.distributed`` process group.

        Call it once on every rank after the local updates; afterwards every rank
        holds the statistics of the whole dataset. The sums must sit on a device
        the group's backend serves (CPU for gloo, CUDA for nccl).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce: torch.distributed is not initialized (call init_process_group first)")
        counters = torch.tensor([self.num_updates, self.num_pixels], dtype=torch.float64, device=self.S.device)
        for tensor in (self.S, self.W, counters):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        self.num_updates, self.num_pixels = int(counters[0].item()), int(counters[1].item())
        return self

    # ----- saved state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings: loadable with ``torch.load(weights_only=True)``."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "num_classes": self.num_classes,
            "temperature": self.temperature,
            "momentum": self.momentum,
            "S": self.S.detach().cpu().clone(),
            "W": self.W.detach().cpu().clone(),
            "num_updates": self.num_updates,
            "num_pixels": self.num_pixels,
        }

    def load_state_dict(self, state: dict) -> "LabelCalibrator":
        """Replace the sums with ``state``'s after checking all of it; on any error nothing changes."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state: not a {STATE_FORMAT} state (format={state.get('format')!r})")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state: version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        C = self.num_classes
        if state.get("num_classes") != C:
            raise ValueError(f"state: num_classes={state.get('num_classes')!r}, but this calibrator has {C}")
        if state.get("temperature") != self.temperature:
            raise ValueError(
                f"state: statistics were taken at temperature {state.get('temperature')!r}, "
                f"this calibrator uses {self.temperature}"
            )
        S, W = state.get("S"), state.get("W")
        for name, tensor, shape in (("S", S, (C, C)), ("W", W, (C,))):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
                raise ValueError(f"state[{name!r}]: expected a float64 tensor")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"state[{name!r}]: expected shape {shape}, got {tuple(tensor.shape)}")
            if not torch.isfinite(tensor).all() or (tensor < 0).any():
                raise ValueError(f"state[{name!r}]: sums must be finite and non-negative")
        counts = [state.get("num_updates"), state.get("num_pixels")]
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("state: num_updates and num_pixels must be non-negative ints")
        device = self.S.device  # an unfixed calibrator still moves to the first batch's device
        self.S, self.W = S.to(device, copy=True), W.to(device, copy=True)
        self.num_updates, self.num_pixels = counts
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the state atomically (a temporary file, then a rename): a crash never leaves half a file."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastcal-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state_dict(), f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path: str | os.PathLike) -> "LabelCalibrator":
        """Load a file written by :meth:`save`; a corrupt or foreign file raises ``ValueError``."""
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # truncated or not a torch file: the unpickler's errors vary
            raise ValueError(f"path: {os.fspath(path)!r} is not a readable fastcal state file ({error})") from error
        return self.load_state_dict(state)

    def __repr__(self) -> str:
        mode = "cumulative" if self.momentum is None else f"momentum={self.momentum}"
        return (f"LabelCalibrator(num_classes={self.num_classes}, temperature={self.temperature}, "
                f"empty={self.empty!r}, backend={self.backend!r}, {mode}, updates={self.num_updates})")
