"""fit_calibrator and the wrapper in a user's loop: masks through every entry point, and hooks for
the batch layouts and inference calls of mmsegmentation (a stand-in of its call signatures, which
behaves as its data preprocessor does) and MONAI (the real library)."""
from types import SimpleNamespace

import pytest
import torch

import fastcal
from fastcal.adapters import model_device
from fastcal.fit import fit_calibrator
from fastcal.nn import LabelCalibration

C = 5


class PixelModel(torch.nn.Module):
    """A per-pixel segmenter (1x1 convolutions): a pixel's logits depend on that pixel alone, so
    padding an image changes none of its own pixels' logits."""

    def __init__(self, channels=3, spatial_dims=2):
        super().__init__()
        conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
        self.body = torch.nn.Sequential(conv(channels, 8, 1), torch.nn.Tanh(), conv(8, C, 1))
        torch.nn.init.normal_(self.body[2].weight, std=3.0)

    def forward(self, x):
        return self.body(x)


def assert_same_sums(a, b):
    """Equal up to float32 sums in another order (the CPU loops add a block in float32; batches of
    other shapes run the model's GEMMs in other orders)."""
    torch.testing.assert_close(a.S, b.S, rtol=1e-5, atol=1e-5 * float(b.W.max()))
    torch.testing.assert_close(a.W, b.W, rtol=1e-5, atol=1e-5 * float(b.W.max()))
    assert a.num_pixels == b.num_pixels


# ----- mmsegmentation: pad to a size divisor, mask the padding -----------------------------------
class MMSegLike(PixelModel):
    """The call signature and the test-time behaviour of an mmsegmentation 1.x segmentor (1.2.2's
    ``SegDataPreProcessor``): ``data_preprocessor(data, training=False)`` normalises the images,
    asserts that a batch's images have one size, and pads them (bottom and right) only when
    ``test_cfg`` sets ``size_divisor`` or ``size``, else stacks them as they are; ``test_step(data)``
    returns one data sample per image with ``seg_logits.data`` [C, H, W] at the image's own size
    (padding removed); ``encode_decode(inputs, metas)`` gives the logits of the padded batch."""

    def __init__(self, test_cfg=None):
        super().__init__()
        self.test_cfg = {"size_divisor": 8} if test_cfg is None else test_cfg

    def data_preprocessor(self, data, training=False):
        inputs = [img.float() / 255.0 for img in data["inputs"]]
        assert all(i.shape[1:] == inputs[0].shape[1:] for i in inputs), "The image size in a batch should be the same."
        samples = [SimpleNamespace(metainfo={"img_shape": tuple(i.shape[-2:])}) for i in inputs]
        H, W = inputs[0].shape[-2:]
        if "size" in self.test_cfg:
            H, W = self.test_cfg["size"]
        elif "size_divisor" in self.test_cfg:
            divisor = self.test_cfg["size_divisor"]
            H, W = -(-H // divisor) * divisor, -(-W // divisor) * divisor
        padded = torch.stack([torch.nn.functional.pad(i, (0, W - i.shape[-1], 0, H - i.shape[-2]), value=0.5)
                              for i in inputs])
        for sample in samples:
            sample.metainfo["pad_shape"] = (H, W)
        return {"inputs": padded, "data_samples": samples}

    def encode_decode(self, inputs, batch_img_metas):
        return self(inputs)

    def test_step(self, data):
        data = self.data_preprocessor(data, False)
        logits = self.encode_decode(data["inputs"], [s.metainfo for s in data["data_samples"]])
        return [SimpleNamespace(seg_logits=SimpleNamespace(data=z[:, :s.metainfo["img_shape"][0],
                                                                :s.metainfo["img_shape"][1]]))
                for z, s in zip(logits, data["data_samples"])]


def mmseg_batches(seed=0):
    """Batches of same-size images (mmsegmentation asserts it at test time), sizes that the size
    divisor pads."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(13, 17), (9, 20)]
    return [{"inputs": [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(2)],
             "data_samples": [SimpleNamespace() for _ in range(2)]} for h, w in sizes]


def unpadded_calibrator(model, batches):
    cal = fastcal.LabelCalibrator(C)
    with torch.no_grad():
        for batch in batches:
            for img in batch["inputs"]:
                cal.update(model((img.float() / 255.0)[None]))
    return cal


def test_mmseg_padded_batches_with_the_padding_masked_give_the_unpadded_images_sums():
    torch.manual_seed(0)
    model = MMSegLike().eval()
    batches = mmseg_batches()

    def padded_logits(model, batch):
        data = model.data_preprocessor(batch, False)
        return model.encode_decode(data["inputs"], [s.metainfo for s in data["data_samples"]])

    def padding_mask(batch):
        data = model.data_preprocessor(batch, False)
        mask = torch.zeros(data["inputs"].shape[0], *data["inputs"].shape[-2:], dtype=torch.bool)
        for m, s in zip(mask, data["data_samples"]):
            m[:s.metainfo["img_shape"][0], :s.metainfo["img_shape"][1]] = True
        return mask

    masked = fit_calibrator(model, batches, C, logits=padded_logits, valid=padding_mask, progress=False)
    assert_same_sums(masked, unpadded_calibrator(model, batches))
    unmasked = fit_calibrator(model, batches, C, logits=padded_logits, progress=False)
    assert unmasked.num_pixels > masked.num_pixels  # the padding would have counted
    # without size_divisor (or size) in test_cfg the preprocessor pads nothing, and a batch of
    # images of several sizes is refused, as mmsegmentation does at test time
    plain = MMSegLike(test_cfg={}).eval()
    plain.load_state_dict(model.state_dict())
    assert plain.data_preprocessor(batches[0])["inputs"].shape[-2:] == (13, 17)
    assert_same_sums(fit_calibrator(plain, batches, C, logits=padded_logits, progress=False),
                     unpadded_calibrator(model, batches))
    mixed = {"inputs": [batches[0]["inputs"][0], batches[1]["inputs"][0]], "data_samples": [None, None]}
    with pytest.raises(AssertionError, match="should be the same"):
        plain.data_preprocessor(mixed)


def test_mmseg_test_step_logits_through_the_hook():
    """mmseg's own inference (``test_step``: slide or whole, padding removed) as the logits hook."""
    torch.manual_seed(0)
    model = MMSegLike().eval()
    batches = mmseg_batches(1)
    cal = fastcal.LabelCalibrator(C)

    def per_image(model, batch):  # images of different sizes: one update per image
        for sample in model.test_step(batch):
            cal.update(sample.seg_logits.data[None])
        return torch.empty(0, C, 1, 1)  # nothing more to count for the batch

    fit_calibrator(model, batches, C, calibrator=cal, logits=per_image, progress=False)
    assert_same_sums(cal, unpadded_calibrator(model, batches))
    with pytest.raises(TypeError, match="data preprocessor"):
        fit_calibrator(model, batches, C, progress=False)


# ----- MONAI (the real library): sliding-window inference over volumes, a body mask -------------
def test_monai_sliding_window_inference_of_a_unet_with_a_body_mask(tmp_path):
    """A real ``monai.networks.nets.UNet`` (3-D, 14 classes, random weights) through the real
    ``monai.inferers.sliding_window_inference``, with the body mask in MONAI's own forms
    ([N, 1, D, H, W], float and uint8): only body voxels are counted, the wrapper agrees, and the
    rank-5 head in ONNX Runtime labels as the calibrator."""
    import monai  # the test extra installs it: a missing one fails the test
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from fastcal.export import calibration_head, export_onnx

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=14, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    body = torch.zeros(2, 1, 24, 20, 16)
    body[:, :, 4:20, 3:17, 2:14] = 1.0  # a box of body, the rest air
    volumes = [{"image": torch.randn(2, 1, 24, 20, 16), "body_mask": body if i == 0 else body.to(torch.uint8)}
               for i in range(2)]

    def infer(model, batch):
        return sliding_window_inference(batch["image"], (16, 16, 16), 4, model, overlap=0.25)

    cal = fit_calibrator(net, volumes, 14, valid="body_mask", logits=infer, progress=False)
    assert cal.num_pixels == int(body.sum()) * len(volumes)  # the body's voxels, no more
    expected = fastcal.LabelCalibrator(14)
    with torch.no_grad():
        for v in volumes:
            expected.update(infer(net, v), v["body_mask"][:, 0] > 0)
    assert_same_sums(cal, expected)
    wrapper = LabelCalibration(net, 14, mode="offline", logits=lambda model, x: sliding_window_inference(
        x, (16, 16, 16), 4, model, overlap=0.25))
    wrapper.fit(volumes, images=lambda b: b["image"], valid="body_mask", progress=False)
    assert_same_sums(wrapper.calibrator, expected)
    with torch.no_grad():
        logits = infer(net, volumes[0])
    assert torch.equal(wrapper(volumes[0]["image"]), cal.predict(logits))
    import onnxruntime

    export_onnx(calibration_head(cal), logits, tmp_path / "head.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    labels = torch.from_numpy(session.run(None, {"input": logits.numpy()})[0])
    assert labels.shape == (2, 24, 20, 16)
    assert (labels == cal.predict(logits)).float().mean() > 0.999
    assert monai.__version__


# ----- every form of valid; masked pixels change nothing -----------------------------------------
def test_every_form_of_valid_gives_the_same_sums_and_masked_pixels_change_nothing():
    torch.manual_seed(0)
    model = PixelModel().eval()
    fov = torch.rand(12, 16) > 0.4  # one field of view for every image
    batches = [{"image": torch.randn(2, 3, 12, 16), "mask": fov.expand(2, 12, 16).clone()} for _ in range(3)]
    expected = fastcal.LabelCalibrator(C)
    with torch.no_grad():
        for b in batches:
            expected.update(model(b["image"]), fov.expand(2, 12, 16))
    for valid in (fov, fov.expand(2, 12, 16), "mask", lambda batch: batch["mask"]):
        assert_same_sums(fit_calibrator(model, batches, C, valid=valid, progress=False), expected)
    garbage = [{**b, "image": torch.where(fov, b["image"], torch.full_like(b["image"], 1e4))} for b in batches]
    assert_same_sums(fit_calibrator(model, garbage, C, valid="mask", progress=False), expected)
    with pytest.raises(TypeError, match="valid"):
        fit_calibrator(model, batches, C, valid=fov.to(torch.complex64), progress=False)
    with pytest.raises(ValueError, match="no field 'nope'"):
        fit_calibrator(model, batches, C, valid="nope", progress=False)


def test_valid_at_the_output_size_with_upsampling():
    torch.manual_seed(0)
    model = PixelModel().eval()
    images = [torch.randn(2, 3, 6, 8) for _ in range(2)]
    valid = torch.rand(12, 16) > 0.5
    cal = fit_calibrator(model, images, C, size=(12, 16), valid=valid, progress=False)
    expected = fastcal.LabelCalibrator(C)
    with torch.no_grad():
        for x in images:
            expected.update(model(x), valid.expand(2, 12, 16), size=(12, 16))
    assert_same_sums(cal, expected)


def test_the_wrapper_takes_masks_and_hooks_in_fit_and_forward():
    torch.manual_seed(0)
    model = PixelModel().eval()
    images = torch.randn(2, 3, 10, 12)
    valid = torch.rand(2, 10, 12) > 0.5
    hooked = lambda model, x: {"out": model(x)}  # noqa: E731  (any output form the fit helper takes)
    with torch.no_grad():
        logits = model(images)
    continual = LabelCalibration(model, C, logits=hooked)
    labels = continual(images, valid=valid)
    reference = fastcal.LabelCalibrator(C).update(logits, valid)
    assert_same_sums(continual.calibrator, reference)
    assert torch.equal(labels, reference.predict(logits))
    episodic = LabelCalibration(model, C, mode="episodic")
    assert torch.equal(episodic(images, valid=valid), fastcal.calibrate(logits, valid=valid))
    offline = LabelCalibration(model, C, mode="offline", logits=hooked)
    offline.fit([{"image": images, "mask": valid}], valid="mask", progress=False)
    assert_same_sums(offline.calibrator, reference)
    with pytest.raises(ValueError, match="valid"):
        offline(images, valid=valid[:, :5])


def test_the_device_follows_the_model_and_a_plain_callable_leaves_images_where_they_are():
    assert model_device(PixelModel()) == torch.device("cpu")
    assert model_device(lambda x: x) is None
    seen = []
    fit_calibrator(lambda x: (seen.append(x.device), torch.randn(x.shape[0], C, 4, 4))[1],
                   [torch.randn(1, 3, 4, 4)], C, progress=False)
    assert seen == [torch.device("cpu")]


# ----- one form of masks and model outputs at every entry point ----------------------------------
def mask_forms(valid):
    """The same [N, H, W] mask as every form the entry points take."""
    N = valid.shape[0]
    first = valid[0]
    shared = first.expand(N, *first.shape)  # forms without the batch dim need one mask for all
    return [(shared, first), (valid, valid.unsqueeze(1)), (valid, valid.to(torch.uint8)),
            (valid, valid.float()), (valid, valid.unsqueeze(1).double())]


def test_every_entry_point_takes_every_form_of_a_mask():
    torch.manual_seed(0)
    model = PixelModel().eval()
    images = torch.randn(2, 3, 10, 12)
    with torch.no_grad():
        logits = model(images)
    for mask, form in mask_forms(torch.rand(2, 10, 12) > 0.4):
        expected = fastcal.LabelCalibrator(C).update(logits, mask)
        assert_same_sums(fastcal.LabelCalibrator(C).update(logits, form), expected)
        S, W = fastcal.prototype_stats(logits, valid=form)
        torch.testing.assert_close(S, expected.S) and torch.testing.assert_close(W, expected.W)
        assert torch.equal(fastcal.calibrate(logits, valid=form), fastcal.calibrate(logits, valid=mask))
        assert_same_sums(fit_calibrator(model, [images], C, valid=form, progress=False), expected)
        for valid in (form, lambda batch, form=form: form):
            continual = LabelCalibration(model, C)
            labels = continual(images, valid=valid)
            assert_same_sums(continual.calibrator, expected)
            assert torch.equal(labels, expected.predict(logits))
        offline = LabelCalibration(model, C, mode="offline").fit([images], valid=form, progress=False)
        assert_same_sums(offline.calibrator, expected)
    with pytest.raises(ValueError, match=r"valid: expected shape \(2, 10, 12\)"):
        fastcal.LabelCalibrator(C).update(logits, torch.ones(2, 2, 10, 12))
    with pytest.raises(TypeError, match="valid"):
        fastcal.LabelCalibrator(C).update(logits, torch.ones(2, 10, 12, dtype=torch.complex64))


def test_every_entry_point_takes_every_form_of_model_output():
    z = torch.randn(2, C, 6, 7) * 3
    expected = fastcal.LabelCalibrator(C).update(z)
    for output in ({"out": z}, SimpleNamespace(logits=z)):
        cal = fastcal.LabelCalibrator(C).update(output)
        assert_same_sums(cal, expected)
        assert torch.equal(cal.predict(output), expected.predict(z))
        assert torch.equal(fastcal.calibrate(output), fastcal.calibrate(z))
        torch.testing.assert_close(fastcal.prototype_stats(output), fastcal.prototype_stats(z))
        assert torch.equal(fastcal.predict(output, cal.prototypes), cal.predict(z))
    with pytest.raises(TypeError, match="logits"):
        fastcal.LabelCalibrator(C).update({"logits": z})


def test_an_images_hook_may_give_lists_and_dicts_of_images():
    from collections import namedtuple

    from fastcal.adapters import to_device

    torch.manual_seed(0)
    model = PixelModel().eval()
    batches = [{"views": [torch.randn(2, 3, 6, 7), torch.randn(2, 3, 6, 7)], "id": 3} for _ in range(2)]

    def two_views(views):
        return model(views[0]) + model(views[1])

    cal = fit_calibrator(two_views, batches, C, images=lambda batch: batch["views"], progress=False)
    expected = fastcal.LabelCalibrator(C)
    with torch.no_grad():
        for batch in batches:
            expected.update(two_views(batch["views"]))
    assert_same_sums(cal, expected)
    Pair = namedtuple("Pair", "image meta")
    moved = to_device({"a": [torch.ones(2), (torch.ones(1), "name")], "b": Pair(torch.ones(3), 7)}, "meta")
    assert moved["a"][0].is_meta and moved["a"][1][0].is_meta and moved["a"][1][1] == "name"
    assert isinstance(moved["b"], Pair) and moved["b"].image.is_meta and moved["b"].meta == 7


def test_a_failed_fit_changes_nothing():
    torch.manual_seed(0)
    model = PixelModel().eval()
    images = [torch.randn(2, 3, 6, 8) for _ in range(3)]

    def broken_loader():
        yield images[0]
        raise OSError("the disk went away")

    for mode in ("offline", "continual"):
        wrapper = LabelCalibration(model, C, mode=mode).fit(images, progress=False)
        if mode == "continual":
            wrapper(images[1])  # an update after the fit is kept too
        before = wrapper.calibrator.state_dict()
        labels = wrapper(images[2]) if mode == "offline" else None
        with pytest.raises(OSError, match="disk"):
            wrapper.fit(broken_loader(), progress=False)
        assert torch.equal(wrapper.calibrator.S, before["S"])
        assert wrapper.calibrator.num_updates == before["num_updates"]
        if labels is not None:
            assert torch.equal(wrapper(images[2]), labels)
        with pytest.raises(ValueError, match="gave no pixel to count"):
            wrapper.fit([], progress=False)
        assert torch.equal(wrapper.calibrator.S, before["S"])
    with pytest.raises(RuntimeError, match="call fit\\(loader\\)"):
        LabelCalibration(model, C, mode="offline")(images[0])


def test_size_input_beside_a_logits_hook_asks_for_the_images():
    model = PixelModel().eval()
    batches = [SimpleNamespace(pixels=torch.randn(1, 3, 6, 8))]
    with pytest.raises(ValueError, match="give images="):
        fit_calibrator(model, batches, C, logits=lambda m, b: m(b.pixels), size="input", progress=False)
    cal = fit_calibrator(model, batches, C, logits=lambda m, b: m(b.pixels), size="input",
                         images=lambda b: b.pixels, progress=False)
    assert cal.num_pixels == 48


def test_several_temperatures_from_one_pass_over_the_data():
    import math

    from fastcal.fit import fit_calibrators

    torch.manual_seed(0)
    model = PixelModel().eval()
    images = [torch.randn(2, 3, 6, 8) for _ in range(3)]
    calls = []
    counted = lambda x: (calls.append(1), model(x))[1]  # noqa: E731
    temperatures = (1.0, 4.0, math.inf)
    fitted = fit_calibrators(counted, images, C, temperatures=temperatures, empty="skip", progress=False)
    assert len(calls) == len(images) and list(fitted) == list(temperatures)
    for T, cal in fitted.items():
        alone = fit_calibrator(model, images, C, temperature=T, empty="skip", progress=False)
        assert cal.temperature == T and cal.empty == "skip"
        assert torch.equal(cal.S, alone.S) and torch.equal(cal.W, alone.W)
    with pytest.raises(ValueError, match="distinct"):
        fit_calibrators(model, images, C, temperatures=(1, 1.0), progress=False)
    with pytest.raises(TypeError, match="temperatures"):
        fit_calibrators(model, images, C, temperatures=2.0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        fit_calibrators(model, images, C, temperatures=(1.0, -1.0), progress=False)
    with pytest.raises(TypeError, match="temperatures= sets"):
        fit_calibrators(model, images, C, temperature=2.0, progress=False)
