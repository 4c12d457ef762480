"""The ops under ``torch.compile(fullgraph=True)``: traced without a graph break, same results."""
import math

import pytest
import torch

import fastcal

from cases import make_logits


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("op", ["prototype_stats", "predict", "calibrate"])
def test_ops_pass_opcheck(op):
    """Schema, fake (meta) implementation and dispatch agree (``torch.library.opcheck``)."""
    z = make_logits((2, 5, 6, 7))
    valid = torch.rand(2, 6, 7) > 0.3
    args = {
        "prototype_stats": (z, valid, 1.5, "torch", None, 2.0, None, None, False),
        "predict": (z, torch.eye(5), 1.5, "torch", torch.int32, False, [9, 11], None, True),
        "calibrate": (z, valid, 1.5, "onehot", "torch", torch.int64, True, None, 0.5, None, None, False),
    }[op]
    torch.library.opcheck(getattr(torch.ops.fastcal, op).default, args)


def test_compiled_inference_matches_eager_with_no_graph_break():
    head = torch.nn.Conv2d(3, 6, 1)
    P = torch.softmax(torch.randn(6, 6) * 3, dim=1)

    def infer(images):
        logits = head(images)
        S, W = fastcal.prototype_stats(logits, temperature=2.0)
        return (fastcal.calibrate(logits, temperature=2.0, size=(24, 28)),
                fastcal.calibrate(logits, output="scores"),
                fastcal.predict(logits, P, label_dtype=torch.uint8),
                S, W,
                fastcal.calibrate(logits, temperature=math.inf),  # the limit: a float constant in the graph
                fastcal.prototype_stats(logits, temperature=math.inf)[0])

    images = torch.randn(2, 3, 12, 14)
    with torch.no_grad():
        eager = infer(images)
        compiled = torch.compile(infer, fullgraph=True, backend="aot_eager")(images)
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=0)
    torch.testing.assert_close(compiled[2], eager[2], rtol=0, atol=0)
    torch.testing.assert_close(compiled[3], eager[3])
    torch.testing.assert_close(compiled[4], eager[4])
    torch.testing.assert_close(compiled[5], eager[5], rtol=0, atol=0)
    torch.testing.assert_close(compiled[6], eager[6])
    assert (eager[6] < 0).any()  # signed sums: the limit's centred logits, not a softmax
    assert compiled[0].shape == (2, 24, 28) and compiled[2].dtype == torch.uint8


def test_inductor_compiles_a_model_with_calibration():
    """The default compiler (inductor: generated C++ around the opaque op) gives the eager labels."""
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 1)).eval()

    def infer(images):
        return fastcal.calibrate(head(images), scale_factor=2)

    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        eager = infer(images)
        compiled = torch.compile(infer, fullgraph=True)(images)
    assert compiled.shape == (2, 32, 32)
    # the compiled convolutions may round differently, so compare where the eager labels are clear
    agree = (compiled == eager).float().mean()
    assert agree > 0.99, f"only {agree:.3f} of the labels agree"


def test_compiled_calls_still_check_their_input():
    compiled = torch.compile(lambda z: fastcal.calibrate(z), fullgraph=True, backend="aot_eager")
    z = make_logits((1, 4, 5, 5))
    z[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        compiled(z)


def test_make_fx_records_the_ops():
    """Tracers that run under a dispatch mode (fake tensors, make_fx, torch.export) see the ops."""
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda z: fastcal.calibrate(z, output="scores"), tracing_mode="fake")(make_logits((1, 4, 6, 6)))
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert "fastcal.calibrate.default" in targets, targets


def test_eager_calls_do_not_load_the_compiler_stack():
    """Outside a tracer the ops' bodies run directly: a process that never compiles never imports
    torch._dynamo. (With every eager call going through the dispatcher, which imports it, the gloo
    workers of tests/test_distributed.py aborted at exit in about one run in six.)"""
    import subprocess
    import sys

    code = ("import sys, torch, fastcal; z = torch.randn(1, 4, 8, 8); fastcal.calibrate(z); "
            "fastcal.prototype_stats(z); fastcal.predict(z, torch.eye(4)); print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("fullgraph", [True, False])
def test_dynamic_shapes_and_symbolic_numbers(fullgraph):
    """``dynamic=True`` hands the checks symbolic numbers (the temperature, the confidence power,
    the output size): traced without a break, equal to eager, at two shapes of one compile."""
    def infer(z, temperature):
        return (fastcal.calibrate(z, temperature=temperature, confidence_power=1.5),
                fastcal.calibrate(z, size=(20, 22), output="scores"),
                fastcal.predict(z, torch.eye(5), temperature=temperature, scale_factor=2.5))

    compiled = torch.compile(infer, dynamic=True, fullgraph=fullgraph)
    for shape, temperature in (((2, 5, 8, 9), 2.0), ((3, 5, 6, 11), 0.5)):
        z = make_logits(shape)
        for got, want in zip(compiled(z, temperature), infer(z, temperature)):
            assert torch.equal(got, want)
