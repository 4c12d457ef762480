"""``LabelCalibrator``: prototype statistics accumulated over a stream of batches."""
from __future__ import annotations

import os
import warnings

import torch

from . import _backends, _checks, _ops, _plan, _process, _statefile, reference
from ._operands import DistanceOperands
from ._state import WEIGHT_FLOOR, Stream, Sums  # noqa: F401 (WEIGHT_FLOOR: public)
from ._statefile import STATE_FORMAT, STATE_VERSION  # noqa: F401  (public names)
from .adapters import logits_of, mask_of
from .diagnostics import diagnose


class LabelCalibrator:
    """Accumulates ``S`` [C, C] and ``W`` [C] in float64 over ``update`` calls.

    Each pixel weighs ``conf ** confidence_power`` (default 1, the paper; see
    :func:`fastcal.prototype_stats`); the power is part of the saved state.

    Cumulative by default: every pixel seen counts the same. With
    ``momentum=m`` (0 < m <= 1) the calibrator follows a drifting stream: each
    ``update`` first scales the sums so far by ``1 - m``, so a batch seen ``t``
    updates ago weighs ``(1 - m)**t`` (a half-life of ``log(2) / -log(1 - m)``
    updates). A class missing from recent batches keeps its last prototype: the
    decay scales its ``S`` and ``W`` alike, and never below a weight of
    ``WEIGHT_FLOOR`` (2^-900), so neither ~1000 updates at m = 0.5 nor ``m = 1``
    (only the latest batch counts) turn a class seen once back into an empty one.

    A batch with no pixel to count (N = 0, no spatial extent, or every pixel masked
    out by ``valid``) changes nothing: no decay, no update counted.

    ``class_names`` (optional, C strings) name the classes in :meth:`diagnostics`, the saved state
    and an exported head's metadata.

    The sums live on the device of the first batch (loaded state moves with them);
    later batches must come on the same device. A rejected batch (bad shape, NaN
    logits...) changes nothing. Works inside and outside ``torch.inference_mode()``
    and ``torch.no_grad()``, in any order: the sums are replaced, never updated in place.

    Thread-safe: ``update``, ``predict``, ``reset``, ``all_reduce`` and the loads may be called from
    several threads; each change of the state happens under one lock, while a batch's statistics
    are computed outside it, so no batch is lost and ``S``, ``W``, the counts and the counters
    always describe the same batches.

    Args:
        num_classes (int): ``C >= 2``.
        temperature (float): ``T > 0`` in float32's normal range, or ``math.inf`` (the limit: the
            nearest class mean of centred logits). Default 1, the paper's.
        empty (str): ``"onehot"`` (default) or ``"skip"``: how a class without statistics predicts.
        backend (str): as in :func:`fastcal.predict`. Default ``"auto"``.
        momentum (float | None): None (default, cumulative) or a number in (0, 1].
        confidence_power (float): ``gamma`` in [0, 8]. Default 1.
        class_names (Sequence[str] | None): C names, or None.
    """

    def __init__(self, num_classes: int, *, temperature: float = 1.0, empty: str = "onehot",
                 backend: str = "auto", momentum: float | None = None, confidence_power: float = 1.0,
                 class_names=None):
        self.num_classes = _checks.check_num_classes(num_classes)
        self.temperature = _checks.check_temperature(temperature)
        self.confidence_power = _checks.check_confidence_power(confidence_power)
        _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
        _checks.check_choice("backend", backend, _backends.NAMES)
        self.empty, self.backend, self.momentum = empty, backend, _checks.check_momentum(momentum)
        self.class_names = _checks.check_class_names(class_names, num_classes)
        self._lock = _process.Lock()  # every change of ``_stream``; reads take the value as it is
        self._stream = Stream.of(Sums.zeros(self.num_classes), any_weight=False)
        self._prepared = None  # (stream, empty policy, {device: DistanceOperands}) for predict
        self._warned_unfitted = False

    def reset(self) -> None:
        """Forget every statistic; the next batch may come on any device."""
        with self._lock:
            self._stream = Stream.of(Sums.zeros(self.num_classes, self._stream.device), any_weight=False)

    @property
    def S(self) -> torch.Tensor:
        """[C, C] float64 sums ``sum w * p`` per argmax class, ``w = conf ** confidence_power``."""
        return self._stream.total.S

    @property
    def W(self) -> torch.Tensor:
        """[C] float64 sums ``sum w`` per argmax class, ``w = conf ** confidence_power``."""
        return self._stream.total.W

    @property
    def counts(self) -> torch.Tensor:
        """[C] float64 pixels counted per argmax class (decayed like ``W`` in online mode; NaN when
        loaded from a version-1 state, which did not keep them)."""
        return self._stream.total.N

    @property
    def num_updates(self) -> int:
        """Batches added (summed over ranks by :meth:`all_reduce`); empty batches do not count."""
        return self._stream.updates

    @property
    def num_pixels(self) -> int:
        """Valid pixels added (summed over ranks by :meth:`all_reduce`)."""
        return self._stream.pixels

    def _check_batch(self, logits: torch.Tensor) -> None:
        """What the plan cannot know: this calibrator's class count and device (the logits
        themselves were checked by the plan)."""
        stream = self._stream
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits: expected C={self.num_classes} classes on dim 1, got {logits.shape[1]}")
        if stream.fixed and logits.device != stream.device:
            raise ValueError(f"logits: on {logits.device}, but this calibrator's sums are on {stream.device}")

    def update(self, logits: torch.Tensor, valid: torch.Tensor | None = None, *, size=None, scale_factor=None,
               align_corners=False) -> LabelCalibrator:
        """Add a batch's statistics. Raises, changing nothing, on bad input or non-finite logits.

        ``size`` / ``scale_factor`` / ``align_corners``: the statistics of the bilinearly upsampled
        logits (``valid`` at the output size), as in :func:`fastcal.prototype_stats`.

        Args:
            logits (torch.Tensor): [N, C, *spatial] floating, on the sums' device once one batch
                fixed it; or a model's output holding them (``{"out": ...}``, ``.logits``).
            valid (torch.Tensor | None): a mask in any of the forms of
                :data:`fastcal.adapters.MASK_FORMS` (bool or 0/1 integer or floating;
                [N, *spatial], [*spatial] for every image, or [N, 1, *spatial]). Default None.
            size, scale_factor, align_corners: upsampling, as in :func:`fastcal.prototype_stats`.

        Returns:
            the calibrator itself."""
        logits = logits_of(logits)
        valid = mask_of(valid, logits)
        plan = _plan.plan("stats", logits, valid=valid, temperature=self.temperature, backend=self.backend,
                          confidence_power=self.confidence_power, size=size, scale_factor=scale_factor,
                          align_corners=align_corners)
        self._check_batch(logits)
        S, W, N, pixels = _ops.stats_step(plan, logits.detach(), valid, count=True)
        if pixels == 0:
            return self
        with self._lock:
            self._check_batch(logits)  # again: another thread may have fixed the device since
            self._stream = self._stream.added(Sums(S, W, N, 1, pixels), self.momentum)
        return self

    @property
    def prototypes(self) -> torch.Tensor:
        """[C, C] float32 prototypes from the sums so far (see :func:`fastcal.prototypes_from_stats`)."""
        return self._operands().prototypes.clone()

    def _operands(self, device=None) -> DistanceOperands:
        """The prototypes, prepared for the predict pass, on ``device`` (default: the sums'), built
        once per state of the sums, empty policy and device, and trusted: the sums are this
        calibrator's own, checked when they were loaded, so nothing is read back (empty classes
        are resolved on the device)."""
        stream, empty = self._stream, self.empty
        device = stream.device if device is None else torch.device(device)
        prepared = self._prepared
        if prepared is None or prepared[0] is not stream or prepared[1] != empty:
            if empty == "skip" and not stream.any_weight:
                _ops.raise_all_empty()
            prepared = self._prepared = (stream, empty, {})
        by_device = prepared[2]
        if stream.device not in by_device:
            total = stream.total
            by_device[stream.device] = DistanceOperands(
                reference.prototypes_from_stats(total.S, total.W, empty, self.temperature))
        if device not in by_device:
            by_device[device] = DistanceOperands(by_device[stream.device].prototypes.to(device))
        return by_device[device]

    def diagnostics(self, class_names=None, *, min_pixels: float = 1000, min_distance: float = 0.2):
        """Per class: pixels, weight, the prototype's own probability, its nearest other prototype,
        whether it can be predicted at all; and warnings (too few pixels, collapsed prototypes,
        classes never predicted). See :mod:`fastcal.diagnostics`; ``print()`` it for a table.

        Args:
            class_names (Sequence[str] | None): a name per class for the table. Default: the
                calibrator's ``class_names`` (None: numbers).
            min_pixels (float): a class with fewer pixels gets a warning. Default 1000.
            min_distance (float): two prototypes nearer than this get a "collapsed" warning. Default 0.2."""
        names = self.class_names if class_names is None else class_names
        return diagnose(self.S, self.W, self.counts, self.empty, names, temperature=self.temperature,
                        min_pixels=min_pixels, min_distance=min_distance)

    @property
    def missing_classes(self) -> list[int]:
        """Classes no pixel has been assigned to so far (``W == 0``)."""
        return torch.nonzero(self.W == 0).flatten().tolist()

    def predict(self, logits: torch.Tensor, *, label_dtype=torch.int64, output="labels", size=None,
                scale_factor=None, align_corners=False) -> torch.Tensor:
        """Calibrated labels [N, *spatial] with the current prototypes, or their float32 scores
        [N, C, *spatial] with ``output="scores"`` (of the bilinearly upsampled logits with ``size`` /
        ``scale_factor``, as in :func:`fastcal.predict`). ``logits`` may be a model's output holding
        them (``{"out": ...}``, ``.logits``).

        Without statistics (no update yet, or only empty batches) every class has its one-hot
        prototype under ``empty="onehot"``, so the labels are the argmax: a ``RuntimeWarning`` says
        so, once per calibrator.

        Args:
            logits (torch.Tensor): [N, C, *spatial] float32, float16 or bfloat16, any strides (or a
                model output holding them), C the calibrator's class count.
            label_dtype (torch.dtype): int64 (default), int32, int16 or uint8 (at most 256 classes).
            output (str): ``"labels"`` (default) or ``"scores"``.
            size (tuple[int, ...] | None): the output's spatial size, the logits upsampled bilinearly.
            scale_factor (float | tuple[float, ...] | None): or the upsampling factor per side.
            align_corners (bool): as in ``F.interpolate``. Default False.

        Returns:
            torch.Tensor: labels [N, *out_spatial] of ``label_dtype``, or float32 scores [N, C, *out_spatial]."""
        logits = logits_of(logits)
        if not self._stream.any_weight and self.empty == "onehot" and not self._warned_unfitted:
            self._warned_unfitted = True
            warnings.warn("LabelCalibrator.predict: no statistics yet (no update, or only empty batches), so "
                          "every prototype is one-hot and the labels are the argmax; update() with target "
                          "logits first", RuntimeWarning, stacklevel=2)
        plan = _plan.plan("own-predict", logits, temperature=self.temperature,
                          backend=self.backend, label_dtype=label_dtype, output=output, size=size,
                          scale_factor=scale_factor, align_corners=align_corners)
        self._check_batch(logits)
        operands = self._operands(logits.device)
        return _ops.predict_step(plan, logits.detach(), operands.prototypes, operands)

    # ----- distributed -----------------------------------------------------------------
    def all_reduce(self, group=None) -> LabelCalibrator:
        """Combine the updates every rank made since the last reduction; afterwards every rank holds
        the same statistics, those of one process that saw all the batches.

        Cumulative mode: the sums are added, as if one process had seen every batch.
        Online mode (``momentum``): the ranks are taken to step in lockstep, as data-parallel
        workers do: the ``t``-th update of every rank since the last reduction is one step of the
        stream, with the ranks' batches together, so one process fed those combined batches holds
        the same sums. A rank with fewer updates (uneven shards) has its batches in the first steps;
        a rank with none contributes nothing.

        Call it on every rank (it is a collective), as often as you like: a reduction with no
        update in between changes nothing, and state from :meth:`load_state_dict` counts as
        already shared. The sums travel on the device the group's backend needs (CUDA for nccl,
        CPU otherwise), whatever device a rank's sums are on, and come back to it.

        Args:
            group (torch.distributed.ProcessGroup | None): the ranks to combine. Default: the world.

        Returns:
            LabelCalibrator: ``self``.
        """
        with self._lock:  # no update may land between the payload and the new shared state
            self._stream = self._stream.reduced(self.momentum, group)
        return self

    # ----- saved state ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings: loadable with ``torch.load(weights_only=True)``; a
        snapshot of one state, whatever other threads do meanwhile."""
        return _statefile.state_of(self, self._stream.total)

    def load_state_dict(self, state: dict) -> LabelCalibrator:
        """Replace the sums with ``state``'s after checking all of it; on any error nothing changes.

        Every field is checked for its type, shape, device and range: plain ints for the version,
        the class count and the counters (a bool is not one), plain numbers for the temperature,
        confidence power and momentum, and the empty policy (version 3), each equal to this
        calibrator's; float64 tensors holding values (not on the meta device, not requiring grad)
        of finite, non-negative sums (pixel counts may be NaN: unknown, as in version-1 states), and
        weights that are 0 (an empty class) or at least ``WEIGHT_FLOOR``, so every prototype
        ``S[k] / W[k]`` is finite; then (version 3) the digest of the whole. Class names saved with
        the state are taken when this calibrator has none, and must match when it has (see
        :func:`fastcal._statefile.checked_state`).

        Args:
            state (dict): from :meth:`state_dict` (or ``torch.load(..., weights_only=True)`` of a saved file).

        Returns:
            LabelCalibrator: ``self``."""
        sums, class_names = _statefile.checked_state(self, state)
        with self._lock:
            # an unfixed calibrator still moves to the first batch's device
            self._stream = Stream.of(sums.to(self._stream.device), self._stream.fixed)
            self.class_names = class_names
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the state atomically (see :func:`fastcal._statefile.write`): a crash at any point
        leaves either the previous file or the new one, never half a file. The file gets the mode a
        new file gets under the process's umask (e.g. 0644 under umask 022).

        Args:
            path (str | os.PathLike): the file (a symbolic link is written through; the link stays)."""
        _statefile.write(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> LabelCalibrator:
        """Load a file written by :meth:`save`; a corrupt, altered or foreign file raises
        ``ValueError`` (see :mod:`fastcal._statefile`), changing nothing.

        Args:
            path (str | os.PathLike): a file written by :meth:`save` with this calibrator's settings.

        Returns:
            LabelCalibrator: ``self``."""
        return self.load_state_dict(_statefile.read(path))

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, empty: str | None = None,
                  backend: str = "auto") -> LabelCalibrator:
        """A calibrator with the settings a state file was saved with (class count, temperature,
        momentum, confidence power, empty policy, class names) and its sums. ``empty`` overrides the
        saved policy (states before version 3 did not save one: ``"onehot"`` then).

        Args:
            path (str | os.PathLike): a file written by :meth:`save`.
            empty (str | None): ``"onehot"`` or ``"skip"``, replacing the saved policy. Default: the saved one.
            backend (str): as in :class:`LabelCalibrator`. Default ``"auto"``.

        Returns:
            LabelCalibrator: a new calibrator; a file that fails any check raises ``ValueError``."""
        state = _statefile.read(path)
        calibrator = cls(**_statefile.settings_of(state, path), backend=backend).load_state_dict(state)
        if empty is not None:
            _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
            calibrator.empty = empty
        return calibrator

    def __repr__(self) -> str:
        mode = "cumulative" if self.momentum is None else f"momentum={self.momentum}"
        power = "" if self.confidence_power == 1.0 else f"confidence_power={self.confidence_power}, "
        return (f"LabelCalibrator(num_classes={self.num_classes}, temperature={self.temperature}, "
                f"empty={self.empty!r}, backend={self.backend!r}, {power}{mode}, updates={self.num_updates})")
