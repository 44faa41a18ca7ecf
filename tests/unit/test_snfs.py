"""Sparse momentum (SNFS): momentum redistribution, exact global count, growth by momentum,
the capacity cap, and one short fit through the real config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.methods import METHODS, build_method
from prunelab.methods.snfs import SNFS, redistribute
from prunelab.sparsity.engine import Context, SparsityEngine
from prunelab.sparsity.masks import Masks


def snfs(sparsity=0.8, alpha=0.5, every=1, dense_last=False, **options) -> SNFS:
    method = build_method(
        "snfs",
        sparsity,
        distribution={"name": "uniform", "dense_first": False, "dense_last": dense_last},
        schedule={
            "kind": "prune_grow",
            "update_every": every,
            "drop_fraction": alpha,
            "anneal": "constant",
            "begin": 0.0,
            "end": 1.0,
        },
        **options,
    )
    assert isinstance(method, SNFS)
    return method


def layers(*shapes: tuple[int, ...], seed: int = 0) -> dict[str, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {f"l{i}": nn.Parameter(torch.randn(s, generator=gen)) for i, s in enumerate(shapes)}


def set_momentum(opt: torch.optim.Optimizer, param: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(opt, torch.optim.Adam):
        opt.state[param]["step"] = torch.tensor(10.0)
        opt.state[param]["exp_avg"] = value.clone()
        opt.state[param]["exp_avg_sq"] = torch.ones_like(value)
    else:
        opt.state[param]["momentum_buffer"] = value.clone()


def counts(masks: Masks) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


def test_registered():
    assert METHODS["snfs"] is SNFS


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_regrowth_follows_mean_momentum(optimizer):
    """(a) The layer with the larger mean momentum magnitude over its active weights gets
    most of the regrowth: its active count rises, the other's falls, the total holds."""
    params = layers((20, 20), (20, 20))
    method = snfs(0.8)
    method.setup({n: tuple(p.shape) for n, p in params.items()}, 100, 10)
    masks = method.init_masks(params, Context(seed=0, step=0))
    before = counts(masks)
    assert before == {"l0": 80, "l1": 80}
    opt = (
        torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(params.values(), lr=0.1)
    )
    gen = torch.Generator().manual_seed(1)
    for name, scale in (("l0", 0.1), ("l1", 10.0)):  # l1: 100x the momentum
        value = scale * (1 + torch.rand(params[name].shape, generator=gen)) * masks[name]
        set_momentum(opt, params[name], value)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    new = method.update(3, params, masks, Context(seed=0, step=3, grads=grads, optimizer=opt))
    after = counts(new)
    assert sum(after.values()) == sum(before.values())
    assert after["l1"] > before["l1"] + 30 and after["l0"] < before["l0"] - 30
    # l0 dropped 40 and regrew its ~1% share of the 80 dropped in all.
    assert after["l0"] in (40, 41)


def test_without_momentum_state_the_gradient_decides():
    """No optimizer state yet: the mean dense-gradient magnitude redistributes instead."""
    params = layers((20, 20), (20, 20))
    method = snfs(0.8)
    method.setup({n: tuple(p.shape) for n, p in params.items()}, 100, 10)
    masks = method.init_masks(params, Context(seed=0, step=0))
    grads = {"l0": torch.full((20, 20), 5.0), "l1": torch.full((20, 20), 0.05)}
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)  # no state yet
    new = method.update(1, params, masks, Context(seed=0, step=1, grads=grads, optimizer=opt))
    assert counts(new)["l0"] > 110 and sum(counts(new).values()) == 160


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5)
    )


@pytest.mark.parametrize("regrow_dropped", [True, False])
@pytest.mark.parametrize("dense_last", [False, True])
def test_global_count_is_exact_through_training(regrow_dropped, dense_last):
    """(b) Through real training (SGD with momentum, the engine), the global active count is
    exactly constant at every update while the per-layer counts move; a kept-dense layer
    stays dense."""
    model = mlp()
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    method = snfs(0.85, alpha=0.3, every=3, dense_last=dense_last, regrow_dropped=regrow_dropped)
    engine = SparsityEngine(model, params, method, seed=0)
    engine.setup(30, 10)
    engine.initialize()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine.attach(opt)
    total = sum(counts(engine.masks).values())
    first = counts(engine.masks)
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        updated = engine.before_optimizer_step(step, opt)
        opt.step()
        if updated:
            assert sum(counts(engine.masks).values()) == total
            if dense_last:
                assert bool(engine.masks["4.weight"].all())
    assert engine.n_updates >= 5
    assert counts(engine.masks) != first
    assert engine.masks.sparsity() == pytest.approx(1 - total / engine.masks.numel())


@pytest.mark.parametrize("regrow_dropped", [True, False])
def test_growth_picks_the_largest_momentum_inactive_positions(regrow_dropped):
    """(b) When the optimizer holds momentum at inactive positions (the reference, whose
    gradients are dense), growth takes the candidates with the largest |momentum|; the
    gradient plays no part then."""
    params = layers((30, 30))
    method = snfs(0.9, alpha=0.5, regrow_dropped=regrow_dropped)
    method.setup({"l0": (30, 30)}, 100, 10)
    masks = method.init_masks(params, Context(seed=0, step=0))
    mask = masks["l0"]
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    momentum = torch.randperm(900, generator=gen).float().view(30, 30) + 1  # distinct
    set_momentum(opt, params["l0"], momentum)
    grads = {"l0": torch.rand(30, 30, generator=gen)}  # would pick other positions
    new = method.update(5, params, masks, Context(seed=0, step=5, grads=grads, optimizer=opt))
    n_active, n_drop = int(mask.sum()), int(0.5 * int(mask.sum()))
    magnitude = params["l0"].detach().abs()
    kept_value = magnitude[mask].sort(descending=True).values[n_active - n_drop - 1]
    kept = mask & (magnitude >= kept_value)
    assert int(kept.sum()) == n_active - n_drop
    candidates = ~kept if regrow_dropped else ~mask
    top = momentum[candidates].sort(descending=True).values[n_drop - 1]
    expected = kept | (candidates & (momentum >= top))
    assert torch.equal(new["l0"], expected)


def test_growth_falls_back_on_the_dense_gradient():
    """In prunelab's training the momentum of inactive weights is 0 (masked gradients): growth
    then ranks every candidate, the just-dropped included, by |dense gradient|."""
    params = layers((30, 30))
    method = snfs(0.9, alpha=0.5)
    method.setup({"l0": (30, 30)}, 100, 10)
    masks = method.init_masks(params, Context(seed=0, step=0))
    mask = masks["l0"]
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    set_momentum(opt, params["l0"], (1 + torch.rand(30, 30, generator=gen)) * mask)
    grad = torch.randperm(900, generator=gen).float().view(30, 30)
    new = method.update(
        5, params, masks, Context(seed=0, step=5, grads={"l0": grad}, optimizer=opt)
    )
    n_active, n_drop = int(mask.sum()), int(0.5 * int(mask.sum()))
    magnitude = params["l0"].detach().abs()
    kept = mask & (magnitude >= magnitude[mask].sort(descending=True).values[n_active - n_drop - 1])
    top = grad[~kept].sort(descending=True).values[n_drop - 1]
    assert torch.equal(new["l0"], kept | (~kept & (grad >= top)))


def test_capacity_cap():
    """(c) A near-full layer with by far the largest momentum fills up to its size and no
    further; the excess goes to the other layer and the total holds."""
    params = layers((10, 10), (20, 50))
    method = snfs(0.8, alpha=0.5)
    method.setup({n: tuple(p.shape) for n, p in params.items()}, 100, 10)
    gen = torch.Generator().manual_seed(4)
    full = torch.ones(100, dtype=torch.bool)
    full[torch.randperm(100, generator=gen)[:5]] = False
    sparse = torch.zeros(1000, dtype=torch.bool)
    sparse[torch.randperm(1000, generator=gen)[:100]] = True
    masks = Masks({"l0": full.view(10, 10), "l1": sparse.view(20, 50)})
    opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    set_momentum(opt, params["l0"], 100.0 * masks["l0"])
    set_momentum(opt, params["l1"], 0.01 * masks["l1"])
    grads = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    new = method.update(5, params, masks, Context(seed=0, step=5, grads=grads, optimizer=opt))
    # l0 drops 47 and l1 50: 97 to regrow, of which l0 can take only 100 - 48 = 52.
    assert counts(new) == {"l0": 100, "l1": 95}


def test_redistribute_splits_the_excess_evenly_as_the_reference():
    out = redistribute(100, {"a": 0.9, "b": 0.08, "c": 0.02}, {"a": 20, "b": 1000, "c": 1000})
    assert out == {"a": 20, "b": 43, "c": 37}
    # Exact total under rounding, every cap respected, a second round of capping.
    out = redistribute(101, {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 10, "b": 40, "c": 1000})
    assert out == {"a": 10, "b": 40, "c": 51}
    # No signal: split by the caps.
    assert redistribute(8, {"a": 0.0, "b": float("nan")}, {"a": 5, "b": 15}) == {"a": 2, "b": 6}


def test_rejects_a_bad_adam_momentum():
    from prunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="adam_momentum"):
        snfs(adam_momentum="raw")


def test_fit_through_the_real_config_ends_on_target(compose_cfg):
    """(d) pruning=snfs sparsity=0.9 on the default data: on target, several updates, the
    per-layer densities moved away from the uniform start."""
    from prunelab.train import train

    record = train(
        compose_cfg(
            "pruning=snfs",
            "sparsity=0.9",
            "epochs=2",
            "trainer.limit_train_batches=10",
            "schedule.update_every=4",
        )
    )
    assert record["status"] == "completed"
    sp = record["sparsity"]
    assert abs(sp["global"] - 0.9) <= 1e-3, sp
    assert sp["weights_zero_global"] >= sp["global"] - 1e-9
    assert sp["n_updates"] >= 2
    curve = record["sparsity_curve"]
    assert all(abs(p["sparsity/global"] - curve[0]["sparsity/global"]) < 1e-12 for p in curve)
    assert any(p["mask/turnover"] > 0 for p in curve)
    assert record["config"]["distribution"]["name"] == "uniform"
    assert any(abs(value - 0.9) > 0.01 for value in sp["layers"].values()), sp["layers"]
    # Training FLOPs by the snfs rule (dense gradients every step): (2 f_S + f_D) / 3 f_D.
    assert record["cost"]["flops_train_x_dense"] == pytest.approx((2 * 0.1 + 1) / 3, rel=1e-3)


def test_momentum_tracks_inactive_weights_and_grown_weights_keep_it():
    """As in the reference, the optimizer's momentum follows every weight (the gradients of
    inactive weights are not masked), the inactive weights are still exactly zero after
    every step, growth picks the inactive weights of largest |momentum|, and an update zeroes
    the state of every weight inactive after it while grown weights keep theirs."""
    model = mlp()
    params = {n: p for n, p in model.named_parameters() if n.endswith("weight")}
    method = snfs(0.85, alpha=0.3, every=5)
    engine = SparsityEngine(model, params, method, seed=0)
    engine.setup(30, 10)
    engine.initialize()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine.attach(opt)
    gen = torch.Generator().manual_seed(1)
    checked = 0
    for step in range(16):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        old = {n: m.clone() for n, m in engine.masks.items()}
        before = (
            {n: opt.state[p]["momentum_buffer"].clone() for n, p in params.items()}
            if (opt.state)
            else None
        )
        updated = engine.before_optimizer_step(step, opt)
        if updated and before is not None:
            name = "0.weight"
            new, was = engine.masks[name], old[name]
            grown = new & ~was
            buf = opt.state[params[name]]["momentum_buffer"]
            assert bool((before[name][~was] != 0).any()), "no momentum at inactive weights"
            assert torch.equal(buf[grown], before[name][grown]), "grown weights lost momentum"
            assert bool((buf[~new] == 0).all()), "inactive weights kept stale momentum"
            # Grown = the largest |momentum| among the weights inactive before the update
            # (the just-dropped weights may come back too).
            kept = new & was
            candidates = ~kept
            score = before[name].abs()
            n_grown = int((new & ~kept).sum())
            top = score[candidates].topk(n_grown).values.min()
            assert bool((score[new & ~kept] >= top).all())
            checked += 1
        opt.step()
        for n, p in params.items():
            assert bool((p.detach()[~engine.masks[n]] == 0).all()), f"{n}: pruned weight moved"
    assert checked >= 2
