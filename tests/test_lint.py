"""The house rules: ``ruff check`` (its rule set in pyproject.toml, why in docs/tests.md) finds
nothing in the repository, so an unused name, a stray blank line or imports out of order never land."""
import os
import shutil
import subprocess
import sys


def test_ruff_finds_nothing():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ruff = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    result = subprocess.run([ruff, "check", "--no-cache", root], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
