"""The prepared GPU check script keeps working: its logic runs here with the CPU standing in for the device."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_dry_run_on_cpu() -> None:
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "all checks passed" in p.stdout and p.stdout.count("PASS") == 8


def test_device_check_refuses_a_missing_device() -> None:
    import torch

    if torch.cuda.is_available():
        return
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py")], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "PASS" not in p.stdout
