"""L1 penalty pruning through the real config and Lightning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunelab.train import build, train


def test_l1_runs_end_to_end_and_ends_on_target(compose_cfg):
    record = train(compose_cfg("pruning=l1", "sparsity=0.9", "pruning.l1=1e-4", "epochs=2"))
    assert record["status"] == "completed"
    assert record["sparsity"]["global"] == pytest.approx(0.9, abs=1e-3)
    assert record["sparsity"]["n_updates"] == 1


def test_module_adds_the_penalty_to_the_training_loss(compose_cfg):
    cfg = compose_cfg("pruning=l1", "sparsity=0.9", "pruning.l1=1e-2")
    built = build(cfg)
    module, engine = built["module"], built["engine"]
    engine.setup(total_steps=100, steps_per_epoch=10)
    engine.initialize()
    datamodule = built["datamodule"]
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    loss = module.training_loss((x, y))
    data_loss = F.cross_entropy(module.model(x), y)
    assert torch.allclose(loss, data_loss + engine.penalty(0))
