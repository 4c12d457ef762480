"""The calibrator's state as one value: the sums a stream of batches adds up.

``Sums`` holds, in float64, ``S`` [C, C] (``sum w * p`` per argmax class), ``W`` [C] (``sum w``),
``N`` [C] (pixels per class) and two counters (batches and pixels added). It is immutable: every
operation returns a new value, so a reader holding one never sees half an update, and
``torch.inference_mode`` tensors never need an in-place change. ``Stream`` is what a calibrator
holds: the sums every rank shares and those this rank added since, one immutable value too, which
the calibrator replaces under its lock and reads without it. ``LabelCalibrator`` is the policy on
top (momentum, empty classes, devices, files, the lock).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import is_int

# In online mode a class's weight never decays below this (about 1e-271): a class missing from
# the stream keeps its last prototype at a weight that no pixel (each weighs at least 1/C) notices,
# instead of sinking through the denormals to 0, where it would count as empty.
WEIGHT_FLOOR = 2.0**-900


@dataclass(frozen=True)
class Sums:
    S: torch.Tensor
    W: torch.Tensor
    N: torch.Tensor
    updates: int = 0
    pixels: int = 0

    @classmethod
    def zeros(cls, num_classes: int, device=None) -> Sums:
        vector = torch.zeros(num_classes, dtype=torch.float64, device=device)
        return cls(torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device), vector, vector.clone())

    @property
    def device(self) -> torch.device:
        return self.S.device

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.S + other.S, self.W + other.W, self.N + other.N,
                    self.updates + other.updates, self.pixels + other.pixels)

    def scaled(self, factor) -> Sums:
        """The sums times ``factor`` (a number, or one per class: [C]); the counters unchanged."""
        if isinstance(factor, torch.Tensor):
            return Sums(self.S * factor[:, None], self.W * factor, self.N * factor, self.updates, self.pixels)
        return Sums(self.S * factor, self.W * factor, self.N * factor, self.updates, self.pixels)

    def to(self, device) -> Sums:
        return Sums(self.S.to(device), self.W.to(device), self.N.to(device), self.updates, self.pixels)

    def decay_factors(self, momentum: float) -> torch.Tensor:
        """Per class, what one online step multiplies its sums by: ``1 - momentum``, or more where
        that would take the weight below ``WEIGHT_FLOOR``."""
        keep = torch.full_like(self.W, 1.0 - momentum)
        floor = WEIGHT_FLOOR / self.W.clamp_min(WEIGHT_FLOOR)
        return torch.where(self.W > 0, torch.maximum(keep, floor), keep)

    # ----- one reduction payload: [S (C*C), W (C), N (C), updates, pixels] -------------------
    def payload(self, device=None) -> torch.Tensor:
        counters = torch.tensor([self.updates, self.pixels], dtype=torch.float64, device=self.device)
        return torch.cat([self.S.flatten(), self.W, self.N, counters]).to(device or self.device)

    @classmethod
    def from_payload(cls, payload: torch.Tensor, num_classes: int) -> Sums:
        C = num_classes
        S, W, N, counters = payload.split([C * C, C, C, 2])
        updates, pixels = counters.tolist()
        return cls(S.reshape(C, C).clone(), W.clone(), N.clone(), int(updates), int(pixels))

    # ----- the saved form --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"S": self.S.detach().cpu().clone(), "W": self.W.detach().cpu().clone(),
                "N": self.N.detach().cpu().clone(), "num_updates": self.updates, "num_pixels": self.pixels}

    @classmethod
    def from_dict(cls, state: dict, num_classes: int, *, has_counts: bool = True, signed: bool = False) -> Sums:
        """Check and copy the sums of a saved state: float64 tensors holding values
        (not meta, not requiring grad) of the right shapes, finite and non-negative, weights that
        are 0 (an empty class) or at least ``WEIGHT_FLOOR`` so every ``S[k] / W[k]`` is finite, and
        non-negative int counters. Without ``has_counts`` (version 1 files) the pixel counts are
        unknown: NaN, which a state saved after loading one keeps (NaN counts are accepted). ``signed``:
        ``S`` holds sums of centred logits (the limit ``T = inf``), which may be negative."""
        C = num_classes
        S, W = state.get("S"), state.get("W")
        N = state.get("N") if has_counts else torch.full((C,), float("nan"), dtype=torch.float64)
        for name, tensor, shape in (("S", S, (C, C)), ("W", W, (C,))) + ((("N", N, (C,)),) if has_counts else ()):
            _check_tensor(name, tensor, shape, unknown_allowed=name == "N", signed=signed and name == "S")
        if ((W > 0) & (W < WEIGHT_FLOOR)).any():
            raise ValueError(f"state['W']: a weight is 0 (an empty class) or at least {WEIGHT_FLOOR:.3g}, "
                             "below that a prototype S[k] / W[k] overflows")
        if not torch.isfinite(S / torch.where(W > 0, W, 1.0)[:, None]).all():
            raise ValueError("state['S']: the prototypes S[k] / W[k] must be finite")
        counters = [state.get("num_updates"), state.get("num_pixels")]
        if not all(is_int(c) and c >= 0 for c in counters):
            raise ValueError("state: num_updates and num_pixels must be non-negative ints")
        return cls(S.clone(), W.clone(), N.clone(), *counters)


@dataclass(frozen=True)
class Stream:
    """The sums every rank shares (after a reduction, a load or a reset) and ``local``, those this
    rank added since; ``fixed``: whether a batch has fixed their device; ``any_weight``: whether any
    class has weight, known on the host, so that predicting with ``empty="skip"`` need not read
    ``W`` back to refuse a calibrator with nothing to predict."""
    shared: Sums
    local: Sums
    fixed: bool = False
    any_weight: bool = False

    @classmethod
    def of(cls, shared: Sums, fixed: bool = False, any_weight: bool | None = None) -> Stream:
        """``shared`` with nothing local on top."""
        any_weight = bool((shared.W > 0).any()) if any_weight is None else any_weight
        return cls(shared, Sums.zeros(shared.S.shape[0], shared.device), fixed, any_weight)

    @property
    def total(self) -> Sums:
        return self.shared + self.local

    @property
    def device(self) -> torch.device:
        return self.shared.device

    @property
    def updates(self) -> int:
        return self.shared.updates + self.local.updates

    @property
    def pixels(self) -> int:
        return self.shared.pixels + self.local.pixels

    def added(self, batch: Sums, momentum: float | None) -> Stream:
        """One step of the stream: the sums so far decayed (online mode), then the batch's added; the
        first batch moves the sums to its device and fixes it."""
        shared, local = self.shared, self.local
        if not self.fixed:
            shared, local = shared.to(batch.device), local.to(batch.device)
        if momentum is not None and self.updates:
            factors = (shared + local).decay_factors(momentum)
            shared, local = shared.scaled(factors), local.scaled(factors)
        return Stream(shared, local + batch, True, True)

    def reduced(self, momentum: float | None, group=None) -> Stream:
        """The stream every rank holds after ``LabelCalibrator.all_reduce``: see :func:`reduced`."""
        return Stream.of(reduced(self.shared, self.local, momentum, group), self.fixed)


def reduced(shared: Sums, local: Sums, momentum: float | None, group=None) -> Sums:
    """The sums every rank holds after ``LabelCalibrator.all_reduce`` (see there): each rank's
    ``local`` sums since the last reduction, caught up with the rank that made the most updates
    (online mode), added over the ranks, with rank 0's ``shared`` part entering once. Travels on
    the device the group's backend needs (CUDA for nccl, CPU otherwise), comes back to
    ``shared``'s."""
    import torch.distributed as dist  # only for a reduction: a process that never reduces never loads it

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce: torch.distributed is not initialized (call init_process_group first)")
    device = shared.device
    if dist.get_backend(group) != "nccl":
        wire = torch.device("cpu")
    else:
        wire = device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    steps = torch.tensor([local.updates], dtype=torch.int64, device=wire)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=group)
    lag = int(steps.item()) - local.updates
    catch_up = 1.0 if momentum is None else (1.0 - momentum) ** lag
    mine = local + shared if dist.get_rank(group) == 0 else local
    payload = mine.scaled(catch_up).payload(wire)
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    return Sums.from_payload(payload.to(device), shared.S.shape[0])


def _check_tensor(name: str, tensor, shape: tuple, unknown_allowed: bool = False, signed: bool = False) -> None:
    """``unknown_allowed``: NaN entries (an unknown value) pass the range check; ``signed``: negative
    entries do."""
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
        raise ValueError(f"state[{name!r}]: expected a float64 tensor")
    if tensor.is_nested or tensor.layout != torch.strided:
        raise ValueError(f"state[{name!r}]: expected a dense tensor, got layout {tensor.layout}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"state[{name!r}]: expected shape {shape}, got {tuple(tensor.shape)}")
    if tensor.device.type == "meta":
        raise ValueError(f"state[{name!r}]: on the meta device, which holds no values")
    if tensor.requires_grad:
        raise ValueError(f"state[{name!r}]: requires grad; the sums carry no gradient (pass it detached)")
    known = tensor[~torch.isnan(tensor)] if unknown_allowed else tensor
    if not torch.isfinite(known).all() or (not signed and (known < 0).any()):
        raise ValueError(f"state[{name!r}]: sums must be finite and non-negative")
