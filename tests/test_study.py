"""``fastcal study`` on a miniature configuration: every experiment, its files and its report."""
import json

import numpy as np
import pytest

from fastcal.apps import study
from fastcal.apps.demo import DemoConfig

TINY = study.StudyConfig(demo=DemoConfig(height=24, width=40, train_images=16, steps=20, batch=4, channels=8),
                         pool_images=8, test_images=6, image_counts=(1, 2, 8), subset_seeds=3, drift_steps=3,
                         drift_batch=4, drift_streams=2, momenta=(0.5,), temperatures=(0.5, 1.0, 16.0, float("inf")),
                         shifts=(0.0, 0.5, 1.0))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, study.run(TINY, str(out), progress=False)


def test_files_are_written(results):
    out, _ = results
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk) >= {"confidence_power", "image_count", "drift", "failure_modes", "seconds"}
    for name in study.FIGURES.values():
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    report = (out / "report.md").read_text()
    assert "| question | finding |" in report and "![drift](drift.png)" in report


def test_every_experiment_covers_its_grid(results):
    _, r = results
    assert [row["power"] for row in r["confidence_power"]["rows"]] == list(TINY.powers)
    counts = r["image_count"]["rows"]
    assert [row["images"] for row in counts] == [1, 2, 8]
    assert [row["runs"] for row in counts] == [3, 3, 1]  # the whole pool is one draw
    assert all(row["min"] <= row["mean"] <= row["max"] for row in counts)
    drift = r["drift"]
    assert drift["shift"] == [0.0, 0.5, 1.0]
    assert set(drift["mean"]) == {"argmax", "cumulative", "momentum 0.5", "episodic"}
    assert all(len(v) == 3 and all(0 <= x <= 1 for x in v) for v in drift["mean"].values())
    failures = r["failure_modes"]
    assert set(failures) == {"no cars, empty=onehot", "no cars, empty=skip", "collapse"}
    assert failures["collapse"]["smallest prototype distance"] >= 0
    temperature = r["temperature"]
    assert [row["domain"] for row in temperature["rows"]] == ["target", "stream middle (shift 0.5)",
                                                             "stream end (shift 1)", "severe", "source (no shift)"]
    assert all(0 <= row[f"T={T:g}"] <= 1 for row in temperature["rows"] for T in TINY.temperatures)
    assert "T=inf" in temperature["rows"][0]
    limit = r["limit"]
    assert [row["shift"] for row in limit["rows"]] == list(TINY.shifts)
    for row in limit["rows"]:
        best = max(TINY.temperatures, key=lambda T: row[f"T={T:g}"])
        assert row["best T"] == best and row["switch chooses"] in (1.0, float("inf"))
        assert row["regret"] == row[f"T={best:g}"] - row[f"T={row['switch chooses']:g}"] >= 0
        assert (row["switch chooses"] == float("inf")) == (row["relabelled at T=1"] > TINY.switch_share)
    assert limit["offered"] == (limit["worst regret"] <= TINY.regret_bound)
    assert set(limit["calibrate+predict seconds"]) == {"T=1", "T=inf"}


def test_every_scored_calibration_is_a_case_of_the_signals_question(results):
    _, r = results
    cases = r["signals"]["cases"]
    expected = (len(TINY.powers) + 3 + TINY.drift_streams * TINY.drift_steps * (2 + len(TINY.momenta))
                + 5 * (len(TINY.temperatures) - 1))  # the limit's calibrations have no probabilities
    assert len(cases) == expected
    for case in cases:
        assert 0 <= case["relabelled"] <= 1 and 0 <= case["purity"] <= 1 and case["entropy"] >= 0
        assert case["closest prototypes"] >= 0 and case["nearest distance"] >= 0
    assert set(r["signals"]["spearman"]) == set(study.SIGNALS)


def test_spearman_is_a_rank_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert study._spearman(x, x ** 3) == pytest.approx(1.0)
    assert study._spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert np.isnan(study._spearman(x, np.ones(4)))


def test_findings_are_computed_from_the_results(results):
    _, r = results
    rows = dict(study.findings(r))
    assert set(rows) == {"Confidence weighting", "Unlabelled images needed", "Drifting stream",
                         "A class absent from the target (car)", "Collapsing prototypes",
                         "Choosing the temperature", "The limit T = inf", "Knowing when it helps, without labels"}
    assert f"over {len(r['signals']['cases'])} calibrations" in rows["Knowing when it helps, without labels"]
    best = max(r["confidence_power"]["rows"], key=lambda row: row["miou"])
    assert f"best γ = {best['power']:g}" in rows["Confidence weighting"]


def test_the_drift_runs_from_source_to_severe():
    from fastcal.apps.demo.scenes import SEVERE, SOURCE, TARGET

    assert study.drifting_domain(0.0).colors == SOURCE.colors
    np.testing.assert_allclose(study.drifting_domain(0.5).colors, TARGET.colors)
    assert study.drifting_domain(1.0).noise == pytest.approx(SEVERE.noise)
