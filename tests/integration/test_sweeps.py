"""Hydra multiruns through the real CLI: joblib, skip_completed, failures, Optuna, submitit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab import files

ROOT = Path(__file__).resolve().parents[2]
TINY = ("debug=fast", "trainer.enable_progress_bar=false")


def _multirun(sweep_dir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *TINY,
            *args,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(sweep_dir: Path) -> dict[str, dict]:
    return {
        p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.rglob(files.RESULTS))
    }


def test_joblib_sweep_runs_every_cell(tmp_path):
    proc = _multirun(tmp_path, "launcher=joblib", "n_jobs=2", "pruning=dense,rigl", "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert len(records) == 4
    assert all(r["status"] == "completed" for r in records.values())
    cells = {(r["choices"]["pruning"], r["seed"]) for r in records.values()}
    assert cells == {("dense", 0), ("dense", 1), ("rigl", 0), ("rigl", 1)}
    by_method = {}
    for r in records.values():
        by_method.setdefault(r["choices"]["pruning"], set()).add(r["config_hash"])
    assert all(len(h) == 1 for h in by_method.values())  # seeds share their cell's hash


def test_skip_completed_reruns_only_missing_cells(tmp_path):
    args = ("pruning=dense,rigl", "seed=0,1")
    assert _multirun(tmp_path, *args).returncode == 0
    before = _records(tmp_path)
    assert len(before) == 4
    killed = sorted(before)[1]
    files.results_path(tmp_path / killed).unlink()  # as if the sweep died in that job
    stamps = {n: files.results_path(tmp_path / n).stat().st_mtime_ns for n in before if n != killed}
    proc = _multirun(tmp_path, *args, "skip_completed=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = _records(tmp_path)
    assert set(after) == set(before) and all(r["status"] == "completed" for r in after.values())
    for name, stamp in stamps.items():  # completed cells were not run again
        assert files.results_path(tmp_path / name).stat().st_mtime_ns == stamp
    assert after[killed]["config_hash"] == before[killed]["config_hash"]


def test_a_failing_cell_does_not_stop_the_sweep(tmp_path):
    # random takes no prune-and-grow schedule: that cell fails, the others run.
    proc = _multirun(tmp_path, "pruning=rigl,random", "schedule=drop_cosine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    status = {r["config"]["pruning"]["name"]: r["status"] for r in records.values()}
    assert status == {"rigl": "completed", "random": "failed"}
    failed = next(r for r in records.values() if r["status"] == "failed")
    assert "random" in failed["error"] and "\n" not in failed["error"]


def test_optuna_search_runs_three_trials(tmp_path):
    proc = _multirun(tmp_path, "hparams_search=rigl_optuna", "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert len(records) == 3 and all(r["status"] == "completed" for r in records.values())
    lrs = {r["config"]["lr"] for r in records.values()}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 3e-2 for lr in lrs)
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_params" in best and "best_value" in best


@pytest.mark.slow
def test_submitit_local_two_jobs(tmp_path):
    proc = _multirun(tmp_path, "launcher=submitit_local", "pruning=dense,rigl", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert len(records) == 2 and all(r["status"] == "completed" for r in records.values())
