"""What a calibrator's statistics say about each class, and warnings a user can act on.

Computed from ``S``, ``W`` and the pixel counts ``N`` alone (no data pass), in float64 on the CPU:

* ``pixels`` ``N[k]``, ``weight`` ``W[k]``, ``self_probability`` ``P[k][k]`` (how much of its own
  class the prototype holds: low when the pixels taken as ``k`` look like another class);
* ``nearest`` other prototype and the Euclidean ``distance`` to it (small: the two classes have
  collapsed into one, calibration can barely tell them apart);
* ``predictable``: some pixel can be labelled ``k`` at all. A prototype lies in the probability
  simplex (a mean of probability vectors), so a pixel whose ``p`` is the prototype itself is at
  distance 0 from it: only a skipped class (``empty="skip"``) or an exact copy of a lower-numbered
  prototype (ties go to the lowest class) is never predicted;
* ``keeps_certain``: a pixel certain of ``k`` (``p = e_k``) is labelled ``k``. When it is not, even
  the model's most confident pixels of ``k`` are relabelled.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from . import _space, reference


@dataclass(frozen=True)
class ClassReport:
    index: int
    name: str
    pixels: float | None            # pixels counted (decayed in online mode); None when unknown
    weight: float                   # W[k]
    empty: bool                     # never the argmax in the data seen
    self_probability: float | None  # P[k][k]; None for a skipped class, and at the limit T = inf
    nearest: int | None             # the nearest other prototype (None: no other prototype)
    distance: float | None          # Euclidean distance to it
    predictable: bool
    keeps_certain: bool | None      # is p = e_k labelled k (None for a skipped class)


# the kinds of warning, by a phrase of their text (the summary line counts them)
_KINDS = (("never the argmax", "empty"), ("pixels behind its prototype", "with too few pixels"),
          ("prototype equals", "duplicated"), ("even a pixel certain", "relabelling its certain pixels"),
          ("its prototype holds more", "impure"), ("calibration can barely tell", "too-close pair"))


@dataclass
class Diagnostics:
    classes: list[ClassReport]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"classes": [asdict(c) for c in self.classes], "warnings": list(self.warnings)}

    def summary(self) -> str:
        """One line first: the classes, how many warn, and the warnings by kind."""
        if not self.warnings:
            return f"{len(self.classes)} classes, no warnings"
        kinds: dict = {}
        for warning in self.warnings:
            kind = next((k for text, k in _KINDS if text in warning), "other")
            kinds[kind] = kinds.get(kind, 0) + 1
        return (f"{len(self.classes)} classes, {len(self.warnings)} warning(s): "
                + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))

    def __str__(self) -> str:
        lines = [self.summary(),
                 f"{'class':14s}{'pixels':>12s}{'weight':>12s}{'P[k][k]':>9s}  {'nearest':14s}{'distance':>9s}"]
        for c in self.classes:
            pixels = "?" if c.pixels is None else f"{c.pixels:.0f}"
            own = "-" if c.self_probability is None else f"{c.self_probability:.3f}"
            near = "-" if c.nearest is None else self.classes[c.nearest].name
            distance = "-" if c.distance is None else f"{c.distance:.3f}"
            lines.append(f"{c.name[:13]:14s}{pixels:>12s}{c.weight:12.4g}{own:>9s}  {near[:13]:14s}{distance:>9s}")
        lines += [f"warning: {w}" for w in self.warnings] or ["no warnings"]
        return "\n".join(lines)


def diagnose(S: torch.Tensor, W: torch.Tensor, N: torch.Tensor, empty: str, class_names=None, *,
             min_pixels: float = 1000, min_distance: float = 0.2, temperature: float = 1.0) -> Diagnostics:
    """The per-class report and its warnings: classes with fewer than ``min_pixels`` pixels (or
    none), prototypes closer than ``min_distance``, classes never predicted, and classes whose
    certain pixels are relabelled.

    Defaults: 1000 pixels is a small object in one image; two one-hot prototypes are sqrt(2) apart
    and 0.2 is under a seventh of that (on the demo's target the closest pair is about 0.5 apart).
    At the limit ``temperature=math.inf`` the prototypes are means of centred logits, not
    probabilities: no class has an own probability, and distances are in logit units.
    """
    S, W, N = S.detach().double().cpu(), W.detach().double().cpu(), N.detach().double().cpu()
    C = W.shape[0]
    names = [str(n) for n in class_names] if class_names is not None else [f"class {k}" for k in range(C)]
    if len(names) != C:
        raise ValueError(f"class_names: expected {C} names, got {len(names)}")
    limit = _space.is_limit(temperature)
    P = reference.prototypes_from_stats(S, W, empty, temperature).double()
    skipped = torch.isnan(P).all(dim=1)
    distance = torch.cdist(torch.nan_to_num(P, nan=0.0), torch.nan_to_num(P, nan=0.0))
    distance[skipped] = math.inf
    distance[:, skipped] = math.inf
    distance.fill_diagonal_(math.inf)
    certain_labels = reference.predict(torch.eye(C, dtype=torch.float32)[:, :, None] * 1e4, P.float(),
                                       temperature)[:, 0]

    classes, warnings = [], []
    for k in range(C):
        pixels = None if math.isnan(float(N[k])) else float(N[k])
        nearest = int(distance[k].argmin()) if bool(torch.isfinite(distance[k]).any()) else None
        duplicate_of = [j for j in range(k) if not skipped[j] and torch.equal(P[j], P[k])]
        report = ClassReport(
            index=k, name=names[k], pixels=pixels, weight=float(W[k]), empty=bool(W[k] == 0),
            self_probability=None if skipped[k] or limit else float(P[k, k]),
            nearest=nearest, distance=None if nearest is None else float(distance[k, nearest]),
            predictable=not bool(skipped[k]) and not duplicate_of,
            keeps_certain=None if skipped[k] else int(certain_labels[k]) == k,
        )
        classes.append(report)
        if report.empty:
            warnings.append(
                f"{names[k]}: never the argmax in the data seen; " + (
                    ("it is never predicted (empty='skip')" if empty == "skip" else
                     "it is never predicted at the limit T = inf while another class has statistics")
                    if skipped[k] else
                    "it keeps the one-hot prototype, so only pixels more certain of it than any seen get it"))
        elif pixels is not None and pixels < min_pixels:
            warnings.append(f"{names[k]}: only {pixels:.0f} pixels behind its prototype (fewer than {min_pixels:g}); "
                            "calibrate on more target images")
        if duplicate_of:
            warnings.append(f"{names[k]}: its prototype equals {names[duplicate_of[0]]}'s, so it is never predicted")
        if report.keeps_certain is False:
            warnings.append(f"{names[k]}: even a pixel certain of it is labelled {names[int(certain_labels[k])]}")
        if report.self_probability is not None and not report.empty and bool(P[k].argmax() != k):
            warnings.append(f"{names[k]}: its prototype holds more {names[int(P[k].argmax())]} "
                            f"({float(P[k].max()):.2f}) than {names[k]} ({report.self_probability:.2f})")
    for j in range(C):
        for k in range(j + 1, C):
            if float(distance[j, k]) < min_distance:
                warnings.append(f"{names[j]} and {names[k]}: prototypes {float(distance[j, k]):.3f} apart "
                                f"(under {min_distance:g}); calibration can barely tell them apart")
    return Diagnostics(classes, warnings)
