"""Calibration at the model's output resolution: every backend's fused bilinear upsampling against
F.interpolate and the float64 oracle (``oracle.interpolate``, PyTorch's rule in NumPy)."""
import pytest
import torch
import torch.nn.functional as F

import fastcal

import oracle
from cases import DTYPES, device_of, make_logits

FLOAT32_EPS = 2.0**-23
# (input H, W) and the resize: scale factors 4 and 8, a size that is no multiple of the input,
# a fractional factor, upsampling to a single row or column, factors under 2 and downsampling
# (where the CPU loops interpolate along x with gathers instead of bands)
RESIZES = [((9, 13), {"scale_factor": 4}), ((5, 7), {"scale_factor": 8}), ((11, 6), {"size": (50, 29)}),
           ((7, 10), {"scale_factor": 2.5}), ((6, 8), {"size": (1, 33)}), ((9, 13), {"size": (5, 20)}),
           ((12, 10), {"size": (5, 4)})]


def check(z, backend, temperature=1.0, valid=None, **resize):
    """Stats and labels of the upsampled logits against the oracle; returns the labels."""
    z_up = oracle.interpolate(z, resize.get("size"), resize.get("scale_factor"), resize.get("align_corners", False))
    S, W = fastcal.prototype_stats(z, temperature=temperature, valid=valid, backend=backend, **resize)
    oracle.assert_stats_close(S, W, *oracle.stats(z_up, temperature, None if valid is None else valid.cpu()))
    P = fastcal.prototypes_from_stats(S, W)
    labels = fastcal.predict(z, P, temperature=temperature, backend=backend, **resize)
    assert tuple(labels.shape) == tuple(z_up.shape[:1] + z_up.shape[2:])
    # float32 interpolation rounds each logit by a few ulps of the largest neighbour
    logit_error = 4 * FLOAT32_EPS * float(z.float().abs().max())
    oracle.assert_labels_match(labels, z_up, P, temperature, logit_error=logit_error)
    return labels


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_size, resize", RESIZES, ids=str)
def test_upsampled_stats_and_labels_match_oracle(backend, in_size, resize, align_corners):
    z = make_logits((2, 19, *in_size), device=device_of(backend))
    check(z, backend, align_corners=align_corners, **resize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_dtypes_layouts_masks_and_temperature(backend, dtype, layout):
    z = make_logits((2, 7, 9, 12), dtype, layout, device=device_of(backend))
    valid = torch.rand(2, 36, 48, device=z.device) > 0.3  # at the output resolution
    check(z, backend, temperature=1.7, valid=valid, scale_factor=4, align_corners=layout == "sliced")


@pytest.mark.parametrize("num_classes", [2, 150])
def test_class_counts(backend, num_classes):
    z = make_logits((1, num_classes, 6, 5), device=device_of(backend))
    check(z, backend, size=(13, 11))


def test_a_non_finite_logit_reaches_only_its_bilinear_neighbours(backend):
    z = make_logits((1, 19, 9, 40), device=device_of(backend))
    z[0, 4, 3, 5] = float("nan")
    z[0, 7, 6, 30] = float("inf")
    z_up = oracle.interpolate(z, None, 4, False)
    valid = torch.isfinite(z_up).all(dim=1).to(z.device)  # masks exactly the pixels F.interpolate makes non-finite
    assert 0 < int((~valid).sum()) < 200  # 8 x 8 output pixels each
    S, W = fastcal.prototype_stats(z, valid=valid, backend=backend, scale_factor=4)
    oracle.assert_stats_close(S, W, *oracle.stats(z_up, 1.0, valid.cpu()))
    P = fastcal.prototypes_from_stats(S, W)
    labels = fastcal.predict(z, P, backend=backend, scale_factor=4)
    pixels = z_up.permute(0, 2, 3, 1)[valid.cpu()]  # [M, C]: the finite pixels
    oracle.assert_labels_match(labels[valid].cpu(), pixels, P, logit_error=4 * FLOAT32_EPS * 20)


def test_calibrate_is_interpolate_then_calibrate(backend):
    z = make_logits((2, 19, 10, 12), device=device_of(backend))
    for align_corners in (False, True):
        fused = fastcal.calibrate(z, backend=backend, size=(37, 45), align_corners=align_corners)
        materialised = F.interpolate(z, size=(37, 45), mode="bilinear", align_corners=align_corners)
        S, W = fastcal.prototype_stats(materialised, backend="reference")
        oracle.assert_labels_match(fused, materialised, fastcal.prototypes_from_stats(S, W),
                                   logit_error=8 * FLOAT32_EPS * float(z.abs().max()))


def test_the_reference_is_f_interpolate_then_the_reference():
    z = make_logits((2, 5, 8, 9), torch.float16)
    for resize in ({"size": (30, 31), "align_corners": True}, {"scale_factor": 3.5}):
        up = F.interpolate(z.float(), mode="bilinear", **resize)
        S, W = fastcal.prototype_stats(z, backend="reference", **resize)
        S_up, W_up = fastcal.prototype_stats(up, backend="reference")
        assert torch.equal(S, S_up) and torch.equal(W, W_up)
        P = fastcal.prototypes_from_stats(S, W)
        assert torch.equal(fastcal.predict(z, P, backend="reference", **resize),
                           fastcal.predict(up, P, backend="reference"))


def test_calibrator_and_fit_pass_the_resize_through():
    z = make_logits((2, 6, 8, 8))
    cal = fastcal.LabelCalibrator(6).update(z, size=(32, 32), align_corners=True)
    assert cal.num_pixels == 2 * 32 * 32
    S, W = fastcal.prototype_stats(z, size=(32, 32), align_corners=True)
    assert torch.equal(cal.S, S)
    labels = cal.predict(z, size=(32, 32), align_corners=True)
    assert torch.equal(labels, fastcal.predict(z, cal.prototypes, size=(32, 32), align_corners=True))

    from fastcal.fit import fit_calibrator

    class Model(torch.nn.Module):  # a model whose logits come out at 1/4 of the input, HuggingFace-style
        def forward(self, images):
            return type("Output", (), {"logits": images[:, :, ::4, ::4]})()

    fitted = fit_calibrator(Model(), [z.repeat_interleave(4, 2).repeat_interleave(4, 3)], 6, progress=False,
                            size=(32, 32), align_corners=True)
    assert torch.equal(fitted.S, cal.S)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"size": (10, 10), "scale_factor": 2}, ValueError, "give one of them"),
    ({"size": (10, 0)}, ValueError, "size: expected positive"),
    ({"size": (10.5, 3)}, TypeError, "size: expected a integral"),
    ({"scale_factor": -2}, ValueError, "scale_factor: expected positive"),
    ({"scale_factor": 0.01}, ValueError, "leaves no output pixel"),
    ({"scale_factor": 2, "align_corners": 1}, TypeError, "align_corners: expected a bool"),
    ({"align_corners": True}, ValueError, "applies only with size"),
])
def test_bad_resize_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastcal.calibrate(torch.randn(1, 3, 4, 4), **kwargs)


def test_resize_needs_two_spatial_dims_and_a_valid_mask_at_the_output_size():
    with pytest.raises(ValueError, match=r"needs logits \[N, C, H, W\]"):
        fastcal.calibrate(torch.randn(2, 3, 4, 4, 4), size=(8, 8))
    with pytest.raises(ValueError, match=r"valid: expected shape \(1, 8, 8\) \(the output size\)"):
        fastcal.prototype_stats(torch.randn(1, 3, 4, 4), size=(8, 8), valid=torch.ones(1, 4, 4, dtype=torch.bool))
    cal = fastcal.LabelCalibrator(3)
    with pytest.raises(ValueError, match="valid: expected shape"):
        cal.update(torch.randn(1, 3, 4, 4), valid=torch.ones(1, 4, 4, dtype=torch.bool), size=(8, 8))
    assert cal.num_updates == 0


EMPTY_SOURCES = [((1, 4, 0, 8), {"size": (4, 4)}), ((1, 19, 0, 64), {"size": (512, 1024)}),
                 ((2, 4, 8, 0), {"size": (3, 5), "align_corners": True}), ((0, 4, 0, 0), {"size": (4, 4)}),
                 ((1, 4, 0, 8), {"scale_factor": 2})]


@pytest.mark.parametrize("shape, resize", EMPTY_SOURCES, ids=str)
def test_an_image_with_no_pixels_cannot_be_interpolated(backend, shape, resize):
    """One behaviour on every backend and every entry point: a ValueError, and nothing counted."""
    z = torch.zeros(shape, device=device_of(backend))
    message = "no pixels|leaves no output pixel"
    with pytest.raises(ValueError, match=message):
        fastcal.prototype_stats(z, backend=backend, **resize)
    with pytest.raises(ValueError, match=message):
        fastcal.calibrate(z, backend=backend, **resize)
    with pytest.raises(ValueError, match=message):
        fastcal.predict(z, torch.eye(shape[1], device=z.device), backend=backend, **resize)
    calibrator = fastcal.LabelCalibrator(shape[1], backend=backend)
    with pytest.raises(ValueError, match=message):
        calibrator.update(z, **resize)
    with pytest.raises(ValueError, match=message):
        calibrator.predict(z, **resize)
    assert calibrator.num_updates == 0 and calibrator.num_pixels == 0 and not calibrator.W.any()


def test_models_and_loaders_with_empty_outputs_count_nothing():
    """The model adapters (fit helper, wrapper) pass the same error on from a model whose output has
    no pixels, whatever form the batches and the output take."""
    from fastcal.fit import fit_calibrator
    from fastcal.nn import LabelCalibration

    class NoPixels(torch.nn.Module):
        def forward(self, images):
            return {"out": torch.zeros(images.shape[0], 3, 0, images.shape[-1])}

    images = torch.randn(2, 3, 4, 4)
    for loader in ([images], [(images, None)], [{"pixel_values": images}]):
        calibrator = fastcal.LabelCalibrator(3)
        with pytest.raises(ValueError, match="no pixels"):
            fit_calibrator(NoPixels(), loader, 3, calibrator=calibrator, size="input", progress=False)
        assert calibrator.num_updates == 0 and calibrator.num_pixels == 0
    for mode in ("continual", "episodic"):
        wrapper = LabelCalibration(NoPixels(), 3, mode=mode, size="input")
        with pytest.raises(ValueError, match="no pixels"):
            wrapper(images)
        assert wrapper.calibrator.num_pixels == 0
