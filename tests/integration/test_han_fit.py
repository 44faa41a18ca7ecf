"""Han et al. iterative pruning through the real config and Lightning: the target, the
retraining learning rate in the checkpoint, resume, and the scheduler check."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.train import train


def _checkpoint(run_dir) -> dict:
    return torch.load(files.last_checkpoint(run_dir), map_location="cpu", weights_only=False)


def _lrs(ckpt: dict) -> list[float]:
    return [float(g["lr"]) for g in ckpt["optimizer_states"][0]["param_groups"]]


def test_han_runs_end_to_end_and_ends_on_target(compose_cfg, tmp_path):
    cfg = compose_cfg("pruning=han", "sparsity=0.9", "epochs=3")
    record = train(cfg)
    assert record["status"] == "completed"
    sparsity = record["sparsity"]
    assert sparsity["global"] == pytest.approx(0.9, abs=1e-3)
    assert sparsity["target"] == 0.9
    # 3 epochs x 4 batches: pruning at steps 3, 6, 9, the last in the last epoch, which alone
    # is at the target and may hold the best checkpoint.
    assert sparsity["n_updates"] == 3
    curve = [point["sparsity/global"] for point in record["sparsity_curve"]]
    assert curve[0] == 0.0 and curve == sorted(curve) and len(set(curve)) == 4
    assert record["best_checkpoint"]["epoch"] == 2
    assert _lrs(_checkpoint(tmp_path / "run")) == pytest.approx([cfg.lr * 0.1])


class _StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_resume_after_the_first_prune_keeps_lr_over_ten(compose_cfg, tmp_path):
    overrides = ("pruning=han", "sparsity=0.8", "epochs=3", "cost.enabled=false")
    part = compose_cfg(*overrides, run_dir=tmp_path / "part")
    train(part, callbacks=[_StopAfterEpoch(0)])  # epoch 0 holds the first prune (step 3)
    saved = _checkpoint(tmp_path / "part")
    assert saved["sparsity_engine"]["n_updates"] == 1
    assert _lrs(saved) == pytest.approx([part.lr * 0.1])
    resumed = train(
        compose_cfg(
            *overrides,
            f"ckpt_path={files.last_checkpoint(tmp_path / 'part')}",
            run_dir=tmp_path / "resumed",
        )
    )
    assert resumed["sparsity"]["global"] == pytest.approx(0.8, abs=1e-3)
    assert resumed["sparsity"]["n_updates"] == 3
    assert _lrs(_checkpoint(tmp_path / "resumed")) == pytest.approx([part.lr * 0.1])


def test_quality_records_no_target(compose_cfg):
    record = train(
        compose_cfg(
            "pruning=han", "pruning.quality=0.5", "lr_scheduler=cosine", "cost.enabled=false"
        )
    )
    assert record["status"] == "completed"
    sparsity = record["sparsity"]
    assert sparsity["target"] is None
    assert sparsity["threshold"] == {"value": 0.5, "mode": "std"}
    assert 0.0 < sparsity["global"] < 1.0


def test_a_scheduler_that_would_undo_the_factor_is_a_config_error(compose_cfg):
    cfg = compose_cfg(
        "pruning=han",
        "lr_scheduler=cosine",
        "lr_scheduler.scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
        "+lr_scheduler.scheduler.T_0=10",
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert "CosineAnnealingWarmRestarts" in message and "\n" not in message
