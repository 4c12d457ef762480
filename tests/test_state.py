"""Saved state (versioned, safe, corrupt files refused) and the online (momentum) mode."""
import contextlib
import math
import os
import stat

import pytest
import torch

import fastcal

from cases import make_logits


def fitted(C=5, **kwargs):
    cal = fastcal.LabelCalibrator(C, **kwargs)
    for _ in range(3):
        cal.update(make_logits((2, C, 6, 6)))
    return cal


def same_state(a, b):
    return (torch.equal(a.S, b.S) and torch.equal(a.W, b.W) and torch.equal(a.counts, b.counts)
            and (a.num_updates, a.num_pixels) == (b.num_updates, b.num_pixels))


def test_file_is_plain_tensors_and_round_trips(tmp_path):
    cal = fitted()
    cal.save(tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # no pickled code
    assert state["format"] == "fastcal.LabelCalibrator" and state["version"] == 3
    assert state["empty"] == "onehot" and state["fastcal_version"] == fastcal.__version__
    restored = fastcal.LabelCalibrator(5).load(tmp_path / "state.pt")
    assert same_state(cal, restored)
    assert torch.equal(restored.prototypes, cal.prototypes)


def test_version_1_states_load_without_pixel_counts():
    cal = fitted()
    old = {key: value for key, value in cal.state_dict().items() if key not in ("N", "confidence_power")}
    old["version"] = 1
    restored = fastcal.LabelCalibrator(5).load_state_dict(old)
    assert torch.equal(restored.S, cal.S) and torch.equal(restored.prototypes, cal.prototypes)
    assert torch.isnan(restored.counts).all()  # unknown, and said so by the diagnostics
    assert all(c.pixels is None for c in restored.diagnostics().classes)


def test_a_version_1_state_comes_back_after_every_save(tmp_path):
    """Its pixel counts are unknown (NaN) and stay so; load, update, save, load again, export."""
    cal = fitted()
    old = {key: value for key, value in cal.state_dict().items()
           if key not in ("N", "confidence_power", "empty", "class_names", "fastcal_version", "digest")}
    old["version"] = 1
    torch.save(old, tmp_path / "v1.pt")
    first = fastcal.LabelCalibrator(5).load(tmp_path / "v1.pt")
    first.save(tmp_path / "a.pt")
    first.update(make_logits((1, 5, 4, 4)))
    first.save(tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        again = fastcal.LabelCalibrator(5).load(tmp_path / name)
        assert torch.isnan(again.counts).all()
        assert torch.equal(fastcal.LabelCalibrator.from_file(tmp_path / name).W, again.W)
    assert torch.equal(again.S, first.S) and again.num_updates == 4


def test_every_flipped_bit_of_a_saved_file_is_refused(tmp_path):
    """The zip records' CRC32 and the state's digest: one flipped bit anywhere, in the sums' record
    or elsewhere, raises ValueError (never altered sums)."""
    import random

    cal = fitted()
    cal.save(tmp_path / "state.pt")
    raw = (tmp_path / "state.pt").read_bytes()
    rng = random.Random(0)
    data_start = raw.index(b"data/0") if b"data/0" in raw else 0
    positions = [rng.randrange(len(raw)) for _ in range(30)] + [rng.randrange(data_start, len(raw))
                                                                 for _ in range(30)]
    for position in positions:
        flipped = bytearray(raw)
        flipped[position] ^= 1 << rng.randrange(8)
        (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
        try:
            loaded = fastcal.LabelCalibrator(5).load(tmp_path / "flipped.pt")
        except ValueError:
            continue
        assert same_state(loaded, cal), f"a flipped bit at byte {position} loaded altered sums"


def test_an_altered_state_dict_is_refused_by_its_digest():
    state = fitted().state_dict()
    S = state["S"].clone()
    S[0, 1] += 2.0**-40  # plausible, finite, non-negative: only the digest can tell
    with pytest.raises(ValueError, match="digest does not match"):
        fastcal.LabelCalibrator(5).load_state_dict({**state, "S": S})
    with pytest.raises(ValueError, match="digest does not match"):
        fastcal.LabelCalibrator(5).load_state_dict({**state, "num_pixels": state["num_pixels"] + 1})


def test_a_state_file_describes_how_it_predicts(tmp_path):
    cal = fastcal.LabelCalibrator(5, empty="skip", temperature=2.0, class_names=list("abcde"))
    cal.update(make_logits((2, 5, 6, 6)))
    cal.save(tmp_path / "skip.pt")
    with pytest.raises(ValueError, match="empty='skip'"):
        fastcal.LabelCalibrator(5, temperature=2.0).load(tmp_path / "skip.pt")
    restored = fastcal.LabelCalibrator.from_file(tmp_path / "skip.pt")
    assert (restored.empty, restored.temperature, restored.class_names) == ("skip", 2.0, tuple("abcde"))
    z = make_logits((2, 5, 6, 6))
    assert torch.equal(restored.predict(z), cal.predict(z))
    assert fastcal.LabelCalibrator.from_file(tmp_path / "skip.pt", empty="onehot").empty == "onehot"
    named = fastcal.LabelCalibrator(5, empty="skip", temperature=2.0).load(tmp_path / "skip.pt")
    assert named.class_names == tuple("abcde") and "a" in str(named.diagnostics())
    with pytest.raises(ValueError, match="class_names differ"):
        fastcal.LabelCalibrator(5, empty="skip", temperature=2.0, class_names=list("vwxyz")).load(
            tmp_path / "skip.pt")
    with pytest.raises(ValueError, match="expected 5 names"):
        fastcal.LabelCalibrator(5, class_names=["a"])


def corrupt_files(tmp_path, good: dict):
    def saved(name, state):
        torch.save(state, tmp_path / name)
        return tmp_path / name

    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    return [
        (saved("version.pt", {**good, "version": 4}), "version 4 is not supported"),
        (saved("counts.pt", {**good, "N": good["N"][:3]}), r"state\['N'\]: expected shape"),
        (saved("classes.pt", {**good, "num_classes": 6}), "num_classes=6"),
        (saved("shape.pt", {**good, "S": torch.zeros(5, 4, dtype=torch.float64)}), r"state\['S'\]: expected shape"),
        (saved("dtype.pt", {**good, "W": good["W"].float()}), r"state\['W'\]: expected a float64"),
        (saved("nan.pt", {**good, "S": good["S"].clone().fill_(math.nan)}), "finite and non-negative"),
        (saved("negative.pt", {**good, "W": -good["W"]}), "finite and non-negative"),
        (saved("list.pt", [1, 2]), "state: expected a dict"),
        (tmp_path / "truncated.pt", "not a readable fastcal state file"),
        (tmp_path / "text.pt", "not a readable fastcal state file"),
    ]


def test_corrupt_files_are_refused_and_change_nothing(tmp_path):
    source = fitted()
    source.save(tmp_path / "good.pt")
    target = fitted()
    before = (target.S.clone(), target.W.clone(), target.num_updates, target.num_pixels)
    for path, message in corrupt_files(tmp_path, source.state_dict()):
        with pytest.raises((ValueError, TypeError), match=message):
            target.load(path)
        assert torch.equal(target.S, before[0]) and torch.equal(target.W, before[1])
        assert (target.num_updates, target.num_pixels) == before[2:]
    with pytest.raises(FileNotFoundError):
        target.load(tmp_path / "missing.pt")


def test_save_replaces_atomically(tmp_path):
    cal = fitted()
    cal.save(tmp_path / "state.pt")
    cal.update(make_logits((1, 5, 4, 4)))
    cal.save(tmp_path / "state.pt")
    assert fastcal.LabelCalibrator(5).load(tmp_path / "state.pt").num_updates == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary left behind


def test_a_file_of_todays_version_loads_once_the_format_moves_on(tmp_path, monkeypatch):
    """Readers take every version up to their own and read each field from the version that
    introduced it: a bump of the format strands no file saved today."""
    from fastcal import _statefile

    cal = fitted(temperature=2.0, empty="skip", class_names=list("abcde"), confidence_power=0.5)
    cal.save(tmp_path / "today.pt")
    monkeypatch.setattr(_statefile, "STATE_VERSION", _statefile.STATE_VERSION + 1)
    loaded = fastcal.LabelCalibrator.from_file(tmp_path / "today.pt")
    assert same_state(loaded, cal)
    assert (loaded.temperature, loaded.empty, loaded.confidence_power, loaded.class_names) == (
        2.0, "skip", 0.5, tuple("abcde"))
    assert same_state(fastcal.LabelCalibrator(5, temperature=2.0, empty="skip", confidence_power=0.5)
                      .load(tmp_path / "today.pt"), cal)
    with pytest.raises(ValueError, match="saved by a newer fastcal"):
        fastcal.LabelCalibrator(5).load_state_dict({**cal.state_dict(), "version": _statefile.STATE_VERSION + 1})


def test_save_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    target, link = tmp_path / "real" / "state.pt", tmp_path / "link.pt"
    target.parent.mkdir()
    fitted().save(target)
    link.symlink_to(target)
    cal = fitted()
    cal.update(make_logits((1, 5, 4, 4)))
    cal.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert fastcal.LabelCalibrator(5).load(target).num_updates == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.pt"]  # written beside the target


@pytest.mark.parametrize("state, message", [
    ({"num_classes": 4, "temperature": "hot"}, "not a fastcal state file"),
    ({"format": "fastcal.LabelCalibrator", "version": 3, "num_classes": 4, "temperature": "hot",
      "S": torch.zeros(4, 4, dtype=torch.float64), "W": torch.zeros(4, dtype=torch.float64)}, "temperature"),
    ({"format": "fastcal.LabelCalibrator", "version": 3, "num_classes": 10**6}, r"S should be \[1000000, 1000000\]"),
    ({"format": "fastcal.LabelCalibrator", "version": 3, "num_classes": 10000,
      "S": torch.zeros(2, 2, dtype=torch.float64), "W": torch.zeros(2, dtype=torch.float64)}, "S should be"),
    ({"format": "fastcal.LabelCalibrator", "version": 3, "num_classes": "4"}, "num_classes='4'"),
])
def test_foreign_state_files_are_refused_before_anything_is_built(tmp_path, state, message, monkeypatch):
    torch.save(state, tmp_path / "foreign.pt")
    built = []
    real = fastcal.LabelCalibrator.__init__
    monkeypatch.setattr(fastcal.LabelCalibrator, "__init__", lambda *a, **k: (built.append(1), real(*a, **k))[1])
    with pytest.raises(ValueError, match=message):
        fastcal.LabelCalibrator.from_file(tmp_path / "foreign.pt")
    assert not built


def test_momentum_decays_history_by_the_documented_rule():
    a, b = make_logits((1, 4, 5, 5)), make_logits((1, 4, 5, 5))
    cal = fastcal.LabelCalibrator(4, momentum=0.25).update(a).update(b)
    S_a, W_a = fastcal.prototype_stats(a)
    S_b, W_b = fastcal.prototype_stats(b)
    torch.testing.assert_close(cal.S, 0.75 * S_a + S_b)
    torch.testing.assert_close(cal.W, 0.75 * W_a + W_b)
    with pytest.raises(ValueError, match=r"momentum: expected None or a number in \(0, 1\]"):
        fastcal.LabelCalibrator(4, momentum=0.0)


def drifting_batch(domain: str, g: torch.Generator) -> torch.Tensor:
    """Three latent classes. In domain "a" the model is sure of each; in domain "b" its
    output for class 1 drifts towards class 0 (p_0 near 0.45), which moves the decision
    boundary between the prototypes of classes 0 and 1."""
    k = torch.randint(0, 3, (4, 16, 16), generator=g)
    noise = torch.randn(4, 16, 16, generator=g)
    z = torch.zeros(4, 3, 16, 16)
    for cls in range(3):
        z[:, cls] = torch.where(k == cls, 3.0 + 0.5 * noise, z[:, cls])
    if domain == "b":
        z[:, 1] = torch.where(k == 1, 0.0, z[:, 1])
        z[:, 0] = torch.where(k == 1, -0.2 + 0.4 * noise, z[:, 0])
    return z


def test_online_mode_tracks_a_drifting_stream():
    C, g = 3, torch.Generator().manual_seed(0)
    cumulative, online = fastcal.LabelCalibrator(C), fastcal.LabelCalibrator(C, momentum=0.3)
    for domain in ["a"] * 30 + ["b"] * 8:
        batch = drifting_batch(domain, g)
        cumulative.update(batch)
        online.update(batch)
    oracle = fastcal.LabelCalibrator(C)
    for _ in range(10):
        oracle.update(drifting_batch("b", g))
    test = drifting_batch("b", g)
    truth = oracle.predict(test)
    agree_online = (online.predict(test) == truth).float().mean().item()
    agree_cumulative = (cumulative.predict(test) == truth).float().mean().item()
    print(f"agreement with the current domain's oracle: online {agree_online:.3f}, cumulative {agree_cumulative:.3f}")
    assert agree_online > 0.97
    assert agree_online > agree_cumulative + 0.05


# ----- online mode: edge cases --------------------------------------------------------------
def test_empty_batches_do_not_decay_an_online_calibrator():
    cal = fitted(momentum=0.5)
    S, W, updates = cal.S.clone(), cal.W.clone(), cal.num_updates
    cal.update(torch.randn(0, 5, 6, 6))
    cal.update(make_logits((2, 5, 6, 6)), valid=torch.zeros(2, 6, 6, dtype=torch.bool))
    assert torch.equal(cal.S, S) and torch.equal(cal.W, W) and cal.num_updates == updates


def seen_then_only_class_0(shape, momentum):
    """A calibrator that saw one batch of every class, its prototypes then, and a batch of the same
    logits where class 0 wins every pixel."""
    z = make_logits(shape)
    cal = fastcal.LabelCalibrator(shape[1], momentum=momentum).update(z)
    only_class_0 = z.clone()
    only_class_0[:, 0] += 100.0
    return cal, cal.prototypes, only_class_0


def test_momentum_one_keeps_the_last_prototype_of_absent_classes():
    cal, before, only_class_0 = seen_then_only_class_0((2, 4, 6, 6), momentum=1.0)
    cal.update(only_class_0)
    assert cal.missing_classes == []
    S0, W0 = fastcal.prototype_stats(only_class_0)
    torch.testing.assert_close(cal.prototypes[0], (S0[0] / W0[0]).float())  # the latest batch alone
    torch.testing.assert_close(cal.prototypes[1:], before[1:], rtol=1e-6, atol=0)


def test_a_long_stream_never_sinks_to_denormals():
    cal, first, only_class_0 = seen_then_only_class_0((1, 4, 5, 5), momentum=0.5)
    for _ in range(1500):  # 0.5**1500 is far below the smallest float64
        cal.update(only_class_0)
    W = cal.W
    assert cal.missing_classes == [] and bool((W >= 0.999 * fastcal.calibrator.WEIGHT_FLOOR).all())
    assert bool((W[1:] < 1e-250).all())  # absent classes weigh nothing against any pixel
    torch.testing.assert_close(cal.prototypes[1:], first[1:], rtol=1e-6, atol=0)


def test_load_refuses_another_momentum(tmp_path):
    fitted(momentum=0.25).save(tmp_path / "online.pt")
    for momentum in (None, 0.5):
        with pytest.raises(ValueError, match="momentum 0.25"):
            fastcal.LabelCalibrator(5, momentum=momentum).load(tmp_path / "online.pt")
    assert fastcal.LabelCalibrator(5, momentum=0.25).load(tmp_path / "online.pt").num_updates == 3


@pytest.mark.parametrize("kwargs, error", [
    ({"num_classes": 2.0}, TypeError), ({"num_classes": "3"}, TypeError), ({"num_classes": True}, TypeError),
    ({"num_classes": 1}, ValueError), ({"momentum": "0.1"}, TypeError), ({"momentum": True}, TypeError),
    ({"momentum": 1.5}, ValueError), ({"momentum": 0}, ValueError),
])
def test_wrong_types_raise_type_error_and_wrong_values_value_error(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        fastcal.LabelCalibrator(**{"num_classes": 3, **kwargs})


# ----- inference mode ------------------------------------------------------------------------
MODES = {"plain": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("momentum", [None, 0.5])
@pytest.mark.parametrize("create, reset, load, update", [
    ("inference_mode", "plain", "plain", "plain"), ("plain", "inference_mode", "plain", "plain"),
    ("plain", "plain", "inference_mode", "plain"), ("inference_mode", "no_grad", "inference_mode", "plain"),
    ("plain", "plain", "plain", "inference_mode"), ("no_grad", "inference_mode", "no_grad", "inference_mode"),
])
def test_works_inside_and_outside_inference_mode_in_any_order(create, reset, load, update, momentum, tmp_path):
    batches = [make_logits((1, 5, 6, 6)) for _ in range(3)]
    expected = fastcal.LabelCalibrator(5, momentum=momentum)
    for batch in batches:
        expected.update(batch)
    with MODES[create]():
        cal = fastcal.LabelCalibrator(5, momentum=momentum).update(batches[0])
    with MODES[reset]():
        cal.reset()
    with MODES[update]():
        cal.update(batches[0])
    cal.save(tmp_path / "state.pt")
    with MODES[load]():
        cal.load(tmp_path / "state.pt")
    with MODES[update]():
        cal.update(batches[1])
    with MODES["plain" if update == "inference_mode" else "inference_mode"]():  # and switch once more
        cal.update(batches[2])
    torch.testing.assert_close(cal.S, expected.S, rtol=1e-12, atol=0)
    assert torch.equal(cal.predict(batches[0]), expected.predict(batches[0]))


# ----- save ------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_save_keeps_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        fitted().save(tmp_path / "state.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state.pt").stat().st_mode) == 0o666 & ~umask


def test_save_reads_the_umask_without_changing_it(tmp_path, monkeypatch):
    """Setting the umask, even for an instant, gives another thread's new files mode 0666."""
    calls = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: (calls.append(mask), real_umask(mask))[1])
    cal = fitted()
    cal.save(tmp_path / "state.pt")
    assert calls == []


def test_saves_from_several_threads_leave_the_umask_alone(tmp_path):
    import threading

    cal = fitted()
    old = os.umask(0o027)
    try:
        threads = [threading.Thread(target=lambda i=i: [cal.save(tmp_path / f"{i}-{k}.pt") for k in range(5)])
                   for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o640}


def test_save_flushes_the_file_and_the_folder_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace",)), real_replace(a, b))[1])
    fitted().save(tmp_path / "state.pt")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


def test_an_interrupted_save_leaves_the_previous_file(tmp_path, monkeypatch):
    first = fitted()
    first.save(tmp_path / "state.pt")
    second = fitted()
    second.update(make_logits((1, 5, 4, 4)))

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the user pressed Ctrl-C while the file was being written

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        second.save(tmp_path / "state.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert same_state(fastcal.LabelCalibrator(5).load(tmp_path / "state.pt"), first)


# ----- every field of a loaded state: type, shape, device, range ------------------------------
def bad_states(good: dict):
    C = good["W"].shape[0]
    tiny_W = good["W"].clone()
    tiny_W[0] = 1e-320
    huge_S, small_W = good["S"].clone(), good["W"].clone()
    huge_S[0, 0], small_W[0] = 1e300, 1e-250  # a weight above the floor, a prototype of 1e550
    return [
        ({**good, "version": True}, ValueError, "version True"),
        ({**good, "version": 2.0}, ValueError, "version 2.0"),
        ({**good, "num_classes": float(C)}, ValueError, "num_classes"),
        ({**good, "num_classes": True}, ValueError, "num_classes"),
        ({**good, "temperature": torch.tensor([1.0, 1.0])}, ValueError, "temperature"),
        ({**good, "temperature": True}, ValueError, "temperature"),
        ({**good, "temperature": "1.0"}, ValueError, "temperature"),
        ({**good, "confidence_power": torch.tensor(1.0)}, ValueError, "confidence_power"),
        ({**good, "momentum": 0.0}, ValueError, "momentum"),
        ({**good, "momentum": "none"}, ValueError, "momentum"),
        ({**good, "S": good["S"].to("meta")}, ValueError, r"state\['S'\]: on the meta device"),
        ({**good, "W": good["W"].to("meta")}, ValueError, r"state\['W'\]: on the meta device"),
        ({**good, "N": good["N"].to("meta")}, ValueError, r"state\['N'\]: on the meta device"),
        ({**good, "S": good["S"].clone().requires_grad_()}, ValueError, r"state\['S'\]: requires grad"),
        ({**good, "W": good["W"].clone().requires_grad_()}, ValueError, r"state\['W'\]: requires grad"),
        ({**good, "N": good["N"][:-1]}, ValueError, r"state\['N'\]: expected shape"),
        ({**good, "N": -good["N"]}, ValueError, r"state\['N'\]: sums must be finite and non-negative"),
        ({**good, "N": good["N"].float()}, ValueError, r"state\['N'\]: expected a float64"),
        ({**good, "S": good["S"].numpy()}, ValueError, r"state\['S'\]: expected a float64 tensor"),
        ({**good, "W": tiny_W}, ValueError, r"state\['W'\]: a weight is 0"),
        ({**good, "S": huge_S, "W": small_W}, ValueError, r"state\['S'\]: the prototypes"),
        ({**good, "num_updates": True}, ValueError, "num_updates"),
        ({**good, "num_pixels": -1}, ValueError, "num_pixels"),
        ({**good, "num_pixels": 3.0}, ValueError, "num_pixels"),
    ]


def test_every_state_field_is_checked_and_a_bad_one_changes_nothing():
    good = fitted().state_dict()
    target = fitted()
    before = target.state_dict()
    for state, error, message in bad_states(good):
        with pytest.raises(error, match=message):  # the message tells which case failed
            target.load_state_dict(state)
        after = target.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in ("S", "W", "N"))
        assert (after["num_updates"], after["num_pixels"]) == (before["num_updates"], before["num_pixels"])
    target.load_state_dict(good)  # and the good one still loads
    assert torch.equal(target.S, good["S"])
