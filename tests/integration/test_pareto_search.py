"""The multi-objective Optuna search (accuracy vs a cost) through the real CLI, and the Pareto
figure of its records drawn by scripts/plot_tradeoff.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prunelab import files
from prunelab.report.plots import pareto_front

ROOT = Path(__file__).resolve().parents[2]
TINY = (
    "epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "logger.wandb.enabled=false",
    "cost.latency=false",
)
METHODS = {"static", "gmp", "set", "rigl"}


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _search(sweep_dir: Path, trials: int, *args: str) -> list[dict]:
    proc = _run(
        str(ROOT / "train.py"),
        "hparams_search=pareto_optuna",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.n_jobs=1",
        *TINY,
        *args,
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "error:" not in proc.stderr, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob(files.RESULTS))]
    assert len(records) == trials
    assert all(r["status"] == "completed" for r in records)
    for r in records:
        assert 0.5 <= r["config"]["sparsity"] <= 0.99
        assert 1e-4 <= r["config"]["lr"] <= 3e-2
        assert r["config"]["pruning"]["name"] in METHODS
    return records


def _optuna_front(sweep_dir: Path) -> list[tuple[float, float]]:
    """Optuna's Pareto solutions as sorted (accuracy, cost) pairs."""
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert all(len(s["values"]) == 2 for s in results["solutions"])
    return sorted(tuple(s["values"]) for s in results["solutions"])


def _records_front(records: list[dict], cost: str) -> list[tuple[float, float]]:
    points = [(r["cost"][cost], r["metrics"]["val/acc_best"]) for r in records]
    return sorted((y, x) for x, y in pareto_front(points))


def _plot(sweep_dir: Path, out_dir: Path, cost_key: str, runs: int) -> Path:
    proc = _run(
        str(ROOT / "scripts" / "plot_tradeoff.py"),
        str(sweep_dir),
        "--metric",
        "val/acc_best",
        "--pareto",
        cost_key,
        "--out-dir",
        str(out_dir),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = Path(proc.stdout.splitlines()[0])
    assert png.parent == out_dir and png.name.startswith("pareto_")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"of {runs} runs" in proc.stdout and "Optuna's own front" in proc.stdout
    return png


def test_pareto_search_six_trials_and_its_plot(tmp_path):
    sweep = tmp_path / "sweep"
    records = _search(sweep, 6)
    assert len({r["config"]["sparsity"] for r in records}) == 6
    # The front drawn from the records is the one Optuna reports for the same objectives.
    assert _records_front(records, "flops_train") == _optuna_front(sweep)
    png = _plot(sweep, tmp_path / "plots", "cost.flops_train", runs=6)
    assert png.name == "pareto_flops_train.png"


@pytest.mark.slow
def test_pareto_search_two_trials_on_inference_macs(tmp_path):
    """The cost is chosen on the command line (the fast suite checks the choice in the unit
    tests of optimized_metric)."""
    sweep = tmp_path / "sweep"
    records = _search(sweep, 2, "optimized_metric=[val/acc_best,cost/macs_infer_sparse]")
    assert _records_front(records, "macs_infer_sparse") == _optuna_front(sweep)
    png = _plot(sweep, tmp_path / "plots", "cost/macs_infer_sparse", runs=2)
    assert png.name == "pareto_macs_infer_sparse.png"
