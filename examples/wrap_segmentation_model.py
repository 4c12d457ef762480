"""Wrap a torchvision segmentation model in ``fastcal.nn.LabelCalibration``, in each mode.

    python examples/wrap_segmentation_model.py [--model lraspp|deeplabv3|small] [--size 128]

The model has random weights (nothing is downloaded), so its labels mean nothing; the point
is the code: how each mode is driven, and that the wrapper accepts torchvision's
``{"out": logits}`` and upsamples the logits to the input size on the fly. torchvision's
models need torchvision; ``--model small`` (the default when torchvision cannot be imported)
is a two-layer network with the same output convention.
"""
import argparse
import sys

import torch
from torch import nn

from fastcal.nn import LabelCalibration

NUM_CLASSES = 19


class SmallSegmenter(nn.Module):
    """Logits at 1/4 of the input, returned as torchvision's models return them."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, num_classes, 1))
        nn.init.normal_(self.body[-1].weight, std=2.0)  # untrained, but with confident, varied logits

    def forward(self, images):
        return {"out": self.body(images)}


def build_model(name: str) -> nn.Module:
    if name == "small":
        return SmallSegmenter(NUM_CLASSES)
    from torchvision.models import segmentation

    if name == "lraspp":
        model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    else:
        model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                          num_classes=NUM_CLASSES, aux_loss=False)
    return HeadResolution(model)


class HeadResolution(nn.Module):
    """A torchvision segmentation model without its final ``F.interpolate`` to the input size:
    fastcal upsamples on the fly instead (``size="input"``), and the full-size logits are never
    written. Its ``forward`` is the model's, minus that interpolation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        features = self.model.backbone(images)
        return {"out": self.model.classifier(features)}


def images_of_a_target_domain(count: int, size: int, seed: int):
    """Unlabelled batches: smooth random scenes, darker and noisier than anything 'trained on'."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        coarse = torch.rand(2, 3, size // 16, size // 16, generator=generator)
        scene = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        yield scene * 0.5 + 0.1 * torch.randn(2, 3, size, size, generator=generator)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    try:
        import torchvision  # noqa: F401

        default = "lraspp"
    except Exception:  # not installed, or built for another torch
        default = "small"
    parser.add_argument("--model", choices=["lraspp", "deeplabv3", "small"], default=default)
    parser.add_argument("--size", type=int, default=128, help="image height and width (default 128)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args.model)
    print(f"model: {args.model} ({type(model).__name__}), {NUM_CLASSES} classes, images {args.size}x{args.size}")

    # offline: statistics of a few unlabelled target batches, then fixed prototypes
    offline = LabelCalibration(model, NUM_CLASSES, mode="offline", size="input")
    offline.fit(images_of_a_target_domain(4, args.size, seed=1), progress=False)
    # continual: every batch updates the statistics, then is predicted (a drifting stream: momentum)
    continual = LabelCalibration(model, NUM_CLASSES, mode="continual", momentum=0.2, size="input")
    # episodic: every batch is calibrated on its own
    episodic = LabelCalibration(model, NUM_CLASSES, mode="episodic", size="input", output="scores")

    for step, images in enumerate(images_of_a_target_domain(3, args.size, seed=2)):
        with torch.no_grad():
            plain = nn.functional.interpolate(model(images)["out"], size=images.shape[-2:], mode="bilinear")
        argmax = plain.argmax(1)
        labels = {"offline": offline(images), "continual": continual(images), "episodic": episodic(images).argmax(1)}
        changed = ", ".join(f"{mode} {100 * (found != argmax).float().mean():5.1f}%" for mode, found in labels.items())
        print(f"batch {step}: labels {tuple(labels['offline'].shape)}; changed from the argmax: {changed}")
    print(f"continual statistics after the stream: {continual.calibrator!r}")
    continual.reset()
    print(f"after reset(): {continual.calibrator.num_updates} updates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
