"""A miniature run of the demo pipeline, and the fit helper."""
import json

import torch

import fastcal
from fastcal import demo
from fastcal.fit import fit_calibrator

TINY = demo.DemoConfig(height=24, width=40, train_images=8, calib_images=6, test_images=4, steps=3, batch=4,
                       channels=8, panel_images=2)


def test_miniature_demo_pipeline(tmp_path):
    results = demo.run(TINY, str(tmp_path), progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk) >= {"target", "source", "train_seconds", "calibrate_seconds", "config"}
    for domain in ("target", "source"):
        for kind in ("argmax", "calibrated"):
            score = on_disk[domain][kind]
            assert 0.0 <= score["miou"] <= 1.0 and set(score["iou"]) == set(demo.CLASSES)
    png = (tmp_path / "panel.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 100

    images, labels, logits, argmax, calibrated = results["_outputs"]["target"]
    assert images.shape == (4, 3, 24, 40) and labels.shape == argmax.shape == calibrated.shape == (4, 24, 40)
    assert logits.shape == (4, len(demo.CLASSES), 24, 40)
    # the calibrated labels are the reference's on the same logits and prototypes
    prototypes = results["_calibrator"].prototypes
    assert torch.equal(calibrated, fastcal.predict(logits, prototypes, backend="reference"))


def test_same_seed_same_scenes():
    a = demo.make_split(demo.TARGET, 3, TINY, seed=5, progress=False)
    b = demo.make_split(demo.TARGET, 3, TINY, seed=5, progress=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    source = demo.make_split(demo.SOURCE, 3, TINY, seed=5, progress=False)
    assert not torch.equal(source[0], a[0])


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


def test_cli_help(capsys):
    from fastcal.__main__ import main

    assert main(["--help"]) == 0
    assert "fastcal demo" in capsys.readouterr().out
    assert main(["train"]) == 2
