"""``LabelCalibration``: a segmentation model wrapped so that ``forward`` returns calibrated labels.

For test-time-adaptation harnesses (tent, CoTTA, TTAB, ...): an ``nn.Module`` with ``forward``,
``reset()`` and ``fit(loader)``, that never computes a gradient and never changes the model.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _checks, _upsample, api
from .adapters import batch_images, batch_valid, model_device, model_logits, output_size, to_device
from .calibrator import LabelCalibrator
from .fit import fit_calibrator

MODES = ("offline", "continual", "episodic")

__all__ = ["LabelCalibration"]


class LabelCalibration(nn.Module):
    """``model`` followed by label calibration of its logits [N, C, H, W], without gradients.

    Modes:

    * ``"offline"``: :meth:`fit` runs the model over a loader of unlabelled target images and
      keeps their statistics; ``forward`` predicts with those prototypes and learns nothing.
    * ``"continual"``: each ``forward`` first adds the batch's statistics (decayed by ``momentum``
      if given, see :class:`fastcal.LabelCalibrator`), then predicts with the prototypes so far.
      It starts from :meth:`fit`'s statistics if ``fit`` was called, else from nothing.
    * ``"episodic"``: each batch is calibrated on its own prototypes (:func:`fastcal.calibrate`);
      nothing is kept between calls.

    :meth:`reset` returns to the statistics of the last :meth:`fit` (empty if there was none).

    The model runs under ``torch.no_grad()`` in eval mode, whatever ``train()`` says (batch
    norm statistics and dropout stay as trained), and its parameters never change. Its output may
    be logits, torchvision's ``{"out": logits}`` or an object with ``.logits``.
    ``output="labels"`` returns [N, H, W] labels; ``output="scores"`` float32 scores
    [N, C, H, W], ``-||p - P[k]||^2``, whose argmax over classes is the label, for harnesses that
    take the argmax themselves. ``size`` / ``scale_factor`` / ``align_corners`` upsample the
    logits bilinearly on the fly (see :func:`fastcal.calibrate`); ``size="input"`` means the
    input images' height and width.

    ``logits(model, images) -> logits`` replaces ``model(images)`` in ``forward`` and :meth:`fit`
    (a data preprocessor, sliding-window inference: see :func:`fastcal.fit.fit_calibrator`);
    ``forward(images, valid=None)`` masks pixels out of the statistics it adds (continual and
    episodic modes; every pixel still gets a label), at the logits' or the output resolution:
    ``valid`` takes the forms :meth:`fit` takes (a mask tensor in any of
    :data:`fastcal.adapters.MASK_FORMS`, or ``valid(images) -> mask``).

    ``state_dict()`` holds the model's tensors and, under ``"_extra_state"``, the calibrator's
    statistics and those of the last fit, so a saved wrapper resumes where it was.
    ``confidence_power`` weighs the pixels (see :func:`fastcal.prototype_stats`).

    Args:
        model (nn.Module): the segmentation model.
        num_classes (int): C, its class count.
        mode (str): ``"continual"`` (default), ``"offline"`` or ``"episodic"``.
        temperature (float): T, or ``math.inf`` for the limit. Default 1.0.
        momentum (float | None): the online mode's decay (see :class:`fastcal.LabelCalibrator`). Default None.
        empty (str): ``"onehot"`` (default) or ``"skip"``.
        backend (str): see :func:`fastcal.calibrate`. Default ``"auto"``.
        output (str): ``"labels"`` (default) or ``"scores"``.
        confidence_power (float): pixels weigh ``conf ** confidence_power``. Default 1.0.
        size (tuple[int, ...] | str | None): upsample the logits to this size, or ``"input"``.
        scale_factor (float | tuple[float, ...] | None): or by this factor per side.
        align_corners (bool): as in ``F.interpolate``. Default False.
        logits (Callable | None): ``logits(model, images) -> logits``, in place of ``model(images)``.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, mode: str = "continual", temperature: float = 1.0,
                 momentum: float | None = None, empty: str = "onehot", backend: str = "auto",
                 output: str = "labels", confidence_power: float = 1.0, size=None, scale_factor=None,
                 align_corners: bool = False, logits=None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        _checks.check_choice("mode", mode, MODES)
        _checks.check_choice("output", output, _checks.OUTPUTS)
        if momentum is not None and mode != "continual":
            raise ValueError(f"momentum: only the 'continual' mode decays its statistics, got mode={mode!r}")
        _upsample.check_model_arguments(size, scale_factor, align_corners)
        if logits is not None and not callable(logits):
            raise TypeError("logits: expected None or a callable (model, images) -> logits, "
                            f"got {type(logits).__name__}")
        self.logits_hook = logits
        self.model = model.eval()
        self.mode, self.output = mode, output
        self.resize = {"size": size, "scale_factor": scale_factor, "align_corners": align_corners}
        self.calibrator = LabelCalibrator(num_classes, temperature=temperature, empty=empty, backend=backend,
                                          momentum=momentum, confidence_power=confidence_power)
        self._fitted = self.calibrator.state_dict()

    def train(self, mode: bool = True) -> LabelCalibration:
        super().train(mode)
        self.model.eval()  # calibration adapts the labels, never the model
        return self

    def _logits(self, images: torch.Tensor):
        self.model.eval()
        with torch.no_grad():
            output = self.model(images) if self.logits_hook is None else self.logits_hook(self.model, images)
        return model_logits(output), {**self.resize, "size": output_size(self.resize["size"], images)}

    @torch.no_grad()
    def forward(self, images: torch.Tensor, valid=None) -> torch.Tensor:
        """Calibrated labels (or scores) of ``images`` in the wrapper's mode (see the class).

        Args:
            images (torch.Tensor): the model's input batch (any form the model or ``logits`` hook takes).
            valid (torch.Tensor | Callable | None): pixels the statistics may use (continual and
                episodic modes), in a form of :data:`fastcal.adapters.MASK_FORMS`, or ``valid(images)``.

        Returns:
            torch.Tensor: labels [N, *spatial] int64, or float32 scores [N, C, *spatial]."""
        logits, resize = self._logits(images)
        valid = batch_valid(valid, images, logits)
        if self.mode == "episodic":
            c = self.calibrator
            if logits.shape[1:2] != (c.num_classes,):
                raise ValueError(f"logits: expected C={c.num_classes} classes on dim 1, "
                                 f"got shape {tuple(logits.shape)}")
            return api.calibrate(logits, temperature=c.temperature, empty=c.empty, backend=c.backend,
                                 output=self.output, confidence_power=c.confidence_power, valid=valid, **resize)
        if self.mode == "continual":
            self.calibrator.update(logits, valid, **resize)
        elif valid is not None:
            _checks.check_valid(valid, logits, _upsample.output_shape(
                logits, _upsample.resolve(logits, resize["size"], resize["scale_factor"], resize["align_corners"])))
        elif self.calibrator.num_updates == 0:
            raise RuntimeError("LabelCalibration(mode='offline'): no statistics to predict with; call "
                               "fit(loader) with a loader of target images before predicting")
        return self.calibrator.predict(logits, output=self.output, **resize)

    def fit(self, loader, *, progress: bool = True, valid=None, images=None) -> LabelCalibration:
        """Statistics of the model's logits over every batch of ``loader`` (unlabelled images, moved
        to the device of the model's parameters: see :func:`fastcal.fit.fit_calibrator`, whose
        ``valid`` and ``images`` this takes; the wrapper's ``logits`` hook gets each batch's
        images), replacing any earlier ones; a progress bar on stderr with ``progress`` (tqdm).

        All or nothing: a loader or model that raises part-way, an interrupt, or a loader that gives
        no pixel to count (``ValueError``) leaves the statistics as they were before the call.

        Args:
            loader (Iterable): batches of unlabelled target images.
            progress (bool): a progress bar on a terminal. Default True.
            valid (torch.Tensor | str | Callable | None): as in :func:`fastcal.fit.fit_calibrator`.
            images (Callable | None): ``images(batch) -> inputs``, as there.

        Returns:
            LabelCalibration: ``self``."""
        if self.mode == "episodic":
            raise ValueError("fit: the 'episodic' mode keeps no statistics between batches")
        hook = None
        if self.logits_hook is not None:
            pick, device = images or batch_images, model_device(self.model)
            hook = lambda model, batch: self.logits_hook(model, to_device(pick(batch), device))  # noqa: E731
        before = self.calibrator.state_dict()
        self.calibrator.reset()
        try:
            fit_calibrator(self.model, loader, self.calibrator.num_classes, calibrator=self.calibrator,
                           progress=progress, valid=valid, images=images, logits=hook, **self.resize)
            if self.calibrator.num_updates == 0:
                raise ValueError("fit: the loader gave no pixel to count (no batch, or every pixel masked out "
                                 "by valid); the statistics are kept as they were")
        except BaseException:
            self._restore(before)
            raise
        self._fitted = self.calibrator.state_dict()
        return self

    def reset(self) -> LabelCalibration:
        """Back to the statistics of the last :meth:`fit`, or to none."""
        self._restore(self._fitted)
        return self

    def _restore(self, state: dict) -> None:
        self.calibrator.reset()
        if state["num_updates"]:
            self.calibrator.load_state_dict(state)

    def get_extra_state(self) -> dict:
        return {"calibrator": self.calibrator.state_dict(), "fitted": self._fitted, "mode": self.mode}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state: expected the dict of a LabelCalibration's get_extra_state(), "
                            f"got {type(state).__name__}")
        if state.get("mode") != self.mode:
            raise ValueError(f"state: saved from a LabelCalibration in mode {state.get('mode')!r}, "
                             f"this one is {self.mode!r}")
        c = self.calibrator
        scratch = LabelCalibrator(c.num_classes, temperature=c.temperature, momentum=c.momentum,
                                  confidence_power=c.confidence_power, empty=c.empty)
        scratch.load_state_dict(state["fitted"])  # check both before changing anything
        self.calibrator.load_state_dict(state["calibrator"])
        self._fitted = state["fitted"]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, output={self.output!r}, calibrator={self.calibrator!r}"

