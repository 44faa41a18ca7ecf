"""Iterative magnitude pruning (lottery tickets): the level plan, the pruning rule between
levels, rewinding and the control branches' masks."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import build_model, prunable

from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.methods.imp import branch_mask, mask_overlap, rewind
from prunelab.sparsity.masks import Masks

WIDTHS = [20, 30, 30, 10]  # three Linear layers: 600, 900, 300 weights


def _imp(sparsity: float, distribution: str = "uniform", **options):
    method = build_method(
        "imp", sparsity, distribution={"name": distribution}, schedule={"kind": "fixed"}, **options
    )
    model = build_model(WIDTHS, seed=0)
    params = prunable(model)
    method.setup({n: tuple(p.shape) for n, p in params.items()}, 100, 10)
    return method, model, params


def _kept(level) -> int:
    return sum(level.counts.values())


def test_rate_driven_levels_prune_a_fifth_per_level_and_end_exactly_at_target():
    method, _, params = _imp(0.9)
    plan = method.plan()
    total = sum(p.numel() for p in params.values())
    assert plan[0].sparsity == 0.0 and plan[0].index == 0
    names = list(params)
    # Layer by layer: 20% of the remaining weights per level, 10% for the output layer.
    for level in plan[1:-1]:
        for name in names[:-1]:
            expected = params[name].numel() * 0.8**level.index
            assert abs(level.counts[name] - expected) <= 1
        assert abs(level.counts[names[-1]] - params[names[-1]].numel() * 0.9**level.index) <= 1
    assert _kept(plan[-1]) == round(total * 0.1)
    assert plan[-1].sparsity == 0.9
    # The last level is the first whose rate-driven count would reach the target.
    assert plan[-2].realised < 0.9


def test_explicit_level_sparsities_and_levels_are_met_exactly():
    method, _, params = _imp(0.95, level_sparsities=[0.5, 0.8, 0.95], output_rate=None)
    total = sum(p.numel() for p in params.values())
    plan = method.plan()
    assert [lv.sparsity for lv in plan] == [0.0, 0.5, 0.8, 0.95]
    for level in plan[1:]:
        assert _kept(level) == round(total * (1 - level.sparsity))
        # output_rate=null: every layer at the same density (within rounding).
        for name, count in level.counts.items():
            assert abs(count - params[name].numel() * (1 - level.sparsity)) <= 2
    method, _, _ = _imp(0.9, levels=3)
    plan = method.plan()
    assert len(plan) == 4
    densities = [1 - lv.realised for lv in plan[1:]]
    assert densities[-1] == pytest.approx(0.1, abs=1 / total)
    assert densities[0] == pytest.approx(0.1 ** (1 / 3), abs=1e-3)


def _prune_levels(method, model, params, trained_noise: float = 0.1):
    """Run the pruning rule through every level, perturbing the weights in between (as if
    each level trained them)."""
    masks = Masks.dense_like(params)
    history = [masks]
    gen = torch.Generator().manual_seed(0)
    for level in method.plan()[1:]:
        trained = {
            n: (p.detach() + trained_noise * torch.randn(p.shape, generator=gen)) * masks[n]
            for n, p in params.items()
        }
        masks = method.prune(level, trained, masks, seed=0)
        history.append(masks)
    return history


@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_each_level_mask_is_a_subset_of_the_previous_one(distribution):
    method, model, params = _imp(0.95, distribution)
    history = _prune_levels(method, model, params)
    plan = method.plan()
    for previous, current, level in zip(history[:-1], history[1:], plan[1:], strict=True):
        for name in current:
            assert not bool((current[name] & ~previous[name]).any())
        total = current.numel()
        kept = sum(current.nnz().values())
        assert abs(kept - round(total * (1 - level.realised))) <= len(current)
    assert history[-1].sparsity() == pytest.approx(0.95, abs=len(params) / total)


def test_pruning_keeps_the_largest_trained_magnitudes_among_the_active():
    method, _, params = _imp(0.5, level_sparsities=[0.5], output_rate=None)
    level = method.plan()[1]
    trained = {
        n: torch.arange(p.numel(), dtype=torch.float32).view(p.shape) for n, p in params.items()
    }
    masks = method.prune(level, trained, Masks.dense_like(params), seed=0)
    for name, mask in masks.items():
        k = level.counts[name]
        # The k largest values of arange are its last k entries.
        assert bool(mask.flatten()[-k:].all()) and not bool(mask.flatten()[:-k].any())


def test_rewinding_restores_exactly_the_saved_weights_at_unpruned_positions():
    method, model, params = _imp(0.8, level_sparsities=[0.8])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "training" moves every parameter
        for p in model.parameters():
            p.add_(1.0)
    masks = method.prune(
        method.plan()[1],
        {n: p.detach() for n, p in params.items()},
        Masks.dense_like(params),
        seed=0,
    )
    rewind(model, saved, masks, params)
    state = model.state_dict()
    for key, value in saved.items():
        name = key
        if name in masks:
            assert torch.equal(state[key][masks[name]], value[masks[name]])
            assert bool((state[key][~masks[name]] == 0).all())
        else:  # biases and every other parameter: the saved values
            assert torch.equal(state[key], value)


def test_branch_masks_keep_each_layers_count():
    method, model, params = _imp(0.8, level_sparsities=[0.8])
    lottery = method.prune(
        method.plan()[1],
        {n: p.detach() for n, p in params.items()},
        Masks.dense_like(params),
        seed=0,
    )
    reinit = branch_mask("reinit", lottery, seed=0, level=1)
    assert reinit.equal(lottery)
    for kind in ("shuffle", "random"):
        mask = branch_mask(kind, lottery, seed=0, level=1)
        assert mask.nnz() == lottery.nnz()
        assert not mask.equal(lottery)
        assert branch_mask(kind, lottery, seed=0, level=1).equal(mask)  # seeded
        assert not branch_mask(kind, lottery, seed=1, level=1).equal(mask)
        # A random mask at 20% density overlaps the lottery mask about as chance predicts.
        assert mask_overlap(mask, lottery)["global"] < 0.25


def test_mask_overlap_is_the_jaccard_index():
    a = Masks({"w": torch.tensor([True, True, False, False])})
    b = Masks({"w": torch.tensor([True, False, True, False])})
    assert mask_overlap(a, b) == {"global": 1 / 3, "layers": {"w": 1 / 3}}
    assert mask_overlap(a, a)["global"] == 1.0


def test_a_level_trains_with_its_mask_fixed_and_counts_as_at_target():
    method, model, params = _imp(0.8, level_sparsities=[0.8])
    level = method.plan()[1]
    masks = method.prune(
        level, {n: p.detach() for n, p in params.items()}, Masks.dense_like(params), seed=0
    )
    twin = method.for_level(level, masks)
    assert twin.init_masks(params, None).equal(masks)
    assert twin.at_target(masks) and twin.sparsity_target() == pytest.approx(level.realised)
    assert method.level_mask is None  # the parent method is unchanged
    assert not twin.is_update_step(5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"branch": "nonexistent"},
            "pruning.branch must be none or one of reinit, shuffle, random",
        ),
        ({"branch": ["random", "bogus"]}, "got 'bogus'"),
        ({"rate": 1.5}, "pruning.rate must be a number in (0, 1)"),
        ({"output_rate": 0}, "pruning.output_rate must be a number in (0, 1)"),
        ({"levels": 0}, "pruning.levels must be an integer >= 1"),
        ({"level_sparsities": [0.5, 0.4, 0.9]}, "must increase"),
        ({"level_sparsities": [0.5, 0.8]}, "set sparsity=0.8"),
        ({"levels": 3, "level_sparsities": [0.9]}, "exclude each other"),
        ({"rewind_step": -1}, "pruning.rewind_step must be an integer >= 0"),
        ({"rewind_step": 1.5}, "pruning.rewind_step must be an integer >= 0"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError) as err:
        build_method(
            "imp", 0.9, distribution={"name": "uniform"}, schedule={"kind": "fixed"}, **options
        )
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_distributions_other_than_layerwise_or_global_are_refused():
    with pytest.raises(ConfigError, match="distribution=uniform"):
        build_method("imp", 0.9, distribution={"name": "erk"}, schedule={"kind": "fixed"})


def test_rate_driven_level_count_matches_the_lottery_ticket_arithmetic():
    # 20% per level, all layers alike: 0.8**L <= 0.05 first at L = 14 (0.8**13 = 0.055).
    method, _, _ = _imp(0.95, output_rate=None)
    plan = method.plan()
    assert len(plan) - 1 == math.ceil(math.log(0.05) / math.log(0.8)) == 14


def test_branches_run_at_every_level_or_only_at_the_chosen_ones():
    method, _, _ = _imp(0.9, level_sparsities=[0.5, 0.8, 0.9], branch="random")
    plan = method.plan()
    assert [method.branches_at(lv) for lv in plan] == [(), ("random",), ("random",), ("random",)]
    method, _, _ = _imp(0.9, level_sparsities=[0.5, 0.8, 0.9], branch="random", branch_levels=[0.8])
    assert [method.branches_at(lv) for lv in method.plan()] == [(), (), ("random",), ()]
    method.check_branch_levels(method.plan())
    method, _, _ = _imp(0.9, level_sparsities=[0.5, 0.9], branch="random", branch_levels=[0.8])
    with pytest.raises(
        ConfigError, match="0.8 is not the sparsity of a level; the levels are 0.5, 0.9"
    ):
        method.check_branch_levels(method.plan())
