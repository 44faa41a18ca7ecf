"""Mask diagnostics in real (tiny) runs, and scripts/compare_masks.py on their checkpoints.

Two RigL runs (seeds 0 and 1, mask updates every 2 steps) are trained once per module; an
IMP-shaped folder is laid out from their checkpoints to check that an IMP run folder means
its last lottery level.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab import files
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
RUN = ("pruning=rigl", "sparsity=0.9", "epochs=2", "schedule.update_every=2", "cost.latency=false")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def runs(runs_dir, compose_cfg) -> dict[str, Path]:
    """Train both runs once per module (the first test that asks pays for it)."""
    out = {"a": runs_dir / "a", "b": runs_dir / "b"}
    if not (runs_dir / "done").exists():
        for seed, run_dir in enumerate(out.values()):
            record = train(compose_cfg(*RUN, f"seed={seed}", run_dir=run_dir))
            assert record["status"] == "completed"
        (runs_dir / "done").touch()
    return out


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_masks.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_results_and_logs_hold_the_diagnostics(runs):
    record = json.loads(files.results_path(runs["a"]).read_text())
    diag = record["sparsity"]["diagnostics"]
    assert list(diag["layers"]) == list(record["sparsity"]["layers"])
    # The default MLP has a residual layer: no chain path analysis, only local dead units.
    assert diag["chain"] is False and diag["disconnected_layers"] == []
    for name, layer in diag["layers"].items():
        assert layer["density"] == pytest.approx(1 - record["sparsity"]["layers"][name])
        assert 0 <= layer["dead_units"] <= layer["out_units"]
    assert diag["effective_sparsity"] >= record["sparsity"]["global"]
    with files.csv_metrics(runs["a"]).open() as handle:
        rows = list(csv.DictReader(handle))
    logged = [r for r in rows if r.get("mask/dead_units")]
    # At initialisation and at every update step; gradient norms at the updates only.
    assert len(logged) == 1 + record["sparsity"]["n_updates"] >= 2
    with_grads = [r for r in logged if r.get("mask/grad_norm_inactive")]
    assert len(with_grads) == record["sparsity"]["n_updates"]
    assert all(float(r["mask/grad_norm_inactive"]) > 0 for r in with_grads)
    assert any(f"mask/dead_units/{name}" in rows[0] for name in diag["layers"])


def test_compare_two_runs_and_an_imp_folder(runs, tmp_path):
    # An IMP run folder: its last lottery level (level_01, a copy of run b) is the one read.
    imp_dir = tmp_path / "imp"
    for level, source in (("level_00", "a"), ("level_01", "b"), ("level_01_random", "a")):
        target = files.last_checkpoint(imp_dir / files.IMP_LEVELS_DIR / level)
        target.parent.mkdir(parents=True)
        shutil.copy(files.last_checkpoint(runs[source]), target)
    png, report = tmp_path / "plots" / "jaccard.png", tmp_path / "compare.json"
    result = _run(
        str(runs["a"]), str(runs["b"]), str(imp_dir), "--out", str(png), "--json", str(report)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| run A | run B | layer | Jaccard | Hamming | Hamming % |" in lines
    assert any(line.startswith("| 1 | rigl/0.9/seed0 |") for line in lines)
    assert any(line.startswith("| 2 | rigl/0.9/seed1 |") for line in lines)
    assert any(line.startswith("| 3 | level_01 |") for line in lines)
    data = json.loads(report.read_text())
    pairs = {(p["a"], p["b"]): p for p in data["pairs"]}
    assert set(pairs) == {
        ("rigl/0.9/seed0", "rigl/0.9/seed1"),
        ("rigl/0.9/seed0", "level_01"),
        ("rigl/0.9/seed1", "level_01"),
    }
    differ = pairs[("rigl/0.9/seed0", "rigl/0.9/seed1")]
    assert 0.0 < differ["global"]["jaccard"] < 1.0 and differ["global"]["hamming"] > 0
    same = pairs[("rigl/0.9/seed1", "level_01")]["global"]
    assert (same["jaccard"], same["hamming"]) == (1.0, 0)
    jaccard = differ["global"]["jaccard"]
    assert f"| rigl/0.9/seed0 | rigl/0.9/seed1 | global | {jaccard:.3f} |" in result.stdout
    for layer in differ["layers"]:
        assert f"| rigl/0.9/seed0 | rigl/0.9/seed1 | {layer} |" in result.stdout
    matrix = data["jaccard_matrix"]
    assert [matrix[i][i] for i in range(3)] == [1.0] * 3 and matrix[0][1] == matrix[1][0]
    assert png.stat().st_size > 1000


def test_bad_folders_are_one_line_errors(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run(str(runs["a"]), str(empty), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {empty}: no checkpoint (looked for checkpoints/last.ckpt)"
    ]
    other = files.last_checkpoint(tmp_path / "other")
    other.parent.mkdir(parents=True)
    torch.save({"sparsity_engine": {"masks": {"x.weight": torch.ones(2, 2).bool()}}}, other)
    result = _run(str(runs["a"]), str(other.parents[1]), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: rigl/0.9/seed0 and other cannot be compared: the masks cover")
    assert not (tmp_path / "x.png").exists()
