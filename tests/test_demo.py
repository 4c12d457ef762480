"""A miniature run of the demo pipeline, its figures, the command line, and the fit helper."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import fastcal
from fastcal.__main__ import main as cli
from fastcal.__main__ import parser
from fastcal.apps import demo
from fastcal.apps.demo import report
from fastcal.fit import fit_calibrator

TINY = demo.DemoConfig(height=24, width=40, train_images=8, calib_images=6, test_images=4, steps=3, batch=4,
                       channels=8, panel_images=2)


def test_miniature_demo_pipeline(tmp_path):
    import dataclasses
    import math

    results = demo.run(dataclasses.replace(TINY, temperature=math.inf), str(tmp_path), progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk) >= {"target", "source", "train_seconds", "calibrate_seconds", "config", "diagnostics"}
    for domain in ("target", "source"):
        for kind in ("argmax", "calibrated"):
            score = on_disk[domain][kind]
            assert 0.0 <= score["miou"] <= 1.0 and set(score["iou"]) == set(demo.CLASSES)
    assert 0.0 <= on_disk["source"]["calibrated_on_source"]["miou"] <= 1.0  # a source-fitted calibrator too
    for domain, kind in (("target", "calibrated_limit"), ("source", "calibrated_on_source_limit")):
        assert 0.0 <= on_disk[domain][kind]["miou"] <= 1.0  # the limit T = inf beside T = 1
    table = demo.report.demo_table(on_disk)
    assert "source, calibrator fitted on source" in table and "source, calibrator fitted on target" in table
    assert "T = inf" in table
    saved = fastcal.LabelCalibrator.from_file(tmp_path / "calibrator.pt")  # the calibrator at --temperature
    assert saved.temperature == math.inf and saved.num_pixels == results["_calibrator"].num_pixels
    assert cli(["export", str(tmp_path / "calibrator.pt"), "--out", str(tmp_path / "head.onnx")]) == 0
    png = (tmp_path / "panel.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    images, labels, logits, argmax, calibrated = results["_outputs"]["target"]
    assert images.shape == (4, 3, 24, 40) and labels.shape == argmax.shape == calibrated.shape == (4, 24, 40)
    assert logits.shape == (4, len(demo.CLASSES), 24, 40)
    # the calibrated labels are the reference's on the same logits and prototypes
    prototypes = results["_calibrator"].prototypes
    assert torch.equal(calibrated, fastcal.predict(logits, prototypes, backend="reference"))


def test_same_seed_same_scenes():
    a = demo.make_split(demo.TARGET, 3, 24, 40, seed=5, progress=False)
    b = demo.make_split(demo.TARGET, 3, 24, 40, seed=5, progress=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    source = demo.make_split(demo.SOURCE, 3, 24, 40, seed=5, progress=False)
    assert not torch.equal(source[0], a[0])


def test_blended_domains_run_from_one_to_the_other():
    half = demo.blend(demo.SOURCE, demo.TARGET, 0.5)
    assert half.noise == pytest.approx((demo.SOURCE.noise + demo.TARGET.noise) / 2)
    assert demo.blend(demo.SOURCE, demo.TARGET, 0.0).colors == demo.SOURCE.colors
    np.testing.assert_allclose(demo.blend(demo.SOURCE, demo.TARGET, 1.0).colors, demo.TARGET.colors)


def test_mIoU_changes_are_reported_in_points():
    assert report.points(0.412, 0.443) == "+3.1 pt"
    assert report.points(0.5, 0.49) == "-1.0 pt"


def test_fit_calibrator_accepts_tuples_dicts_and_model_dicts():
    net = torch.nn.Conv2d(3, 4, 1)
    images = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    plain = fit_calibrator(net, images, 4, progress=False)
    tuples = fit_calibrator(net, [(x, torch.zeros(2, 5, 5)) for x in images], 4, progress=False)
    dicts = fit_calibrator(lambda x: {"out": net(x)}, [{"image": x} for x in images], 4, progress=False)
    assert torch.equal(plain.S, tuples.S) and torch.equal(plain.S, dicts.S)
    manual = fastcal.LabelCalibrator(4)
    with torch.no_grad():
        for x in images:
            manual.update(net(x))
    assert torch.equal(plain.S, manual.S) and plain.num_pixels == 3 * 2 * 25


def test_fit_calibrator_shows_a_progress_bar_on_a_terminal(capsys, monkeypatch):
    import sys

    fit_calibrator(torch.nn.Conv2d(3, 4, 1), [torch.randn(1, 3, 4, 4)] * 3, 4, progress=True)
    assert capsys.readouterr().err == ""  # not a terminal: quiet, as in a log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    fit_calibrator(torch.nn.Conv2d(3, 4, 1), [torch.randn(1, 3, 4, 4)] * 3, 4, progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and "/3 " in err  # the bar knows how many batches come
    fit_calibrator(torch.nn.Conv2d(3, 4, 1), [torch.randn(1, 3, 4, 4)] * 3, 4, progress=False)
    assert capsys.readouterr().err == ""


def test_command_line_help(capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli(["--help"])
    assert exit_code.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fastcal ")
    commands = next(a for a in parser()._actions if a.dest == "command")
    assert set(commands.choices) == {"demo", "study", "export"}
    with pytest.raises(SystemExit) as exit_code:
        cli(["train"])
    assert exit_code.value.code == 2
    with pytest.raises(SystemExit):
        cli(["study", "--help"])
    assert "--out" in capsys.readouterr().out


def test_without_matplotlib_the_commands_say_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    for command in ("demo", "study"):
        assert cli([command, "--out", str(tmp_path / command), "--quiet"]) == 2
        assert "pip install 'fastcal[plots]'" in capsys.readouterr().err
        assert not (tmp_path / command / "results.json").exists()  # said before doing the work


def read_only_folder(tmp_path):
    """A folder this process cannot write into (root ignores mode bits: a read-only file system)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/sys/fastcal-out"
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder / "out")


@pytest.mark.parametrize("command", ["demo", "study"])
def test_bad_options_fail_at_once_with_one_line(command, tmp_path, capsys, monkeypatch):
    """Each bad option ends the command while its line is parsed (exit 2, argparse's one-line error,
    no traceback), before any scene is rendered or model trained."""
    module = demo if command == "demo" else __import__("fastcal.apps.study", fromlist=["run"])
    monkeypatch.setattr(module, "run", lambda *args, **kwargs: pytest.fail("the work started"))
    existing_file = tmp_path / "results.txt"
    existing_file.write_text("not a folder")
    cases = [(["--out", str(existing_file)], "exists and is not a folder"),
             (["--out", str(existing_file / "sub")], "cannot write into"),
             (["--out", read_only_folder(tmp_path)], "cannot write into")]
    if command == "demo":
        cases += [(["--device", "bogus"], "expected cpu, cuda or cuda:N"), (["--steps", "-5"], "positive integer"),
                  (["--steps", "0"], "positive integer"), (["--temperature", "-1"], "positive number or inf"),
                  (["--temperature", "hot"], "positive number or inf")]
        if not torch.cuda.is_available():
            cases.append((["--device", "cuda"], "no CUDA device is available"))
    else:
        cases += [(["--temperatures", "2", "-1"], "positive number or inf")]
    for options, message in cases:
        with pytest.raises(SystemExit) as exit_code:
            cli([command, *options])
        assert exit_code.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"fastcal {command}: error: argument") and message in last, err
        assert "Traceback" not in err
