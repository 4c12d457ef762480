"""``LabelCalibrator.diagnostics()``: per-class figures from the statistics, and the warnings."""
import json

import numpy as np
import pytest
import torch

import fastcal
from fastcal.diagnostics import diagnose

import oracle
from cases import make_logits


def test_figures_match_the_statistics():
    z = make_logits((2, 6, 32, 32))
    cal = fastcal.LabelCalibrator(6).update(z)
    report = cal.diagnostics([f"c{k}" for k in range(6)])
    S, W = oracle.stats(z)
    P = oracle.prototypes(S, W)
    counts = np.bincount(oracle.pixels_by_class(z).argmax(axis=1), minlength=6)
    for k, c in enumerate(report.classes):
        assert c.name == f"c{k}" and c.pixels == counts[k] and not c.empty and c.predictable
        assert c.weight == pytest.approx(W[k], rel=1e-6)
        assert c.self_probability == pytest.approx(P[k, k], rel=1e-5)
        others = [j for j in range(6) if j != k]
        gaps = [np.linalg.norm(P[k] - P[j]) for j in others]
        assert c.nearest == others[int(np.argmin(gaps))]
        assert c.distance == pytest.approx(min(gaps), rel=1e-5)
    json.dumps(report.to_dict())  # plain numbers, strings and bools
    assert "c5" in str(report)


@pytest.mark.parametrize("empty", ["onehot", "skip"])
def test_an_absent_class_is_reported(empty):
    z = make_logits((2, 5, 32, 32))
    z[:, 3] -= 100.0
    report = fastcal.LabelCalibrator(5, empty=empty).update(z).diagnostics()
    absent = report.classes[3]
    assert absent.empty and absent.pixels == 0 and absent.weight == 0
    assert absent.predictable == (empty == "onehot")
    assert any(w.startswith("class 3: never the argmax") for w in report.warnings)
    assert ("never predicted (empty='skip')" in " ".join(report.warnings)) == (empty == "skip")


def test_few_pixels_and_collapsed_prototypes_are_warned_about():
    z = make_logits((1, 4, 40, 40))
    z[:, 2] = z[:, 1] + 1e-3 * torch.randn(1, 40, 40)  # classes 1 and 2 look alike
    cal = fastcal.LabelCalibrator(4).update(z)
    report = cal.diagnostics(min_pixels=10)
    assert any("class 1 and class 2: prototypes" in w for w in report.warnings)
    assert not any("only" in w for w in report.warnings)
    few = cal.diagnostics(min_pixels=10_000, min_distance=0.0)
    assert sum("pixels behind its prototype" in w for w in few.warnings) == 4
    assert not any("apart" in w for w in few.warnings)


def test_relabelled_certain_pixels_and_duplicates():
    P = torch.tensor([[0.1, 0.8, 0.1], [0.34, 0.33, 0.33], [0.0, 0.0, 1.0], [0.34, 0.33, 0.33]],
                     dtype=torch.float64)
    P = torch.cat([P, torch.zeros(4, 1, dtype=torch.float64)], dim=1)  # C = 4, class 3 = copy of class 1
    W = torch.full((4,), 10.0, dtype=torch.float64)
    report = diagnose(P * 10.0, W, W.clone(), "onehot")
    first, duplicate = report.classes[0], report.classes[3]
    assert first.keeps_certain is False and first.predictable
    assert any("class 0: even a pixel certain of it is labelled class 1" in w for w in report.warnings)
    assert any("class 0: its prototype holds more class 1" in w for w in report.warnings)
    assert not duplicate.predictable and duplicate.distance == 0.0
    assert any("class 3: its prototype equals class 1's" in w for w in report.warnings)


def test_counts_decay_with_momentum():
    z = make_logits((1, 3, 16, 16))
    cal = fastcal.LabelCalibrator(3, momentum=0.5).update(z).update(z)
    counts = np.bincount(oracle.pixels_by_class(z).argmax(axis=1), minlength=3)
    np.testing.assert_allclose(cal.counts.numpy(), 1.5 * counts)  # 0.5 * first + second
    assert sum(c.pixels for c in cal.diagnostics().classes) == pytest.approx(1.5 * 256)


def test_class_names_must_match():
    with pytest.raises(ValueError, match="class_names"):
        fastcal.LabelCalibrator(3).update(make_logits((1, 3, 4, 4))).diagnostics(["a", "b"])


def test_the_printed_report_opens_with_a_one_line_summary():
    z = torch.randn(2, 6, 8, 8) * 3
    z[:, 5] -= 50  # a class never the argmax; every class has few pixels
    report = fastcal.LabelCalibrator(6).update(z).diagnostics()
    first = str(report).splitlines()[0]
    assert first == report.summary()
    assert first.startswith(f"6 classes, {len(report.warnings)} warning(s): ")
    assert "1 empty" in first and "5 with too few pixels" in first
    quiet = fastcal.LabelCalibrator(3).update(torch.randn(1, 3, 200, 200) * 5).diagnostics()
    assert str(quiet).splitlines()[0] == "3 classes, no warnings"
