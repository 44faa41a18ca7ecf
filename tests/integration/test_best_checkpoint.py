"""Best checkpoint and val/acc_best count only epochs at the target sparsity; the record says
which epoch was best and how sparse it was; weight decay can spare norms and biases."""

from __future__ import annotations

import csv

import pytest
import torch

from prunelab import files
from prunelab.train import train

# Four short epochs; a static run prunes 99% of its weights at the start of epoch 2, so its
# dense epochs 0-1 have the best validation accuracy by far: none of them may be "best".
STATIC = (
    "pruning=static",
    "sparsity=0.99",
    "epochs=4",
    "schedule.at_epoch=2",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=4",
    "test_ckpt=best",
    "cost.enabled=false",
)


def _val_acc_by_epoch(run_dir) -> dict[int, float]:
    with open(files.csv_metrics(run_dir)) as handle:
        rows = list(csv.DictReader(handle))
    return {int(r["epoch"]): float(r["val/acc"]) for r in rows if r.get("val/acc")}


def test_best_checkpoint_is_chosen_among_epochs_at_target(compose_cfg, tmp_path):
    run_dir = tmp_path / "static"
    record = train(compose_cfg(*STATIC, run_dir=run_dir))
    best = record["best_checkpoint"]
    assert best["epoch"] >= 2, f"best epoch {best['epoch']} was before pruning"
    assert best["sparsity"] == pytest.approx(0.99, abs=1e-3)
    by_epoch = _val_acc_by_epoch(run_dir)
    assert max(by_epoch[e] for e in (0, 1)) > max(by_epoch[e] for e in (2, 3)), (
        "the dense epochs should be better here, or the test proves nothing"
    )
    at_target = max(by_epoch[e] for e in (2, 3))
    assert record["metrics"]["val/acc_best"] == pytest.approx(at_target, abs=1e-6)
    state = torch.load(files.checkpoint_dir(run_dir) / files.BEST_CHECKPOINT, weights_only=False)
    assert state["epoch"] >= 2


def test_norm_and_bias_parameters_can_be_spared_weight_decay(compose_cfg, tmp_path):
    from prunelab.train import build

    cfg = compose_cfg("model=mnist1d_cnn", "optimizer=sgd", "lr=0.1", run_dir=tmp_path / "r")
    cfg.weight_decay_norm_bias = False
    module = build(cfg)["module"]
    groups = module.parameter_groups()
    assert [g.get("weight_decay") for g in groups] == [None, 0.0]
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in module.model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1 and not name.endswith("bias")), name
