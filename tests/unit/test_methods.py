"""Pruning methods: mask helpers, config errors, SNIP saliency, one-shot and gradual magnitude.

Pure torch: tiny MLPs on random data, driven by a hand-written loop through the engine.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods import METHODS, build_method
from prunelab.methods.base import random_mask, topk_mask
from prunelab.sparsity.engine import SparsityEngine

SETTINGS = settings(max_examples=30, deadline=None)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def mlp(widths: list[int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batches_for(widths: list[int], seed: int = 0, n: int = 4, size: int = 8) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, widths[0], generator=gen), torch.randint(0, widths[-1], (size,)))
        for _ in range(n)
    ]


def weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def dist(name: str) -> dict:
    return {"name": name, "dense_first": False, "dense_last": False, "power_scale": 1.0}


def engine_for(model, method, total_steps, steps_per_epoch=None, seed=0) -> SparsityEngine:
    engine = SparsityEngine(model, weights(model), method, seed=seed)
    engine.setup(total_steps, steps_per_epoch or max(1, total_steps // 4))
    return engine


def global_topk(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """True at the k largest entries over all layers (scores assumed free of ties)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    threshold = flat.sort(descending=True).values[k - 1]
    out = {n: s >= threshold for n, s in scores.items()}
    assert sum(int(m.sum()) for m in out.values()) == k, "ties in the test scores"
    return out


def n_zeros_target(sparsity: float, params: dict[str, torch.Tensor]) -> tuple[int, int]:
    total = sum(p.numel() for p in params.values())
    return round(sparsity * total), total


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


# --------------------------------------------------------------------------------------
# topk_mask / random_mask
# --------------------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)


@SETTINGS
@given(shape=shapes, data=st.data())
def test_topk_mask_keeps_exactly_the_k_largest(shape, data):
    numel = math.prod(shape)
    k = data.draw(st.integers(0, numel))
    seed = data.draw(st.integers(0, 2**16))
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = topk_mask(scores, k)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == k
    if 0 < k < numel:
        assert scores[mask].min() >= scores[~mask].max()


@SETTINGS
@given(shape=shapes, data=st.data())
def test_topk_mask_count_is_exact_with_ties(shape, data):
    numel = math.prod(shape)
    k = data.draw(st.integers(0, numel))
    scores = torch.tensor(
        data.draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=numel, max_size=numel))
    ).view(shape)
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == k
    if 0 < k < numel:
        assert scores[mask].min() >= scores[~mask].max()


def test_topk_mask_breaks_ties_by_lowest_index():
    mask = topk_mask(torch.zeros(20), 5)
    assert mask.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


@SETTINGS
@given(shape=shapes, data=st.data())
def test_random_mask_has_exactly_k_and_is_reproducible(shape, data):
    numel = math.prod(shape)
    k = data.draw(st.integers(0, numel))
    seed = data.draw(st.integers(0, 2**16))
    mask = random_mask(torch.Size(shape), k, torch.Generator().manual_seed(seed))
    assert mask.dtype == torch.bool and mask.shape == torch.Size(shape)
    assert int(mask.sum()) == k
    again = random_mask(torch.Size(shape), k, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)


def test_random_mask_depends_on_the_generator():
    masks = {
        tuple(random_mask(torch.Size((10, 10)), 30, torch.Generator().manual_seed(s)).flatten())
        for s in range(5)
    }
    assert len(masks) == 5


# --------------------------------------------------------------------------------------
# build_method: configuration errors
# --------------------------------------------------------------------------------------

GOOD_SCHEDULES = {
    "dense": {"kind": "fixed"},
    "static": {"kind": "one_shot", "at": 0.5, "at_epoch": None},
    "random": {"kind": "fixed"},
    "snip": {"kind": "fixed"},
    "gmp": {"kind": "polynomial", "begin": 0.0, "end": 0.75, "frequency": 100, "power": 3},
    "set": {"kind": "prune_grow", "update_every": 100, "drop_fraction": 0.3, "anneal": "cosine"},
    "rigl": {"kind": "prune_grow", "update_every": 100, "drop_fraction": 0.3, "anneal": "cosine"},
    "snfs": {"kind": "prune_grow", "update_every": 100, "drop_fraction": 0.3, "anneal": "cosine"},
    "grasp": {"kind": "fixed"},
    "synflow": {"kind": "fixed"},
    "l1": {"kind": "one_shot", "at": 0.5, "at_epoch": None},
    "imp": {"kind": "fixed"},
    "adaptive": {"kind": "fixed"},
    "han": {"kind": "iterative", "begin": 0.25, "end": 0.75},
    "l0": {"kind": "fixed"},
    "dns": {"kind": "polynomial", "begin": 0.0, "end": 0.75, "frequency": 100, "power": 3},
    "structured_l1": {"kind": "one_shot", "at": 0.5, "at_epoch": None},
    "neuron_sensitivity": {"kind": "one_shot", "at": 0.5, "at_epoch": None},
    "taylor": {"kind": "polynomial", "begin": 0.0, "end": 0.75, "frequency": 100, "power": 3},
    "block": {"kind": "one_shot", "at": 0.5, "at_epoch": None},
    "fbs": {"kind": "fixed"},
}
# Distributions other than ERK for the methods that take only some.
GOOD_DISTRIBUTIONS = {
    "imp": "uniform",
    "structured_l1": "uniform",
    "neuron_sensitivity": "global",
    "taylor": "uniform",
    "block": "global",
}


def test_every_registered_method_has_a_schedule_here():
    assert set(METHODS) - {"dynamic"} == set(GOOD_SCHEDULES)


@pytest.mark.parametrize("name", sorted(GOOD_SCHEDULES))
def test_build_method_builds_every_registered_method(name):
    distribution = dist(GOOD_DISTRIBUTIONS.get(name, "erk"))
    method = build_method(name, 0.9, distribution=distribution, schedule=GOOD_SCHEDULES[name])
    assert isinstance(method, METHODS[name])
    assert method.name == name


def test_build_method_rejects_an_unknown_name():
    with pytest.raises(ConfigError) as err:
        build_method("magnitude", 0.9)
    message = one_line(err)
    assert "magnitude" in message and "rigl" in message


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("random", "polynomial"),
        ("rigl", "fixed"),
        ("set", "one_shot"),
        ("static", "polynomial"),
        ("gmp", "one_shot"),
        ("gmp", "prune_grow"),
        ("snip", "prune_grow"),
        ("dense", "prune_grow"),
    ],
)
def test_build_method_rejects_a_schedule_kind_the_method_cannot_use(name, kind):
    with pytest.raises(ConfigError) as err:
        build_method(name, 0.9, distribution=dist("uniform"), schedule={"kind": kind})
    message = one_line(err)
    assert kind in message and name in message


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize("name", ["static", "random", "snip", "gmp", "set", "rigl"])
def test_build_method_rejects_sparsity_outside_unit_interval(name, sparsity):
    with pytest.raises(ConfigError) as err:
        build_method(name, sparsity, schedule=GOOD_SCHEDULES[name])
    one_line(err)


def test_build_method_rejects_unknown_options():
    with pytest.raises(ConfigError) as err:
        build_method("rigl", 0.9, schedule=GOOD_SCHEDULES["rigl"], grow="random")
    assert "rigl" in one_line(err)
    with pytest.raises(ConfigError) as err:
        build_method("snip", 0.9, batches=0)
    one_line(err)


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("rigl", {"kind": "prune_grow", "update_every": 0}),
        ("set", {"kind": "prune_grow", "drop_fraction": 1.5}),
        ("set", {"kind": "prune_grow", "anneal": "exponential"}),
        ("gmp", {"kind": "polynomial", "frequency": 0}),
        ("gmp", {"kind": "polynomial", "power": 0}),
        ("static", {"kind": "one_shot", "at": 1.5}),
    ],
)
def test_build_method_rejects_bad_schedule_values_up_front(name, schedule):
    with pytest.raises(ConfigError) as err:
        build_method(name, 0.9, distribution=dist("uniform"), schedule=schedule)
    one_line(err)


@pytest.mark.parametrize(
    ("name", "distribution"),
    [("random", "global"), ("set", "global"), ("rigl", "global"), ("rigl", "lognormal")],
)
def test_unusable_distribution_fails_before_training(name, distribution):
    """A score-free method with the 'global' distribution (or an unknown distribution) is a
    ConfigError at the latest when the masks are first decided, before any step."""
    model = mlp([6, 5, 3])
    with pytest.raises(ConfigError) as err:
        method = build_method(
            name, 0.8, distribution=dist(distribution), schedule=GOOD_SCHEDULES[name]
        )
        engine_for(model, method, total_steps=10).initialize()
    one_line(err)


# --------------------------------------------------------------------------------------
# SNIP
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_batches", [1, 2])
def test_snip_keeps_exactly_the_top_saliency_weights(n_batches):
    widths, sparsity = [12, 10, 6, 4], 0.8
    model = mlp(widths, seed=3)
    data = batches_for(widths, seed=3)
    params = weights(model)

    # Our own SNIP: |g * w| with g the gradient summed over the first n_batches batches
    # (the accumulated gradient of Lee et al., not the sum of per-batch |g * w|), one
    # global top-k.
    grad_sum = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in data[:n_batches]:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            grad_sum[n] += g
    saliency = {n: (grad_sum[n] * p.detach()).abs() for n, p in params.items()}
    zeros, total = n_zeros_target(sparsity, params)
    expected = global_topk(saliency, total - zeros)
    dense_weights = {n: p.detach().clone() for n, p in params.items()}

    sentinel = {n: torch.full_like(p, 7.0) for n, p in params.items()}
    for n, p in params.items():
        p.grad = sentinel[n].clone()
    method = build_method(
        "snip",
        sparsity,
        distribution=dist("global"),
        schedule={"kind": "fixed"},
        batches=n_batches,
    )
    engine = engine_for(model, method, total_steps=10)
    engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)

    for n, p in params.items():
        assert torch.equal(engine.masks[n], expected[n]), f"{n}: SNIP kept other weights"
        assert torch.equal(p.detach(), dense_weights[n] * expected[n])
        assert torch.equal(p.grad, sentinel[n]), "SNIP clobbered the existing gradients"
    assert not any(method.is_update_step(t) for t in range(10))


def test_snip_restores_batchnorm_statistics():
    """The saliency passes run the model in training mode; BatchNorm's running statistics
    must be what they were before SNIP looked at the data."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    model.eval()
    data = [(torch.randn(16, 6) * 3 + 1, torch.randint(0, 3, (16,))) for _ in range(3)]
    before = {n: b.clone() for n, b in model.named_buffers()}
    method = build_method(
        "snip", 0.5, distribution=dist("global"), schedule={"kind": "fixed"}, batches=3
    )
    engine = engine_for(model, method, total_steps=10)
    engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"SNIP changed the buffer {name}"
    assert not model.training, "SNIP left the model in training mode"


def test_snip_without_data_fails_clearly():
    model = mlp([6, 5, 3])
    method = build_method("snip", 0.5, distribution=dist("global"))
    engine = engine_for(model, method, total_steps=10)
    with pytest.raises(ValueError, match="SNIP"):
        engine.initialize()


# --------------------------------------------------------------------------------------
# static one-shot magnitude pruning
# --------------------------------------------------------------------------------------


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def _train(model, optimizer, engine, data, steps, on_step):
    """The module's loop; ``on_step(step, weights_before, changed)`` after each update call."""
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        x, y = data[step % len(data)]
        F.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in engine.params.items()}
        changed = engine.before_optimizer_step(step, optimizer)
        on_step(step, before, changed)
        optimizer.step()


@pytest.mark.parametrize(
    ("distribution", "schedule", "prune_step"),
    [
        ("global", {"kind": "one_shot", "at": 0.5, "at_epoch": None}, 10),
        ("global", {"kind": "one_shot", "at": 0.5, "at_epoch": 3}, 12),  # 4 steps per epoch
        ("uniform", {"kind": "one_shot", "at": 0.25}, 5),
    ],
)
def test_static_prunes_once_by_magnitude(distribution, schedule, prune_step):
    widths, sparsity, total = [12, 10, 6, 3], 0.75, 20
    model = mlp(widths, seed=4)
    data = batches_for(widths, seed=4)
    method = build_method("static", sparsity, distribution=dist(distribution), schedule=schedule)
    engine = engine_for(model, method, total_steps=total, steps_per_epoch=4)
    engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)
    optimizer = _sgd(model)
    engine.attach(optimizer)
    params = engine.params
    zeros, n_total = n_zeros_target(sparsity, params)
    assert all(bool(m.all()) for m in engine.masks.values()), "static starts dense"
    pruned: dict[str, torch.Tensor] = {}

    def check(step, before, changed):
        assert changed == (step == prune_step)
        if step < prune_step:
            assert all(bool(m.all()) for m in engine.masks.values()), f"pruned at {step}"
            return
        if step == prune_step:
            magnitude = {n: w.abs() for n, w in before.items()}
            if distribution == "global":
                expected = global_topk(magnitude, n_total - zeros)
                for n in params:
                    assert torch.equal(engine.masks[n], expected[n]), f"{n}: not global top-k"
            else:
                for n, mask in engine.masks.items():
                    kept = int(mask.sum())
                    assert abs((mask.numel() - kept) - sparsity * mask.numel()) <= 1
                    assert torch.equal(mask, topk_mask(magnitude[n], kept)), n
            assert sum(int((~m).sum()) for m in engine.masks.values()) == zeros
            pruned.update({n: m.clone() for n, m in engine.masks.items()})
            for n, p in params.items():
                assert torch.equal(p.detach(), before[n] * pruned[n])
            return
        for n in params:
            assert torch.equal(engine.masks[n], pruned[n]), f"mask changed at {step}"

    _train(model, optimizer, engine, data, range(total), check)
    assert engine.n_updates == 1
    for n, p in params.items():
        assert (p.detach()[~pruned[n]] == 0).all()


# --------------------------------------------------------------------------------------
# gradual magnitude pruning
# --------------------------------------------------------------------------------------


def zhu_gupta(step: int, final: float, begin: int, end: int, power: float) -> float:
    """s_t = s_f (1 - (1 - (t - t0) / (t_end - t0))^power), 0 before t0, s_f after t_end."""
    if step < begin:
        return 0.0
    if step >= end:
        return final
    return final * (1.0 - (1.0 - (step - begin) / (end - begin)) ** power)


@pytest.mark.parametrize("power", [3, 1])
@pytest.mark.parametrize("distribution", ["global", "uniform", "erk"])
def test_gmp_follows_the_polynomial_schedule(distribution, power):
    widths, sparsity, total = [12, 10, 8, 3], 0.9, 30
    begin, end, frequency = 3, 21, 4  # begin=0.1, end=0.7 of 30 steps
    schedule = {
        "kind": "polynomial",
        "begin": 0.1,
        "end": 0.7,
        "begin_epoch": None,
        "end_epoch": None,
        "frequency": frequency,
        "power": power,
    }
    model = mlp(widths, seed=5)
    data = batches_for(widths, seed=5)
    method = build_method("gmp", sparsity, distribution=dist(distribution), schedule=schedule)
    engine = engine_for(model, method, total_steps=total)
    engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)
    optimizer = _sgd(model)
    engine.attach(optimizer)
    params = engine.params
    n_layers = len(params)
    _, n_total = n_zeros_target(sparsity, params)
    assert all(bool(m.all()) for m in engine.masks.values()), "gmp starts dense"

    expected_updates = set(range(begin, end + 1, frequency)) | {end}
    seen: list[float] = []
    previous = {n: m.clone() for n, m in engine.masks.items()}

    def check(step, before, changed):
        assert method.is_update_step(step) == (step in expected_updates), f"step {step}"
        zeros = sum(int((~m).sum()) for m in engine.masks.values())
        if step not in expected_updates:
            assert not changed, f"mask update off schedule at {step}"
            assert all(torch.equal(engine.masks[n], previous[n]) for n in params)
        else:
            target = round(zhu_gupta(step, sparsity, begin, end, power) * n_total)
            assert abs(zeros - target) <= n_layers, f"step {step}: {zeros} zeros, want {target}"
            if distribution == "global":
                # One magnitude threshold over the still-active weights.
                scores = {n: torch.where(previous[n], w.abs(), -1.0) for n, w in before.items()}
                expected = global_topk(scores, n_total - zeros)
                for n in params:
                    assert torch.equal(engine.masks[n], expected[n]), f"{n} at {step}"
        for n, mask in engine.masks.items():
            assert not (mask & ~previous[n]).any(), f"{n}: a pruned weight came back at {step}"
            previous[n] = mask.clone()
        seen.append(zeros / n_total)

    _train(model, optimizer, engine, data, range(total), check)
    assert seen == sorted(seen), "sparsity went down"
    assert abs(seen[-1] * n_total - round(sparsity * n_total)) <= n_layers
    assert 1 <= engine.n_updates <= len(expected_updates)
    for n, p in params.items():
        assert (p.detach()[~engine.masks[n]] == 0).all()


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("static", {"kind": "one_shot", "at": 1.0}),
        ("gmp", {"kind": "polynomial", "begin": 0.0, "end": 1.0, "frequency": 4, "power": 1}),
    ],
)
def test_schedule_ending_with_training_still_reaches_the_target(name, schedule):
    widths, sparsity, total = [12, 10, 3], 0.9, 30
    model = mlp(widths, seed=6)
    data = batches_for(widths, seed=6)
    method = build_method(name, sparsity, distribution=dist("global"), schedule=schedule)
    engine = engine_for(model, method, total_steps=total)
    engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)
    optimizer = _sgd(model)
    engine.attach(optimizer)
    _train(model, optimizer, engine, data, range(total), lambda *_: None)
    zeros, n_total = n_zeros_target(sparsity, engine.params)
    assert abs(sum(int((~m).sum()) for m in engine.masks.values()) - zeros) <= len(widths) - 1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1 << 15, 1 << 17),
    k_fraction=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "periodic", "sorted", "with_inf"]),
    seed=st.integers(0, 2**16),
)
def test_kth_largest_is_the_value_topk_finds(n, k_fraction, kind, seed):
    """The sampled selection gives exactly torch.topk's k-th largest value, whatever the
    input: heavy ties, a period that a strided sample sees only one phase of (the sample
    then misleads and the whole input is searched), sorted runs, -inf (NaN scores)."""
    from prunelab.methods.base import kth_largest

    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        flat = torch.randn(n, generator=g).abs()
    elif kind == "ties":
        flat = torch.randint(0, 5, (n,), generator=g).float()
    elif kind == "periodic":
        flat = torch.zeros(n)
        flat[:: max(1, n // (1 << 13))] = 1.0  # exactly where the sample looks
        flat += torch.rand(n, generator=g) * 1e-3
    elif kind == "sorted":
        flat = torch.arange(n, dtype=torch.float32).flip(0)
    else:
        flat = torch.randn(n, generator=g)
        flat[torch.rand(n, generator=g) < 0.3] = -math.inf
    k = min(n, max(1, round(k_fraction * n)))
    assert torch.equal(kth_largest(flat, k), torch.topk(flat, k, sorted=False).values.min())


def test_topk_mask_on_a_large_layer_matches_a_full_sort():
    """topk_mask through the sampled selection: exactly k entries, the k largest."""
    from prunelab.methods.base import topk_mask

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 784, generator=g)
    for k in (1, 2352, 7056, 23520, 117600, 211680, 235199):
        mask = topk_mask(scores, k)
        assert int(mask.sum()) == k
        order = scores.flatten().argsort(descending=True)
        assert bool(mask.flatten()[order[:k]].all())


def _top_among_by_gathering(scores, candidates, k, generator=None):
    """The candidates gathered, their k largest chosen with torch.topk's k-th value, ties
    in index order then shuffled by ``generator``: what top_among must choose."""
    index = candidates.flatten().nonzero().flatten()
    flat = torch.nan_to_num(scores.flatten()[index].float(), nan=-math.inf)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    k = max(0, min(k, index.numel()))
    if k == 0:
        return mask.view_as(scores)
    kth = torch.topk(flat, k).values.min()
    chosen = flat > kth
    ties = (flat == kth).nonzero().flatten()
    need = k - int(chosen.sum())
    if generator is not None and ties.numel() > need:
        ties = ties[torch.randperm(ties.numel(), generator=generator)[:need]]
    chosen[ties[:need]] = True
    mask[index[chosen]] = True
    return mask.view_as(scores)


@settings(max_examples=80, deadline=None)
@given(
    n=st.sampled_from([1, 7, 300, 5000, 40000]),
    density=st.floats(0.0, 1.0),
    k_fraction=st.floats(-0.1, 1.1),
    kind=st.sampled_from(["normal", "ties", "nan", "inf"]),
    seeded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_top_among_chooses_as_gathering_the_candidates_does(
    n, density, k_fraction, kind, seeded, seed
):
    """top_among selects over the whole layer when most entries are candidates (growth)
    and among the gathered candidates otherwise (drop); both choose exactly the entries the
    plain gather-and-topk selection chooses, random tie-breaks included."""
    from prunelab.methods.base import top_among

    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, generator=g)
    if kind == "ties":
        scores = torch.randint(0, 3, (n,), generator=g).float()
    elif kind == "nan":
        scores[torch.rand(n, generator=g) < 0.3] = math.nan
    elif kind == "inf":
        scores[torch.rand(n, generator=g) < 0.3] = -math.inf
    candidates = torch.rand(n, generator=g) < density
    k = round(k_fraction * int(candidates.sum()))
    generators = [torch.Generator().manual_seed(seed) if seeded else None for _ in range(2)]
    got = top_among(scores, candidates, k, generators[0])
    assert torch.equal(got, _top_among_by_gathering(scores, candidates, k, generators[1]))
    assert int(got.sum()) == max(0, min(k, int(candidates.sum())))
    assert not bool((got & ~candidates).any())


@settings(max_examples=80, deadline=None)
@given(
    n=st.sampled_from([7, 300, 5000, 40000, 100000]),
    density=st.floats(0.0, 1.0),
    fraction=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "nan", "inf"]),
    regrow_dropped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prune_and_grow_chooses_as_gathering_does(n, density, fraction, kind, regrow_dropped, seed):
    """A prune-and-grow update selects in index space; it keeps and grows exactly the
    weights that gathering the candidates and taking torch.topk's k largest chooses, for
    the drop and for the growth, random tie-breaks included."""
    from prunelab.methods.rigl import RigL
    from prunelab.sparsity.engine import Context

    g = torch.Generator().manual_seed(seed)

    def scores():
        if kind == "ties":
            return torch.randint(0, 3, (n,), generator=g).float()
        values = torch.randn(n, generator=g)
        if kind in ("nan", "inf"):
            values[torch.rand(n, generator=g) < 0.3] = math.nan if kind == "nan" else -math.inf
        return values

    mask = torch.rand(n, generator=g) < density
    drop, grow = scores(), scores()
    method = RigL(0.5, schedule={"kind": "prune_grow"}, regrow_dropped=regrow_dropped)
    ctx = Context(seed=seed, step=100)
    (active,) = torch.nonzero(mask, as_tuple=True)
    n_drop = int(fraction * active.numel())
    if not regrow_dropped:
        n_drop = min(n_drop, n - active.numel())
    if n_drop <= 0:
        return
    got, indices, (dropped, added) = method._drop_and_grow(mask, active, n_drop, drop, grow, ctx, 3)
    # The kept indices handed to the next update are the new mask's, in increasing order,
    # and the changes it lists are exactly where the masks differ.
    assert torch.equal(indices, torch.nonzero(got, as_tuple=True)[0])
    assert torch.equal(dropped.sort().values, torch.nonzero(mask & ~got, as_tuple=True)[0])
    assert torch.equal(added.sort().values, torch.nonzero(got & ~mask, as_tuple=True)[0])
    # Scoring the drop by |w| from the weights themselves chooses as the scores |w| do.
    by_weights = method._drop_and_grow(mask, active, n_drop, -drop, grow, ctx, 3, True)
    by_scores = method._drop_and_grow(mask, active, n_drop, drop.abs(), grow, ctx, 3)
    assert torch.equal(by_weights[0], by_scores[0])
    kept = _top_among_by_gathering(
        drop, mask, active.numel() - n_drop, method.tie_generator(ctx, 3, "drop")
    )
    candidates = ~kept if regrow_dropped else ~mask
    grown = _top_among_by_gathering(grow, candidates, n_drop, method.tie_generator(ctx, 3, "grow"))
    assert torch.equal(got, kept | grown)
    assert int(got.sum()) == int(mask.sum()) - n_drop + min(n_drop, int(candidates.sum()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_selection_through_numpy_and_through_torch_agree(dtype, kind):
    """On the CPU float32 and float64 are selected through numpy, other dtypes through
    torch's own kernels: the same values give the same k-th value and the same entries,
    random tie-breaks included."""
    from prunelab.methods.base import kth_largest, top_index

    g = torch.Generator().manual_seed(0)
    for n in (1000, 40000, 100000):
        if kind == "ties":
            values = torch.randint(0, 50, (n,), generator=g).to(dtype)
        else:
            values = torch.randn(n, generator=g).to(dtype)
        for k in (1, n // 10, n // 2, n - 1):
            assert float(kth_largest(values, k)) == float(kth_largest(values.float(), k))
            got = top_index(values, k, torch.Generator().manual_seed(k))
            want = top_index(values.float(), k, torch.Generator().manual_seed(k))
            assert torch.equal(got.sort().values, want.sort().values), (n, k)
