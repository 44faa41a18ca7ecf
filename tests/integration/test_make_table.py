"""scripts/make_table.py and scripts/plot_tradeoff.py on real (tiny) training runs.

The runs are laid out like a Hydra multirun (``<sweep>/<job>/results.json``): dense and
RigL at sparsity 0.8 and 0.9 with seeds 0 and 1, plus two failed jobs at 0.95 — one that
failed while building (a failed record) and one whose config was rejected before any record
was written (only Hydra's ``.hydra/overrides.yaml``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
GRID = [(p, s, seed) for p in ("dense", "rigl") for s in ("0.8", "0.9") for seed in (0, 1)]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multirun")


@pytest.fixture
def sweep(sweep_dir, compose_cfg) -> Path:
    """Train the grid once per module (the first test that asks pays for it)."""
    if (sweep_dir / "done").exists():
        return sweep_dir
    for job, (pruning, sparsity, seed) in enumerate(GRID):
        overrides = (f"pruning={pruning}", f"sparsity={sparsity}", f"seed={seed}")
        assert train(compose_cfg(*overrides, run_dir=sweep_dir / str(job)))["status"] == "completed"
    # Job 8 fails while building: a failed record without Hydra choices.
    with pytest.raises(ConfigError):
        train(
            compose_cfg(
                "pruning=rigl", "sparsity=0.95", "seed=0", "model=resnet20", run_dir=sweep_dir / "8"
            )
        )
    # Job 9 is rejected by validation: no record, only the overrides Hydra saved.
    bad = ("pruning=rigl", "sparsity=0.95", "seed=1", "lr=-1")
    with pytest.raises(ConfigError):
        train(compose_cfg(*bad, run_dir=sweep_dir / "9"))
    assert not files.results_path(sweep_dir / "9").exists()
    hydra_dir = sweep_dir / "9" / files.HYDRA_DIR
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in bad))
    (sweep_dir / "done").touch()
    return sweep_dir


def _expected(sweep: Path, pruning: str, sparsity: str | None) -> tuple[float, float]:
    """Mean and sample std over seeds of test/acc, straight from the results files."""
    per_seed: dict[int, list[float]] = {}
    for job, (p, s, seed) in enumerate(GRID):
        if p == pruning and (sparsity is None or s == sparsity):
            record = json.loads(files.results_path(sweep / str(job)).read_text())
            per_seed.setdefault(seed, []).append(record["metrics"]["test/acc"])
    values = [statistics.fmean(v) for v in per_seed.values()]
    return statistics.fmean(values), statistics.stdev(values)


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_markdown_table(sweep, tmp_path):
    out = tmp_path / "table.md"
    result = _run("make_table.py", str(sweep), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == result.stdout
    lines = result.stdout.splitlines()
    assert "| pruning | 80% | 90% | 95% |" in lines
    dense_mean, dense_std = _expected(sweep, "dense", None)
    dense = f"{100 * dense_mean:.2f} ± {100 * dense_std:.2f} (n=2)"
    assert f"| dense | {dense} | {dense} | {dense} |" in lines
    rigl = [_expected(sweep, "rigl", s) for s in ("0.8", "0.9")]
    cells = " | ".join(f"{100 * m:.2f} ± {100 * s:.2f} (n=2)" for m, s in rigl)
    assert f"| rigl | {cells} | failed |" in lines
    notes = result.stdout[result.stdout.index("\n- ") :]
    assert "rigl/95% failed: seed 0: failed (ConfigError: model 'resnet20'" in notes
    assert "seed 1: failed (no results.json" in notes
    assert "repeated in every sparsity column" in notes


def test_latex_table(sweep):
    result = _run("make_table.py", str(sweep), "--format", "latex")
    assert result.returncode == 0, result.stderr
    tex = result.stdout
    for token in ("\\begin{tabular}{lrrr}", "\\toprule", "\\midrule", "\\bottomrule"):
        assert token in tex
    mean, std = _expected(sweep, "rigl", "0.8")
    assert f"rigl & {100 * mean:.2f} $\\pm$ {100 * std:.2f} & " in tex
    assert tex.rstrip().splitlines()[-3].endswith("& failed \\\\")
    assert "n=2 unless shown" in tex


def test_csv_table_numbers_are_the_means_of_the_records(sweep):
    result = _run("make_table.py", str(sweep), "--format", "csv", "--extra", "cost.flops_train")
    assert result.returncode == 0, result.stderr
    rows = {(r["pruning"], r["sparsity"]): r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert set(rows) == {(p, s) for p in ("dense", "rigl") for s in ("0.8", "0.9", "0.95")}
    for pruning, sparsity in [
        ("dense", "0.8"),
        ("dense", "0.95"),
        ("rigl", "0.8"),
        ("rigl", "0.9"),
    ]:
        row = rows[(pruning, sparsity)]
        mean, std = _expected(sweep, pruning, None if pruning == "dense" else sparsity)
        assert float(row["mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(row["std"]) == pytest.approx(std, abs=1e-9)
        assert (row["n"], row["n_jobs"], row["status"]) == ("2", "2", "ok")
    failed = rows[("rigl", "0.95")]
    assert (failed["mean"], failed["n"], failed["n_jobs"], failed["status"]) == (
        "",
        "0",
        "2",
        "failed",
    )
    assert "cost.flops_train" in next(iter(rows.values()))  # requested column, empty if absent


def test_no_records_is_a_one_line_error(tmp_path):
    result = _run("make_table.py", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: no results found")
    unknown = _run("make_table.py", str(tmp_path), "--published", "nope")
    assert unknown.returncode == 2 and "lenet300_mnist" in unknown.stderr


def test_plots_are_written(sweep, tmp_path):
    out_dir = tmp_path / "plots"
    result = _run(
        "plot_tradeoff.py",
        str(sweep),
        "--out-dir",
        str(out_dir),
        "--wandb-run",
        str(tmp_path / "wb"),
    )
    assert result.returncode == 0, result.stderr
    for name in ("accuracy_vs_sparsity.png", "sparsity_curves.png", "accuracy_vs_flops.png"):
        assert (out_dir / name).stat().st_size > 1000
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
