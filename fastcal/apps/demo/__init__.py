"""The domain-shift demo: ``fastcal demo`` (or ``python -m fastcal demo``).

1. Procedural street scenes with exact labels, rendered in two domains: a clean
   synthetic "source" and a shifted "target" (another palette and textures,
   lighting, blur, sensor noise, and more cars and people).
2. A small fully-convolutional network is trained on the source only, then frozen.
3. :class:`~fastcal.LabelCalibrator` s are fitted on unlabelled target images, at T = 1 (the
   paper) and at the limit T = inf, from one pass (:func:`fastcal.fit.fit_calibrators`);
   argmax and calibrated labels are scored on held-out labelled target images, and on held-out
   source images, where calibration need not help.
4. ``demo-out/results.json`` holds every number; ``demo-out/panel.png`` shows
   target images, their ground truth, argmax and calibrated labels (needs matplotlib);
   ``demo-out/calibrator.pt`` is the target calibrator at ``--temperature`` (default 1), ready for
   ``fastcal export``.

Everything is generated from a seed; nothing is downloaded. The package's modules are reused by
``fastcal study``: :mod:`.scenes` (scenes and domains), :mod:`.network` (the model and its
training), :mod:`.report` (scores, tables, figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ... import _cli
from ...fit import fit_calibrators
from . import report
from .network import SegmentationNet, logits_of, train
from .scenes import CLASSES, SEVERE, SOURCE, TARGET, Domain, blend, make_split

__all__ = ["DemoConfig", "run", "main", "add_arguments", "CLASSES", "SOURCE", "TARGET", "SEVERE", "Domain",
           "blend", "make_split"]


@dataclass
class DemoConfig:
    seed: int = 0
    height: int = 48
    width: int = 96
    train_images: int = 384
    calib_images: int = 96       # unlabelled target images the calibrator sees
    test_images: int = 96        # held-out labelled images, in each domain
    steps: int = 300
    batch: int = 16
    channels: int = 24
    panel_images: int = 4
    temperature: float = 1.0     # the target calibrator saved as calibrator.pt (T = 1 and inf are always scored)


def split(config: DemoConfig, domain: Domain, count: int, seed: int, progress: bool = True):
    return make_split(domain, count, config.height, config.width, seed, progress)


def trained_model(config: DemoConfig, progress: bool = True):
    """The network trained on ``config.train_images`` source images; returns ``(model, seconds)``."""
    torch.manual_seed(config.seed)
    images, labels = split(config, SOURCE, config.train_images, config.seed * 1000 + 1, progress)
    model = SegmentationNet(len(CLASSES), config.channels)
    seconds = train(model, images, labels, config.steps, config.batch, config.seed + 1, progress)
    return model, seconds


def run(config: DemoConfig, out: str, device: str = "cpu", progress: bool = True, figures: bool = True) -> dict:
    """The whole demo; returns (and writes to ``out``) its results."""
    if figures:
        report.pyplot()  # before the work: say now if matplotlib is missing
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    model, train_seconds = trained_model(config, progress)
    model.to(device).eval()
    source_test = split(config, SOURCE, config.test_images, config.seed * 1000 + 2, progress)
    target_calib = split(config, TARGET, config.calib_images, config.seed * 1000 + 3, progress)
    target_test = split(config, TARGET, config.test_images, config.seed * 1000 + 4, progress)
    source_calib = split(config, SOURCE, config.calib_images, config.seed * 1000 + 5, progress)

    temperatures = tuple(dict.fromkeys((1.0, math.inf, float(config.temperature))))
    calib_start = time.perf_counter()
    loader = [target_calib[0][i:i + 32] for i in range(0, config.calib_images, 32)]  # images only
    fitted = fit_calibrators(model, loader, len(CLASSES), temperatures=temperatures, device=device,
                             progress=progress)
    calibrate_seconds = time.perf_counter() - calib_start
    calibrator, limit = fitted[1.0], fitted[math.inf]
    # the source domain calibrated as a user would: on unlabelled source images, held out from the test
    source_loader = [source_calib[0][i:i + 32] for i in range(0, config.calib_images, 32)]
    on_source = fit_calibrators(model, source_loader, len(CLASSES), temperatures=(1.0, math.inf), device=device,
                                progress=progress)

    results = {"config": asdict(config), "classes": CLASSES, "device": device,
               "train_seconds": train_seconds, "calibrate_seconds": calibrate_seconds,
               "missing_classes": [CLASSES[k] for k in calibrator.missing_classes],
               "diagnostics": calibrator.diagnostics(CLASSES).to_dict()}
    outputs = {}
    for name, (images, labels) in tqdm((("target", target_test), ("source", source_test)), desc="evaluating",
                                       unit="split", disable=not progress or None, leave=False):
        logits = logits_of(model, images.to(device))
        argmax = logits.argmax(dim=1).cpu()
        calibrated = calibrator.predict(logits).cpu()
        results[name] = {"argmax": report.score(argmax, labels), "calibrated": report.score(calibrated, labels),
                         "calibrated_limit": report.score(limit.predict(logits).cpu(), labels)}
        if name == "source":
            for kind, own in (("calibrated_on_source", on_source[1.0]), ("calibrated_on_source_limit",
                                                                         on_source[math.inf])):
                results[name][kind] = report.score(own.predict(logits).cpu(), labels)
        outputs[name] = (images, labels, logits, argmax, calibrated)
    results["seconds"] = time.perf_counter() - start

    if figures:
        images, labels, _, argmax, calibrated = outputs["target"]
        k = config.panel_images
        report.write_panel(os.path.join(out, "panel.png"), images[:k], labels[:k], argmax[:k], calibrated[:k])
    fitted[float(config.temperature)].save(os.path.join(out, "calibrator.pt"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    results["_outputs"] = outputs
    results["_calibrator"] = calibrator
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo-out", type=_cli.output_folder,
                        help="folder for results.json and panel.png, created if missing (default demo-out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and the training (default 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=_cli.device,
                        help="where the model and the calibration run: cpu, cuda or cuda:N (default: cuda if "
                             "available)")
    parser.add_argument("--steps", type=_cli.positive_int, default=DemoConfig.steps,
                        help="training steps (default %(default)s)")
    parser.add_argument("--temperature", type=_cli.temperature, default=1.0,
                        help="the temperature of the target calibrator saved as calibrator.pt: a positive number "
                             "or inf, the limit (default 1; T = 1 and inf are scored whatever it is)")
    parser.add_argument("--no-figures", action="store_true", help="skip panel.png (no matplotlib needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    config = DemoConfig(seed=args.seed, steps=args.steps, temperature=args.temperature)
    results = run(config, args.out, args.device, progress=not args.quiet, figures=not args.no_figures)
    print(report.demo_table(results))
    warnings = results["diagnostics"]["warnings"]
    print("\ncalibrator diagnostics: " + ("; ".join(warnings) if warnings else "no warnings"))
    wrote = ["results.json", "calibrator.pt"] + ([] if args.no_figures else ["panel.png"])
    print(f"\nwrote {', '.join(os.path.join(args.out, name) for name in wrote)}")
    state = os.path.join(args.out, "calibrator.pt")
    print(f"deploy the target calibrator (T = {args.temperature:g}) as an ONNX head:\n"
          f"  fastcal export {state} --out {os.path.join(args.out, 'head.onnx')}")
    return 0
