"""Pruning through the real Hydra config and Lightning: targets, resume, bad combinations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
SHORT = ("epochs=2", "trainer.limit_train_batches=10")
# Shorter schedules so that short runs still see several mask updates.
SCHEDULE = {
    "static": (),
    "random": (),
    "snip": (),
    "gmp": ("schedule.frequency=2",),
    "set": ("schedule.update_every=4",),
    "rigl": ("schedule.update_every=4",),
    "dynamic": ("schedule.update_every=4",),
    "snfs": ("schedule.update_every=4",),
    "l1": (),
}


@pytest.mark.parametrize("method", sorted(SCHEDULE))
@pytest.mark.parametrize("sparsity", [0.9])
def test_every_method_ends_on_target(compose_cfg, method, sparsity):
    record = train(
        compose_cfg(f"pruning={method}", f"sparsity={sparsity}", *SHORT, *SCHEDULE[method])
    )
    assert record["status"] == "completed"
    sp = record["sparsity"]
    assert abs(sp["global"] - sparsity) <= 1e-3, sp
    assert sp["weights_zero_global"] >= sp["global"] - 1e-9
    assert sp["target"] == sparsity
    assert set(sp["layers"]) == {"layers.0.weight", "layers.1.weight", "head.weight"}
    curve = record["sparsity_curve"]
    assert curve[0]["step"] == 0 and curve[-1]["sparsity/global"] == pytest.approx(sp["global"])
    if method in ("set", "rigl", "dynamic"):
        assert sp["n_updates"] >= 2 and sp["itop_rate"] > 1 - sparsity
        assert any(point["mask/turnover"] > 0 for point in curve)


def test_dense_ignores_sparsity(compose_cfg):
    record = train(compose_cfg("pruning=dense", "sparsity=0.9"))
    assert record["sparsity"]["global"] == 0.0 and record["sparsity"]["target"] == 0.0
    assert record["sparsity"]["weights_zero_global"] == 0.0


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_headline_full_run_on_default_data(compose_cfg, method):
    record = train(compose_cfg(f"pruning={method}", "sparsity=0.9", fast=False))
    assert record["status"] == "completed"
    assert abs(record["sparsity"]["global"] - 0.9) <= 1e-3
    for layer, value in record["sparsity"]["layers"].items():
        assert 0.0 < value < 1.0, layer
    assert record["metrics"]["test/acc"] > 0.3  # well above chance (0.1) on MNIST-1D
    on_disk = json.loads(files.results_path(record["run_dir"]).read_text())
    assert on_disk["sparsity"] == record["sparsity"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("pruning=random", "schedule=cubic"), "pruning=random cannot use a 'polynomial'"),
        (("pruning=rigl", "schedule=one_shot"), "pruning=rigl cannot use a 'one_shot'"),
        (("pruning=gmp", "schedule=fixed"), "pruning=gmp cannot use a 'fixed'"),
        (("pruning=rigl", "sparsity=0"), "needs sparsity > 0"),
        (("pruning=static", "sparsity=1.0"), "sparsity must be in [0, 1)"),
        (("pruning=rigl", "schedule.drop_fraction=1.5"), "drop_fraction"),
        (("pruning=snip", "pruning.batches=0"), "pruning.batches"),
        (("pruning=snip", "+pruning.bogus=1"), "pruning=snip"),
    ],
)
def test_nonsense_combinations_are_config_errors(compose_cfg, tmp_path, overrides, needle):
    with pytest.raises(ConfigError) as err:
        train(compose_cfg(*overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not files.results_path(tmp_path / "run").exists()


class _StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _engine_state(run_dir: Path) -> dict:
    ckpt = torch.load(files.last_checkpoint(run_dir), map_location="cpu", weights_only=False)
    return ckpt["sparsity_engine"]


@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_resume_gives_the_same_masks_and_metrics(compose_cfg, tmp_path, method):
    overrides = (
        f"pruning={method}",
        "sparsity=0.8",
        "epochs=4",
        "trainer.limit_train_batches=12",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.deterministic=true",
        *(("schedule.frequency=3",) if method == "gmp" else ("schedule.update_every=5",)),
    )
    full = train(compose_cfg(*overrides, fast=False, run_dir=tmp_path / "full"))
    train(
        compose_cfg(*overrides, fast=False, run_dir=tmp_path / "part"),
        callbacks=[_StopAfterEpoch(1)],
    )
    part_state = _engine_state(tmp_path / "part")
    assert 0 < part_state["n_updates"] < _engine_state(tmp_path / "full")["n_updates"]
    resumed = train(
        compose_cfg(
            *overrides,
            f"ckpt_path={files.last_checkpoint(tmp_path / 'part')}",
            fast=False,
            run_dir=tmp_path / "resumed",
        )
    )
    a, b = _engine_state(tmp_path / "full"), _engine_state(tmp_path / "resumed")
    assert a["n_updates"] == b["n_updates"]
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
        assert torch.equal(a["ever_active"][name], b["ever_active"][name]), name
    assert a["history"] == b["history"]
    for key in ("test/acc", "test/loss", "val/acc_best"):
        assert full["metrics"][key] == resumed["metrics"][key], key
    assert full["sparsity"] == resumed["sparsity"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rigl", "set", "snip", "random"])
def test_ddp_ranks_choose_identical_masks(tmp_path, method):
    """Two CPU processes (gloo): after initialisation (SNIP scores data from each rank's own
    shard) and after every update the ranks compare mask digests, and the run fails if they
    differ; the record counts the checks that passed."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "trainer=ddp_cpu",
            f"pruning={method}",
            "sparsity=0.9",
            "epochs=2",
            *(["schedule.update_every=3"] if method in ("rigl", "set") else []),
            "logger.wandb.enabled=false",
            "trainer.enable_progress_bar=false",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = list(tmp_path.rglob(files.RESULTS))
    record = json.loads(path.read_text())
    assert record["status"] == "completed"
    # One check after initialisation, one per update.
    assert record["sparsity"]["rank_checks"] == record["sparsity"]["n_updates"] + 1
    if method in ("rigl", "set"):
        assert record["sparsity"]["n_updates"] >= 5
    assert abs(record["sparsity"]["global"] - 0.9) <= 1e-3


def test_dense_cell_is_shared_across_sparsities(compose_cfg, tmp_path):
    a = train(compose_cfg("pruning=dense", "sparsity=0.8", run_dir=tmp_path / "a"))
    b = train(compose_cfg("pruning=dense", "sparsity=0.95", run_dir=tmp_path / "b"))
    c = train(compose_cfg("pruning=static", "sparsity=0.8", run_dir=tmp_path / "c"))
    d = train(compose_cfg("pruning=static", "sparsity=0.95", run_dir=tmp_path / "d"))
    assert a["config_hash"] == b["config_hash"]
    assert len({a["config_hash"], c["config_hash"], d["config_hash"]}) == 3
