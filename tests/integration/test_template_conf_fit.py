"""The template's config groups on tiny real runs: early stopping, debug modes, eval.py as a
Hydra app, enforce_tags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
NO_LATENCY = "cost.latency=false"
# An lr this small leaves the weights (and so val/acc) unchanged from epoch to epoch: after
# its first counted epoch, early stopping with patience 1 stops at the next one.
FLAT = ("lr=1e-12", "epochs=6", "callbacks=[default,early_stopping]")
STOP_SOON = "callbacks.early_stopping.patience=1"
STATIC = ("pruning=static", "schedule.at_epoch=3", "sparsity=0.5")


def test_early_stopping_stops_a_dense_run(compose_cfg):
    record = train(compose_cfg(*FLAT, STOP_SOON, NO_LATENCY))
    assert record["status"] == "completed"
    # Epoch 0 sets the best val/acc, epoch 1 does not improve: stopped after 2 of 6 epochs.
    assert record["epochs_completed"] == 2 and record["global_step"] == 8


def test_early_stopping_never_stops_a_static_run_before_its_pruning_step(compose_cfg, tmp_path):
    record = train(compose_cfg(*FLAT, *STATIC, STOP_SOON, NO_LATENCY))
    assert record["status"] == "completed"
    # Dense epochs 0-2 are not counted; pruned at the start of epoch 3, stopped after epoch 4.
    assert record["epochs_completed"] == 5
    assert record["sparsity"]["global"] == pytest.approx(0.5, abs=1e-3)
    assert record["best_checkpoint"]["epoch"] == 3
    assert record["best_checkpoint"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # Lightning's own EarlyStopping would have stopped the run dense, before its target.
    stock = "callbacks.early_stopping._target_=pytorch_lightning.callbacks.EarlyStopping"
    dense = train(compose_cfg(*FLAT, *STATIC, STOP_SOON, stock, NO_LATENCY, run_dir=tmp_path / "s"))
    assert dense["epochs_completed"] == 2 and dense["sparsity"]["global"] == 0.0


def test_callbacks_none_still_checkpoints(compose_cfg, tmp_path):
    record = train(compose_cfg("callbacks=none", NO_LATENCY))
    assert files.last_checkpoint(tmp_path / "run").is_file()
    assert record["best_checkpoint"]["epoch"] == 0


class _Batches(pl.Callback):
    """Records the first input value of every training batch, by epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, []).append(float(batch[0].flatten()[0]))


def test_debug_overfit_trains_on_the_same_batches(compose_cfg):
    spy = _Batches()
    record = train(compose_cfg("debug=overfit", "epochs=3", NO_LATENCY, fast=False), [spy])
    assert record["status"] == "completed" and record["global_step"] == 9
    assert len(spy.seen[0]) == 3 and spy.seen[0] == spy.seen[1] == spy.seen[2]


def test_debug_limit_runs(compose_cfg):
    record = train(compose_cfg("debug=limit", NO_LATENCY, fast=False))
    assert record["status"] == "completed"
    assert record["epochs_completed"] == 3 and record["global_step"] == 30


def test_debug_profiler_writes_its_report_into_the_run_folder(compose_cfg, tmp_path):
    record = train(compose_cfg("debug=profiler", "trainer.limit_train_batches=3", NO_LATENCY))
    assert record["status"] == "completed"
    report = tmp_path / "run" / "fit-profile.txt"
    assert report.is_file() and "run_training_epoch" in report.read_text()


def test_enforce_tags_refuses_an_untagged_multirun_config(compose_cfg, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(compose_cfg("extras.enforce_tags=true", "hydra.mode=MULTIRUN", NO_LATENCY))
    assert "needs tags" in str(err.value) and "\n" not in str(err.value)
    record = json.loads(files.results_path(tmp_path / "run").read_text())
    assert record["status"] == "failed" and not files.last_checkpoint(tmp_path / "run").exists()
    tagged = compose_cfg(
        "extras.enforce_tags=true",
        "hydra.mode=MULTIRUN",
        "tags=[t]",
        NO_LATENCY,
        run_dir=tmp_path / "tagged",
    )
    assert train(tagged)["status"] == "completed"


def test_train_cli_refuses_an_untagged_sweep_before_any_job(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "seed=0,1",
            "extras.enforce_tags=true",
            "debug=fast",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: extras.enforce_tags")
    assert not list(tmp_path.iterdir())  # no sweep folder, no job


def _two_runs(compose_cfg, tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    train(compose_cfg("pruning=rigl", "sparsity=0.8", NO_LATENCY, run_dir=a))
    train(compose_cfg("seed=1", NO_LATENCY, run_dir=b))
    return a, b


def test_eval_app_evaluates_a_checkpoint_and_a_sweep_of_two(compose_cfg, tmp_path, capsys):
    from prunelab.evaluate import main

    a, b = _two_runs(compose_cfg, tmp_path)
    logs = tmp_path / "logs"
    assert main([f"ckpt_path={files.last_checkpoint(a)}", f"paths.log_dir={logs}"]) == 0
    report = json.loads((files.export_dir(a) / files.EXPORT_REPORT).read_text())
    assert report["checkpoint"] == "last" and report["ckpt_path"] == str(files.last_checkpoint(a))
    accs = report["test_acc"]
    assert all(abs(accs[k] - accs["checkpoint"]) <= 1e-6 for k in ("state_dict", "sparse", "onnx"))
    assert "test/acc" in capsys.readouterr().out
    (job,) = (logs / "runs" / "eval").iterdir()
    assert (job / files.HYDRA_DIR / files.HYDRA_CONFIG).is_file()

    best_b = files.checkpoint_dir(b) / files.BEST_CHECKPOINT
    out = tmp_path / "exports"
    argv = ["-m", f"ckpt_path={files.last_checkpoint(a)},{best_b}", f"paths.log_dir={logs}"]
    assert main([*argv, f"export_dir={out}/${{hydra:job.num}}"]) == 0
    reports = [json.loads((out / n / files.EXPORT_REPORT).read_text()) for n in ("0", "1")]
    assert [r["run_dir"] for r in reports] == [str(a), str(b)]
    assert [r["checkpoint"] for r in reports] == ["last", "best"]
    assert reports[0]["test_acc"]["checkpoint"] == pytest.approx(accs["checkpoint"])
    (sweep,) = (logs / "multiruns" / "eval").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]


def test_eval_app_keeps_the_run_folder_form(compose_cfg, tmp_path):
    from prunelab.evaluate import main

    _, b = _two_runs(compose_cfg, tmp_path)
    assert main([str(b), "--checkpoint", "best", f"paths.log_dir={tmp_path / 'logs'}"]) == 0
    report = json.loads((files.export_dir(b) / files.EXPORT_REPORT).read_text())
    assert report["checkpoint"] == "best" and report["run_dir"] == str(b)
