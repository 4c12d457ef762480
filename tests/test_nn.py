"""``fastcal.nn.LabelCalibration`` in each mode, against ``LabelCalibrator`` used by hand."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fastcal
from fastcal.nn import LabelCalibration

C = 5


def small_model(output="tensor", stride=1):
    """Conv + batch norm + dropout: eval mode matters (dropout, running statistics)."""
    torch.manual_seed(1)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=stride), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Dropout2d(0.5), nn.Conv2d(8, C, 1))
    body[1].running_mean.normal_()
    body[1].running_var.uniform_(0.5, 2.0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, images):
            logits = self.body(images) * 3
            if output == "dict":
                return {"out": logits, "aux": logits[:, :1]}
            if output == "object":
                return SimpleNamespace(logits=logits, hidden_states=None)
            return logits

    return Model()


def batches(count=4, size=(12, 14)):
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(2, 3, *size, generator=generator) for _ in range(count)]


def logits_of(model, images):
    model.eval()
    with torch.no_grad():
        return fastcal.adapters.model_logits(model(images))


@pytest.mark.parametrize("output", ["tensor", "dict", "object"])
def test_offline_mode_is_fit_then_fixed_prototypes(output):
    model = small_model(output)
    wrapper = LabelCalibration(model, C, mode="offline", temperature=1.5)
    loader = [(images, "labels are ignored") for images in batches()]
    wrapper.fit(loader, progress=False)
    by_hand = fastcal.LabelCalibrator(C, temperature=1.5)
    for images, _ in loader:
        by_hand.update(logits_of(model, images))
    for images in batches(2, (9, 11)):
        torch.testing.assert_close(wrapper(images), by_hand.predict(logits_of(model, images)), rtol=0, atol=0)
    torch.testing.assert_close(wrapper.calibrator.S, by_hand.S, rtol=0, atol=0)  # forward learned nothing
    assert wrapper.calibrator.num_updates == len(loader)


def test_offline_mode_refuses_to_predict_before_fit():
    with pytest.raises(RuntimeError, match="fit"):
        LabelCalibration(small_model(), C, mode="offline")(batches(1)[0])


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_continual_mode_updates_then_predicts(momentum):
    model = small_model()
    wrapper = LabelCalibration(model, C, mode="continual", momentum=momentum)
    by_hand = fastcal.LabelCalibrator(C, momentum=momentum)
    for images in batches():
        logits = logits_of(model, images)
        by_hand.update(logits)
        torch.testing.assert_close(wrapper(images), by_hand.predict(logits), rtol=0, atol=0)
    torch.testing.assert_close(wrapper.calibrator.S, by_hand.S, rtol=0, atol=0)
    wrapper.reset()
    assert wrapper.calibrator.num_updates == 0 and not wrapper.calibrator.S.any()


def test_continual_mode_starts_from_fit_and_resets_to_it():
    model = small_model()
    wrapper = LabelCalibration(model, C, mode="continual").fit(batches(2), progress=False)
    fitted_S = wrapper.calibrator.S.clone()
    for images in batches(3, (8, 8)):
        wrapper(images)
    assert wrapper.calibrator.num_updates == 5
    wrapper.reset()
    assert wrapper.calibrator.num_updates == 2
    torch.testing.assert_close(wrapper.calibrator.S, fitted_S, rtol=0, atol=0)


def test_episodic_mode_calibrates_each_batch_alone():
    model = small_model()
    wrapper = LabelCalibration(model, C, mode="episodic")
    for images in batches():
        torch.testing.assert_close(wrapper(images), fastcal.calibrate(logits_of(model, images)), rtol=0, atol=0)
    assert wrapper.calibrator.num_updates == 0
    with pytest.raises(ValueError, match="episodic"):
        wrapper.fit(batches(1))


@pytest.mark.parametrize("mode", ["continual", "episodic"])
def test_scores_output_argmax_is_the_label(mode):
    model = small_model()
    labels = LabelCalibration(model, C, mode=mode)
    scores = LabelCalibration(model, C, mode=mode, output="scores")
    for images in batches(2):
        got = scores(images)
        assert got.shape == (2, C, 12, 14) and got.dtype == torch.float32
        assert (got.argmax(1) == labels(images)).float().mean() > 0.999


def test_model_stays_in_eval_mode_without_gradients_and_unchanged():
    model = small_model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    wrapper = LabelCalibration(model, C, mode="continual").train()
    assert wrapper.training and not model.training
    images = batches(1)[0].requires_grad_()
    first, second = wrapper(images), wrapper(images)
    assert not first.requires_grad and images.grad is None
    assert all(p.grad is None for p in model.parameters())
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0)
    # dropout is off: the same batch twice gives the same logits (second call: two updates, same prototypes)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_upsampling_to_the_input_size():
    model = small_model(stride=2)
    wrapper = LabelCalibration(model, C, mode="episodic", size="input", align_corners=True)
    images = batches(1, (16, 20))[0]
    labels = wrapper(images)
    assert labels.shape == (2, 16, 20)
    expected = fastcal.calibrate(logits_of(model, images), size=(16, 20), align_corners=True)
    torch.testing.assert_close(labels, expected, rtol=0, atol=0)


def test_state_dict_carries_the_statistics():
    model = small_model()
    wrapper = LabelCalibration(model, C, mode="continual", momentum=0.5).fit(batches(2), progress=False)
    wrapper(batches(1, (6, 6))[0])
    state = wrapper.state_dict()
    assert "_extra_state" in state and any(key.startswith("model.") for key in state)
    restored = LabelCalibration(small_model(), C, mode="continual", momentum=0.5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.calibrator.S, wrapper.calibrator.S, rtol=0, atol=0)
    images = batches(1, (7, 9))[0]
    torch.testing.assert_close(restored(images), wrapper(images), rtol=0, atol=0)
    restored.reset()
    assert restored.calibrator.num_updates == 2  # the fit came along too
    with pytest.raises(ValueError, match="mode"):
        LabelCalibration(small_model(), C, mode="offline").load_state_dict(state)


def test_bad_arguments_and_outputs():
    with pytest.raises(TypeError, match="model"):
        LabelCalibration(lambda x: x, C)
    with pytest.raises(ValueError, match="mode"):
        LabelCalibration(small_model(), C, mode="online")
    with pytest.raises(ValueError, match="momentum"):
        LabelCalibration(small_model(), C, mode="offline", momentum=0.1)

    class ReturnsTuple(nn.Module):
        def forward(self, images):
            return (images,)

    with pytest.raises(TypeError, match="model output"):
        LabelCalibration(ReturnsTuple(), 3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="loader"):
        LabelCalibration(small_model(), C, mode="offline").fit([["not", "tensors"]], progress=False)


def test_fit_shows_progress_on_a_terminal_only(capsys, monkeypatch):
    import sys

    wrapper = LabelCalibration(small_model(), C, mode="offline")
    wrapper.fit(batches(2), progress=True)
    assert capsys.readouterr().err == ""  # stderr is no terminal here (a log): quiet
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    wrapper.fit(batches(2), progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and "/2 " in err  # fit_calibrator's bar, knowing the batch count
    assert wrapper.calibrator.num_updates == 2
    wrapper.fit(batches(2), progress=False)
    assert capsys.readouterr().err == ""  # quiet when asked


def test_arguments_are_checked_when_the_wrapper_is_built():
    for kwargs, error, message in [({"size": (0, 0)}, ValueError, "size: expected positive"),
                                   ({"size": "Input"}, TypeError, "size: expected a"),
                                   ({"scale_factor": -2}, ValueError, "scale_factor: expected positive"),
                                   ({"size": "input", "scale_factor": 2}, ValueError, "give one of them"),
                                   ({"align_corners": True}, ValueError, "align_corners: applies only")]:
        with pytest.raises(error, match=message):
            LabelCalibration(small_model(), C, **kwargs)


def test_episodic_mode_checks_the_class_count():
    wrapper = LabelCalibration(small_model(), C + 2, mode="episodic")
    with pytest.raises(ValueError, match=f"expected C={C + 2} classes"):
        wrapper(batches(1)[0])


def test_set_extra_state_refuses_what_is_not_a_state():
    wrapper = LabelCalibration(small_model(), C)
    with pytest.raises(TypeError, match="state: expected the dict"):
        wrapper.set_extra_state(5)


def test_fit_calibrator_refuses_options_it_would_ignore():
    from fastcal.fit import fit_calibrator

    calibrator = fastcal.LabelCalibrator(C)
    with pytest.raises(TypeError, match="temperature"):
        fit_calibrator(small_model(), batches(1), C, calibrator=calibrator, temperature=-5, progress=False)
    with pytest.raises(ValueError, match="num_classes"):
        fit_calibrator(small_model(), batches(1), 9, calibrator=calibrator, progress=False)
    assert calibrator.num_updates == 0
    fit_calibrator(small_model(), batches(1), C, calibrator=calibrator, progress=False)
    assert calibrator.num_updates == 1
