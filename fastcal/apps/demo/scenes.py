"""Procedural street scenes with exact labels, rendered in a domain's style.

Each scene is a label map (sky, buildings and trees above a horizon, a road in perspective with
sidewalks, cars, people and poles scaled by their depth); a :class:`Domain` renders it: palette,
texture, lighting, blur, sensor noise and how many cars and people. Everything comes from a
seeded generator; nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

CLASSES = ["road", "sidewalk", "building", "vegetation", "sky", "car", "person", "pole"]
ROAD, SIDEWALK, BUILDING, VEGETATION, SKY, CAR, PERSON, POLE = range(len(CLASSES))
PALETTE = np.array([[128, 64, 128], [244, 35, 232], [70, 70, 70], [107, 142, 35],
                    [70, 130, 180], [0, 0, 142], [220, 20, 60], [153, 153, 153]], dtype=np.uint8)


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


def make_split(domain: Domain, count: int, height: int, width: int, seed: int, progress: bool = True):
    """``count`` (images [count, 3, H, W] float32, labels [count, H, W] int64) of ``domain``."""
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, height, width)
    labels = torch.empty(count, height, width, dtype=torch.int64)
    for i in tqdm(range(count), desc=f"rendering {domain.name}", unit="image", disable=not progress or None,
                  leave=False):
        labels[i] = _scene(g, height, width, domain)
        images[i] = _render(g, labels[i], domain)
    return images, labels


def blend(a: Domain, b: Domain, t: float, name: str | None = None) -> Domain:
    """The domain ``t`` of the way from ``a`` to ``b`` (``t`` in [0, 1]): colours, texture, noise,
    lighting and object counts interpolated; blur from halfway."""
    def mix(x, y):
        return (1 - t) * x + t * y

    return Domain(name or f"{a.name}->{b.name} {t:.2f}",
                  tuple(tuple(mix(x, y) for x, y in zip(ca, cb)) for ca, cb in zip(a.colors, b.colors)),
                  texture=mix(a.texture, b.texture), noise=mix(a.noise, b.noise), blur=(b.blur if t >= 0.5 else a.blur),
                  light=(mix(a.light[0], b.light[0]), mix(a.light[1], b.light[1])),
                  cars=mix(a.cars, b.cars), people=mix(a.people, b.people))


# A shift past the target: darker, noisier, the palette washed further (the study's drift and collapse).
SEVERE = replace(TARGET, name="severe",
                 colors=tuple(tuple(0.5 * c + 0.25 for c in rgb) for rgb in TARGET.colors),
                 texture=0.2, noise=0.18, light=(0.25, 0.6))
