"""Update-step semantics of the engine, checked against the reference implementations.

- a weight grown at an update step ends that step at exactly 0 with zero optimizer state
  (google-research/rigl skips the optimizer step on update iterations; sparse_learning
  changes the mask after the step), whatever the optimizer;
- Adam/AdamW: a regrown weight's updates equal those of a fresh Adam (per-weight bias
  correction);
- exact score ties are broken at random, seeded from (seed, step, layer);
- a NaN never makes a layer lose weights, and an update with non-finite gradients is skipped;
- ``distribution.budget=pruned`` leaves kept-dense layers out of the budget.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_engine import (
    PRUNE_GROW,
    backward,
    build_model,
    clone_masks,
    make_batches,
    make_engine,
    start,
)

from prunelab.methods import build_method
from prunelab.methods.base import topk_mask
from prunelab.sparsity.engine import SparsityEngine

WIDTHS = [12, 10, 4]

OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
    "nesterov": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True
    ),
    "sgd_fused": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True
    ),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4),
    "adam_fused": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, fused=True),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adamw_fused": lambda m: torch.optim.AdamW(
        m.parameters(), lr=1e-2, weight_decay=0.1, fused=True
    ),
}


def _warm(model, optimizer, batches, n=3):
    for i in range(n):
        backward(model, optimizer, batches[i % len(batches)])
        optimizer.step()


def _buffers(optimizer, param):
    state = optimizer.state.get(param, {})
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}


# --------------------------------------------------------------------------------------
# 1. grown weights end the update step at zero with zero optimizer state
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("update_step", ["masked", "skip"])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_grown_weights_are_zero_after_the_update_step(method, update_step, optimizer_name):
    model = build_model(WIDTHS, seed=1)
    batches = make_batches(WIDTHS, seed=1)
    optimizer = OPTIMIZERS[optimizer_name](model)
    _warm(model, optimizer, batches)
    engine = make_engine(method, 0.8, model, "uniform", seed=3, update_step=update_step)
    start(engine, model, batches, optimizer)
    n_grown = 0
    for step in range(12):
        backward(model, optimizer, batches[step % len(batches)])
        old = clone_masks(engine.masks)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        changed = engine.before_optimizer_step(step, optimizer)
        optimizer.step()
        if not changed:
            continue
        for name, p in engine.params.items():
            grown = engine.masks[name] & ~old[name]
            n_grown += int(grown.sum())
            assert (p.detach()[grown] == 0).all(), f"{name}: a grown weight moved in its step"
            for key, buf in _buffers(optimizer, p).items():
                assert (buf[grown] == 0).all(), f"{name}.{key} is non-zero at grown weights"
        if update_step == "skip":  # nothing but the mask change happened in this step
            for name, p in model.named_parameters():
                expected = (
                    before[name] * engine.masks[name] if name in engine.masks else (before[name])
                )
                assert torch.equal(p.detach(), expected), f"{name} moved in a skipped step"
    assert n_grown > 0


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_dense_update_step_trains_grown_weights_at_once(optimizer_name):
    """The named legacy option: grown weights receive their dense gradient right away."""
    model = build_model(WIDTHS, seed=1)
    batches = make_batches(WIDTHS, seed=1)
    optimizer = OPTIMIZERS[optimizer_name](model)
    engine = make_engine("rigl", 0.8, model, "uniform", seed=3, update_step="dense")
    start(engine, model, batches, optimizer)
    moved = 0
    for step in range(12):
        backward(model, optimizer, batches[step % len(batches)])
        old = clone_masks(engine.masks)
        changed = engine.before_optimizer_step(step, optimizer)
        optimizer.step()
        if changed:
            for name, p in engine.params.items():
                grown = engine.masks[name] & ~old[name]
                moved += int((p.detach()[grown] != 0).sum())
    assert moved > 0


def test_skip_undoes_the_first_step_that_creates_optimizer_state():
    """A skipped step leaves no optimizer state behind, even the first one."""
    model = build_model(WIDTHS, seed=4)
    batches = make_batches(WIDTHS, seed=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = dict(PRUNE_GROW, update_every=1)
    engine = make_engine("set", 0.7, model, "uniform", schedule=schedule, update_step="skip")
    start(engine, model, batches, optimizer)
    backward(model, optimizer, batches[0])
    engine.before_optimizer_step(0, optimizer)  # not an update step: a normal step
    optimizer.step()
    assert optimizer.state
    optimizer.state.clear()
    backward(model, optimizer, batches[1])
    assert engine.before_optimizer_step(1, optimizer)
    optimizer.step()
    assert not optimizer.state, "a skipped step left momentum buffers"


# --------------------------------------------------------------------------------------
# 2. Adam after regrowth: a regrown weight behaves like a fresh Adam
# --------------------------------------------------------------------------------------


def _fresh_adam(grads, lr, betas, eps, amsgrad=False):
    """Weights of a scalar Adam from 0 over the gradient sequence ``grads`` (float64)."""
    w, m, v, vmax, out = 0.0, 0.0, 0.0, 0.0, []
    for k, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        vmax = max(vmax, v)
        denom = math.sqrt(vmax if amsgrad else v) / math.sqrt(1 - betas[1] ** k) + eps
        w -= lr / (1 - betas[0] ** k) * m / denom
        out.append(w)
    return out


def _regrown_trajectories(optimizer_name, correction, update_step, amsgrad=False):
    """Train RigL with one update; for every grown weight return (its gradients, its
    weights) over the steps after the update."""
    model = build_model(WIDTHS, seed=2)
    batches = make_batches(WIDTHS, seed=2, n=6)
    fused = optimizer_name.endswith("_fused")
    kind = torch.optim.AdamW if optimizer_name.startswith("adamw") else torch.optim.Adam
    optimizer = kind(model.parameters(), lr=1e-2, weight_decay=0.0, fused=fused, amsgrad=amsgrad)
    schedule = dict(PRUNE_GROW, update_every=20, end=0.9)
    engine = make_engine(
        "rigl",
        0.8,
        model,
        "uniform",
        schedule=schedule,
        total_steps=40,
        seed=5,
        update_step=update_step,
        adam_bias_correction=correction,
    )
    start(engine, model, batches, optimizer)
    grown, grads, weights = None, [], []
    for step in range(36):
        backward(model, optimizer, batches[step % len(batches)])
        old = clone_masks(engine.masks)
        changed = engine.before_optimizer_step(step, optimizer)
        if changed:
            grown = {n: engine.masks[n] & ~old[n] for n in old}
        if grown is not None:
            grads.append({n: p.grad[grown[n]].double().clone() for n, p in engine.params.items()})
        optimizer.step()
        if grown is not None:
            weights.append(
                {n: p.detach()[grown[n]].double().clone() for n, p in engine.params.items()}
            )
    assert grown is not None and sum(int(g.sum()) for g in grown.values()) > 0
    return grads, weights


@pytest.mark.parametrize("update_step", ["masked", "skip", "dense"])
@pytest.mark.parametrize(
    ("optimizer_name", "amsgrad"),
    [
        ("adam", False),
        ("adam", True),
        ("adamw", False),
        ("adamw", True),
        ("adam_fused", False),
        ("adamw_fused", False),
    ],
)
def test_regrown_weights_follow_a_fresh_adam(optimizer_name, amsgrad, update_step):
    grads, weights = _regrown_trajectories(optimizer_name, "per_weight", update_step, amsgrad)
    for name in grads[0]:
        for i in range(grads[0][name].numel()):
            sequence = [g[name][i].item() for g in grads]
            # The steps in which the weight was really trained: zero gradient (masked) or
            # an undone step (skip) in the update step itself.
            start_at = 0 if update_step == "dense" else 1
            expected = _fresh_adam(sequence[start_at:], 1e-2, (0.9, 0.999), 1e-8, amsgrad)
            got = [w[name][i].item() for w in weights][start_at:]
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), f"{name}[{i}]"


def test_per_tensor_bias_correction_overshoots_after_regrowth():
    """Torch's per-tensor step count (the reference's behaviour) bias-corrects a regrown
    weight's fresh moments with the tensor's step t: its first update is
    (1 - b1) / (1 - b1^t) * sqrt(1 - b2^t) / sqrt(1 - b2) times a fresh Adam's (3.2x for
    large t; 0.52x at t=22 here). The per-weight correction removes it (test above)."""
    grads, weights = _regrown_trajectories("adam", "per_tensor", "masked")
    name = next(n for n in grads[0] if grads[0][n].numel())
    ratio = weights[1][name] / _first_fresh(grads[1][name])
    t = 22  # update at step 20 (20 steps taken), a zero-gradient step, then the first own one
    expected = 0.1 / (1 - 0.9**t) * math.sqrt(1 - 0.999**t) / math.sqrt(0.001)
    assert ratio.median().item() == pytest.approx(expected, rel=1e-3)
    assert abs(expected - 1) > 0.4


def _first_fresh(g):
    return -1e-2 * g / (g.abs() + 1e-8)


# --------------------------------------------------------------------------------------
# 4. ties, 5. non-finite scores and gradients
# --------------------------------------------------------------------------------------


def test_exact_ties_are_broken_at_random_and_reproducibly():
    scores = torch.zeros(1000)
    scores[:10] = 1.0
    a = topk_mask(scores, 60, torch.Generator().manual_seed(1))
    b = topk_mask(scores, 60, torch.Generator().manual_seed(1))
    c = topk_mask(scores, 60, torch.Generator().manual_seed(2))
    assert int(a.sum()) == 60 and a[:10].all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a[10:60].sum()) < 20, "ties went to the lowest indices"
    # Distinct scores keep their order: no noise is added to them.
    distinct = torch.arange(100.0)
    assert torch.equal(topk_mask(distinct, 30, torch.Generator()), distinct >= 70)


def test_rigl_growth_with_all_zero_gradients_is_not_biased_to_the_first_rows():
    """Dead units give zero gradients: growth must not fill the first rows."""
    model = build_model(WIDTHS, seed=6)
    batches = make_batches(WIDTHS, seed=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine("rigl", 0.8, model, "uniform", seed=6)
    start(engine, model, batches, optimizer)
    for p in engine.params.values():
        p.grad = torch.zeros_like(p)
    old = clone_masks(engine.masks)
    assert engine.before_optimizer_step(5, optimizer)
    name = next(iter(engine.params))
    grown = engine.masks[name] & ~old[name]
    rows = grown.nonzero()[:, 0].float()
    assert grown.sum() > 5
    assert rows.mean().item() > 0.25 * grown.shape[0], "growth piled into the first rows"


def test_topk_mask_with_nan_scores_returns_exactly_k():
    scores = torch.tensor([float("nan"), 1.0, float("nan"), 3.0, 2.0, float("nan")])
    for k in range(7):
        mask = topk_mask(scores, k)
        assert int(mask.sum()) == k
    assert torch.equal(topk_mask(scores, 2), torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.bool))


def test_update_with_non_finite_gradients_is_skipped_and_counted():
    model = build_model(WIDTHS, seed=8)
    batches = make_batches(WIDTHS, seed=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = make_engine("rigl", 0.8, model, "uniform", seed=8)
    start(engine, model, batches, optimizer)
    backward(model, optimizer, batches[0])
    name, first = next(iter(engine.params.items()))
    active = engine.masks[name].nonzero()
    first.grad[tuple(active[0])] = float("inf")  # an overflow at two active weights
    first.grad[tuple(active[1])] = float("nan")
    before = clone_masks(engine.masks)
    assert not engine.before_optimizer_step(5, optimizer)
    assert engine.n_skipped_updates == 1
    assert all(torch.equal(engine.masks[n], before[n]) for n in before)
    assert engine.sparsity_report()["n_skipped_updates"] == 1
    for name, p in engine.params.items():  # gradients are still masked
        assert (p.grad[~engine.masks[name]] == 0).all()


# --------------------------------------------------------------------------------------
# 10. dense_first / dense_last: the reference budget
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["static", "set", "rigl", "random"])
def test_pruned_budget_leaves_dense_layers_out(name):
    model = build_model([20, 16, 12, 4], seed=9)
    params = {f"{i}.weight": m.weight for i, m in enumerate(model) if hasattr(m, "weight")}
    schedule = (
        {"kind": "one_shot", "at": 0.0}
        if name == "static"
        else (dict(PRUNE_GROW) if name in ("set", "rigl") else {"kind": "fixed"})
    )
    dist = {"name": "uniform", "dense_first": True, "dense_last": True, "budget": "pruned"}
    method = build_method(name, 0.9, distribution=dist, schedule=schedule)
    engine = SparsityEngine(model, params, method, seed=0)
    engine.setup(total_steps=30, steps_per_epoch=10)
    counts = method.keep_counts(0.9, scores={n: p.abs() for n, p in params.items()})
    names = list(params)
    middle = names[1]
    assert counts[names[0]] == params[names[0]].numel()
    assert counts[names[-1]] == params[names[-1]].numel()
    assert counts[middle] == round(0.1 * params[middle].numel())
    engine.initialize(batches=lambda: iter([]), loss_fn=F.cross_entropy)
    if name != "static":
        report = engine.sparsity_report()
        assert report["pruned_layers"] == pytest.approx(0.9, abs=1 / params[middle].numel())
        assert report["global"] < 0.9
        assert engine.at_target()


def test_all_budget_makes_the_other_layers_pay_for_dense_ones():
    model = build_model([20, 16, 12, 4], seed=9)
    params = {f"{i}.weight": m.weight for i, m in enumerate(model) if hasattr(m, "weight")}
    dist = {"name": "uniform", "dense_last": True, "budget": "all"}
    method = build_method("random", 0.5, distribution=dist, schedule={"kind": "fixed"})
    engine = SparsityEngine(model, params, method, seed=0)
    engine.setup(total_steps=30, steps_per_epoch=10)
    engine.initialize()
    report = engine.sparsity_report()
    assert report["global"] == pytest.approx(0.5, abs=1e-3)
    assert report["pruned_layers"] > 0.5
