"""What a run records about how it was made, and how it refuses what it cannot trust: the
code version, reuse of completed cells (skip_completed), weights left out of pruning, and
config nodes that cannot be instantiated."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf

import prunelab.train as train_module
from prunelab import files
from prunelab.errors import ConfigError
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
QUICK = ("cost.latency=false",)
CODE_A = {"commit": "a" * 40, "dirty": False, "diff_sha": None}
CODE_B = {"commit": "b" * 40, "dirty": False, "diff_sha": None}


def _head_commit() -> str | None:
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def _use_code(monkeypatch, code: dict) -> None:
    monkeypatch.setattr(train_module, "code_version", lambda *a, **k: dict(code))


def _skip_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skip_completed" in r.getMessage()]


def test_record_names_the_code_that_made_it(compose_cfg):
    record = train(compose_cfg(*QUICK))
    assert record["code"]["commit"] == _head_commit()
    assert record["code"]["dirty"] in ((True, False) if _head_commit() else (None,))


def test_skip_completed_reuses_only_what_the_same_code_made(compose_cfg, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="prunelab.train")
    _use_code(monkeypatch, CODE_A)
    first = train(compose_cfg(*QUICK))
    assert first["code"] == CODE_A
    again = train(compose_cfg(*QUICK, "skip_completed=true"))
    assert again["code"] == CODE_A and again["started_at"] == first["started_at"]
    (line,) = _skip_lines(caplog)
    assert "reusing" in line and "a" * 12 in line

    caplog.clear()
    _use_code(monkeypatch, CODE_B)  # the code changed: the cell runs again
    rerun = train(compose_cfg(*QUICK, "skip_completed=true"))
    assert rerun["status"] == "completed" and rerun["code"] == CODE_B
    (line,) = _skip_lines(caplog)
    assert "other code" in line and "a" * 12 in line and "any_code" in line

    caplog.clear()
    _use_code(monkeypatch, {**CODE_B, "dirty": True, "diff_sha": "1" * 12})  # edited tree
    dirty = train(compose_cfg(*QUICK, "skip_completed=true"))
    assert dirty["code"]["dirty"] is True
    assert "other code" in _skip_lines(caplog)[0]

    caplog.clear()
    _use_code(monkeypatch, CODE_A)
    reused = train(compose_cfg(*QUICK, "skip_completed=any_code"))
    assert reused["code"]["dirty"] is True and reused["started_at"] == dirty["started_at"]
    (line,) = _skip_lines(caplog)
    assert "reusing" in line and "dirty" in line


def test_skip_completed_must_be_true_false_or_any_code(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="any_code") as err:
        train(compose_cfg(*QUICK, "skip_completed=maybe"))
    assert "\n" not in str(err.value)
    assert not files.results_path(tmp_path / "run").exists()


def test_weights_left_out_of_pruning_are_named(compose_cfg, monkeypatch, caplog):
    import prunelab.models

    everything = prunelab.models.prunable_parameters

    def without_head(model):
        return {n: p for n, p in everything(model).items() if n != "head.weight"}

    monkeypatch.setattr(prunelab.models, "prunable_parameters", without_head)
    caplog.set_level(logging.WARNING, logger="prunelab.train")
    record = train(compose_cfg(*QUICK, "pruning=rigl", "sparsity=0.9"))
    sparsity = record["sparsity"]
    assert sparsity["unpruned_params"] == {"head.weight": 1000}
    assert sparsity["unpruned_share"] == pytest.approx(1000 / (4000 + 10000 + 1000))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "head.weight" in warning and "\n" not in warning


def test_latency_under_load_only_in_parallel_sweeps(monkeypatch):
    def runtime(mode: RunMode, launcher: dict):
        hc = OmegaConf.create({"mode": mode, "launcher": launcher})
        monkeypatch.setattr(train_module, "_hydra_runtime", lambda: hc)

    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    runtime(RunMode.MULTIRUN, {"n_jobs": 2})
    assert train_module._latency_under_load() is True
    runtime(RunMode.MULTIRUN, {"n_jobs": 1})
    assert train_module._latency_under_load() is False
    runtime(RunMode.MULTIRUN, {"_target_": local, "cpus_per_task": 1})
    assert train_module._latency_under_load() is True
    runtime(RunMode.MULTIRUN, {"_target_": slurm, "cpus_per_task": 8})
    assert train_module._latency_under_load() is False
    runtime(RunMode.RUN, {"n_jobs": 2})
    assert train_module._latency_under_load() is False


@pytest.mark.parametrize(
    ("override", "group", "needle"),
    [
        ("trainer.max_epochs=-3", "trainer", "max_epochs"),
        ("model._target_=prunelab.models.NoSuchModel", "model", "NoSuchModel"),
        ("optimizer._target_=torch.optim.NoSuchOptimizer", "optimizer", "NoSuchOptimizer"),
    ],
)
def test_a_node_that_cannot_be_built_is_a_config_error(
    compose_cfg, tmp_path, override, group, needle
):
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(*QUICK, override))
    message = str(err.value)
    assert message.startswith(f"{group}:") and needle in message and "\n" not in message
    record = json.loads(files.results_path(tmp_path / "run").read_text())
    assert record["status"] == "failed" and group in record["error"]
    assert not files.last_checkpoint(tmp_path / "run").exists()  # nothing was trained


def test_cli_bad_trainer_value_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "trainer.max_epochs=-3",
            "logger.wandb.enabled=false",
            f"paths.log_dir={tmp_path}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "trainer" in errors[0] and "max_epochs" in errors[0], proc.stderr
    assert "Error in call to target" not in proc.stderr
    records = [json.loads(p.read_text()) for p in tmp_path.rglob(files.RESULTS)]
    assert records and all(r["status"] == "failed" for r in records)


def test_a_model_the_cost_meter_cannot_count_fails_before_training(compose_cfg):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from prunelab.models import prunable_parameters

    class FunctionalFc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(40, 10)

        def forward(self, x):
            return F.linear(x, self.fc.weight, self.fc.bias)  # outside fc's forward

    class Data:
        input_shape = (40,)

    model = FunctionalFc()
    built = {"model": model, "prunable": prunable_parameters(model), "datamodule": Data()}
    state = torch.random.get_rng_state()
    with pytest.raises(ConfigError, match=r"'fc\.weight'"):
        train_module._check_cost_meter(compose_cfg(), built)
    assert torch.equal(torch.random.get_rng_state(), state)  # training draws are unchanged
    train_module._check_cost_meter(compose_cfg("cost.enabled=false"), built)  # not measured
