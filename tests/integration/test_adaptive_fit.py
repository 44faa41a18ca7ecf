"""pruning=adaptive through the real config and Lightning: the dense stage and every tried
sparsity as sub-runs, the summary (chosen, tried, stopped_because), a MACs budget, a budget
no point meets, and bad input rejected before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.evaluate import load_run, resolve_checkpoint
from prunelab.methods.adaptive import BudgetNotMet
from prunelab.report.records import find_records
from prunelab.train import train

ADAPTIVE = (
    "pruning=adaptive",
    "pruning.search_steps=3",
    "pruning.finetune_epochs=1",
    "cost.latency=false",
)
# The default MLP on MNIST-1D: about 15,000 MACs dense; sparsity 0.5 needs about 7,500,
# 0.9293 (the log-density midpoint of 0.5 and 0.99) about 1,100.
MAX_MACS = 4000


def test_macs_budget_picks_the_lowest_sparsity_under_it(compose_cfg, tmp_path):
    run_dir = tmp_path / "adaptive"
    record = train(compose_cfg(*ADAPTIVE, f"max_macs={MAX_MACS}", run_dir=run_dir))
    assert record["status"] == "completed"
    summary = record["adaptive"]
    tried = summary["tried"]
    # Cost alone: the top of the range first (passes), the bottom (fails), then the midpoint.
    assert [p["sparsity"] for p in tried] == [0.99, 0.5, 0.9293]
    assert [p["feasible"] for p in tried] == [True, False, True]
    assert summary["stopped_because"] == "max_steps" and summary["mode"] == "cost"
    chosen = summary["chosen"]
    assert chosen["sparsity"] == 0.9293 and chosen["macs"] <= MAX_MACS
    for point in tried:
        assert set(point) >= {"sparsity", "val_acc", "drop", "macs", "latency_ms", "feasible"}
        assert point["drop"] == pytest.approx(summary["reference_val_acc"] - point["val_acc"])
    # The summary's metrics, sparsity and cost are the chosen sub-run's.
    sub = json.loads(files.results_path(chosen["run_dir"]).read_text())
    assert record["metrics"]["val/acc"] == sub["metrics"]["val/acc"] == chosen["val_acc"]
    assert record["sparsity"]["global"] == pytest.approx(0.9293, abs=1e-3)
    assert sub["cost"]["macs_infer_sparse"] == pytest.approx(chosen["macs"], rel=1e-3)
    assert record["chosen_run"] == chosen["run_dir"]
    # Every stage is a sub-run; tables read those, not the summary.
    assert [line["stage"] for line in record["sub_runs"]] == [
        "dense", "step_01", "step_02", "step_03",
    ]  # fmt: skip
    assert files.last_checkpoint(files.adaptive_point_dir(run_dir, None)).exists()
    assert len(find_records([run_dir])) == 4
    # eval.py and scripts/sensitivity.py reload any stage, and the run itself as its choice.
    for stage in (files.adaptive_point_dir(run_dir, None), run_dir):
        folder, ckpt, _ = resolve_checkpoint(run_dir=stage)
        loaded = load_run(folder, ckpt_path=ckpt)
        expected = 0.0 if stage != run_dir else chosen["sparsity"]
        assert loaded["masks"].sparsity() == pytest.approx(expected, abs=1e-3)
        assert folder == (
            stage if stage != run_dir else files.adaptive_dir(run_dir) / "step_03_s0.9293"
        )


def test_accuracy_budget_reports_chosen_tried_and_why(compose_cfg, tmp_path):
    run_dir = tmp_path / "adaptive"
    # A loose budget: the top of the range passes, so the search stops after both ends.
    record = train(compose_cfg(*ADAPTIVE, "max_accuracy_drop=0.99", run_dir=run_dir))
    summary = record["adaptive"]
    assert [p["sparsity"] for p in summary["tried"]] == [0.5, 0.99]
    assert summary["stopped_because"] == "range_end_passes"
    assert "raise pruning.hi" in summary["reason"]
    assert summary["chosen"]["sparsity"] == 0.99 and summary["budget_met"]
    assert summary["chosen"]["drop"] <= 0.99
    dense = json.loads(files.results_path(files.adaptive_point_dir(run_dir, None)).read_text())
    assert summary["reference_val_acc"] == dense["metrics"]["val/acc"]
    assert dense["sparsity"]["global"] == 0.0
    # The same command in the same folder reads the completed stages back: nothing retrains.
    ckpts = sorted(files.adaptive_dir(run_dir).glob("*/checkpoints/last.ckpt"))
    stamps = [c.stat().st_mtime_ns for c in ckpts]
    again = train(compose_cfg(*ADAPTIVE, "max_accuracy_drop=0.99", run_dir=run_dir))
    assert again["adaptive"]["tried"] == summary["tried"]
    assert [c.stat().st_mtime_ns for c in ckpts] == stamps and len(ckpts) == 3
    # Another budget in that folder is refused before training.
    with pytest.raises(ConfigError, match="another configuration"):
        train(compose_cfg(*ADAPTIVE, "max_accuracy_drop=0.5", run_dir=run_dir))


def test_budget_no_point_meets_writes_the_summary_then_fails(compose_cfg, tmp_path):
    run_dir = tmp_path / "adaptive"
    with pytest.raises(BudgetNotMet) as err:
        train(compose_cfg(*ADAPTIVE, "max_macs=1", run_dir=run_dir))
    message = str(err.value)
    assert "\n" not in message and "no sparsity in [0.5, 0.99] met the budget" in message
    assert "closest: sparsity 0.99" in message
    record = json.loads(files.results_path(run_dir).read_text())
    assert record["status"] == "failed" and record["error"].startswith("BudgetNotMet")
    summary = record["adaptive"]
    assert summary["chosen"] is None and summary["closest"]["sparsity"] == 0.99
    assert summary["stopped_because"] == "safe_end_fails" and len(summary["tried"]) == 1


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (("max_accuracy_drop=1.5",), "max_accuracy_drop must be a number in (0, 1)"),
        (("max_accuracy_drop=0",), "max_accuracy_drop must be a number in (0, 1)"),
        ((), "pruning=adaptive needs a budget"),
        (("max_macs=0",), "max_macs must be a number > 0"),
        (("max_accuracy_drop=0.01", "dataset.val_fraction=0"), "dataset.val_fraction=0"),
        (("max_latency_ms=1",), "max_latency_ms needs the measured latency"),
        (("max_accuracy_drop=0.01", "pruning.lo=0.995"), "must be below pruning.hi"),
    ],
)
def test_bad_input_fails_before_training(compose_cfg, tmp_path, overrides, fragment):
    run_dir = tmp_path / "adaptive"
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(*ADAPTIVE, *overrides, run_dir=run_dir))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not files.adaptive_dir(run_dir).exists()  # nothing trained


def test_command_line_error_is_one_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "pruning=adaptive",
            "max_accuracy_drop=2",
            "logger.wandb.enabled=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=files.Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: max_accuracy_drop must be a number in (0, 1), got 2; e.g. max_accuracy_drop=0.01"
    ]
