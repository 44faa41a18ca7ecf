"""L1 penalty pruning: the loss term, its effect on the weights, and the end-to-end run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine import build_model, make_batches, prunable

from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.sparsity.engine import SparsityEngine

WIDTHS = [12, 16, 4]
ONE_SHOT = {"kind": "one_shot", "at": 0.5, "at_epoch": None}


def _engine(l1: float, model) -> SparsityEngine:
    method = build_method("l1", 0.8, distribution={"name": "global"}, schedule=ONE_SHOT, l1=l1)
    engine = SparsityEngine(model, prunable(model), method, seed=0)
    engine.setup(total_steps=40, steps_per_epoch=10)
    engine.initialize()
    return engine


def test_penalty_is_l1_of_the_prunable_weights_until_the_pruning_step():
    model = build_model(WIDTHS, seed=0)
    engine = _engine(1e-3, model)
    expected = 1e-3 * sum(p.abs().sum() for p in prunable(model).values())
    assert torch.allclose(engine.penalty(0), expected)
    assert torch.allclose(engine.penalty(19), expected)
    assert engine.penalty(20) is None  # pruned at step 20: fine-tune without the penalty
    assert engine.penalty(39) is None


def _train(l1: float) -> tuple[float, float]:
    """Mean |w| of the prunable weights just before pruning, and the share of the weight
    norm the magnitude cut removes."""
    model = build_model(WIDTHS, seed=1)
    batches = make_batches(WIDTHS, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = _engine(l1, model)
    engine.attach(optimizer)
    for step in range(20):
        optimizer.zero_grad()
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(model(x), y)
        penalty = engine.penalty(step)
        (loss if penalty is None else loss + penalty).backward()
        engine.before_optimizer_step(step, optimizer)
        optimizer.step()
    weights = torch.cat([p.detach().flatten() for p in prunable(model).values()])
    mean = float(weights.abs().mean())
    kept = weights.abs().topk(int(0.2 * weights.numel())).values
    return mean, 1 - float(kept.square().sum() / weights.square().sum())


def test_the_penalty_pushes_weights_towards_zero_before_the_cut():
    mean_plain, removed_plain = _train(0.0)
    mean_l1, removed_l1 = _train(0.1)
    assert mean_l1 < 0.8 * mean_plain
    assert removed_l1 < removed_plain, "the cut should remove less of the weight norm"


@pytest.mark.parametrize("value", [-1.0, "a", True])
def test_bad_coefficient_is_a_config_error(value):
    with pytest.raises(ConfigError, match="pruning.l1"):
        build_method("l1", 0.8, distribution={"name": "global"}, schedule=ONE_SHOT, l1=value)
