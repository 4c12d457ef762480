"""fastcal.export: the calibration head in PyTorch, ONNX Runtime and torch.export, against the
calibrator and the float64 oracle; a real HuggingFace SegFormer exported with its calibration;
``fastcal export``."""
import math
import subprocess
import sys

import numpy as np
import onnxruntime as ort  # the test extra installs it (with transformers): a missing one fails the file
import pytest
import torch
import transformers

import fastcal
from fastcal.__main__ import main as cli
from fastcal.export import calibrated_model, calibration_head, dynamic_shapes, export_onnx
from fastcal.fit import fit_calibrator
from fastcal.nn import LabelCalibration

import oracle


def fitted(C, empty="onehot", seed=0):
    torch.manual_seed(seed)
    z = torch.randn(2, C, 12, 17) * 3
    if empty == "skip":
        z[:, C - 1] -= 100.0  # a class no pixel is assigned to
    return fastcal.LabelCalibrator(C, empty=empty, temperature=1.3).update(z)


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def assert_agree(labels, expected, logits, cal, resize):
    """Equal to the calibrator's labels wherever the nearest prototype is a clear winner, and within
    the float32 bound of the oracle's nearest everywhere (genuine near-ties may go either way)."""
    z = logits.double()
    reference = oracle.interpolate(z, **resize) if resize else z
    P = cal.prototypes
    oracle.assert_labels_match(labels, reference, P, cal.temperature, logit_error=1e-6 if resize else 0.0)
    clear = oracle.clear_winners(reference, P, cal.temperature)
    got, want = labels.reshape(-1).numpy(), expected.reshape(-1).numpy()
    assert np.array_equal(got[clear], want[clear])
    assert clear.mean() > 0.9


RESIZES = [{}, {"size": (29, 37)}, {"size": (29, 37), "align_corners": True}, {"scale_factor": 2.5}]


LAYOUTS = ["channels_last", "nchw"]


# every layout in float32; the half-precision inputs (cast in the graph) in the default layout
LAYOUT_DTYPES = [("channels_last", torch.float32), ("nchw", torch.float32), ("channels_last", torch.float16),
                 ("channels_last", torch.bfloat16)]


# the half-precision inputs (cast once, first thing in the graph) without and with one resize
HEAD_CASES = [(resize, layout, dtype) for resize in RESIZES for layout, dtype in LAYOUT_DTYPES
              if dtype == torch.float32 or resize in ({}, {"size": (29, 37)})]


@pytest.mark.parametrize("resize,layout,dtype", HEAD_CASES, ids=str)
@pytest.mark.parametrize("C,empty", [(2, "onehot"), (19, "skip"), (150, "onehot"), (256, "onehot")])
def test_head_labels_are_the_calibrators(C, empty, resize, dtype, layout):
    cal = fitted(C, empty)
    z = (torch.randn(2, C, 11, 13) * 3).to(dtype)
    head = calibration_head(cal, layout=layout, **resize)
    labels = head(z)
    assert labels.dtype == torch.int64
    assert_agree(labels, cal.predict(z, **resize), z.float(), cal, resize)
    if empty == "skip":
        assert not (labels == C - 1).any()


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_head_labels_in_the_dtype_users_store(layout, label_dtype):
    cal = fitted(19)
    z = torch.randn(2, 19, 9, 10) * 3
    labels = calibration_head(cal, layout=layout, label_dtype=label_dtype)(z)
    assert labels.dtype == label_dtype
    assert torch.equal(labels, cal.predict(z, label_dtype=label_dtype))
    with pytest.raises(ValueError, match="uint8"):
        calibration_head(fitted(300), label_dtype=torch.uint8)


@pytest.mark.parametrize("shape", [(2, 7, 5, 6, 7), (3, 7, 11), (0, 7, 4, 4)], ids=str)
def test_the_channels_last_head_takes_every_rank_predict_takes(shape):
    cal = fitted(7)
    z = torch.randn(shape) * 3
    labels = calibration_head(cal)(z)
    assert labels.shape == (shape[0], *shape[2:])
    if z.numel():
        assert_agree(labels, cal.predict(z), z, cal, {})
    if len(shape) != 4:
        with pytest.raises(ValueError, match="layout='nchw' takes"):
            calibration_head(cal, layout="nchw")(z)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("resize", RESIZES[:2], ids=str)
def test_head_scores_are_the_calibrators(resize, layout):
    cal = fitted(19, "skip")
    z = torch.randn(2, 19, 11, 13) * 3
    scores = calibration_head(cal, output="scores", layout=layout, **resize)(z)
    expected = cal.predict(z, output="scores", **resize)
    assert scores.dtype == torch.float32 and scores.shape == expected.shape
    assert torch.equal(torch.isinf(scores), torch.isinf(expected))  # the skipped class: -inf
    finite = torch.isfinite(expected)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=0, atol=1e-5)


def test_the_head_keeps_a_copy_of_the_prototypes():
    cal = fitted(5)
    z = torch.randn(1, 5, 8, 8) * 3
    head = calibration_head(cal, output="scores")
    before = head(z)
    cal.update(torch.randn(3, 5, 8, 8) * 5)
    assert torch.equal(head(z), before)


def test_bad_arguments_are_refused():
    cal = fitted(5)
    with pytest.raises(ValueError, match="output"):
        calibration_head(cal, output="probabilities")
    with pytest.raises(TypeError, match="calibrator"):
        calibration_head(torch.eye(5))
    with pytest.raises(ValueError):
        calibration_head(cal, size=(0, 4))
    with pytest.raises(ValueError, match="empty"):  # nothing to predict under "skip", as predict says
        calibration_head(fastcal.LabelCalibrator(5, empty="skip"))


# ----- ONNX Runtime and torch.export --------------------------------------------------------------
ONNX_CASES = [  # (C, empty, resize, dtype, layout): each exported once, run at other shapes
    (2, "onehot", {}, torch.float32, "channels_last"),
    (19, "skip", {"size": (29, 37)}, torch.float32, "channels_last"),
    (19, "onehot", {"size": (29, 37), "align_corners": True}, torch.float16, "channels_last"),
    (150, "onehot", {"scale_factor": 2.5}, torch.float32, "channels_last"),
    (256, "skip", {}, torch.float16, "channels_last"),
    (19, "skip", {"size": (29, 37)}, torch.float32, "nchw"),
    (150, "onehot", {}, torch.float16, "nchw"),
]
GRAPH_OPS = {"channels_last": {"Softmax", "MatMul", "ArgMax"}, "nchw": {"Softmax", "Conv", "ArgMax"}}


@pytest.mark.parametrize("C,empty,resize,dtype,layout", ONNX_CASES, ids=str)
def test_onnx_runtime_labels_are_the_calibrators(tmp_path, C, empty, resize, dtype, layout):
    cal = fitted(C, empty)
    path = tmp_path / "head.onnx"
    export_onnx(calibration_head(cal, layout=layout, **resize), (torch.randn(2, C, 8, 9) * 3).to(dtype), path)
    import onnx

    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert GRAPH_OPS[layout] <= {node.op_type for node in graph.graph.node}
    for shape in [(2, C, 11, 13), (1, C, 20, 7), (0, C, 5, 6)]:  # dynamic batch, height and width; empty
        z = (torch.randn(shape) * 3).to(dtype)
        labels = run_onnx(path, z)
        if shape[0]:
            assert_agree(labels, cal.predict(z, **resize), z.float(), cal, resize)
        else:
            assert labels.shape == cal.predict(z, **resize).shape


def test_onnx_runtime_volumes_and_random_logits_agree_on_nearly_every_pixel(tmp_path):
    """The goal the head is measured by: >= 99.99% of the calibrator's labels on random logits, for
    3-D logits [N, C, D, H, W] and float16 inputs too, in ONNX Runtime."""
    cal = fitted(19)
    for dtype, shape in ((torch.float32, (2, 19, 64, 96)), (torch.float16, (2, 19, 64, 96)),
                         (torch.float32, (2, 19, 8, 24, 32))):
        path = tmp_path / f"{dtype}-{len(shape)}.onnx"
        export_onnx(calibration_head(cal), (torch.randn(2, *shape[1:-2], 8, 9) * 3).to(dtype), path)
        z = (torch.randn(shape) * 3).to(dtype)
        labels, expected = run_onnx(path, z), cal.predict(z)
        assert labels.shape == expected.shape
        assert (labels == expected).float().mean() >= 0.9999


@pytest.mark.parametrize("layout", LAYOUTS)
def test_onnx_runtime_scores(tmp_path, layout):
    cal = fitted(19, "skip")
    export_onnx(calibration_head(cal, output="scores", layout=layout), torch.randn(2, 19, 8, 8),
                tmp_path / "scores.onnx")
    z = torch.randn(2, 19, 10, 12) * 3
    scores, expected = run_onnx(tmp_path / "scores.onnx", z), cal.predict(z, output="scores")
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isinf(scores), ~finite)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("resize", [{}, {"size": (29, 37)}, {"scale_factor": 2.5, "align_corners": True}], ids=str)
def test_torch_export_with_dynamic_batch_height_and_width(resize, layout):
    cal = fitted(19)
    head = calibration_head(cal, layout=layout, **resize)
    program = torch.export.export(head, (torch.randn(2, 19, 8, 9),), dynamic_shapes=dynamic_shapes(head))
    for shape in [(2, 19, 11, 13), (3, 19, 6, 20)]:
        z = torch.randn(shape) * 3
        assert torch.equal(program.module()(z), head(z))
        assert_agree(program.module()(z), cal.predict(z, **resize), z, cal, resize)


# ----- a model and its calibration as one graph ---------------------------------------------------
class Backbone(torch.nn.Module):
    """A small convolutional segmenter with logits at 1/4 of the input, returned as {"out": ...}."""

    def __init__(self, C=6):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(8, C, 3, stride=2, padding=1))

    def forward(self, x):
        return {"out": self.body(x) * 4}


def test_calibrated_model_exports_model_and_calibration_as_one_graph(tmp_path):
    torch.manual_seed(0)
    model = Backbone().eval()
    images = [torch.randn(2, 3, 32, 40) for _ in range(3)]
    cal = fit_calibrator(model, images, 6, size="input", progress=False)
    combined = calibrated_model(model, cal, size="input")
    export_onnx(combined, images[0], tmp_path / "model.onnx")
    x = torch.randn(2, 3, 36, 44)
    with torch.no_grad():
        logits = model(x)["out"]
    expected = cal.predict(logits, size=(36, 44))
    assert_agree(run_onnx(tmp_path / "model.onnx", x), expected, logits, cal, {"size": (36, 44)})
    program = torch.export.export(combined, (images[0],), dynamic_shapes=dynamic_shapes(combined))
    assert torch.equal(program.module()(x), combined(x))


def test_a_huggingface_segformer_with_its_calibration_in_onnx_runtime(tmp_path):
    """A real transformers SegformerForSemanticSegmentation (random weights from a small config, no
    download; logits at 1/4 of the input) through fit_calibrator, the wrapper and calibrated_model,
    exported to ONNX and run in ONNX Runtime."""
    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_labels=7, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                          num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16)
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():  # logits of a trained model's spread, not a random head's near-zero ones
        model.decode_head.classifier.weight.mul_(200.0)
    loader = [{"pixel_values": torch.randn(2, 3, 64, 64)} for _ in range(2)]
    cal = fit_calibrator(model, loader, 7, size="input", progress=False)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(x).logits
    assert logits.shape == (2, 7, 16, 24)
    expected = cal.predict(logits, size=(64, 96))
    wrapper = LabelCalibration(model, 7, mode="offline", size="input")
    wrapper.fit(loader, progress=False)
    assert torch.equal(wrapper.calibrator.S, cal.S)
    with torch.no_grad():
        assert torch.equal(wrapper(x), expected)
    combined = calibrated_model(model, cal, size=(64, 96))
    export_onnx(combined, x, tmp_path / "segformer.onnx")
    assert_agree(run_onnx(tmp_path / "segformer.onnx", x), expected, logits, cal, {"size": (64, 96)})


# ----- the command -----------------------------------------------------------------------------
def test_export_command_writes_a_head_onnx_runtime_runs(tmp_path, capsys):
    cal = fitted(19, "skip")
    cal.save(tmp_path / "state.pt")
    out = tmp_path / "head.onnx"
    assert cli(["export", str(tmp_path / "state.pt"), "--out", str(out), "--size", "29", "37",
                "--empty", "skip"]) == 0
    assert "wrote" in capsys.readouterr().out
    z = torch.randn(2, 19, 11, 13) * 3
    assert_agree(run_onnx(out, z), cal.predict(z, size=(29, 37)), z, cal, {"size": (29, 37)})


def test_export_command_refuses_missing_and_invalid_state_files(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "h.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "torn.pt").write_bytes(b"not a torch file")
    assert cli(["export", str(tmp_path / "torn.pt"), "--out", str(tmp_path / "h.onnx")]) == 2
    assert "not a readable fastcal state file" in capsys.readouterr().err
    torch.save({"format": "something else", "num_classes": 3}, tmp_path / "foreign.pt")
    assert cli(["export", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "h.onnx")]) == 2
    assert not (tmp_path / "h.onnx").exists()
    with pytest.raises(SystemExit) as error:
        cli(["export", str(tmp_path / "torn.pt"), "--out", str(tmp_path / "no-such-folder" / "h.onnx")])
    assert error.value.code == 2


def test_import_fastcal_imports_no_export_dependency():
    code = ("import sys, fastcal; bad = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'transformers') "
            "if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----- the edges: overflow, and what the command refuses -----------------------------------------
@pytest.mark.parametrize("temperature,scale", [(1.2e-38, 9.0), (0.01, 1e37), (3.0, 3e38)])
def test_the_head_agrees_where_predict_is_defined(tmp_path, temperature, scale):
    """Tiny temperatures and huge logits: the head subtracts the max first, as the kernels do."""
    torch.manual_seed(1)
    z = torch.randn(2, 5, 12, 13).clamp(-1, 1) * scale
    cal = fastcal.LabelCalibrator(5, temperature=temperature).update(z)
    head = calibration_head(cal)
    expected = cal.predict(z)
    assert torch.equal(head(z), expected)
    assert torch.equal(calibration_head(cal, layout="nchw")(z), expected)
    for layout in LAYOUTS:  # the max comes after the upsampling, as in the kernels
        resized = calibration_head(cal, layout=layout, size=(17, 19))(z)
        assert (resized == cal.predict(z, size=(17, 19))).float().mean() > 0.99
    export_onnx(head, z, tmp_path / "head.onnx")
    assert torch.equal(run_onnx(tmp_path / "head.onnx", z), expected)
    scores = calibration_head(cal, output="scores")(z)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("temperature", [0.5, 3.0])  # below 1 the max is subtracted first; from 1 on, not
def test_a_class_masked_out_with_minus_inf_has_probability_zero_in_every_head(tmp_path, temperature):
    """-inf logits (a class a model masks out) and finite logits spread beyond float32 (z - max z
    overflows at T < 1) give the calibrator's labels in both layouts, in PyTorch and ONNX Runtime."""
    torch.manual_seed(2)
    z = torch.randn(2, 5, 12, 13) * 3
    cal = fastcal.LabelCalibrator(5, temperature=temperature).update(z)
    masked = z.clone()
    masked[:, 0] = float("-inf")  # class 0 forbidden everywhere
    masked[0, 2, :4] = float("-inf")  # and class 2 in a few rows
    spread = torch.tensor([-3e38, 3e38, 0.0, -1e38, 2e38]).view(1, 5, 1, 1).expand(2, 5, 3, 4).contiguous()
    for logits in (masked, spread):
        expected = cal.predict(logits)
        oracle.assert_labels_match(expected, logits.double(), cal.prototypes, temperature)
        for layout in LAYOUTS:
            head = calibration_head(cal, layout=layout)
            assert torch.equal(head(logits), expected)
            export_onnx(head, logits, tmp_path / "head.onnx")
            assert torch.equal(run_onnx(tmp_path / "head.onnx", logits), expected)


def test_export_command_messages_name_the_real_cause(tmp_path, capsys):
    fitted(300).save(tmp_path / "wide.pt")
    assert cli(["export", str(tmp_path / "wide.pt"), "--out", str(tmp_path / "h.onnx"), "--label-dtype", "uint8"]) == 2
    err = capsys.readouterr().err
    assert "--label-dtype uint8" in err and "256 classes" in err and "not a usable" not in err
    with pytest.raises(SystemExit) as error:
        cli(["export", str(tmp_path / "wide.pt"), "--out", ""])
    assert error.value.code == 2
    assert "expected a file name" in capsys.readouterr().err
    for state, message in (({"num_classes": 4, "temperature": "hot"}, "not a fastcal state file"),
                           ({"format": "fastcal.LabelCalibrator", "version": 3, "num_classes": 10**6},
                            "S should be")):
        torch.save(state, tmp_path / "foreign.pt")
        assert cli(["export", str(tmp_path / "foreign.pt"), "--out", str(tmp_path / "h.onnx")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h.onnx").exists()


def test_export_command_writes_through_a_symlink(tmp_path, capsys):
    fitted(5).save(tmp_path / "state.pt")
    (tmp_path / "real.onnx").write_bytes(b"old")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "real.onnx")
    assert cli(["export", str(tmp_path / "state.pt"), "--out", str(tmp_path / "link.onnx")]) == 0
    assert (tmp_path / "link.onnx").is_symlink() and (tmp_path / "real.onnx").read_bytes() != b"old"
    z = torch.randn(2, 5, 6, 7)
    assert run_onnx(tmp_path / "link.onnx", z).shape == (2, 6, 7)


def test_export_command_takes_the_saved_empty_policy_and_refuses_what_it_cannot_honour(tmp_path, capsys):
    cal = fitted(19, "skip")
    cal.save(tmp_path / "state.pt")
    state_bytes = (tmp_path / "state.pt").read_bytes()
    assert cli(["export", str(tmp_path / "state.pt"), "--out", str(tmp_path / "state.pt")]) == 2
    assert "is the state file itself" in capsys.readouterr().err
    assert (tmp_path / "state.pt").read_bytes() == state_bytes  # untouched
    assert cli(["export", str(tmp_path / "state.pt"), "--out", str(tmp_path / "head.onnx")]) == 0
    assert "empty='skip'" in capsys.readouterr().out
    z = torch.randn(2, 19, 11, 13) * 3
    assert torch.equal(run_onnx(tmp_path / "head.onnx", z), cal.predict(z))  # skip, as the calibrator
    fastcal.LabelCalibrator(19, empty="skip").save(tmp_path / "nothing.pt")
    assert cli(["export", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "n.onnx")]) == 2
    err = capsys.readouterr().err
    assert "every class is empty" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.onnx").exists()
    for bad in (["--opset", "5"], ["--opset", "99"], ["--out", str(tmp_path / "missing_folder") + "/"]):
        out = [] if bad[0] == "--out" else ["--out", str(tmp_path / "x.onnx")]
        with pytest.raises(SystemExit) as error:
            cli(["export", str(tmp_path / "state.pt"), *out, *bad])
        assert error.value.code == 2
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "missing_folder").exists()


def test_an_asked_opset_is_the_written_one(tmp_path):
    import onnx

    cal = fitted(5)
    export_onnx(calibration_head(cal), torch.randn(2, 5, 8, 8), tmp_path / "h.onnx", opset=20)
    graph = onnx.load(str(tmp_path / "h.onnx"))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [20]
    with pytest.raises(ValueError, match="opset"):
        export_onnx(calibration_head(cal), torch.randn(2, 5, 8, 8), tmp_path / "h.onnx", opset=13)


def test_class_names_travel_to_the_onnx_metadata(tmp_path):
    import json

    import onnx

    cal = fastcal.LabelCalibrator(3, class_names=["road", "car", "sky"]).update(torch.randn(2, 3, 6, 6) * 3)
    cal.save(tmp_path / "state.pt")
    assert cli(["export", str(tmp_path / "state.pt"), "--out", str(tmp_path / "h.onnx")]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "h.onnx")).metadata_props}
    assert json.loads(props["class_names"]) == ["road", "car", "sky"]


@pytest.mark.parametrize("options,dtype,shape", [
    (["--input-dtype", "float16", "--label-dtype", "uint8"], torch.float16, (2, 19, 11, 13)),
    (["--rank", "5"], torch.float32, (1, 19, 4, 6, 7)),
    (["--layout", "nchw", "--label-dtype", "int32"], torch.float32, (2, 19, 5, 6)),
], ids=str)
def test_export_command_writes_the_input_and_label_types_asked_for(tmp_path, capsys, options, dtype, shape):
    cal = fitted(19)
    cal.save(tmp_path / "state.pt")
    assert cli(["export", str(tmp_path / "state.pt"), "--out", str(tmp_path / "h.onnx"), *options]) == 0
    z = (torch.randn(shape) * 3).to(dtype)
    label_dtype = {"uint8": torch.uint8, "int32": torch.int32}.get(options[-1], torch.int64)
    # the head's labels in the asked type; the calibrator's in its default type, converted (their values
    # are what is compared: the CPU loops' label types are tests/test_backends.py's subject)
    labels, expected = run_onnx(tmp_path / "h.onnx", z), cal.predict(z).to(label_dtype)
    assert labels.dtype == label_dtype
    assert_agree(labels, expected, z.float(), cal, {})
    assert cli(["export", str(tmp_path / "state.pt"), "--out", str(tmp_path / "x.onnx"), "--rank", "5",
                "--size", "8", "8"]) == 2
    assert "--rank 4" in capsys.readouterr().err


def test_onnx_runtime_runs_the_upsampled_channels_last_head_without_a_transpose_of_the_big_tensor(tmp_path):
    """What makes the default head fast (docs/design.md, section 10): after ONNX Runtime's graph
    optimisation the classes move once, fused into the small tensor's product, and Resize, Softmax,
    MatMul and ArgMax all run channels-last: no Transpose node is left."""
    import onnx

    cal = fitted(19)
    export_onnx(calibration_head(cal, size=(64, 96)), torch.randn(2, 19, 8, 9), tmp_path / "head.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "head.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Transpose" not in ops and {"Resize", "Softmax", "MatMul", "ArgMax"} <= set(ops), ops


def test_an_exported_file_gets_the_mode_the_umask_gives(tmp_path):
    """Written atomically like a state file (a temporary file renamed), and readable as any new file."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        export_onnx(calibration_head(fitted(5)), torch.randn(2, 5, 8, 8), tmp_path / "head.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "head.onnx").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.onnx"]  # no temporary left behind


# ----- OpenVINO: a tested deploy runtime ---------------------------------------------------------
def run_openvino(path, x: torch.Tensor) -> torch.Tensor:
    """The exported head in OpenVINO's CPU plugin, kept in float32: by default the plugin computes
    in bfloat16 on CPUs that have it, which changes labels (docs/deploy.md)."""
    import openvino  # the test extra installs it: a missing one fails the test

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled([x.numpy()])[compiled.output(0)])


@pytest.mark.parametrize("layout,resize,temperature", [
    ("channels_last", {}, 1.3), ("nchw", {"size": (29, 37)}, 1.3), ("channels_last", {"size": (29, 37)}, math.inf),
], ids=str)
def test_openvino_labels_are_the_calibrators(tmp_path, layout, resize, temperature):
    torch.manual_seed(3)
    z = torch.randn(2, 19, 12, 17) * 3
    cal = fastcal.LabelCalibrator(19, temperature=temperature).update(z)
    head = calibration_head(cal, layout=layout, **resize)
    export_onnx(head, z, tmp_path / "head.onnx")
    logits = torch.randn(2, 19, 11, 13) * 3
    labels = run_openvino(tmp_path / "head.onnx", logits)
    assert_agree(labels, cal.predict(logits, **resize), logits, cal, resize)
