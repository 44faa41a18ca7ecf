"""The benchmark scripts run end to end and end with their ``name: value`` headline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> list[str]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def _headline(lines: list[str], name: str) -> float:
    match = re.fullmatch(rf"{name}: (\d+\.\d+)", lines[-1])
    assert match, lines[-1]
    return float(match.group(1))


def test_overhead_benchmark_pairs_epochs_with_the_hand_loop():
    lines = _run("scripts/bench_overhead.py", "--epochs", "2", "--rounds", "1")
    pairs = next(line for line in lines if line.startswith("pair ratios:")).split()[2:]
    assert len(pairs) == 1  # two epochs, the first one is warm-up
    assert 0.5 < _headline(lines, "overhead") < 5.0


@pytest.mark.slow
def test_overhead_benchmark_compares_a_pruned_run_with_dense():
    lines = _run(
        "scripts/bench_overhead.py",
        "pruning=rigl",
        "sparsity=0.9",
        "--epochs",
        "2",
        "--rounds",
        "1",
    )
    assert any("vs prunelab dense" in line for line in lines)
    assert any(line.startswith("pruned / hand loop, per pair: ") for line in lines)
    assert 0.5 < _headline(lines, "overhead") < 5.0
