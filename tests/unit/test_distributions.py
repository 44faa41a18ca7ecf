"""Layer-wise sparsity distributions: exact totals, per-layer rounding, ERK, global magnitude."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

from prunelab.errors import ConfigError
from prunelab.sparsity import (
    DISTRIBUTIONS,
    dense_layers,
    er,
    erk,
    global_magnitude,
    keep_counts,
    uniform,
)
from prunelab.sparsity.distributions import round_to_total

SETTINGS = settings(max_examples=50, deadline=None)

dim = st.integers(1, 64)
linear_shape = st.tuples(dim, dim)
conv_shape = st.tuples(dim, dim, st.integers(1, 5), st.integers(1, 5))
layer_shapes = st.lists(st.one_of(linear_shape, conv_shape), min_size=1, max_size=6)
sparsities = st.floats(0.0, 0.99, allow_nan=False)


@st.composite
def problems(draw, shape_strategy=layer_shapes):
    """Random (shapes, sparsity, dense) with dense a random subset of the layers."""
    shapes = {f"layer{i}": s for i, s in enumerate(draw(shape_strategy))}
    names = list(shapes)
    dense = frozenset(draw(st.lists(st.sampled_from(names), max_size=len(names) - 1)))
    return shapes, draw(sparsities), dense


def numels(shapes):
    return {n: math.prod(s) for n, s in shapes.items()}


def budget(shapes, sparsity, dense):
    """(total zeros wanted, keep budget of the non-dense layers, their total numel)."""
    sizes = numels(shapes)
    total = sum(sizes.values())
    zeros = round(sparsity * total)
    dense_numel = sum(sizes[n] for n in dense)
    return zeros, total - zeros - dense_numel, total - dense_numel


def water_fill(shapes, dense, remaining, raw):
    """Reference ideal keep counts min(1, eps * raw) * numel summing to ``remaining``.

    Solved by bisection on eps, independently of the implementation's iteration.
    """
    sizes = numels(shapes)
    free = [n for n in shapes if n not in dense]

    def kept(eps):
        return sum(min(1.0, eps * raw[n]) * sizes[n] for n in free)

    lo, hi = 0.0, max(1.0 / raw[n] for n in free)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kept(mid) < remaining else (lo, mid)
    eps = 0.5 * (lo + hi)
    return {n: min(1.0, eps * raw[n]) * sizes[n] for n in free}


def ideal_counts(name, shapes, dense, remaining, power_scale=1.0):
    sizes = numels(shapes)
    free = [n for n in shapes if n not in dense]
    free_numel = sum(sizes[n] for n in free)
    if name == "uniform":
        return {n: remaining / free_numel * sizes[n] for n in free}
    dims = {n: shapes[n] if name == "erk" else shapes[n][:2] for n in free}
    raw = {n: (sum(d) / math.prod(d)) ** power_scale for n, d in dims.items()}
    return water_fill(shapes, dense, remaining, raw)


def check_invariants(shapes, sparsity, dense, counts):
    sizes = numels(shapes)
    zeros, _, _ = budget(shapes, sparsity, dense)
    assert list(counts) == list(shapes)
    assert all(isinstance(c, int) for c in counts.values())
    assert sum(sizes.values()) - sum(counts.values()) == zeros
    for n, c in counts.items():
        assert 0 <= c <= sizes[n]
        if n in dense:
            assert c == sizes[n]


# --------------------------------------------------------------------------------------
# the shared invariant, for every distribution
# --------------------------------------------------------------------------------------


@SETTINGS
@given(problem=problems(), name=st.sampled_from(["uniform", "er", "erk"]))
def test_exact_total_and_within_one_of_ideal(problem, name):
    shapes, sparsity, dense = problem
    zeros, remaining, free_numel = budget(shapes, sparsity, dense)
    if remaining < 0:
        with pytest.raises(ConfigError):
            keep_counts(name, shapes, sparsity, dense)
        return
    counts = keep_counts(name, shapes, sparsity, dense)
    check_invariants(shapes, sparsity, dense, counts)
    for n, ideal in ideal_counts(name, shapes, dense, remaining).items():
        assert abs(counts[n] - ideal) <= 1 + 1e-6, (n, counts[n], ideal)


@SETTINGS
@given(problem=problems(), seed=st.integers(0, 2**31 - 1))
def test_global_exact_total(problem, seed):
    shapes, sparsity, dense = problem
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    if budget(shapes, sparsity, dense)[1] < 0:
        with pytest.raises(ConfigError):
            global_magnitude(shapes, sparsity, dense, scores)
        return
    check_invariants(shapes, sparsity, dense, global_magnitude(shapes, sparsity, dense, scores))


@SETTINGS
@given(problem=problems(), power=st.floats(0.0, 2.0))
def test_power_scale_keeps_the_invariant(problem, power):
    shapes, sparsity, dense = problem
    _, remaining, _ = budget(shapes, sparsity, dense)
    if remaining < 0:
        return
    counts = erk(shapes, sparsity, dense, power_scale=power)
    check_invariants(shapes, sparsity, dense, counts)
    for n, ideal in ideal_counts("erk", shapes, dense, remaining, power).items():
        assert abs(counts[n] - ideal) <= 1 + 1e-6


def test_registry_and_keep_counts():
    assert set(DISTRIBUTIONS) == {"uniform", "er", "erk", "global", "sensitivity"}
    assert DISTRIBUTIONS["global"] is global_magnitude
    shapes = {"a": (10, 10), "b": (20, 10)}
    assert keep_counts("ERK", shapes, 0.5) == erk(shapes, 0.5)
    with pytest.raises(ConfigError, match="choose one of") as info:
        keep_counts("magnitude", shapes, 0.5)
    assert "\n" not in str(info.value)


def test_dense_layers():
    names = ["conv1", "conv2", "fc"]
    assert dense_layers(names, False, False) == frozenset()
    assert dense_layers(names, True, False) == {"conv1"}
    assert dense_layers(names, False, True) == {"fc"}
    assert dense_layers(names, True, True) == {"conv1", "fc"}
    assert dense_layers(["only"], True, True) == {"only"}
    assert dense_layers([], True, True) == frozenset()


# --------------------------------------------------------------------------------------
# uniform
# --------------------------------------------------------------------------------------


@SETTINGS
@given(problem=problems())
def test_uniform_equal_density(problem):
    shapes, sparsity, dense = problem
    _, remaining, free_numel = budget(shapes, sparsity, dense)
    if remaining < 0:
        return
    counts = uniform(shapes, sparsity, dense)
    density = remaining / free_numel
    for n, size in numels(shapes).items():
        if n not in dense:
            assert abs(counts[n] - density * size) < 1


def test_uniform_without_dense_is_the_target_everywhere():
    shapes = {"a": (10, 10), "b": (20, 10), "c": (4, 5, 3, 3)}
    counts = uniform(shapes, 0.75)
    assert counts == {"a": 25, "b": 50, "c": 45}


def test_uniform_dense_layers_make_the_others_sparser():
    shapes = {"a": (10, 10), "b": (30, 10)}
    counts = uniform(shapes, 0.5, dense=frozenset({"a"}))
    # 400 weights, 200 kept; 'a' keeps 100, so 'b' keeps 100 of 300: sparsity 2/3.
    assert counts == {"a": 100, "b": 100}


# --------------------------------------------------------------------------------------
# ER / ERK
# --------------------------------------------------------------------------------------


def test_erk_hand_computed():
    # raw a = 20/100 = 0.2, b = 30/200 = 0.15; eps * (0.2*100 + 0.15*200) = 150 -> eps = 3.
    assert erk({"a": (10, 10), "b": (20, 10)}, 0.5) == {"a": 60, "b": 90}


def test_erk_hand_computed_conv_and_er():
    shapes = {"conv": (8, 4, 3, 3), "fc": (10, 288)}
    # N = 288 + 2880 = 3168; zeros = round(2534.4) = 2534; keep 634.
    # ERK raw: conv 18/288, fc 298/2880 -> eps = 634/316; ideals 36.11, 597.89.
    assert erk(shapes, 0.8) == {"conv": 36, "fc": 598}
    # ER raw: conv 12/32 -> 108 + 298 = 406 -> eps = 634/406; ideals 168.65, 465.35.
    assert er(shapes, 0.8) == {"conv": 169, "fc": 465}


def test_erk_caps_overfull_layers_and_resolves():
    # raw a = 8/16 = 0.5, b = 200/10000; first eps = 5008/208 gives 'a' density 12 > 1,
    # so 'a' becomes dense and 'b' holds the rest: 5008 - 16 = 4992.
    assert erk({"a": (4, 4), "b": (100, 100)}, 0.5) == {"a": 16, "b": 4992}


@SETTINGS
@given(
    sizes=st.lists(st.integers(2, 64), min_size=2, max_size=6, unique=True),
    sparsity=st.floats(0.5, 0.99),
)
def test_erk_larger_layers_get_lower_density(sizes, sparsity):
    shapes = {f"l{n}": (n, n) for n in sorted(sizes)}
    counts = erk(shapes, sparsity)
    ideal = ideal_counts("erk", shapes, frozenset(), budget(shapes, sparsity, frozenset())[1])
    densities = [ideal[n] / math.prod(s) for n, s in shapes.items()]
    assert densities == sorted(densities, reverse=True)
    # And the integer counts follow them to within one weight.
    for n, s in shapes.items():
        assert abs(counts[n] - ideal[n]) < 1 + 1e-6
        assert counts[n] <= math.prod(s)


@SETTINGS
@given(problem=problems(st.lists(linear_shape, min_size=1, max_size=6)))
def test_er_equals_erk_for_linear_layers(problem):
    shapes, sparsity, dense = problem
    if budget(shapes, sparsity, dense)[1] < 0:
        return
    assert er(shapes, sparsity, dense) == erk(shapes, sparsity, dense)


def test_power_scale_zero_is_uniform():
    shapes = {"a": (10, 10), "b": (20, 10), "c": (4, 5, 3, 3)}
    assert erk(shapes, 0.75, power_scale=0.0) == uniform(shapes, 0.75)


# --------------------------------------------------------------------------------------
# global magnitude
# --------------------------------------------------------------------------------------


def _holder(weight: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.weight = nn.Parameter(weight.clone())
    return module


@SETTINGS
@given(problem=problems(), seed=st.integers(0, 2**31 - 1))
def test_global_matches_torch_global_unstructured(problem, seed):
    shapes, sparsity, dense = problem
    zeros, remaining, _ = budget(shapes, sparsity, dense)
    if remaining < 0:
        return
    gen = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    counts = global_magnitude(shapes, sparsity, dense, {n: w.abs() for n, w in weights.items()})

    modules = {n: _holder(w) for n, w in weights.items() if n not in dense}
    prune.global_unstructured(
        [(m, "weight") for m in modules.values()],
        pruning_method=prune.L1Unstructured,
        amount=zeros,
    )
    for n in shapes:
        expected = int(modules[n].weight_mask.sum()) if n in modules else weights[n].numel()
        assert counts[n] == expected


def test_global_keeps_the_largest_scores():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.8, 0.2]]), "b": torch.tensor([[0.5, 0.05]])}
    counts = global_magnitude({"a": (2, 2), "b": (1, 2)}, 0.5, scores=scores)
    assert counts == {"a": 2, "b": 1}


def test_global_ties_are_deterministic_and_exact():
    shapes = {"a": (4, 4), "b": (8, 2)}
    scores = {n: torch.ones(s) for n, s in shapes.items()}
    first = global_magnitude(shapes, 0.5, scores=scores)
    assert first == global_magnitude(shapes, 0.5, scores=scores)
    assert sum(first.values()) == 16
    assert first == {"a": 16, "b": 0}  # earlier entries win ties


def test_global_needs_matching_scores():
    shapes = {"a": (2, 2)}
    with pytest.raises(ConfigError, match="scores"):
        global_magnitude(shapes, 0.5)
    with pytest.raises(ConfigError, match="shape"):
        global_magnitude(shapes, 0.5, scores={"a": torch.ones(4)})
    with pytest.raises(ConfigError, match="no scores"):
        global_magnitude(shapes, 0.5, scores={})


# --------------------------------------------------------------------------------------
# invalid input and infeasible targets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_infeasible_target_is_a_one_line_config_error(name):
    shapes = {"first": (100, 100), "last": (2, 2)}
    scores = {n: torch.rand(s) for n, s in shapes.items()}
    with pytest.raises(ConfigError, match="dense") as info:
        keep_counts(name, shapes, 0.9, frozenset({"first"}), scores)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity(sparsity):
    with pytest.raises(ConfigError, match="sparsity") as info:
        uniform({"a": (2, 2)}, sparsity)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("shapes", "dense", "match"),
    [
        ({}, frozenset(), "no prunable layers"),
        ({"a": (0, 3)}, frozenset(), "positive ints"),
        ({"a": ()}, frozenset(), "positive ints"),
        ({"a": (2, 2)}, frozenset({"b"}), "not among"),
    ],
)
def test_bad_shapes_and_dense(shapes, dense, match):
    with pytest.raises(ConfigError, match=match) as info:
        erk(shapes, 0.5, dense)
    assert "\n" not in str(info.value)


def test_bad_power_scale():
    with pytest.raises(ConfigError, match="power_scale"):
        erk({"a": (2, 2)}, 0.5, power_scale=-1.0)


def test_all_dense_at_zero_sparsity_is_fine():
    shapes = {"a": (3, 3), "b": (2, 2)}
    dense = frozenset(shapes)
    for name in ("uniform", "er", "erk"):
        assert keep_counts(name, shapes, 0.0, dense) == {"a": 9, "b": 4}


def test_round_to_total_largest_remainder():
    caps = {"a": 10, "b": 10, "c": 10}
    assert round_to_total({"a": 1.5, "b": 2.7, "c": 0.8}, caps, 5) == {"a": 1, "b": 3, "c": 1}
    assert round_to_total({"a": 9.9, "b": 9.9, "c": 0.2}, caps, 20) == {"a": 10, "b": 10, "c": 0}
    with pytest.raises(ConfigError):
        round_to_total({"a": 1.0}, {"a": 1}, 2)
