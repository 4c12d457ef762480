"""The fused CPU loops where real programs run them: without a cache folder, after fork(), from
several threads under Numba's workqueue layer, and the first call's compile notice. Each case runs
in a fresh Python process, as a user's program would."""
import os
import subprocess
import sys
import textwrap

import pytest

PROLOGUE = """
import os, sys, threading
import torch
{setup}
import fastcal
from fastcal import numba_backend
import oracle  # tests/ is on the child's PYTHONPATH
torch.manual_seed(0)
z = torch.randn(2, 19, 64, 64) * 3
P = fastcal.prototypes_from_stats(*fastcal.prototype_stats(z, backend="reference"))
def check():
    \"\"\"Both passes of the default CPU path against the float64 oracle.\"\"\"
    check_stats()
    oracle.assert_labels_match(fastcal.predict(z, P), z, P)
def check_stats():
    \"\"\"The stats pass against the oracle: one loop to compile where compiling is what is tested.\"\"\"
    oracle.assert_stats_close(*fastcal.prototype_stats(z), *oracle.stats(z))
"""


def run_python(body: str, env: dict | None = None, setup: str = "", timeout=300):
    """Run ``body`` after the prologue (``setup`` runs before fastcal is imported)."""
    code = PROLOGUE.format(setup=textwrap.dedent(setup)) + textwrap.dedent(body)
    tests = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    environment = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={key: value for key, value in environment.items() if value is not None})


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_without_a_writable_cache_folder():
    """Numba finds no cache locator (read-only package and home, NUMBA_CACHE_DIR unset): the loops
    compile in the process and say so."""
    result = run_python("""
    import numpy as np
    from fastcal import cpu_kernels
    assert not any(cpu_kernels._CACHED.values())
    # the smallest loop (the work units' sums, in order): compiling without a cache is what is tested
    parts = np.arange(2 * 3 * 3, dtype=np.float64).reshape(2, 3, 3)
    S, W, N = np.empty((3, 3)), np.empty(3), np.empty(3)
    cpu_kernels.sum_units(parts, parts[:, 0], parts[:, 1], S, W, N)
    assert np.array_equal(S, parts.sum(axis=0)) and np.array_equal(N, parts[:, 1].sum(axis=0))
    """, env={"NUMBA_CACHE_DIR": None}, setup="""
    from numba.core import caching
    def read_only(locator):  # what every folder of a read-only container answers
        raise PermissionError(30, "Read-only file system")
    caching._CacheLocator.ensure_cache_path = read_only
    """)
    assert_ok(result)
    assert "set NUMBA_CACHE_DIR" in result.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_child_forked_after_the_loops_ran_still_calibrates():
    """The child runs PyTorch operations on one thread (as DataLoader workers do): OpenMP's thread
    pools, the loops' and PyTorch's, do not survive fork(), and a parallel region there hangs."""
    result = run_python("""
    check()  # the parent starts the loops' threads and PyTorch's
    pid = os.fork()
    if pid == 0:
        import faulthandler
        faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the test instead of blocking it
        try:
            assert not numba_backend.can_run(z)  # the child takes the PyTorch operations
            S, W = fastcal.prototype_stats(z)
            labels = fastcal.predict(z, P)
            assert torch.get_num_threads() == 1  # set at the fork, for the program's operations too
            oracle.assert_stats_close(S, W, *oracle.stats(z))
            oracle.assert_labels_match(labels, z, P)
        except BaseException as error:
            print("child:", repr(error), file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    check()  # and the parent keeps its loops
    assert numba_backend.can_run(z)
    """)
    assert_ok(result)


FORK_WITHOUT_A_FASTCAL_CALL = """
import os, sys, faulthandler
import torch
import fastcal
x = torch.randn(1, 19, 64, 64)
torch.randn(1000, 1000).sum()  # a multi-threaded PyTorch op, and no fastcal call, before the fork
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test instead of blocking it
    labels = fastcal.calibrate(x)
    os._exit(0 if labels.shape == (1, 64, 64) else 1)
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_child_forked_before_any_fastcal_call_finishes():
    """The fork hook is in place from ``import fastcal`` on, not from the first CPU op."""
    result = subprocess.run([sys.executable, "-c", FORK_WITHOUT_A_FASTCAL_CALL], capture_output=True, text=True,
                            timeout=240)
    assert_ok(result)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_forked_data_loader_workers_calibrate():
    """DataLoader workers started with fork, whose dataset calls fastcal, finish and agree with the
    parent's labels."""
    result = run_python("""
    torch.randn(1000, 1000).sum()
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return fastcal.calibrate(z[i % 2 : i % 2 + 1])[0]
    loader = torch.utils.data.DataLoader(Images(), batch_size=2, num_workers=2, multiprocessing_context="fork",
                                         timeout=120)
    batches = list(loader)
    expected = torch.cat([fastcal.calibrate(z[0:1]), fastcal.calibrate(z[1:2])])
    for batch in batches:
        assert torch.equal(batch, expected)
    """)
    assert_ok(result)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_every_op_of_a_forked_child_finishes_at_every_class_count():
    """Past PyTorch's grain size (C x C > 32768: 182 classes) even fastcal's small C x C operations
    (adding sums, preparing prototypes) would open a parallel region; the child runs them on one
    thread, on every CPU backend, from 2 to 1024 classes."""
    result = run_python("""
    from fastcal.export import calibration_head
    check()  # the parent starts the loops' threads and PyTorch's
    torch.randn(1000, 1000).sum()
    cases = [(C, backend, torch.randn(2, C, 4, 5) * 3) for C in (2, 181, 182, 300, 1024)
             for backend in ("reference", "torch", "torch-ops")]
    pid = os.fork()
    if pid == 0:
        import faulthandler
        faulthandler.dump_traceback_later(200, exit=True)  # a hang fails the test instead of blocking it
        try:
            for C, backend, logits in cases:
                cal = fastcal.LabelCalibrator(C, backend=backend).update(logits).update(logits)
                P = cal.prototypes
                labels = fastcal.predict(logits, P.clone(), backend=backend)
                assert torch.equal(labels, cal.predict(logits))
                assert torch.equal(fastcal.calibrate(logits, backend=backend), labels)
                fastcal.prototypes_from_stats(*fastcal.prototype_stats(logits, backend=backend))
                calibration_head(cal)
                if C <= 300:  # past the grain size already; at 1024 its C^3 check of certain pixels is slow
                    cal.diagnostics()
        except BaseException as error:
            print("child:", repr(error), file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child status {status}"
    """, timeout=280)
    assert_ok(result)


def test_concurrent_calls_under_the_workqueue_layer():
    result = run_python("""
    import numba
    results, errors = {}, []
    def work(i):
        try:
            for _ in range(3):
                results[i] = fastcal.prototype_stats(z), fastcal.predict(z, P)
        except BaseException as error:
            errors.append(error)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    assert numba.threading_layer() == "workqueue"
    for (S, W), labels in results.values():
        oracle.assert_stats_close(S, W, *oracle.stats(z))
        oracle.assert_labels_match(labels, z, P)
    """, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert_ok(result)


def test_first_call_tells_the_user_it_compiles(tmp_path):
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    first = run_python("check_stats()", env)
    assert_ok(first)
    assert "fastcal: compiling the CPU loop stats_chunk for float32 data" in first.stderr
    assert "fastcal: compiled in" in first.stderr
    again = run_python("check_stats()", env)  # loaded from the cache
    assert_ok(again)
    assert "compiling" not in again.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
def test_a_child_forked_while_another_thread_holds_a_lock_finishes():
    """Every lock fastcal owns (the prepared prototypes', the plans', each calibrator's) is replaced
    in a forked child: one held by another thread of the parent at the fork would never be let go."""
    result = run_python("""
        from fastcal import _operands, _plan
        cal = fastcal.LabelCalibrator(19).update(z)
        holding, release = threading.Event(), threading.Event()
        def hold():
            with _operands._operands_cache._lock, _plan._cache._lock, cal._lock:
                holding.set()
                release.wait()
        thread = threading.Thread(target=hold)
        thread.start()
        holding.wait()
        pid = os.fork()
        if pid == 0:
            cal.update(z)
            labels = cal.predict(z)
            fastcal.predict(z, P.clone())
            os._exit(0 if labels.shape == (2, 64, 64) and cal.num_updates == 2 else 1)
        release.set()
        thread.join()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    """, timeout=240)
    assert_ok(result)
