"""N:M semi-structured masks and threshold masks of the magnitude methods (static, gmp).

Pure torch: the pattern helpers on random tensors, and the methods driven through the engine.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_methods import mlp, weights

from prunelab.cost.flops import LayerFlops
from prunelab.cost.training import segments_from_history, training_flops
from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.sparsity.engine import SparsityEngine
from prunelab.sparsity.patterns import (
    check_threshold,
    from_groups,
    is_n_m,
    n_m_mask,
    parse_n_m,
    threshold_mask,
    to_groups,
)

SETTINGS = settings(max_examples=40, deadline=None)
ONE_SHOT = {"kind": "one_shot", "at": 0.5, "at_epoch": None}
CUBIC = {"kind": "polynomial", "begin": 0.0, "end": 0.75, "frequency": 2, "power": 3}


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"not a one-line message: {message!r}"
    return message


def dist(name: str = "uniform", **extra) -> dict:
    return {
        "name": name,
        "dense_first": False,
        "dense_last": False,
        "power_scale": 1.0,
        "budget": "all",
        "n_m": None,
        **extra,
    }


def engine_for(model, method, total_steps, seed=0) -> SparsityEngine:
    engine = SparsityEngine(model, weights(model), method, seed=seed)
    engine.setup(total_steps, max(1, total_steps // 4))
    engine.initialize()
    return engine


def run_updates(engine: SparsityEngine, steps: range, perturb: bool = True) -> list:
    """Drive the engine over ``steps`` (grads zero, weights nudged between steps so that
    magnitudes change); returns the masks after each update step."""
    gen = torch.Generator().manual_seed(1)
    seen = []
    for step in steps:
        for p in engine.params.values():
            p.grad = torch.zeros_like(p)
        if engine.before_optimizer_step(step):
            seen.append({n: m.clone() for n, m in engine.masks.items()})
        if perturb:
            with torch.no_grad():
                for p in engine.params.values():
                    p.add_(0.01 * torch.randn(p.shape, generator=gen))
                engine.masks.apply_(engine.params)
    return seen


# --------------------------------------------------------------------------------------
# parsing and configuration errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "pair"), [("2:4", (2, 4)), ("1:4", (1, 4)), (" 4 : 8 ", (4, 8))])
def test_parse_n_m_reads_n_and_m(text, pair):
    assert parse_n_m(text) == pair


def test_parse_n_m_off():
    assert parse_n_m(None) is None
    assert parse_n_m("") is None


@pytest.mark.parametrize("value", ["5:4", "0:4", "4:4", "2:x", "2-4", "2:4:8", 124, 0.5, True])
def test_bad_n_m_is_a_one_line_error_when_the_method_is_built(value):
    with pytest.raises(ConfigError) as err:
        build_method("static", 0.5, distribution=dist(n_m=value), schedule=ONE_SHOT)
    message = one_line(err)
    assert "distribution.n_m" in message


def test_n_m_from_unquoted_yaml_says_to_quote_it():
    with pytest.raises(ConfigError) as err:
        parse_n_m(124)  # YAML 1.1 reads n_m: 2:4 as 124
    assert "quote" in one_line(err)


@pytest.mark.parametrize(("name", "schedule"), [("static", ONE_SHOT), ("gmp", CUBIC)])
def test_n_m_sparsity_must_match(name, schedule):
    with pytest.raises(ConfigError) as err:
        build_method(name, 0.9, distribution=dist(n_m="2:4"), schedule=schedule)
    message = one_line(err)
    assert "2:4" in message and "0.9" in message and "0.5" in message


def test_n_m_sparsity_within_rounding_is_accepted_and_made_exact():
    method = build_method("static", 0.667, distribution=dist(n_m="1:3"), schedule=ONE_SHOT)
    assert method.sparsity == 1 - 1 / 3 and method.n_m == (1, 3)


@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("rigl", {"kind": "prune_grow", "update_every": 10}),
        ("set", {"kind": "prune_grow", "update_every": 10}),
        ("random", {"kind": "fixed"}),
        ("snip", {"kind": "fixed"}),
    ],
)
def test_n_m_with_a_non_magnitude_method_is_an_error(name, schedule):
    with pytest.raises(ConfigError) as err:
        build_method(name, 0.5, distribution=dist("erk", n_m="2:4"), schedule=schedule)
    message = one_line(err)
    assert "distribution.n_m" in message and name in message


def test_n_m_with_dense_layers_needs_the_pruned_budget():
    with pytest.raises(ConfigError) as err:
        build_method(
            "static", 0.5, distribution=dist(n_m="2:4", dense_first=True), schedule=ONE_SHOT
        )
    assert "budget=pruned" in one_line(err)
    build_method(
        "static",
        0.5,
        distribution=dist(n_m="2:4", dense_first=True, budget="pruned"),
        schedule=ONE_SHOT,
    )


def test_layer_not_divisible_by_m_is_a_one_line_error_naming_it():
    model = mlp([6, 8, 3])  # the first layer has 6 inputs: not a multiple of 4
    method = build_method("static", 0.5, distribution=dist(n_m="2:4"), schedule=ONE_SHOT)
    with pytest.raises(ConfigError) as err:
        engine_for(model, method, total_steps=10)
    message = one_line(err)
    assert "'0.weight'" in message and "M=4" in message


def test_a_dense_first_layer_need_not_be_divisible():
    model = mlp([6, 8, 4], seed=2)
    method = build_method(
        "static",
        0.5,
        distribution=dist(n_m="2:4", dense_first=True, budget="pruned"),
        schedule=ONE_SHOT,
    )
    engine = engine_for(model, method, total_steps=10)
    run_updates(engine, range(10))
    assert bool(engine.masks["0.weight"].all())
    assert is_n_m(engine.masks["2.weight"], 2, 4)
    assert engine.at_target()


@pytest.mark.parametrize(
    ("threshold", "mode"),
    [
        (0.0, "absolute"),
        (-1.0, "std"),
        (float("nan"), "absolute"),
        ("big", "absolute"),
        (True, "absolute"),
        (0.1, "relative"),
    ],
)
def test_bad_threshold_is_a_one_line_error(threshold, mode):
    with pytest.raises(ConfigError) as err:
        build_method(
            "static",
            0.9,
            distribution=dist(),
            schedule=ONE_SHOT,
            threshold=threshold,
            threshold_mode=mode,
        )
    assert "pruning.threshold" in one_line(err)


def test_threshold_with_gmp_is_an_error():
    with pytest.raises(ConfigError) as err:
        build_method("gmp", 0.9, distribution=dist(), schedule=CUBIC, threshold=0.1)
    message = one_line(err)
    assert "pruning.threshold" in message and "gmp" in message


def test_threshold_and_n_m_exclude_each_other():
    with pytest.raises(ConfigError) as err:
        build_method("static", 0.5, distribution=dist(n_m="2:4"), schedule=ONE_SHOT, threshold=0.1)
    message = one_line(err)
    assert "threshold" in message and "n_m" in message


def test_check_threshold_off_by_default():
    assert check_threshold(None, "absolute") == (None, "absolute")
    assert check_threshold(None, None) == (None, "absolute")


# --------------------------------------------------------------------------------------
# N:M masks: the pattern helper
# --------------------------------------------------------------------------------------

N_M = st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 3)])


@st.composite
def grouped_shapes(draw, m: int):
    out = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 4))
    kernel = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    return (out, groups * m, *kernel)


@SETTINGS
@given(pair=N_M, data=st.data())
def test_n_m_mask_keeps_exactly_n_of_every_m_and_the_largest(pair, data):
    n, m = pair
    shape = data.draw(grouped_shapes(m))
    numel = math.prod(shape)
    # Few distinct values, so that exact ties are frequent.
    values = data.draw(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]), min_size=numel, max_size=numel)
    )
    scores = torch.tensor(values).view(shape).abs()
    seed = data.draw(st.integers(0, 2**16))
    mask = n_m_mask(scores, n, m, generator=torch.Generator().manual_seed(seed))
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert is_n_m(mask, n, m)
    groups, kept = to_groups(scores, m), to_groups(mask, m)
    assert bool((kept.sum(dim=1) == n).all())
    for row, keep in zip(groups, kept, strict=True):
        if n < m:
            assert row[keep].min() >= row[~keep].max()


@SETTINGS
@given(pair=N_M, data=st.data())
def test_n_m_groups_run_along_the_input_dimension(pair, data):
    """Linear [out, in]: groups of M along in; conv [out, in, *k]: groups of M input channels
    at each (out, kernel position), as NVIDIA's ASP."""
    n, m = pair
    shape = data.draw(grouped_shapes(m))
    scores = torch.rand(
        shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    )
    mask = n_m_mask(scores, n, m)
    moved = mask.movedim(1, -1)  # [out, *kernel, in]
    per_group = moved.reshape(*moved.shape[:-1], shape[1] // m, m).sum(dim=-1)
    assert bool((per_group == n).all())
    # Entry (o, c, *k) belongs to group c // M of its (o, *k) row: check one group directly.
    index = (0,) * (len(shape) - 2)
    row = scores[(0, slice(0, m), *index)]
    expected = torch.zeros(m, dtype=torch.bool)
    expected[row.topk(n).indices] = True
    assert torch.equal(mask[(0, slice(0, m), *index)], expected)
    assert torch.equal(from_groups(to_groups(scores, m), shape), scores)


def test_n_m_ties_use_the_generator():
    scores = torch.ones(8, 16)
    first = n_m_mask(scores, 2, 4, generator=torch.Generator().manual_seed(0))
    again = n_m_mask(scores, 2, 4, generator=torch.Generator().manual_seed(0))
    other = n_m_mask(scores, 2, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert is_n_m(first, 2, 4) and is_n_m(other, 2, 4)
    lowest = n_m_mask(scores, 2, 4)  # no generator: lowest index within each group
    assert torch.equal(to_groups(lowest, 4), torch.tensor([[True, True, False, False]] * 32))


def test_n_m_ties_do_not_reorder_distinct_scores():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.5, 3.0, 2.0, 1.0, 0.0]])
    for seed in range(10):
        mask = n_m_mask(scores, 2, 4, generator=torch.Generator().manual_seed(seed))
        assert mask[0, 1] and mask[0, 4] and mask[0, 5]
        assert int(mask[0, 2]) + int(mask[0, 3]) == 1  # the tie at 0.5 goes either way
        assert not mask[0, 6] and not mask[0, 7]


def test_n_m_active_weights_rank_first_and_nan_last():
    scores = torch.tensor([[5.0, 4.0, 1.0, float("nan")]])
    active = torch.tensor([[False, True, True, True]])
    assert n_m_mask(scores, 2, 4, active).tolist() == [[False, True, True, False]]
    assert n_m_mask(scores, 3, 4, active).tolist() == [[False, True, True, True]]


# --------------------------------------------------------------------------------------
# N:M through the methods and the engine
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_static_n_m_prunes_to_n_of_every_m_at_the_pruning_step(pattern):
    n, m = parse_n_m(pattern)
    model = mlp([16, 24, 8], seed=4)
    method = build_method("static", 1 - n / m, distribution=dist(n_m=pattern), schedule=ONE_SHOT)
    engine = engine_for(model, method, total_steps=10)
    assert not engine.at_target()
    before = {}
    for step in range(10):
        for p in engine.params.values():
            p.grad = torch.zeros_like(p)
        snapshot = {k: p.detach().clone() for k, p in engine.params.items()}
        if engine.before_optimizer_step(step):
            before = snapshot
            assert step == 5
    assert before, "no pruning step"
    for name, p in engine.params.items():
        mask = engine.masks[name]
        assert is_n_m(mask, n, m), name
        assert torch.equal(mask, n_m_mask(before[name].abs(), n, m)), name  # distinct |w|
        assert torch.equal(p.detach(), before[name] * mask)
    assert engine.masks.sparsity() == pytest.approx(1 - n / m)
    assert engine.at_target()


def test_static_n_m_masks_are_reproducible_and_seeded():
    def masks_for(seed):
        model = mlp([8, 8, 4], seed=0)
        with torch.no_grad():  # all-tied magnitudes: only the tie generator decides
            for p in weights(model).values():
                p.fill_(0.3)
        method = build_method("static", 0.5, distribution=dist(n_m="2:4"), schedule=ONE_SHOT)
        engine = engine_for(model, method, total_steps=4, seed=seed)
        run_updates(engine, range(4), perturb=False)
        return engine.masks

    assert masks_for(0).equal(masks_for(0))
    assert not masks_for(0).equal(masks_for(1))
    assert all(is_n_m(mask, 2, 4) for mask in masks_for(2).values())


def test_gmp_n_m_ramps_per_group_and_ends_exactly_n_m():
    """Each GMP update keeps M - floor(s_t * M) of every group (the cubic ramp rounded down
    to multiples of 1/M), never revives a pruned weight, and ends exactly N:M."""
    n, m = 2, 8
    model = mlp([16, 16, 8], seed=5)
    method = build_method("gmp", 1 - n / m, distribution=dist(n_m="2:8"), schedule=CUBIC)
    total = 40
    engine = engine_for(model, method, total_steps=total)
    seen = run_updates(engine, range(total))
    steps = [t for t in range(total) if method.is_update_step(t)]
    assert len(seen) == len(steps)
    expected = [
        max(n, m - math.floor(method.schedule.sparsity_at(t, method.sparsity) * m + 1e-9))
        for t in steps
    ]
    assert len(set(expected)) >= 4 and expected[-1] == n  # a real ramp, ending at N
    previous = None
    for masks, keep in zip(seen, expected, strict=True):
        for name, mask in masks.items():
            assert bool((to_groups(mask, m).sum(dim=1) == keep).all()), name
            if previous is not None:
                assert not bool((mask & ~previous[name]).any()), "a pruned weight came back"
        previous = masks
    assert all(is_n_m(mask, n, m) for mask in engine.masks.values())
    assert engine.masks.sparsity() == pytest.approx(1 - n / m)
    assert engine.at_target()


def test_n_m_training_flops_count_density_n_over_m():
    """An N:M run's history holds density N/M in every layer after pruning, and the
    training-FLOP accounting treats it as unstructured sparsity at that density."""
    model = mlp([8, 8, 4], seed=6)
    method = build_method("static", 0.75, distribution=dist(n_m="1:4"), schedule=ONE_SHOT)
    engine = engine_for(model, method, total_steps=10)
    run_updates(engine, range(10))
    final = engine.history[-1]["densities"]
    assert final == {"0.weight": 0.25, "2.weight": 0.25}
    lf = LayerFlops(layers={"0.weight": 128.0, "2.weight": 64.0}, other=0.0, total=192.0)
    segments = segments_from_history(engine.history, 10)
    flops = training_flops(lf, segments, samples_per_step=1, accounting="one_shot")
    # steps 0..5 dense (the update at step 5 is computed with the dense masks), 6..9 at 1/4
    assert flops == pytest.approx(3 * 192.0 * 6 + 3 * 192.0 * 0.25 * 4)


# --------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    threshold=st.floats(0.01, 3.0),
    mode=st.sampled_from(["absolute", "std"]),
    seed=st.integers(0, 2**16),
)
def test_threshold_mask_removes_exactly_the_weights_below_theta(shape, threshold, mode, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = threshold_mask(w, threshold, mode)
    theta = threshold * (float(w.std()) if w.numel() > 1 else 0.0) if mode == "std" else threshold
    assert torch.equal(mask, w.abs() >= theta)
    assert torch.equal(~mask, w.abs() < theta)


def test_threshold_mask_std_of_the_active_weights_only():
    w = torch.tensor([10.0, -10.0, 1.0, -2.0, 3.0, 0.5])
    active = torch.tensor([False, False, True, True, True, True])
    theta = 0.5 * float(w[active].std())
    mask = threshold_mask(w, 0.5, "std", active)
    assert torch.equal(mask, active & (w.abs() >= theta))


@pytest.mark.parametrize("mode", ["absolute", "std"])
def test_static_threshold_prunes_exactly_below_theta(mode):
    threshold = 0.05 if mode == "absolute" else 0.8
    model = mlp([12, 10, 6], seed=7)
    method = build_method(
        "static",
        0.9,  # ignored with a threshold
        distribution=dist("global"),
        schedule=ONE_SHOT,
        threshold=threshold,
        threshold_mode=mode,
    )
    engine = engine_for(model, method, total_steps=10)
    assert not engine.at_target()
    before = None
    for step in range(10):
        for p in engine.params.values():
            p.grad = torch.zeros_like(p)
        snapshot = {k: p.detach().clone() for k, p in engine.params.items()}
        if engine.before_optimizer_step(step):
            before = snapshot
    assert before is not None
    pruned = 0
    for name, p in engine.params.items():
        w = before[name]
        theta = threshold * float(w.std()) if mode == "std" else threshold
        assert torch.equal(engine.masks[name], w.abs() >= theta), name
        assert torch.equal(p.detach(), w * (w.abs() >= theta))
        pruned += int((w.abs() < theta).sum())
    assert pruned > 0
    total = sum(p.numel() for p in engine.params.values())
    assert engine.sparsity_report()["global"] == pytest.approx(pruned / total)
    assert engine.at_target()

    # a resumed run (fresh method and engine, masks from the checkpoint) is at target too
    fresh = build_method(
        "static",
        0.9,
        distribution=dist("global"),
        schedule=ONE_SHOT,
        threshold=threshold,
        threshold_mode=mode,
    )
    resumed = SparsityEngine(model, weights(model), fresh)
    resumed.load_state_dict(engine.state_dict())
    resumed.setup(10, 2)
    assert resumed.at_target()


def test_static_threshold_leaves_dense_layers_alone():
    model = mlp([12, 10, 6], seed=8)
    method = build_method(
        "static",
        0.9,
        distribution=dist(dense_last=True),
        schedule=ONE_SHOT,
        threshold=0.05,
    )
    engine = engine_for(model, method, total_steps=10)
    run_updates(engine, range(10), perturb=False)
    assert bool(engine.masks["2.weight"].all())
    assert not bool(engine.masks["0.weight"].all())
