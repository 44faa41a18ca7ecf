"""L0 regularisation through the real config and Lightning: the run, its honest report of the
sparsity reached, pruning to the target, and resuming with the gates."""

from __future__ import annotations

import logging
import shutil

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from prunelab import files
from prunelab.train import build, train

L0 = ("pruning=l0", "sparsity=0.9", "epochs=2", "cost.latency=false")


def test_l0_runs_end_to_end_and_reports_its_distance_to_the_target(compose_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="prunelab.methods.l0"):
        record = train(compose_cfg(*L0))
    assert record["status"] == "completed"
    sparsity = record["sparsity"]
    assert sparsity["target"] == 0.9
    # Eight steps cannot close 90% of the gates: the run ends below its target and says so.
    assert sparsity["global"] < 0.5 and sparsity["n_updates"] == 1
    assert sparsity["weights_zero_global"] >= sparsity["global"]
    assert record["best_checkpoint"]["epoch"] is None, "no epoch below target may be best"
    assert "val/acc_best" not in record["metrics"]
    report = sparsity["method"]  # the record, too, says how far from the target the run ended
    assert report["target"] == 0.9 and not report["at_target"]
    assert report["distance"] == pytest.approx(sparsity["global"] - 0.9)
    [line] = [r.getMessage() for r in caplog.records if "gates folded" in r.getMessage()]
    distance = sparsity["global"] - 0.9
    assert f"sparsity {sparsity['global']:.4f}" in line and f"distance {distance:+.4f}" in line


def test_l0_pruned_to_the_target_ends_on_it(compose_cfg):
    overrides = ("pruning.prune_to_target=true", "pruning.granularity=neuron", "test_ckpt=best")
    record = train(compose_cfg(*L0, *overrides))
    assert record["sparsity"]["global"] == pytest.approx(0.9, abs=0.02)
    assert record["sparsity"]["global"] >= 0.9
    best = record["best_checkpoint"]
    assert best["epoch"] == 1 and best["tested"]  # the one epoch after the fold


def test_module_adds_the_expected_l0_penalty_to_the_training_loss(compose_cfg):
    built = build(compose_cfg(*L0, "pruning.l0_lambda=0.5"))
    module, engine = built["module"], built["engine"]
    module.setup("fit")
    engine.setup(total_steps=100, steps_per_epoch=10)
    engine.initialize()
    datamodule = built["datamodule"]
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    loss = module.training_loss((x, y))
    torch.manual_seed(0)
    data_loss = F.cross_entropy(module.model(x), y)
    assert torch.allclose(loss, data_loss + engine.penalty(0))


class _CopyCheckpoint(pl.Callback):
    """Copies last.ckpt (end of epoch 0: before the fold) when epoch 1 starts."""

    def __init__(self, run_dir, dest) -> None:
        self.run_dir, self.dest = run_dir, dest

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            shutil.copy(files.last_checkpoint(self.run_dir), self.dest)


class _GatesAtStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.log_alpha = [la.detach().clone() for la in pl_module.pruning_state.log_alpha]
        self.folded = pl_module.engine.method.folded


def test_resume_restores_the_gates(compose_cfg, tmp_path):
    first, mid = tmp_path / "first", tmp_path / "epoch0.ckpt"
    done = train(compose_cfg(*L0, run_dir=first), callbacks=[_CopyCheckpoint(first, mid)])
    saved = torch.load(mid, weights_only=False)["state_dict"]
    gates = _GatesAtStart()
    record = train(
        compose_cfg(*L0, f"ckpt_path={mid}", run_dir=tmp_path / "resumed"), callbacks=[gates]
    )
    assert record["status"] == "completed" and not gates.folded
    for i, la in enumerate(gates.log_alpha):
        assert torch.equal(la, saved[f"pruning_state.log_alpha.{i}"])
    assert record["sparsity"]["n_updates"] == 1
    # A checkpoint saved after the fold holds no gates; resuming from it keeps the mask.
    again = train(
        compose_cfg(*L0, f"ckpt_path={files.last_checkpoint(first)}", run_dir=tmp_path / "again")
    )
    assert again["status"] == "completed"
    assert again["sparsity"]["global"] == done["sparsity"]["global"]
