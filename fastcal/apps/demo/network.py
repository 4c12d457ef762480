"""The demo's segmentation network, its training on the source domain, and its logits."""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm


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


def train(model: nn.Module, images, labels, steps: int, batch: int, seed: int, progress: bool = True) -> float:
    """Adam with a one-cycle schedule on random batches of the labelled ``images``; returns seconds."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="training on source", unit="step", disable=not progress or None, leave=False)
    for _ in bar:
        chosen = torch.randint(0, len(images), (batch,), generator=g)
        loss = nn.functional.cross_entropy(model(images[chosen]), labels[chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return time.perf_counter() - start


@torch.inference_mode()
def logits_of(model: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])
