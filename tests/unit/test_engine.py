"""The sparsity engine's invariants, driven by a hand-written pure-torch training loop.

Each test builds a tiny model (an MLP, or a Conv2d + Linear net), a method from
:func:`prunelab.methods.build_method` and a :class:`SparsityEngine`, and calls the engine the
way the Lightning module does: ``setup`` -> ``initialize`` -> ``attach`` -> per step
``zero_grad``/``backward``/``before_optimizer_step(step, optimizer)``/``optimizer.step()``.
"""

from __future__ import annotations

import copy
import io
import math
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from prunelab.methods import build_method
from prunelab.sparsity.engine import SparsityEngine
from prunelab.sparsity.masks import Masks

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STEPS = 30
BATCH = 8
N_BATCHES = 4


# --------------------------------------------------------------------------------------
# helpers: models, data, optimizers, method configs, the loop
# --------------------------------------------------------------------------------------


def build_model(widths: list[int], conv: bool = False, seed: int = 0) -> nn.Module:
    """An MLP over ``widths`` or, with ``conv``, Conv2d(2 -> widths[0], 3x3) + Linears."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if conv:
        layers += [nn.Conv2d(2, widths[0], 3), nn.ReLU(), nn.Flatten()]
        dims = [widths[0] * 3 * 3, *widths[1:]]
    else:
        dims = list(widths)
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def input_shape(widths: list[int], conv: bool) -> tuple[int, ...]:
    return (2, 5, 5) if conv else (widths[0],)


def make_batches(
    widths: list[int], conv: bool = False, seed: int = 0, n: int = N_BATCHES
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    shape = input_shape(widths, conv)
    return [
        (
            torch.randn(BATCH, *shape, generator=gen),
            torch.randint(0, widths[-1], (BATCH,), generator=gen),
        )
        for _ in range(n)
    ]


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights (not biases) of every Linear/Conv2d, in module order."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            out[f"{mod_name}.weight"] = mod.weight
    return out


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4
    ),
    "sgd_nesterov": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True
    ),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True),
}

EXPECTED_BUFFERS = {
    "sgd_momentum": {"momentum_buffer"},
    "adam": {"exp_avg", "exp_avg_sq"},
    "adam_amsgrad": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
}

PRUNE_GROW = {
    "kind": "prune_grow",
    "update_every": 5,
    "drop_fraction": 0.5,
    "anneal": "constant",
    "begin": 0.0,
    "end": 0.9,
    "begin_epoch": None,
    "end_epoch": None,
}

SCHEDULES: dict[str, dict] = {
    "dense": {"kind": "fixed"},
    "static": {"kind": "one_shot", "at": 0.3, "at_epoch": None},
    "gmp": {
        "kind": "polynomial",
        "begin": 0.0,
        "end": 0.6,
        "begin_epoch": None,
        "end_epoch": None,
        "frequency": 4,
        "power": 3,
    },
    "random": {"kind": "fixed"},
    "snip": {"kind": "fixed"},
    "set": PRUNE_GROW,
    "rigl": PRUNE_GROW,
}


def distribution(name: str) -> dict:
    return {"name": name, "dense_first": False, "dense_last": False, "power_scale": 1.0}


def make_engine(
    method: str,
    sparsity: float,
    model: nn.Module,
    dist: str = "uniform",
    schedule: dict | None = None,
    seed: int = 0,
    total_steps: int = STEPS,
    **options,
) -> SparsityEngine:
    built = build_method(
        method,
        sparsity,
        distribution=distribution(dist),
        schedule=dict(schedule if schedule is not None else SCHEDULES[method]),
        **options,
    )
    engine = SparsityEngine(model, prunable(model), built, seed=seed)
    engine.setup(total_steps=total_steps, steps_per_epoch=max(1, total_steps // 3))
    return engine


def start(
    engine: SparsityEngine,
    model: nn.Module,
    batches: list,
    optimizer: torch.optim.Optimizer,
) -> None:
    engine.initialize(batches=lambda: iter(batches), loss_fn=F.cross_entropy)
    engine.attach(optimizer)


def backward(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    x, y = batch
    F.cross_entropy(model(x), y).backward()


def train_step(engine, model, optimizer, batches, step) -> bool:
    backward(model, optimizer, batches[step % len(batches)])
    changed = engine.before_optimizer_step(step, optimizer)
    optimizer.step()
    return changed


def dense_warmup(model, optimizer, batches, n: int = 2) -> None:
    """A few plain optimizer steps so every optimizer buffer is non-zero everywhere."""
    for i in range(n):
        backward(model, optimizer, batches[i % len(batches)])
        optimizer.step()


def per_element_buffers(optimizer, param) -> dict[str, torch.Tensor]:
    state = optimizer.state.get(param, {})
    return {
        k: v
        for k, v in state.items()
        if torch.is_tensor(v) and v.shape == param.shape and k != "step"
    }


def assert_pruned_weights_zero(engine: SparsityEngine, where: str) -> None:
    for name, p in engine.params.items():
        off = ~engine.masks[name]
        bad = int((p.detach()[off] != 0).sum())
        assert bad == 0, f"{where}: {bad} pruned weights of {name} are non-zero"


def clone_masks(masks: Masks) -> dict[str, torch.Tensor]:
    return {n: m.clone() for n, m in masks.items()}


def nnz(mask: torch.Tensor) -> int:
    return int(mask.sum())


# --------------------------------------------------------------------------------------
# 1. pruned weights are exactly zero after every optimizer step
# --------------------------------------------------------------------------------------

SPARSE_METHODS = ["static", "gmp", "random", "snip", "set", "rigl"]


@st.composite
def runs(draw):
    method = draw(st.sampled_from(SPARSE_METHODS))
    dists = ["uniform", "erk"] + (["global"] if method in ("static", "gmp", "snip") else [])
    return {
        "method": method,
        "sparsity": draw(st.floats(0.5, 0.98)),
        "widths": draw(st.lists(st.integers(3, 10), min_size=3, max_size=4)),
        "conv": draw(st.booleans()),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "dist": draw(st.sampled_from(dists)),
        "seed": draw(st.integers(0, 2**16)),
        # A warm optimizer has non-zero buffers at positions the initial mask prunes, so
        # only the post-step re-masking keeps those weights at zero.
        "warm": draw(st.booleans()),
    }


@SETTINGS
@given(run=runs())
def test_pruned_weights_are_exactly_zero_after_every_step(run):
    model = build_model(run["widths"], run["conv"], seed=run["seed"])
    batches = make_batches(run["widths"], run["conv"], seed=run["seed"])
    optimizer = OPTIMIZERS[run["optimizer"]](model)
    if run["warm"]:
        dense_warmup(model, optimizer, batches)
    engine = make_engine(run["method"], run["sparsity"], model, run["dist"], seed=run["seed"])
    start(engine, model, batches, optimizer)
    assert_pruned_weights_zero(engine, "after initialize")
    n_changed = 0
    for step in range(STEPS):
        n_changed += train_step(engine, model, optimizer, batches, step)
        assert_pruned_weights_zero(engine, f"after optimizer step {step} ({run})")
    if run["method"] in ("static", "gmp"):
        assert n_changed >= 1, "the schedule never updated the mask inside the run"


# --------------------------------------------------------------------------------------
# 2. grown weights start at zero with zeroed optimizer state
# 3. prune-and-grow keeps counts, never regrows what it just dropped
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_name", sorted(EXPECTED_BUFFERS))
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_grown_weights_start_at_zero_with_zeroed_optimizer_state(method, optimizer_name):
    widths = [12, 10, 4]
    model = build_model(widths, seed=1)
    batches = make_batches(widths, seed=1)
    optimizer = OPTIMIZERS[optimizer_name](model)
    dense_warmup(model, optimizer, batches, n=3)  # every buffer non-zero, everywhere
    engine = make_engine(method, 0.8, model, "uniform", seed=3)
    start(engine, model, batches, optimizer)

    updates = 0
    for step in range(STEPS):
        backward(model, optimizer, batches[step % len(batches)])
        old = clone_masks(engine.masks)
        before = {
            n: {k: v.clone() for k, v in per_element_buffers(optimizer, p).items()}
            for n, p in engine.params.items()
        }
        changed = engine.before_optimizer_step(step, optimizer)
        if changed:
            updates += 1
            for name, p in engine.params.items():
                new = engine.masks[name]
                grown, dropped = new & ~old[name], old[name] & ~new
                if not grown.any():
                    continue
                flipped = grown | dropped
                assert (p.detach()[grown] == 0).all(), f"{name}: grown weights are not zero"
                assert (p.detach()[dropped] == 0).all(), f"{name}: dropped weights remain"
                buffers = per_element_buffers(optimizer, p)
                expected = EXPECTED_BUFFERS[optimizer_name]
                assert expected <= set(buffers), f"{name}: optimizer state {set(buffers)}"
                for key, buf in buffers.items():
                    # The test means something only if the buffers were non-zero there.
                    assert (before[name][key][flipped] != 0).any(), f"{name}.{key} was zero"
                    assert (buf[flipped] == 0).all(), (
                        f"step {step}: {name}.{key} is non-zero at "
                        f"{int((buf[flipped] != 0).sum())} grown/dropped positions"
                    )
                    # ... and untouched elsewhere.
                    assert torch.equal(buf[~flipped], before[name][key][~flipped])
        optimizer.step()
        assert_pruned_weights_zero(engine, f"after step {step}")
    assert updates >= 2


@st.composite
def prune_grow_runs(draw):
    return {
        "method": draw(st.sampled_from(["set", "rigl"])),
        "sparsity": draw(st.floats(0.5, 0.95)),
        "widths": draw(st.lists(st.integers(4, 12), min_size=3, max_size=4)),
        "conv": draw(st.booleans()),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "dist": draw(st.sampled_from(["uniform", "erk"])),
        "anneal": draw(st.sampled_from(["constant", "cosine", "linear"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=20, deadline=None)
@given(run=prune_grow_runs())
def test_prune_and_grow_keeps_counts_and_never_regrows_dropped(run):
    model = build_model(run["widths"], run["conv"], seed=run["seed"])
    batches = make_batches(run["widths"], run["conv"], seed=run["seed"])
    optimizer = OPTIMIZERS[run["optimizer"]](model)
    schedule = dict(PRUNE_GROW, anneal=run["anneal"])
    engine = make_engine(
        run["method"], run["sparsity"], model, run["dist"], schedule=schedule, seed=run["seed"]
    )
    start(engine, model, batches, optimizer)
    initial_nnz = engine.masks.nnz()

    any_change = False
    expect_change = False
    n_update_steps = 0
    for step in range(STEPS):
        backward(model, optimizer, batches[step % len(batches)])
        old = clone_masks(engine.masks)
        is_update = engine.method.is_update_step(step)
        changed = engine.before_optimizer_step(step, optimizer)
        moved = any(not torch.equal(engine.masks[n], old[n]) for n in old)
        assert changed or not moved, "the mask changed but before_optimizer_step said no"
        assert is_update or not (changed or moved), f"mask update off schedule at {step}"
        n_update_steps += is_update
        if is_update:
            fraction = engine.method.drop_schedule.fraction_at(step)
            expect_change |= any(
                int(fraction * nnz(m)) >= 1 and nnz(m) < m.numel() for m in old.values()
            )
        for name, new in engine.masks.items():
            grown, dropped = new & ~old[name], old[name] & ~new
            assert nnz(new) == nnz(old[name]) == initial_nnz[name], f"{name}: count changed"
            assert nnz(grown) == nnz(dropped), f"{name}: dropped {nnz(dropped)} grew {nnz(grown)}"
            assert not (grown & dropped).any()
            assert not (new & dropped).any(), f"{name}: a weight dropped at {step} was regrown"
            any_change |= bool(grown.any())
            # The kept indices an update hands to the next are the mask's own.
            assert torch.equal(engine.masks.kept_indices(name), new.flatten().nonzero()[:, 0])
        optimizer.step()
    assert 1 <= engine.n_updates <= n_update_steps
    assert len(engine.history) == engine.n_updates + 1  # one entry at init, one per update
    # Whenever some layer has a whole weight to drop and room to regrow, the mask moves.
    assert any_change == expect_change


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_prune_and_grow_changes_the_mask(method):
    widths = [10, 8, 3]
    model = build_model(widths, seed=5)
    batches = make_batches(widths, seed=5)
    optimizer = OPTIMIZERS["sgd_momentum"](model)
    engine = make_engine(method, 0.7, model, "erk", seed=5)
    start(engine, model, batches, optimizer)
    initial = engine.masks.clone()
    turnover = []
    for step in range(STEPS):
        if train_step(engine, model, optimizer, batches, step):
            turnover.append(engine.last_stats["mask/turnover"])
    assert len(turnover) == 5  # steps 5, 10, 15, 20, 25 (< end = 27)
    assert all(t > 0 for t in turnover)
    assert not engine.masks.equal(initial)
    assert engine.ever_active.density() > initial.density()


# --------------------------------------------------------------------------------------
# 4. RigL grows where the dense gradient is largest
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("regrow_dropped", [False, True])
def test_rigl_grows_top_dense_gradient_among_candidates(regrow_dropped):
    """RigL keeps the largest |w| of the active weights and grows the largest dense |g|
    among the weights not kept (the reference) or, with regrow_dropped=False, among the
    weights inactive before the update."""
    widths = [16, 12, 5]
    model = build_model(widths, seed=7)
    batches = make_batches(widths, seed=7)
    optimizer = OPTIMIZERS["sgd_momentum"](model)
    schedule = dict(PRUNE_GROW, drop_fraction=0.4, anneal="constant")
    engine = make_engine(
        "rigl",
        0.75,
        model,
        "uniform",
        schedule=schedule,
        seed=7,
        regrow_dropped=regrow_dropped,
    )
    start(engine, model, batches, optimizer)

    step = 5
    assert engine.method.is_update_step(step)
    gen = torch.Generator().manual_seed(123)
    grads, weights = {}, {}
    with torch.no_grad():
        for name, p in engine.params.items():
            # Distinct magnitudes everywhere; the largest |grad| overall sit partly on active
            # weights, so "among the inactive" matters.
            p.copy_(torch.randn(p.shape, generator=gen) * engine.masks[name])
            p.grad = torch.randn(p.shape, generator=gen)
            grads[name] = p.grad.clone()
            weights[name] = p.detach().clone()
    old = clone_masks(engine.masks)
    assert engine.before_optimizer_step(step, optimizer)

    regrown = 0
    for name, new in engine.masks.items():
        mask = old[name]
        n_active = nnz(mask)
        n_drop = int(0.4 * n_active)
        if not regrow_dropped:
            n_drop = min(n_drop, mask.numel() - n_active)
        assert n_drop > 0
        assert nnz(new) == n_active

        active_scores = weights[name].abs().flatten()[mask.flatten()]
        cut = active_scores.sort(descending=True).values[n_active - n_drop - 1]
        kept = mask & (weights[name].abs() >= cut)
        assert nnz(kept) == n_active - n_drop
        candidates = ~kept if regrow_dropped else ~mask
        scores = grads[name].abs().flatten()[candidates.flatten()]
        threshold = scores.sort(descending=True).values[n_drop - 1]
        expected_grown = candidates & (grads[name].abs() >= threshold)
        assert nnz(expected_grown) == n_drop
        assert torch.equal(new, kept | expected_grown), f"{name}: RigL chose other weights"
        regrown += int((new & mask & ~kept).sum())

        # The gradients are masked only after the grow decision; a newly grown weight's
        # gradient is masked too (update_step=masked), so it is not trained in this step.
        p = engine.params[name]
        assert torch.equal(p.grad, grads[name] * (new & mask))
    # Only the reference candidates let a dropped weight come straight back.
    assert (regrown > 0) == regrow_dropped


# --------------------------------------------------------------------------------------
# 5. masked gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_gradients_of_pruned_weights_are_zero_before_the_step(method):
    widths = [8, 8, 3]
    model = build_model(widths, conv=True, seed=2)
    batches = make_batches(widths, conv=True, seed=2)
    optimizer = OPTIMIZERS["adamw"](model)
    dist = "global" if method in ("static", "gmp", "snip") else "erk"
    engine = make_engine(method, 0.8, model, dist, seed=2)
    start(engine, model, batches, optimizer)
    saw_update = False
    for step in range(STEPS):
        backward(model, optimizer, batches[step % len(batches)])
        dense = {n: p.grad.clone() for n, p in model.named_parameters()}
        old = clone_masks(engine.masks)
        saw_update |= engine.before_optimizer_step(step, optimizer)
        for name, p in engine.params.items():
            mask = engine.masks[name]
            # Weights grown in this update are not trained in it (update_step=masked).
            kept = mask & old[name]
            assert (p.grad[~kept] == 0).all(), f"step {step}: {name} has unmasked grads"
            assert torch.equal(p.grad[kept], dense[name][kept]), f"{name}: kept grads changed"
        # Biases are not prunable and keep their gradients.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                assert torch.equal(p.grad, dense[name])
        optimizer.step()
    assert saw_update == (method not in ("random", "snip"))


# --------------------------------------------------------------------------------------
# 6. state_dict round trip and exact resume
# --------------------------------------------------------------------------------------


def _through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("cut", [16, 17])  # just after an update step (15 / 16), or between
@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("method", ["set", "rigl", "gmp"])
def test_state_dict_round_trip_and_exact_resume(method, optimizer_name, cut):
    widths = [10, 9, 4]
    total = 40
    schedule = SCHEDULES[method]
    batches = make_batches(widths, seed=4)

    model_a = build_model(widths, seed=4)
    opt_a = OPTIMIZERS[optimizer_name](model_a)
    engine_a = make_engine(method, 0.8, model_a, "erk", schedule, seed=11, total_steps=total)
    start(engine_a, model_a, batches, opt_a)
    for step in range(cut):
        train_step(engine_a, model_a, opt_a, batches, step)
    assert engine_a.n_updates >= 2
    checkpoint = _through_bytes(
        {
            "model": model_a.state_dict(),
            "optimizer": opt_a.state_dict(),
            "engine": engine_a.state_dict(),
        }
    )

    model_b = build_model(widths, seed=99)  # different init: everything comes from the ckpt
    model_b.load_state_dict(checkpoint["model"])
    opt_b = OPTIMIZERS[optimizer_name](model_b)
    opt_b.load_state_dict(checkpoint["optimizer"])
    method_b = build_method(method, 0.8, distribution=distribution("erk"), schedule=schedule)
    engine_b = SparsityEngine(model_b, prunable(model_b), method_b, seed=0)
    engine_b.load_state_dict(checkpoint["engine"])  # on_load_checkpoint, then on_train_start:
    engine_b.setup(total_steps=total, steps_per_epoch=max(1, total // 3))
    assert engine_b.initialized
    engine_b.attach(opt_b)

    assert engine_b.masks.equal(engine_a.masks)
    assert engine_b.ever_active.equal(engine_a.ever_active)
    assert engine_b.history == engine_a.history
    assert engine_b.n_updates == engine_a.n_updates
    assert engine_b.seed == 11
    assert engine_b.last_stats == engine_a.last_stats

    updates_after = 0
    for step in range(cut, total):
        changed_a = train_step(engine_a, model_a, opt_a, batches, step)
        changed_b = train_step(engine_b, model_b, opt_b, batches, step)
        assert changed_a == changed_b
        updates_after += changed_a
        assert engine_b.masks.equal(engine_a.masks), f"masks diverged at step {step}"
    assert updates_after >= 1
    assert engine_b.ever_active.equal(engine_a.ever_active)
    assert engine_b.history == engine_a.history
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs after resume"


def test_state_dict_is_a_snapshot():
    """Training on after ``state_dict()`` must not change the saved state."""
    widths = [8, 8, 3]
    model = build_model(widths, seed=6)
    batches = make_batches(widths, seed=6)
    optimizer = OPTIMIZERS["sgd_momentum"](model)
    engine = make_engine("set", 0.7, model, "uniform", seed=6)
    start(engine, model, batches, optimizer)
    for step in range(6):
        train_step(engine, model, optimizer, batches, step)
    state = engine.state_dict()
    frozen = copy.deepcopy(state)
    for step in range(6, 20):
        train_step(engine, model, optimizer, batches, step)
    assert engine.n_updates > frozen["n_updates"]
    assert state["n_updates"] == frozen["n_updates"]
    assert state["history"] == frozen["history"]
    for key in ("masks", "ever_active"):
        for name in frozen[key]:
            assert torch.equal(state[key][name], frozen[key][name])


# --------------------------------------------------------------------------------------
# 7. the same choice on every "rank"
# --------------------------------------------------------------------------------------


def _rank(method: str, seed: int, widths: list[int]):
    model = build_model(widths, seed=8)  # same initial weights on every rank
    optimizer = OPTIMIZERS["sgd_momentum"](model)
    engine = make_engine(method, 0.75, model, "erk", seed=seed)
    return model, optimizer, engine


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_ranks_make_identical_mask_choices(method):
    widths = [10, 10, 4]
    batches = make_batches(widths, seed=8)
    ranks = [_rank(method, seed=5, widths=widths) for _ in range(2)]
    for r, (model, optimizer, engine) in enumerate(ranks):
        torch.manual_seed(100 + r)  # the global RNG differs between ranks
        start(engine, model, batches, optimizer)
    assert ranks[0][2].masks.equal(ranks[1][2].masks)
    updates = 0
    for step in range(STEPS):
        changed = []
        for r, (model, optimizer, engine) in enumerate(ranks):
            torch.manual_seed(1000 * r + step)
            changed.append(train_step(engine, model, optimizer, batches, step))
        assert changed[0] == changed[1]
        updates += changed[0]
        assert ranks[0][2].masks.equal(ranks[1][2].masks), f"ranks disagree at step {step}"
    assert updates >= 3
    assert ranks[0][2].history == ranks[1][2].history


def test_set_choices_depend_on_the_seed():
    widths = [10, 10, 4]
    batches = make_batches(widths, seed=8)
    model_a, opt_a, engine_a = _rank("set", seed=5, widths=widths)
    model_b, opt_b, engine_b = _rank("set", seed=6, widths=widths)
    start(engine_a, model_a, batches, opt_a)
    start(engine_b, model_b, batches, opt_b)
    assert not engine_a.masks.equal(engine_b.masks), "the initial random mask ignores the seed"

    # From the same mask and weights, a different seed still regrows elsewhere.
    model_c, opt_c, engine_c = _rank("set", seed=6, widths=widths)
    model_c.load_state_dict(model_a.state_dict())
    state = engine_a.state_dict()
    state["seed"] = 6
    engine_c.load_state_dict(state)
    engine_c.attach(opt_c)
    assert engine_c.masks.equal(engine_a.masks)
    for step in range(6):
        train_step(engine_a, model_a, opt_a, batches, step)
        train_step(engine_c, model_c, opt_c, batches, step)
    assert engine_a.n_updates == engine_c.n_updates == 1
    assert not engine_a.masks.equal(engine_c.masks), "SET regrowth ignores the seed"


# --------------------------------------------------------------------------------------
# 8. final sparsity on target
# --------------------------------------------------------------------------------------


FINAL_CASES = [
    ("static", "global"),
    ("static", "uniform"),
    ("gmp", "global"),
    ("gmp", "uniform"),
    ("gmp", "erk"),
    ("set", "erk"),
    ("rigl", "erk"),
    ("rigl", "uniform"),
    ("random", "erk"),
    ("random", "uniform"),
    ("snip", "global"),
]


@pytest.mark.parametrize("sparsity", [0.6, 0.9])
@pytest.mark.parametrize(("method", "dist"), FINAL_CASES)
def test_final_sparsity_is_on_target(method, dist, sparsity):
    widths = [12, 10, 6, 3]
    model = build_model(widths, conv=True, seed=9)
    batches = make_batches(widths, conv=True, seed=9)
    optimizer = OPTIMIZERS["sgd_momentum"](model)
    engine = make_engine(method, sparsity, model, dist, seed=9)
    start(engine, model, batches, optimizer)
    for step in range(STEPS):
        train_step(engine, model, optimizer, batches, step)

    n_layers = len(engine.params)
    total = sum(p.numel() for p in engine.params.values())
    zeros = total - sum(engine.masks.nnz().values())
    target = round(sparsity * total)
    assert abs(zeros - target) <= n_layers, f"{zeros} zeros, target {target} of {total}"
    assert abs(engine.masks.sparsity() - sparsity) <= n_layers / total
    # The report: "global"/"layers" are the mask's sparsity, "weights_zero_*" the measured
    # fraction of exactly-zero weights, which includes every masked-out weight.
    report = engine.sparsity_report()
    assert report["global"] == pytest.approx(engine.masks.sparsity(), abs=1e-12)
    assert report["weights_zero_global"] >= report["global"] - 1e-12
    for name, p in engine.params.items():
        assert int((p == 0).sum()) >= int((~engine.masks[name]).sum())
        assert report["weights_zero_layers"][name] >= report["layers"][name] - 1e-12


@pytest.mark.parametrize(
    ("method", "dist"),
    [
        ("static", "global"),
        ("gmp", "uniform"),
        ("snip", "global"),
        ("random", "erk"),
        ("set", "erk"),
        ("rigl", "uniform"),
    ],
)
def test_dense_first_and_last_layers_stay_dense(method, dist):
    widths = [12, 16, 10, 3]
    model = build_model(widths, conv=True, seed=13)
    batches = make_batches(widths, conv=True, seed=13)
    optimizer = OPTIMIZERS["adam"](model)
    built = build_method(
        method,
        0.7,
        distribution={**distribution(dist), "dense_first": True, "dense_last": True},
        schedule=dict(SCHEDULES[method]),
    )
    engine = SparsityEngine(model, prunable(model), built, seed=13)
    engine.setup(total_steps=STEPS, steps_per_epoch=10)
    start(engine, model, batches, optimizer)
    first, *_, last = list(engine.params)
    for step in range(STEPS):
        train_step(engine, model, optimizer, batches, step)
        assert engine.masks[first].all() and engine.masks[last].all(), f"step {step}"
        assert_pruned_weights_zero(engine, f"step {step}")
    total = sum(p.numel() for p in engine.params.values())
    zeros = total - sum(engine.masks.nnz().values())
    assert abs(zeros - round(0.7 * total)) <= len(engine.params)


# --------------------------------------------------------------------------------------
# 9. the dense baseline
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_dense_method_touches_nothing(sparsity):
    widths = [8, 8, 3]
    batches = make_batches(widths, seed=12)

    plain = build_model(widths, seed=12)
    opt_plain = OPTIMIZERS["adamw"](plain)
    for step in range(10):
        backward(plain, opt_plain, batches[step % len(batches)])
        opt_plain.step()

    model = build_model(widths, seed=12)
    optimizer = OPTIMIZERS["adamw"](model)
    engine = make_engine("dense", sparsity, model, schedule={"kind": "fixed"})
    assert engine.active is False
    start(engine, model, batches, optimizer)
    assert not optimizer._optimizer_step_post_hooks, "the dense engine registered a hook"
    if engine.masks is not None:
        assert all(bool(m.all()) for m in engine.masks.values())
    for step in range(10):
        backward(model, optimizer, batches[step % len(batches)])
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert engine.before_optimizer_step(step, optimizer) is False
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, grads[n])
        optimizer.step()
    assert engine.n_updates == 0
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), f"{name} differs from plain training"
    report = engine.sparsity_report()
    assert report["global"] == 0.0
    assert report["n_updates"] == 0


# --------------------------------------------------------------------------------------
# the post-step re-masking is skipped only where it provably changes nothing
# --------------------------------------------------------------------------------------


def _remask_run(method: str, optimizer_name: str, skip: bool, warm: bool, seed: int = 3):
    """A run whose post-step re-masking is allowed (``skip``) or forced; the weights after
    every step, and how many post-hooks re-applied the masks."""
    widths = [6, 8, 5]
    model = build_model(widths, seed=seed)
    batches = make_batches(widths, seed=seed)
    optimizer = (
        OPTIMIZERS[optimizer_name](model)
        if optimizer_name in OPTIMIZERS
        else torch.optim.RMSprop(model.parameters(), lr=1e-2, momentum=0.9)
    )
    if warm:
        dense_warmup(model, optimizer, batches)
    engine = make_engine(method, 0.8, model, seed=seed)
    start(engine, model, batches, optimizer)
    if not skip:
        engine._remask_free = False
    remasked = 0
    apply = Masks.apply_

    def counting_apply(masks, tensors):
        nonlocal remasked
        # Only the post-hook's re-masking counts (a mask update applies its new masks too).
        remasked += tensors is engine.params and sys._getframe(1).f_code.co_name == "_after_step"
        apply(masks, tensors)

    trajectory = []
    Masks.apply_ = counting_apply
    try:
        for step in range(STEPS):
            train_step(engine, model, optimizer, batches, step)
            assert_pruned_weights_zero(engine, f"after step {step}")
            trajectory.append([p.detach().clone() for p in model.parameters()])
    finally:
        Masks.apply_ = apply
    return trajectory, remasked


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("method", ["rigl", "gmp", "static"])
def test_skipping_the_remask_changes_no_weight(method, optimizer_name, warm):
    """SGD, Adam and AdamW leave a zero weight with a zero gradient and zero state at zero:
    once the first step has re-masked and zeroed the pruned weights' state (a warm
    optimizer has non-zero buffers there), the pass is skipped and every weight of every
    step equals that of a run that re-masks after every step, bit for bit."""
    skipped, n_skipped = _remask_run(method, optimizer_name, skip=True, warm=warm)
    forced, n_forced = _remask_run(method, optimizer_name, skip=False, warm=warm)
    assert n_forced >= STEPS - 1 and n_skipped <= 2
    for step, (a, b) in enumerate(zip(skipped, forced, strict=True)):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), f"step {step}"


def test_other_optimizers_are_remasked_after_every_step():
    _, n = _remask_run("rigl", "rmsprop", skip=True, warm=True)
    assert n == STEPS


def test_a_step_whose_gradients_were_not_masked_is_remasked():
    widths = [6, 8, 5]
    model = build_model(widths)
    batches = make_batches(widths)
    optimizer = OPTIMIZERS["sgd_momentum"](model)
    engine = make_engine("rigl", 0.8, model)
    start(engine, model, batches, optimizer)
    for step in range(3):
        train_step(engine, model, optimizer, batches, step)
    # A step that skips before_optimizer_step: its pruned gradients move the weights.
    backward(model, optimizer, batches[0])
    optimizer.step()
    assert_pruned_weights_zero(engine, "after a step without before_optimizer_step")


# -- fast paths that must answer exactly as the plain operations do -------------------------
def test_all_finite_is_exact_when_finite_entries_overflow_their_sum():
    """A finite sum proves the entries finite; an overflowing sum of finite entries (or a
    NaN, an infinity) is settled entry by entry."""
    from prunelab.sparsity.engine import _all_finite

    big = torch.full((4,), 1e308, dtype=torch.float64)
    assert not bool(torch.isfinite(big.sum()))
    assert _all_finite({"a": big, "b": None, "c": torch.randn(3)})
    assert _all_finite({"a": torch.full((4,), 3e38)})  # overflows a float32 sum
    for bad in (math.inf, -math.inf, math.nan):
        g = torch.randn(10)
        g[3] = bad
        assert not _all_finite({"a": torch.ones(2), "b": g})
    both = torch.tensor([math.inf, -math.inf])  # sums to NaN
    assert not _all_finite({"a": both})


def test_zeroing_optimizer_state_is_exact_with_non_finite_state():
    """The multiplication that zeroes optimizer state at ``positions`` leaves every other
    entry as it was, and zeroes non-finite entries too (where a product by 0 gives NaN)."""
    from prunelab.sparsity.engine import _zero_optimizer_state

    param = torch.nn.Parameter(torch.zeros(6))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    buf = torch.tensor([1.0, math.inf, math.nan, -2.0, math.inf, -0.5])
    optimizer.state[param] = {"momentum_buffer": buf.clone(), "step": torch.tensor(3.0)}
    positions = torch.tensor([True, True, True, False, False, False])
    _zero_optimizer_state(optimizer, param, positions)
    got = optimizer.state[param]["momentum_buffer"]
    assert torch.equal(got[:3], torch.zeros(3))
    assert torch.equal(got[3:], buf[3:])
    assert float(optimizer.state[param]["step"]) == 3.0  # not a per-element buffer
    finite = torch.randn(6)
    optimizer.state[param]["momentum_buffer"] = finite.clone()
    _zero_optimizer_state(optimizer, param, positions)
    expected = finite.masked_fill(positions, 0)
    assert torch.equal(optimizer.state[param]["momentum_buffer"], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64])
def test_mask_as_dtype_reads_its_bytes_as_the_plain_conversion_does(dtype):
    from prunelab.sparsity.masks import as_dtype

    mask = torch.rand(30, 40) < 0.3
    for view in (mask, mask.t(), mask[:, ::3]):  # non-contiguous views too
        got = as_dtype(view, dtype)
        assert got.dtype == dtype and torch.equal(got, view.to(dtype))


def test_masks_forget_kept_indices_and_factors_of_a_replaced_mask():
    masks = Masks({"a": torch.tensor([True, False, True]), "b": torch.ones(2, dtype=torch.bool)})
    assert masks.kept_indices("a").tolist() == [0, 2]
    masks.apply_({"a": torch.ones(3)})
    masks["a"] = torch.tensor([False, True, False])
    assert masks.kept_indices("a").tolist() == [1]
    t = torch.ones(3)
    masks.apply_({"a": t, "b": torch.ones(2)})
    assert t.tolist() == [0.0, 1.0, 0.0]


def test_merge_sorted_merges_two_increasing_runs():
    from prunelab.methods.base import merge_sorted

    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(1000, generator=g)
    a, b = perm[:300].sort().values, perm[300:420].sort().values
    assert torch.equal(merge_sorted(a, b), torch.cat([a, b]).sort().values)
    assert torch.equal(merge_sorted(a[:0], b), b)


def _run_with_or_without_listed_changes(
    method, optimizer_name, listed, channels_last, **options
) -> list[dict]:
    model = build_model([6, 12, 8, 4], conv=True, seed=3)
    if channels_last:  # non-contiguous parameters, gradients and optimizer state
        model = model.to(memory_format=torch.channels_last)
    batches = make_batches([6, 12, 8, 4], conv=True, seed=3)
    optimizer = OPTIMIZERS[optimizer_name](model)
    engine = make_engine(method, 0.7, model, seed=3, **options)
    start(engine, model, batches, optimizer)
    changes_from = Masks.changes_from
    if not listed:
        Masks.changes_from = lambda self, base: None
    snapshots = []
    try:
        for step in range(STEPS):
            backward(model, optimizer, batches[step % len(batches)])
            engine.before_optimizer_step(step, optimizer)
            grads = [p.grad.clone() for p in model.parameters()]
            optimizer.step()
            snapshots.append(
                {
                    "grads": grads,
                    "weights": [p.detach().clone() for p in model.parameters()],
                    "state": [
                        v.clone()
                        for p in model.parameters()
                        for v in optimizer.state[p].values()
                        if torch.is_tensor(v)
                    ],
                    "masks": engine.masks.clone(),
                    "ever": engine.ever_active.clone(),
                    "history": list(engine.history),
                    "adam_resets": {n: r.clone() for n, r in engine.adam_resets.items()},
                }
            )
    finally:
        Masks.changes_from = changes_from
    return snapshots


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"update_step": "skip"},
        {"update_step": "dense"},
        {"adam_bias_correction": "per_weight"},
        {"regrow_dropped": False},
    ],
)
@pytest.mark.parametrize("optimizer_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_an_update_that_lists_its_changes_writes_what_comparing_masks_writes(
    method, optimizer_name, options, channels_last
):
    """A prune-and-grow update names the weights it dropped and grew; the engine then zeroes
    weights, optimizer state and grown gradients at those indices instead of comparing the
    masks. Every gradient, weight, optimizer buffer, mask and record of every step is the
    one the comparison gives."""
    a = _run_with_or_without_listed_changes(method, optimizer_name, True, channels_last, **options)
    b = _run_with_or_without_listed_changes(method, optimizer_name, False, channels_last, **options)
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        for key in ("grads", "weights", "state"):
            assert all(torch.equal(s, t) for s, t in zip(x[key], y[key], strict=True)), (
                key,
                step,
            )
        for key in ("masks", "ever"):
            assert all(torch.equal(x[key][n], y[key][n]) for n in x[key]), (key, step)
        assert x["history"] == y["history"], step
        assert x["adam_resets"].keys() == y["adam_resets"].keys()
        assert all(torch.equal(r, y["adam_resets"][n]) for n, r in x["adam_resets"].items())


def test_plain_steps_mask_as_the_masks_do_and_follow_a_mask_replaced_in_place():
    """Steps without an update take a short path through the cached factors; the gradients
    it leaves are those the masks leave (``Masks.apply_``), before and after updates, and a
    mask replaced in place (``masks[name] = ...``) takes effect at the next step instead of
    the cached factors."""
    widths = [12, 10, 6]
    model = build_model(widths)
    batches = make_batches(widths)
    schedule = dict(PRUNE_GROW, update_every=3, end=0.9)
    engine = make_engine("rigl", 0.7, model, schedule=schedule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start(engine, model, batches, optimizer)
    plain = 0
    for step in range(12):
        backward(model, optimizer, batches[step % len(batches)])
        if step == 7:  # replace a mask in place, mid-training
            name = next(iter(engine.masks))
            engine.masks[name] = ~engine.masks[name]
        update = engine.method.is_update_step(step)
        expected = {n: p.grad.clone() for n, p in engine.params.items()}
        short = engine._plain_step(step)  # what before_optimizer_step tries first
        plain += short
        if not short:
            engine.before_optimizer_step(step, optimizer)
        if not update:
            engine.masks.apply_(expected)
            for name, param in engine.params.items():
                assert torch.equal(param.grad, expected[name]), (step, name)
        if step == 7:
            assert not short  # the replaced mask renewed the plan
        optimizer.step()
    assert plain >= 5  # the short path did run


def test_mask_updates_do_not_keep_earlier_masks_alive():
    """An update's masks know what changed since the masks they came from, without holding
    them: a run of updates keeps one generation of masks (with its cached factors and
    indices), not every one since the start."""
    import gc
    import weakref

    widths = [12, 10, 6]
    model = build_model(widths)
    batches = make_batches(widths)
    engine = make_engine("rigl", 0.7, model, schedule=dict(PRUNE_GROW, update_every=2, end=0.9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start(engine, model, batches, optimizer)
    generations = []
    for step in range(16):
        changed = train_step(engine, model, optimizer, batches, step)
        if changed:
            generations.append(weakref.ref(engine.masks))
    assert len(generations) >= 5
    gc.collect()
    alive = [ref() is not None for ref in generations]
    assert alive[-1] and not any(alive[:-2]), alive
