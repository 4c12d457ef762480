"""The mmsegmentation recipe of docs/recipes.md with the real library: a segmentor built from
mmsegmentation 1.2.2's SegFormer-B0 Cityscapes config (random weights, nothing downloaded), its data
preprocessor with and without test-time padding, the padding mask, and slide inference.

mmsegmentation is not a fastcal dependency and installs only beside mmcv-lite 2.1.0::

    pip install mmsegmentation==1.2.2 mmcv-lite==2.1.0 mmengine ftfy
    python examples/mmsegmentation_recipe.py

mmcv-lite has no compiled ops, which mmsegmentation imports (``mmcv.ops``) but a SegFormer never
calls: this script stands in an empty module for them.
"""
import glob
import os
import sys
import types

import torch


class _NoCompiledOps(types.ModuleType):
    def __getattr__(self, name):  # mmcv-lite has no compiled ops; a SegFormer never calls them
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


sys.modules["mmcv.ops"] = _NoCompiledOps("mmcv.ops")

import mmseg  # noqa: E402  (after the stand-in for mmcv.ops)
from mmengine import Config  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import fastcal  # noqa: E402
from fastcal.fit import fit_calibrator  # noqa: E402

register_all_modules()
root = os.path.dirname(mmseg.__file__)
path = glob.glob(os.path.join(root, ".mim", "configs", "segformer", "*b0*cityscapes*.py"))[0]
cfg = Config.fromfile(path)
cfg.model.pretrained = None
cfg.model.backbone.init_cfg = None
print("config:", os.path.basename(path), "test_cfg of the preprocessor:", cfg.model.data_preprocessor.get("test_cfg"))
torch.manual_seed(0)
model = MODELS.build(cfg.model).eval()


def batch(sizes):
    inputs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in sizes]
    samples = []
    for h, w in sizes:
        sample = SegDataSample()
        sample.set_metainfo({"img_shape": (h, w), "ori_shape": (h, w)})  # as the test pipeline sets them
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


# 1. without test_cfg: no padding; a batch of two sizes is refused
data = model.data_preprocessor(batch([(200, 300), (200, 300)]), False)
print("no test_cfg: inputs", tuple(data["inputs"].shape))
try:
    model.data_preprocessor(batch([(200, 300), (180, 300)]), False)
except AssertionError as e:
    print("mixed sizes:", e)
# 2. with size_divisor: padding, masked by the recipe
model.data_preprocessor.test_cfg = dict(size_divisor=32)


def mmseg_logits(model, b):
    data = model.data_preprocessor(b, False)
    return model.encode_decode(data["inputs"], [s.metainfo for s in data["data_samples"]])


def not_padding(b):
    data = model.data_preprocessor(b, False)
    mask = torch.zeros(data["inputs"].shape[0], *data["inputs"].shape[-2:], dtype=torch.bool)
    for m, s in zip(mask, data["data_samples"]):
        m[: s.metainfo["img_shape"][0], : s.metainfo["img_shape"][1]] = True
    return mask


batches = [batch([(200, 300), (200, 300)]), batch([(170, 250)])]
data = model.data_preprocessor(batches[0], False)
print("size_divisor=32: inputs", tuple(data["inputs"].shape))
cal = fit_calibrator(model, batches, 19, logits=mmseg_logits, valid=not_padding, progress=False)
unpadded = 2 * 200 * 300 + 170 * 250
print("pixels counted", cal.num_pixels, "unpadded pixels", unpadded)
assert cal.num_pixels == unpadded
# 3. slide inference through test_step, per image
model.test_cfg = ConfigDict(mode="slide", crop_size=(128, 128), stride=(96, 96))
slide = fastcal.LabelCalibrator(19)
for b in batches:
    for sample in model.test_step(b):
        slide.update(sample.seg_logits.data[None])
print("slide: pixels", slide.num_pixels)
assert slide.num_pixels == unpadded
