"""``fastcal study``: the paper's open questions, answered on the demo's procedural domains.

1. **Confidence weighting.** Target mIoU against the confidence power γ (each pixel weighs
   ``conf ** γ``; the paper's γ = 1; γ = 0 is the plain mean of soft labels).
2. **How many unlabelled images.** Target mIoU against the number of target images the
   calibrator sees (random subsets of the pool, several seeds: mean, spread).
3. **A drifting stream.** Batches whose shift grows step by step (source -> target -> a darker,
   noisier, washed-out "severe" domain); each batch is labelled by the argmax, by a cumulative
   calibrator and by calibrators with momentum (updated with the batch, then predicting it), and by
   episodic calibration (the batch alone).
4. **Failure modes.** A target where one class (car) never appears, and a shift so strong that
   the model's outputs, and so the prototypes, collapse: what the diagnostics say, and what
   calibration does to mIoU.
5. **The temperature.** mIoU against ``T`` (0.5 to 256, and the limit ``T = inf``) on the demo's
   target, on the drifting stream's middle and last steps, on the severe domain, and on the source
   fitted on other source images (what calibration costs without a shift).
7. **The limit.** How close the largest finite ``T`` gets to ``T = inf`` and the time the limit
   saves; and whether a label-free signal (the share of the unlabelled pool whose label
   calibration at T = 1 changes) can switch between T = 1 and T = inf on graded shifts (blends of
   source and target at 0, 0.25, 0.5, 0.75, 1): its regret against the best T per shift.
6. **Knowing when calibration helps, without labels.** Every calibration the study scores (every
   domain, step, subset, power and temperature above) is a case with a measured gain (calibrated
   minus argmax mIoU); beside it, signals computed without labels: the fraction of pixels the
   calibration relabels, the prototypes' purity (mean ``P[k][k]``), the closest two prototypes'
   distance, the mean distance of a pixel to its nearest prototype, and the mean entropy of ``p``.
   Their Spearman rank correlations with the gain say which, if any, tracks it.

The model is the demo's (trained once on the source, from the seed); everything is generated,
nothing is downloaded. Writes ``results.json``, ``report.md`` and PNG figures into ``--out``.
Differences of mIoU are in points (pt).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _cli
from ..calibrator import LabelCalibrator
from .demo import DemoConfig, report, trained_model
from .demo.network import logits_of
from .demo.scenes import CAR, CLASSES, SEVERE, SOURCE, TARGET, blend, make_split


@dataclass
class StudyConfig:
    seed: int = 0
    demo: DemoConfig = None          # the model and the image size (default: the demo's)
    pool_images: int = 96            # unlabelled target images to calibrate on
    test_images: int = 96            # held-out labelled target images
    powers: tuple = (0.0, 0.5, 1.0, 2.0, 4.0)
    image_counts: tuple = (1, 2, 4, 8, 16, 32, 64, 96)
    subset_seeds: int = 8
    drift_steps: int = 10
    drift_batch: int = 32
    drift_streams: int = 3           # streams (seeds) averaged per step
    momenta: tuple = (0.2, 0.5)
    temperatures: tuple = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, math.inf)
    shifts: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)   # the limit question's blends of source and target
    switch_share: float = 0.005      # the switch rule: T = inf when calibration at T = 1 relabels more
    regret_bound: float = 0.003      # offered as an option only within this regret (mIoU) at every shift

    def __post_init__(self):
        if self.demo is None:
            self.demo = DemoConfig(seed=self.seed)


def drifting_domain(t: float):
    """Source at t = 0, the demo's target at t = 0.5, the severe domain at t = 1."""
    return blend(SOURCE, TARGET, 2 * t, "drift") if t <= 0.5 else blend(TARGET, SEVERE, 2 * t - 1, "drift")


# Failure modes: the target without cars, and a shift that collapses the model's outputs.
NO_CARS = replace(TARGET, name="target without cars", cars=0.0)
COLLAPSE = replace(SEVERE, name="collapse", noise=0.35, light=(0.08, 0.25), texture=0.3)


class Study:
    def __init__(self, config: StudyConfig, progress: bool = True):
        self.config, self.progress = config, progress
        self.model, self.train_seconds = trained_model(config.demo, progress)
        self.seed = config.seed * 1000 + 500
        self.cases = []  # (question, gain, signals) of every calibration scored: question 6

    def scored(self, question: str, calibrator: LabelCalibrator, logits, labels) -> float:
        """The calibrated mIoU of ``logits``, kept with its gain over the argmax and the label-free
        signals of the same calibration (question 6)."""
        calibrated = calibrator.predict(logits)
        miou = report.miou(calibrated, labels)
        if math.isinf(calibrator.temperature):  # the signals are those of probabilities
            return miou
        gain = miou - report.miou(logits.argmax(1), labels)
        self.cases.append({"question": question, "gain": gain, **label_free_signals(calibrator, logits, calibrated)})
        return miou

    def images(self, domain, count: int, offset: int):
        d = self.config.demo
        return make_split(domain, count, d.height, d.width, self.seed + offset, progress=False)

    def logits(self, images):
        return logits_of(self.model, images)

    def fit(self, logits, **options) -> LabelCalibrator:
        return LabelCalibrator(len(CLASSES), **options).update(logits)

    def bar(self, iterable, desc):
        return tqdm(iterable, desc=desc, disable=not self.progress or None, leave=False)

    # ----- 1. the confidence power ---------------------------------------------------------
    def confidence_power(self, pool, test, test_labels) -> dict:
        rows = []
        for power in self.bar(self.config.powers, "confidence power"):
            calibrator = self.fit(pool, confidence_power=power)
            rows.append({"power": power, "miou": self.scored("confidence power", calibrator, test, test_labels)})
        return {"argmax": report.miou(test.argmax(1), test_labels), "rows": rows}

    # ----- 2. how many unlabelled images ----------------------------------------------------
    def image_count(self, pool, test, test_labels) -> dict:
        rows = []
        counts = [n for n in self.config.image_counts if n <= len(pool)]
        for n in self.bar(counts, "unlabelled images"):
            scores = []
            for s in range(self.config.subset_seeds if n < len(pool) else 1):
                chosen = torch.randperm(len(pool), generator=torch.Generator().manual_seed(s))[:n]
                scores.append(report.miou(self.fit(pool[chosen]).predict(test), test_labels))
            scores = np.array(scores)
            rows.append({"images": n, "mean": float(scores.mean()), "std": float(scores.std()),
                         "min": float(scores.min()), "max": float(scores.max()), "runs": len(scores)})
        return {"argmax": report.miou(test.argmax(1), test_labels), "rows": rows}

    # ----- 3. a drifting stream -------------------------------------------------------------
    def drift(self) -> dict:
        c = self.config
        methods = ["argmax", "cumulative", *[f"momentum {m:g}" for m in c.momenta], "episodic"]
        shifts = [step / (c.drift_steps - 1) for step in range(c.drift_steps)]
        scores = {m: np.zeros((c.drift_streams, c.drift_steps)) for m in methods}
        for stream in self.bar(range(c.drift_streams), "drifting streams"):
            online = {"cumulative": LabelCalibrator(len(CLASSES)),
                      **{f"momentum {m:g}": LabelCalibrator(len(CLASSES), momentum=m) for m in c.momenta}}
            for step, t in enumerate(shifts):
                images, labels = self.images(drifting_domain(t), c.drift_batch, 10_000 + 100 * stream + step)
                logits = self.logits(images)
                scores["argmax"][stream, step] = report.miou(logits.argmax(1), labels)
                scores["episodic"][stream, step] = self.scored("drift, episodic", self.fit(logits), logits, labels)
                for name, calibrator in online.items():
                    scores[name][stream, step] = self.scored(f"drift, {name}", calibrator.update(logits), logits,
                                                             labels)
        return {"shift": shifts, "mean": {m: s.mean(0).tolist() for m, s in scores.items()},
                "std": {m: s.std(0).tolist() for m, s in scores.items()}}

    # ----- 4. failure modes -----------------------------------------------------------------
    def failure_modes(self, pool, test, test_labels) -> dict:
        c = self.config
        out = {}
        no_cars_pool = self.logits(self.images(NO_CARS, c.pool_images, 20_000)[0])
        no_cars_test_images, no_cars_labels = self.images(NO_CARS, c.test_images, 20_001)
        no_cars_test = self.logits(no_cars_test_images)
        for empty in ("onehot", "skip"):
            calibrator = self.fit(no_cars_pool, empty=empty)
            diagnostics = calibrator.diagnostics(CLASSES)
            out[f"no cars, empty={empty}"] = {
                "argmax on no-car images": report.miou(no_cars_test.argmax(1), no_cars_labels),
                "calibrated on no-car images": self.scored("no cars", calibrator, no_cars_test, no_cars_labels),
                "argmax on images with cars": report.miou(test.argmax(1), test_labels),
                "calibrated on images with cars": report.miou(calibrator.predict(test), test_labels),
                "car IoU with cars, argmax": report.score(test.argmax(1), test_labels)["iou"]["car"],
                "car IoU with cars, calibrated": report.score(calibrator.predict(test), test_labels)["iou"]["car"],
                "car pixels seen": diagnostics.classes[CAR].pixels,
                "diagnostics": diagnostics.to_dict(),
            }
        collapse_pool = self.logits(self.images(COLLAPSE, c.pool_images, 30_000)[0])
        collapse_images, collapse_labels = self.images(COLLAPSE, c.test_images, 30_001)
        collapse_test = self.logits(collapse_images)
        calibrator = self.fit(collapse_pool)
        diagnostics = calibrator.diagnostics(CLASSES)
        out["collapse"] = {
            "argmax": report.miou(collapse_test.argmax(1), collapse_labels),
            "calibrated": self.scored("collapse", calibrator, collapse_test, collapse_labels),
            "smallest prototype distance": _closest(diagnostics),
            "smallest prototype distance on the target": _closest(self.fit(pool).diagnostics(CLASSES)),
            "diagnostics": diagnostics.to_dict(),
        }
        return out

    # ----- 5. the temperature ---------------------------------------------------------------
    def temperature(self, pool, test, test_labels) -> dict:
        c = self.config
        domains = [("target", pool, test, test_labels)]
        for name, t, offset in (("stream middle (shift 0.5)", 0.5, 40_000), ("stream end (shift 1)", 1.0, 40_100),
                                ("severe", None, 40_200), ("source (no shift)", 0.0, 40_300)):
            domain = SEVERE if t is None else drifting_domain(t)
            calib = self.logits(self.images(domain, c.pool_images // 2, offset)[0])
            images, labels = self.images(domain, c.test_images // 2, offset + 1)
            domains.append((name, calib, self.logits(images), labels))
        rows = []
        for name, calib, logits, labels in self.bar(domains, "temperature"):
            row = {"domain": name, "argmax": report.miou(logits.argmax(1), labels)}
            for T in c.temperatures:
                row[f"T={T:g}"] = self.scored(f"temperature, {name}", self.fit(calib, temperature=T), logits, labels)
            rows.append(row)
        return {"temperatures": list(c.temperatures), "rows": rows}

    # ----- 7. the limit -----------------------------------------------------------------------
    def limit(self, temperature: dict, test) -> dict:
        """How close finite temperatures get to the limit, the time it saves, and the switch rule."""
        c = self.config
        finite = [T for T in c.temperatures if not math.isinf(T)]
        closest = {row["domain"]: row[f"T={max(finite):g}"] - row["T=inf"] for row in temperature["rows"]}
        seconds = {}
        for T in (1.0, math.inf):
            LabelCalibrator(len(CLASSES), temperature=T).update(test).predict(test)  # warm
            start = time.perf_counter()
            for _ in range(3):
                LabelCalibrator(len(CLASSES), temperature=T).update(test).predict(test)
            seconds[f"T={T:g}"] = (time.perf_counter() - start) / 3
        rows = []
        for shift in self.bar(c.shifts, "graded shifts"):
            domain = blend(SOURCE, TARGET, shift, f"blend {shift:g}")
            offset = 50_000 + int(1000 * shift)
            calib = self.logits(self.images(domain, c.pool_images // 2, offset)[0])
            images, labels = self.images(domain, c.test_images // 2, offset + 1)
            logits = self.logits(images)
            row = {"shift": shift, "argmax": report.miou(logits.argmax(1), labels)}
            for T in c.temperatures:
                row[f"T={T:g}"] = report.miou(self.fit(calib, temperature=T).predict(logits), labels)
            paper = self.fit(calib)
            share = float((paper.predict(calib) != calib.argmax(1)).float().mean())  # no label used
            chosen = math.inf if share > c.switch_share else 1.0
            best = max(c.temperatures, key=lambda T: row[f"T={T:g}"])
            row.update({"relabelled at T=1": share, "switch chooses": chosen, "best T": best,
                        "regret": row[f"T={best:g}"] - row[f"T={chosen:g}"]})
            rows.append(row)
        worst = max(r["regret"] for r in rows)
        return {"largest finite T minus the limit": closest, "calibrate+predict seconds": seconds, "rows": rows,
                "switch share": c.switch_share, "worst regret": worst, "offered": worst <= c.regret_bound}

    # ----- 6. label-free signals ------------------------------------------------------------
    def signals(self) -> dict:
        gains = np.array([case["gain"] for case in self.cases])
        correlations = {name: _spearman(np.array([case[name] for case in self.cases]), gains) for name in SIGNALS}
        return {"cases": self.cases, "spearman": correlations}


SIGNALS = ("relabelled", "purity", "closest prototypes", "nearest distance", "entropy")
TRACKS = 0.7  # |Spearman| from which a signal is said to track the gain


def limit_finding(limit: dict, temperature: dict) -> str:
    """One line: the limit against T = 1 per domain, the closeness of the largest finite T, the
    time, and the switch rule's worst regret."""
    per_domain = "; ".join(f"{r['domain']} {report.points(r['T=1'], r['T=inf'])}" for r in temperature["rows"])
    close = max(abs(v) for v in limit["largest finite T minus the limit"].values())
    seconds = limit["calibrate+predict seconds"]
    offered = "within" if limit["offered"] else "beyond"
    return (f"T = inf against T = 1: {per_domain}; the largest finite T is within {100 * close:.1f} pt of the limit; "
            f"calibrate+predict {seconds['T=inf'] / seconds['T=1']:.2f}x the time of T = 1; switching on the share "
            f"relabelled at T = 1 (> {limit['switch share']:.1%}: T = inf) has a worst regret of "
            f"{100 * limit['worst regret']:.1f} pt over the graded shifts, {offered} the 0.3 pt bound")


def label_free_signals(calibrator: LabelCalibrator, logits: torch.Tensor, calibrated: torch.Tensor) -> dict:
    """What a user without labels can compute about one calibration of ``logits``: the purity and
    the closest pair as the calibrator's diagnostics report them."""
    p = torch.softmax(logits.float() / calibrator.temperature, dim=1)
    scores = calibrator.predict(logits, output="scores")
    report = calibrator.diagnostics()
    own = [c.self_probability for c in report.classes if c.self_probability is not None]
    return {"relabelled": float((calibrated != logits.argmax(1)).float().mean()),
            "purity": float(np.mean(own)),
            "closest prototypes": _closest(report),
            "nearest distance": float((-scores.amax(dim=1)).clamp_min(0).sqrt().mean()),
            "entropy": float(-(p * p.clamp_min(1e-12).log()).sum(dim=1).mean())}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _closest(diagnostics) -> float:
    """The distance between the two closest prototypes."""
    return min(c.distance for c in diagnostics.classes if c.distance is not None)


def run(config: StudyConfig, out: str, progress: bool = True, figures: bool = True) -> dict:
    """Every experiment; writes ``results.json``, ``report.md`` and (with ``figures``) the PNGs."""
    if figures:
        report.pyplot()  # say now, not after the work, if matplotlib is missing
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    study = Study(config, progress)
    pool = study.logits(study.images(TARGET, config.pool_images, 1)[0])
    test_images, test_labels = study.images(TARGET, config.test_images, 2)
    test = study.logits(test_images)
    results = {"config": {**asdict(config), "demo": asdict(config.demo)}, "classes": CLASSES,
               "train_seconds": study.train_seconds}
    results["confidence_power"] = study.confidence_power(pool, test, test_labels)
    results["image_count"] = study.image_count(pool, test, test_labels)
    results["drift"] = study.drift()
    results["failure_modes"] = study.failure_modes(pool, test, test_labels)
    results["temperature"] = study.temperature(pool, test, test_labels)
    results["limit"] = study.limit(results["temperature"], test)
    results["signals"] = study.signals()
    results["seconds"] = time.perf_counter() - start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if figures:
        write_figures(results, out)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(results, figures))
    return results


# ----- figures -------------------------------------------------------------------------------
FIGURES = {"confidence_power": "confidence_power.png", "image_count": "image_count.png", "drift": "drift.png",
           "failure_modes": "failure_modes.png", "temperature": "temperature.png", "signals": "signals.png"}


def write_figures(results: dict, out: str) -> None:
    plt = report.pyplot()

    power = results["confidence_power"]
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    axis.plot([r["power"] for r in power["rows"]], [100 * r["miou"] for r in power["rows"]], "o-",
              label="calibrated")
    axis.axhline(100 * power["argmax"], color="gray", linestyle="--", label="argmax")
    axis.set(xlabel="confidence power γ (pixel weight conf^γ)", ylabel="target mIoU (%)",
             title="Confidence weighting")
    axis.legend()
    _save(figure, plt, out, "confidence_power")

    count = results["image_count"]
    rows = count["rows"]
    n = [r["images"] for r in rows]
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    axis.fill_between(n, [100 * r["min"] for r in rows], [100 * r["max"] for r in rows], alpha=0.25,
                      label="min-max over subsets")
    axis.errorbar(n, [100 * r["mean"] for r in rows], yerr=[100 * r["std"] for r in rows], fmt="o-", capsize=3,
                  label="mean ± std")
    axis.axhline(100 * count["argmax"], color="gray", linestyle="--", label="argmax")
    axis.set_xscale("log", base=2)
    axis.set_xticks(n, [str(v) for v in n])
    axis.set(xlabel="unlabelled target images calibrated on", ylabel="target mIoU (%)",
             title="How many unlabelled images")
    axis.legend()
    _save(figure, plt, out, "image_count")

    drift = results["drift"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    argmax = np.array(drift["mean"]["argmax"])
    for method, mean in drift["mean"].items():
        style = "--" if method == "argmax" else "-"
        top.plot(drift["shift"], [100 * v for v in mean], style, marker="o", markersize=3, label=method)
        bottom.plot(drift["shift"], 100 * (np.array(mean) - argmax), style, marker="o", markersize=3, label=method)
    top.set(ylabel="mIoU of the batch (%)", title="A drifting stream")
    bottom.set(xlabel="shift (0 source, 0.5 the demo's target, 1 severe)", ylabel="change from argmax (pt)")
    bottom.axhline(0, color="gray", linewidth=0.5)
    top.legend(fontsize=8)
    _save(figure, plt, out, "drift")

    failures = results["failure_modes"]
    onehot, skip = failures["no cars, empty=onehot"], failures["no cars, empty=skip"]
    cases = [("no cars: no-car images", onehot["argmax on no-car images"], onehot["calibrated on no-car images"]),
             ("no cars: images with cars\n(empty='onehot')", onehot["argmax on images with cars"],
              onehot["calibrated on images with cars"]),
             ("no cars: images with cars\n(empty='skip')", skip["argmax on images with cars"],
              skip["calibrated on images with cars"]),
             ("collapse", failures["collapse"]["argmax"], failures["collapse"]["calibrated"])]
    figure, axis = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(cases))
    axis.bar(x - 0.2, [100 * c[1] for c in cases], 0.4, label="argmax", color="gray")
    axis.bar(x + 0.2, [100 * c[2] for c in cases], 0.4, label="calibrated")
    axis.set_xticks(x, [c[0] for c in cases], fontsize=8)
    axis.set(ylabel="mIoU (%)", title="Failure modes")
    axis.legend()
    _save(figure, plt, out, "failure_modes")

    temperature = results["temperature"]
    figure, axis = plt.subplots(figsize=(6, 3.8))
    temperatures = temperature["temperatures"]
    finite = [T for T in temperatures if not math.isinf(T)]
    where = [4 * max(finite) if math.isinf(T) else T for T in temperatures]  # the limit, drawn past the rest
    for row in temperature["rows"]:
        line, = axis.plot(where, [100 * row[f"T={T:g}"] for T in temperatures], "o-", label=row["domain"])
        axis.axhline(100 * row["argmax"], color=line.get_color(), linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_xticks(where, ["inf" if math.isinf(T) else f"{T:g}" for T in temperatures], fontsize=8)
    axis.set(xlabel="temperature T (dotted: argmax)", ylabel="mIoU (%)", title="The temperature")
    axis.legend(fontsize=7)
    _save(figure, plt, out, "temperature")

    signals = results["signals"]
    figure, axes = plt.subplots(1, len(SIGNALS), figsize=(3 * len(SIGNALS), 3), sharey=True)
    gains = [100 * case["gain"] for case in signals["cases"]]
    for axis, name in zip(axes, SIGNALS):
        axis.scatter([case[name] for case in signals["cases"]], gains, s=8)
        axis.axhline(0, color="gray", linewidth=0.5)
        axis.set(xlabel=name, title=f"Spearman {signals['spearman'][name]:+.2f}")
    axes[0].set_ylabel("gain over argmax (pt)")
    _save(figure, plt, out, "signals")


def _save(figure, plt, out: str, key: str) -> None:
    figure.tight_layout()
    figure.savefig(os.path.join(out, FIGURES[key]), dpi=110)
    plt.close(figure)


# ----- the report ----------------------------------------------------------------------------
def findings(results: dict) -> list[tuple[str, str]]:
    """``(question, answer)`` rows, each computed from the results."""
    rows = []
    power = results["confidence_power"]
    best = max(power["rows"], key=lambda r: r["miou"])
    paper = next((r for r in power["rows"] if r["power"] == 1.0), power["rows"][0])
    spread = max(r["miou"] for r in power["rows"]) - min(r["miou"] for r in power["rows"])
    rows.append(("Confidence weighting",
                 f"best γ = {best['power']:g} ({report.points(paper['miou'], best['miou'])} over "
                 f"γ = {paper['power']:g}); all γ tried span {100 * spread:.1f} pt; "
                 f"argmax {_pct(power['argmax'])}, γ = {paper['power']:g} {_pct(paper['miou'])}"))

    count = results["image_count"]["rows"]
    argmax = results["image_count"]["argmax"]
    always = [r["images"] for r in count if all(q["min"] > argmax for q in count if q["images"] >= r["images"])]
    rows.append(("Unlabelled images needed",
                 (f"every subset of {always[0]} or more images beats the argmax" if always
                  else "no subset size beats the argmax on every draw")
                 + f"; 1 image: {_pct(count[0]['mean'])} ± {100 * count[0]['std']:.1f}, "
                 f"{count[-1]['images']} images: {_pct(count[-1]['mean'])} (argmax {_pct(argmax)})"))

    drift = results["drift"]["mean"]
    mean = {m: float(np.mean(v)) for m, v in drift.items()}
    best_method = max((m for m in mean if m != "argmax"), key=mean.get)
    rows.append(("Drifting stream",
                 f"best over the stream: {best_method} ({report.points(mean['argmax'], mean[best_method])} over "
                 "argmax on average); at the most severe step: "
                 + ", ".join(f"{m} {_pct(v[-1])}" for m, v in drift.items())))

    failures = results["failure_modes"]
    no_cars, skip = failures["no cars, empty=onehot"], failures["no cars, empty=skip"]
    rows.append(("A class absent from the target (car)",
                 f"{no_cars['car pixels seen']:.0f} pixels taken as car; on images with cars, car IoU "
                 f"{_pct(no_cars['car IoU with cars, argmax'])} argmax, "
                 f"{_pct(no_cars['car IoU with cars, calibrated'])} calibrated (onehot), "
                 f"{_pct(skip['car IoU with cars, calibrated'])} (skip); no-car images "
                 + report.points(no_cars["argmax on no-car images"], no_cars["calibrated on no-car images"])))

    collapse = failures["collapse"]
    rows.append(("Collapsing prototypes",
                 f"closest prototypes {collapse['smallest prototype distance']:.3f} apart "
                 f"(target: {collapse['smallest prototype distance on the target']:.3f}); "
                 f"mIoU {_pct(collapse['argmax'])} argmax, {_pct(collapse['calibrated'])} calibrated "
                 f"({report.points(collapse['argmax'], collapse['calibrated'])}); "
                 f"diagnostic warnings: {len(collapse['diagnostics']['warnings'])}"))

    temperature = results["temperature"]
    best = []
    for row in temperature["rows"]:
        T = max(temperature["temperatures"], key=lambda t: row[f"T={t:g}"])
        best.append(f"{row['domain']} T = {T:g} ({report.points(row['T=1'], row[f'T={T:g}'])} over T = 1)")
    rows.append(("Choosing the temperature", "best per domain: " + "; ".join(best)))
    limit = results["limit"]
    rows.append(("The limit T = inf", limit_finding(limit, temperature)))

    rows.append(("Knowing when it helps, without labels", signals_finding(results["signals"])))
    return rows


def tracking_signals(signals: dict) -> list[str]:
    """The label-free signals whose rank correlation with the gain reaches :data:`TRACKS`."""
    return [name for name, r in signals["spearman"].items() if r == r and abs(r) >= TRACKS]


def signals_finding(signals: dict) -> str:
    correlations = ", ".join(f"{name} {r:+.2f}" for name, r in signals["spearman"].items())
    tracking = tracking_signals(signals)
    verdict = (f"{', '.join(tracking)} track(s) the gain (|Spearman| >= {TRACKS})" if tracking
               else f"no signal tracks the gain (every |Spearman| < {TRACKS})")
    return f"{verdict} over {len(signals['cases'])} calibrations; Spearman with the gain: {correlations}"


def _format(key: str, value) -> str:
    """A failure-mode figure: pixel counts whole, distances to 3 decimals, the rest (mIoU, IoU) in %."""
    if value is None:
        return "n/a"
    if "pixels" in key:
        return f"{value:.0f}"
    if "distance" in key:
        return f"{value:.3f}"
    return _pct(value)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown(results: dict, figures: bool = True) -> str:
    lines = ["# fastcal study", "",
             f"Seed {results['config']['seed']}; the demo's model (trained in {results['train_seconds']:.0f} s); "
             f"whole study {results['seconds']:.0f} s. mIoU differences in points (pt).", "",
             "| question | finding |", "|---|---|"]
    lines += [f"| {q} | {a} |" for q, a in findings(results)]
    power = results["confidence_power"]
    lines += ["", "## 1. Confidence weighting", "", "| γ | target mIoU | vs argmax |", "|---|---|---|"]
    lines += [f"| {r['power']:g} | {100 * r['miou']:.1f}% | {report.points(power['argmax'], r['miou'])} |"
              for r in power["rows"]]
    count = results["image_count"]
    lines += ["", "## 2. How many unlabelled images", "", "| images | mean | std | min | max | runs |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['images']} | {100 * r['mean']:.1f}% | {100 * r['std']:.1f} pt | {100 * r['min']:.1f}% | "
              f"{100 * r['max']:.1f}% | {r['runs']} |" for r in count["rows"]]
    lines += ["", f"argmax: {100 * count['argmax']:.1f}%"]
    drift = results["drift"]
    methods = list(drift["mean"])
    lines += ["", "## 3. A drifting stream", "", "| shift | " + " | ".join(methods) + " |",
              "|---" * (len(methods) + 1) + "|"]
    lines += [f"| {t:.2f} | " + " | ".join(f"{100 * drift['mean'][m][i]:.1f}%" for m in methods) + " |"
              for i, t in enumerate(drift["shift"])]
    lines += ["", "## 4. Failure modes", ""]
    for name, case in results["failure_modes"].items():
        figures_of_case = {k: v for k, v in case.items() if k != "diagnostics"}
        lines.append(f"**{name}**: " + "; ".join(f"{k} {_format(k, v)}" for k, v in figures_of_case.items()))
        lines += [f"- diagnostics: {w}" for w in case["diagnostics"]["warnings"]] or ["- diagnostics: no warnings"]
        lines.append("")
    temperature = results["temperature"]
    names = [f"T={T:g}" for T in temperature["temperatures"]]
    lines += ["## 5. The temperature", "", "| domain | argmax | " + " | ".join(names) + " |",
              "|---" * (len(names) + 2) + "|"]
    lines += [f"| {r['domain']} | {_pct(r['argmax'])} | " + " | ".join(_pct(r[n]) for n in names) + " |"
              for r in temperature["rows"]]
    signals = results["signals"]
    lines += ["", "## 6. Knowing when calibration helps, without labels", "",
              signals_finding(signals), "", "| signal | Spearman with the gain |", "|---|---|"]
    lines += [f"| {name} | {r:+.2f} |" for name, r in signals["spearman"].items()]
    gains = [c["gain"] for c in signals["cases"]]
    lines += ["", f"Gains over the {len(gains)} calibrations: from {100 * min(gains):+.1f} to "
              f"{100 * max(gains):+.1f} pt, {sum(g < 0 for g in gains)} of them below the argmax."]
    limit = results["limit"]
    shifts = limit["rows"]
    lines += ["", "## 7. The limit", "", limit_finding(limit, temperature), "",
              "| shift | argmax | " + " | ".join(names) + " | relabelled at T=1 | switch | best T | regret |",
              "|---" * (len(names) + 6) + "|"]
    lines += [f"| {r['shift']:g} | {_pct(r['argmax'])} | " + " | ".join(_pct(r[n]) for n in names)
              + f" | {r['relabelled at T=1']:.2%} | T = {r['switch chooses']:g} | {r['best T']:g} "
              f"| {100 * r['regret']:.1f} pt |" for r in shifts]
    lines.append("")
    if figures:
        lines += ["## Figures", ""] + [f"![{key}]({name})" for key, name in FIGURES.items()]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="study-out", type=_cli.output_folder,
                        help="folder for results.json, report.md and the figures, created if missing "
                             "(default study-out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and the model (default 0)")
    parser.add_argument("--temperatures", nargs="+", type=_cli.temperature, metavar="T",
                        default=list(StudyConfig.temperatures),
                        help="the temperatures the temperature and limit questions sweep: positive numbers or "
                             "inf, the limit; 1 and inf are always included (default: 0.5 to 256 and inf)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNGs (no matplotlib needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    temperatures = tuple(sorted(set(args.temperatures) | {1.0, math.inf}))
    results = run(StudyConfig(seed=args.seed, temperatures=temperatures), args.out, progress=not args.quiet,
                  figures=not args.no_figures)
    print("\n".join(f"{q}: {a}" for q, a in findings(results)))
    print(f"\nwrote {os.path.join(args.out, 'report.md')}, results.json"
          + ("" if args.no_figures else " and " + ", ".join(FIGURES.values())) + f" in {results['seconds']:.0f} s")
    return 0
