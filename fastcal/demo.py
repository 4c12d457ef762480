"""The domain-shift demo: ``fastcal demo`` (or ``python -m fastcal demo``).

1. Procedural street scenes with exact labels, rendered in two domains: a clean
   synthetic "source" and a shifted "target" (another palette and textures,
   lighting, blur, sensor noise, and more cars and people).
2. A small fully-convolutional network is trained on the source only, then frozen.
3. A :class:`~fastcal.LabelCalibrator` is fitted on unlabelled target images;
   argmax and calibrated labels are scored on held-out labelled target images,
   and on held-out source images, where calibration need not help.
4. ``demo-out/results.json`` holds every figure; ``demo-out/panel.png`` shows
   target images, their ground truth, argmax and calibrated labels.

Everything is generated from a seed; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from . import metrics
from ._png import write_png
from .fit import Progress, fit_calibrator

CLASSES = ["road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole"]
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, PERSON, POLE = range(len(CLASSES))
PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [107, 142, 35],
                    [70, 130, 180], [0, 0, 142], [220, 20, 60], [153, 153, 153]], dtype=np.uint8)


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


@dataclass(frozen=True)
class Domain:
    name: str
    colors: tuple           # per-class RGB in [0, 1]
    texture: float          # amplitude of per-class stripes and speckle
    noise: float            # sensor noise std
    blur: bool
    light: tuple            # (min, max) global brightness
    cars: float             # mean objects per image
    people: float


SOURCE = Domain("source", ((0.50, 0.25, 0.50), (0.95, 0.14, 0.91), (0.27, 0.27, 0.27), (0.42, 0.56, 0.14),
                           (0.27, 0.51, 0.71), (0.00, 0.00, 0.56), (0.86, 0.08, 0.24), (0.60, 0.60, 0.60)),
                texture=0.03, noise=0.0, blur=False, light=(0.95, 1.05), cars=1.2, people=1.5)
TARGET = Domain("target", ((0.35, 0.33, 0.38), (0.62, 0.50, 0.55), (0.45, 0.40, 0.33), (0.30, 0.42, 0.22),
                           (0.65, 0.72, 0.80), (0.25, 0.22, 0.45), (0.62, 0.30, 0.28), (0.45, 0.45, 0.42)),
                texture=0.12, noise=0.06, blur=True, light=(0.6, 1.15), cars=3.0, people=2.5)


def _scene(g: torch.Generator, H: int, W: int, domain: Domain) -> torch.Tensor:
    """One label map [H, W] (int64): sky, buildings and trees above a horizon, a road in
    perspective with sidewalks, and cars, people and poles scaled by their depth."""
    def u(a=0.0, b=1.0):
        return a + (b - a) * float(torch.rand((), generator=g))

    y = torch.arange(H)[:, None].expand(H, W).float()
    x = torch.arange(W)[None, :].expand(H, W).float()
    horizon = u(0.35, 0.5) * H
    label = torch.full((H, W), SKY, dtype=torch.int64)
    # buildings: a skyline of blocks standing on the horizon
    left = 0.0
    while left < W:
        right = left + u(0.1, 0.3) * W
        top = horizon - u(0.15, 0.9) * horizon
        label[(x >= left) & (x < right) & (y >= top)] = BUILDING
        left = right + u(0, 0.08) * W
    for _ in range(int(u(1, 4))):  # trees in front of the buildings
        cx, cy, r = u(0, W), horizon - u(0, 0.3) * H, u(0.05, 0.15) * H
        label[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = VEGETATION
    depth = ((y - horizon) / (H - horizon)).clamp(min=0)  # 0 at the horizon, 1 at the bottom
    ground = y >= horizon
    centre = W / 2 + u(-0.1, 0.1) * W
    road_half = depth * 0.55 * W + 1
    walk_half = road_half + depth * 0.2 * W + 1
    label[ground] = VEGETATION
    label[ground & ((x - centre).abs() < walk_half)] = SIDEWALK
    label[ground & ((x - centre).abs() < road_half)] = ROAD

    def box(cls, cx, bottom, w, h):
        label[(x >= cx - w / 2) & (x < cx + w / 2) & (y >= bottom - h) & (y < bottom)] = cls

    for _ in range(int(torch.poisson(torch.tensor(domain.cars), generator=g))):
        d = u(0.15, 1.0)
        bottom = horizon + d * (H - horizon)
        half = d * 0.55 * W
        box(CAR, centre + u(-0.8, 0.8) * half, bottom, 2 + d * 0.3 * W, 2 + d * 0.22 * H)
    for _ in range(2):
        d = u(0.2, 1.0)
        side = 1 if u() < 0.5 else -1
        cx = centre + side * (d * 0.55 * W + d * 0.17 * W)
        label[(x >= cx) & (x < cx + 1 + d * 1.5) & (y < horizon + d * (H - horizon)) & (y > horizon - 0.4 * H)] = POLE
    for _ in range(int(torch.poisson(torch.tensor(domain.people), generator=g))):
        d = u(0.2, 1.0)
        side = 1 if u() < 0.5 else -1
        cx = centre + side * (d * 0.55 * W + u(0.02, 0.18) * d * W)
        box(PERSON, cx, horizon + d * (H - horizon), 2 + d * 0.05 * W, 3 + d * 0.35 * H)
    return label


def _render(g: torch.Generator, label: torch.Tensor, domain: Domain) -> torch.Tensor:
    """RGB image [3, H, W] in [0, 1] of ``label`` in ``domain``'s style."""
    H, W = label.shape
    colors = torch.tensor(domain.colors)
    image = colors[label].permute(2, 0, 1).clone()  # [3, H, W]
    y = torch.arange(H)[:, None].float()
    x = torch.arange(W)[None, :].float()
    phase = torch.rand(len(CLASSES), generator=g) * 6.28
    freq = 0.3 + torch.rand(len(CLASSES), generator=g)
    stripes = torch.sin(freq[label] * (x + 0.5 * y) + phase[label])
    speckle = torch.rand(H, W, generator=g) - 0.5
    image += domain.texture * (stripes + speckle)[None]
    lo, hi = domain.light
    light = lo + (hi - lo) * float(torch.rand((), generator=g))
    gradient = 1 + 0.25 * (light - 1) * (x / W - 0.5) * 2
    image = image * light * gradient[None]
    if domain.blur:
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        image = torch.nn.functional.conv2d(image[None], kernel, padding=1, groups=3)[0]
    if domain.noise:
        image += domain.noise * torch.randn(image.shape, generator=g)
    return image.clamp(0, 1)


def make_split(domain: Domain, count: int, config: DemoConfig, seed: int, progress: bool = True):
    """``count`` (images [count, 3, H, W] float32, labels [count, H, W] int64) of ``domain``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, config.height, config.width)
    labels = torch.empty(count, config.height, config.width, dtype=torch.int64)
    bar = Progress(f"rendering {domain.name} ({count})", count, enabled=progress)
    for i in range(count):
        labels[i] = _scene(g, config.height, config.width, domain)
        images[i] = _render(g, labels[i], domain)
        bar.update()
    bar.close()
    return images, labels


class SegmentationNet(nn.Module):
    """A small fully-convolutional network: dilated 3x3 convolutions over RGB and the row
    coordinate (street scenes are laid out by height), then a 1x1 classifier."""

    def __init__(self, num_classes: int, channels: int = 24):
        super().__init__()
        layers, width = [], 4
        for dilation in (1, 2, 4, 8, 1):
            layers += [nn.Conv2d(width, channels, 3, padding=dilation, dilation=dilation),
                       nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
            width = channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        N, _, H, W = images.shape
        rows = torch.linspace(-1, 1, H, device=images.device).view(1, 1, H, 1).expand(N, 1, H, W)
        return self.head(self.body(torch.cat([images, rows], dim=1)))


def train(model: nn.Module, images, labels, config: DemoConfig, progress: bool = True) -> float:
    g = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=config.steps)
    model.train()
    bar = Progress("training on source", config.steps, enabled=progress)
    for _ in range(config.steps):
        batch = torch.randint(0, len(images), (config.batch,), generator=g)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update(note=f"loss {loss.item():.3f}")
    model.eval()
    return bar.close()


@torch.inference_mode()
def logits_of(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def score(pred: torch.Tensor, target: torch.Tensor) -> dict:
    confusion = metrics.confusion_matrix(pred, target, len(CLASSES))
    iou = metrics.iou_per_class(confusion)
    return {"miou": metrics.mean_iou(confusion), "pixel_accuracy": metrics.pixel_accuracy(confusion),
            "iou": {name: (None if math.isnan(v) else v) for name, v in zip(CLASSES, iou.tolist())}}


def colorize(labels: torch.Tensor) -> np.ndarray:
    return PALETTE[labels.cpu().numpy()]


def write_panel(path: str, images, truth, argmax, calibrated, scale: int = 3) -> None:
    """Rows of [image | ground truth | argmax | calibrated], upscaled ``scale`` times."""
    rows = []
    for i in range(len(images)):
        picture = (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        tiles = [picture, colorize(truth[i]), colorize(argmax[i]), colorize(calibrated[i])]
        gap = np.full((picture.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    panel = np.concatenate(rows[:-1], axis=0)
    write_png(path, panel.repeat(scale, axis=0).repeat(scale, axis=1))


def run(config: DemoConfig, out: str, device: str = "cpu", progress: bool = True) -> dict:
    """The whole demo; returns (and writes to ``out``) its results."""
    torch.manual_seed(config.seed)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    source_train = make_split(SOURCE, config.train_images, config, config.seed * 1000 + 1, progress)
    source_test = make_split(SOURCE, config.test_images, config, config.seed * 1000 + 2, progress)
    target_calib = make_split(TARGET, config.calib_images, config, config.seed * 1000 + 3, progress)
    target_test = make_split(TARGET, config.test_images, config, config.seed * 1000 + 4, progress)

    model = SegmentationNet(len(CLASSES), config.channels)
    train_seconds = train(model, *source_train, config, progress)
    model.to(device).eval()

    calib_start = time.perf_counter()
    loader = [target_calib[0][i:i + 32] for i in range(0, config.calib_images, 32)]  # images only
    calibrator = fit_calibrator(model, loader, len(CLASSES), device=device, progress=progress)
    calibrate_seconds = time.perf_counter() - calib_start

    results = {"config": asdict(config), "classes": CLASSES, "device": device,
               "train_seconds": train_seconds, "calibrate_seconds": calibrate_seconds,
               "missing_classes": [CLASSES[k] for k in calibrator.missing_classes]}
    outputs = {}
    bar = Progress("evaluating held-out images", 2, enabled=progress)
    for name, (images, labels) in (("target", target_test), ("source", source_test)):
        logits = logits_of(model, images.to(device))
        argmax = logits.argmax(dim=1).cpu()
        calibrated = calibrator.predict(logits).cpu()
        results[name] = {"argmax": score(argmax, labels), "calibrated": score(calibrated, labels)}
        outputs[name] = (images, labels, logits, argmax, calibrated)
        bar.update(note=name)
    bar.close()
    results["seconds"] = time.perf_counter() - start

    images, labels, _, argmax, calibrated = outputs["target"]
    k = config.panel_images
    write_panel(os.path.join(out, "panel.png"), images[:k], labels[:k], argmax[:k], calibrated[:k])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    results["_outputs"] = outputs
    results["_calibrator"] = calibrator
    return results


def report(results: dict) -> str:
    lines = ["", f"{'':18s}{'argmax mIoU':>12s}{'calibrated':>12s}{'change':>9s}"]
    for name in ("target", "source"):
        before, after = results[name]["argmax"]["miou"], results[name]["calibrated"]["miou"]
        lines.append(f"{name + ' (held out)':18s}{before:12.1%}{after:12.1%}{after - before:+9.1%}")
    lines.append("")
    lines.append(f"{'per-class IoU':18s}" + "".join(f"{c[:8]:>9s}" for c in CLASSES))
    for name in ("target", "source"):
        for kind in ("argmax", "calibrated"):
            iou = results[name][kind]["iou"]
            cells = "".join(f"{'-':>9s}" if iou[c] is None else f"{iou[c]:9.1%}" for c in CLASSES)
            lines.append(f"{name[:6] + ' ' + kind:18s}{cells}")
    lines.append("")
    lines.append(f"training: {results['train_seconds']:.1f} s; calibration "
                 f"({results['config']['calib_images']} unlabelled target images): {results['calibrate_seconds']:.2f} s; "
                 f"whole demo: {results['seconds']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastcal demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder for results.json and panel.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    config = DemoConfig(seed=args.seed, steps=args.steps)
    results = run(config, args.out, args.device, progress=not args.quiet)
    print(report(results))
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and {os.path.join(args.out, 'panel.png')}")
    return 0
