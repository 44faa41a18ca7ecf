"""pruning=adaptive's search without training: bisection on synthetic accuracy and cost
curves, stop reasons, the report of every point, the budget checks and candidate masks."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.methods.adaptive import (
    STOP_CONVERGED,
    STOP_MAX_STEPS,
    STOP_RANGE_END_PASSES,
    STOP_SAFE_END_FAILS,
    BisectionSearch,
    Budget,
    BudgetNotMet,
    check_budget,
)

DENSE_ACC = 0.90
DENSE_MACS = 100_000.0


def accuracy(s: float, knee: float = 0.9) -> float:
    """A monotone curve: flat up to ``knee``, then falling fast."""
    return DENSE_ACC - max(0.0, s - knee) * 5.0


def macs(s: float) -> float:
    return DENSE_MACS * (1.0 - s)


def run(search: BisectionSearch, acc=accuracy, latency=None) -> BisectionSearch:
    while (s := search.next()) is not None:
        search.record(s, val_acc=acc(s), macs=macs(s), latency_ms=latency(s) if latency else None)
    return search


def test_accuracy_bisection_converges_to_the_boundary():
    # drop <= 0.01 holds up to s = 0.902 exactly.
    search = run(
        BisectionSearch(
            Budget(max_accuracy_drop=0.01), 0.5, 0.99, 12, tol=1e-3, reference_acc=DENSE_ACC
        )
    )
    tried = [p.sparsity for p in search.points]
    assert tried[:2] == [0.5, 0.99]  # the end that should pass, then the other
    assert search.stopped_because == STOP_CONVERGED
    chosen = search.chosen
    assert chosen is not None and chosen.feasible
    assert 0.902 - 2e-3 <= chosen.sparsity <= 0.902
    # The highest feasible point is chosen; every infeasible point lies above it.
    assert all(
        p.sparsity < chosen.sparsity or not p.feasible for p in search.points if p is not chosen
    )
    assert all(not p.feasible for p in search.points if p.sparsity > chosen.sparsity)
    summary = search.summary()
    assert summary["budget_met"] and summary["chosen"]["sparsity"] == chosen.sparsity
    assert len(summary["tried"]) == len(search.points) <= 12
    for line in summary["tried"]:
        assert set(line) >= {"sparsity", "val_acc", "drop", "macs", "latency_ms", "feasible"}
        assert line["drop"] == pytest.approx(DENSE_ACC - accuracy(line["sparsity"]))


def test_midpoints_are_in_log_density_and_steps_are_respected():
    search = run(
        BisectionSearch(Budget(max_accuracy_drop=0.01), 0.5, 0.99, 3, reference_acc=DENSE_ACC)
    )
    tried = [p.sparsity for p in search.points]
    assert len(tried) == 3 and search.stopped_because == STOP_MAX_STEPS
    assert tried[2] == round(1 - math.sqrt(0.5 * 0.01), 4)  # 0.9293
    assert search.next() is None and "search_steps=3" in search.reason


def test_upper_end_within_budget_stops_after_two_points():
    search = run(
        BisectionSearch(Budget(max_accuracy_drop=0.5), 0.5, 0.95, 6, reference_acc=DENSE_ACC)
    )
    assert [p.sparsity for p in search.points] == [0.5, 0.95]
    assert search.stopped_because == STOP_RANGE_END_PASSES and "raise pruning.hi" in search.reason
    assert search.chosen.sparsity == 0.95


def test_no_feasible_point_reports_the_closest():
    # Even the lowest sparsity loses 0.1 of accuracy: nothing meets a 0.01 drop.
    search = run(
        BisectionSearch(Budget(max_accuracy_drop=0.01), 0.5, 0.99, 6, reference_acc=DENSE_ACC),
        acc=lambda s: accuracy(s, knee=0.48),
    )
    assert len(search.points) == 1 and search.stopped_because == STOP_SAFE_END_FAILS
    assert search.chosen is None and search.closest.sparsity == 0.5
    message = search.not_met_message()
    assert "\n" not in message and "no sparsity in [0.5, 0.99]" in message
    assert "closest: sparsity 0.5" in message and "drop 0.1000 > 0.01" in message
    summary = search.summary()
    assert summary["chosen"] is None and not summary["budget_met"]
    assert summary["closest"]["sparsity"] == 0.5
    assert issubclass(BudgetNotMet, ConfigError)


def test_cost_budget_alone_finds_the_lowest_sparsity_within_it():
    # macs <= 20_000 from s = 0.8 upward.
    search = run(
        BisectionSearch(Budget(max_macs=20_000), 0.5, 0.99, 12, tol=1e-3, reference_acc=DENSE_ACC)
    )
    assert [p.sparsity for p in search.points][:2] == [0.99, 0.5]
    chosen = search.chosen
    assert chosen.macs <= 20_000 and 0.8 <= chosen.sparsity <= 0.8 + 2e-3
    assert all(p.macs > 20_000 for p in search.points if p.sparsity < chosen.sparsity)
    assert search.summary()["mode"] == "cost"


def test_cost_budget_nothing_meets_it():
    search = run(BisectionSearch(Budget(max_macs=10), 0.5, 0.99, 6, reference_acc=DENSE_ACC))
    assert search.stopped_because == STOP_SAFE_END_FAILS and search.chosen is None
    assert "pruning.hi=0.99" in search.reason
    assert "MACs 1000 > 10" in search.not_met_message()


def test_accuracy_and_cost_together_must_both_hold():
    # Accuracy allows up to 0.902, MACs need >= 0.85: the answer is the accuracy boundary.
    both = Budget(max_accuracy_drop=0.01, max_macs=15_000)
    search = run(BisectionSearch(both, 0.5, 0.99, 12, tol=1e-3, reference_acc=DENSE_ACC))
    assert search.points[0].sparsity == 0.5 and not search.points[0].feasible  # too many MACs
    assert 0.9 <= search.chosen.sparsity <= 0.902
    # MACs need >= 0.95, accuracy stops at 0.902: nothing meets both.
    tight = Budget(max_accuracy_drop=0.01, max_macs=5_000)
    search = run(BisectionSearch(tight, 0.5, 0.99, 8, reference_acc=DENSE_ACC))
    assert search.chosen is None
    assert "MACs" in search.not_met_message()


def test_latency_budget():
    search = run(
        BisectionSearch(
            Budget(max_latency_ms=0.3), 0.5, 0.99, 10, tol=1e-3, reference_acc=DENSE_ACC
        ),
        latency=lambda s: 1.0 - s,
    )
    assert 0.7 <= search.chosen.sparsity <= 0.705 and search.chosen.latency_ms <= 0.3


def test_record_must_follow_next():
    search = BisectionSearch(Budget(max_accuracy_drop=0.01), 0.5, 0.99, 4, reference_acc=DENSE_ACC)
    assert search.next() == 0.5 and search.next() == 0.5  # asked again: the same point
    with pytest.raises(RuntimeError):
        search.record(0.7, val_acc=0.9)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "needs a budget"),
        ({"max_accuracy_drop": 0}, "max_accuracy_drop must be a number in (0, 1)"),
        ({"max_accuracy_drop": 1.0}, "max_accuracy_drop must be a number in (0, 1)"),
        ({"max_accuracy_drop": -0.1}, "max_accuracy_drop must be a number in (0, 1)"),
        ({"max_macs": 0}, "max_macs must be a number > 0"),
        ({"max_macs": -5}, "max_macs must be a number > 0"),
        ({"max_latency_ms": 0.0}, "max_latency_ms must be a number > 0"),
    ],
)
def test_bad_budgets(kwargs, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        check_budget(**kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_budget_modes():
    assert check_budget(max_accuracy_drop=0.01, max_macs=5).mode == "accuracy"
    assert check_budget(max_macs=5).mode == "cost"


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"lo": 0.9, "hi": 0.8}, "must be below pruning.hi"),
        ({"lo": 0.0}, "pruning.lo must be a number in (0, 1)"),
        ({"hi": 1.0}, "pruning.hi must be a number in (0, 1)"),
        ({"search_steps": 1}, "pruning.search_steps must be >= 2"),
        ({"finetune_epochs": 0}, "pruning.finetune_epochs must be an integer >= 1"),
        ({"criterion": "taylor"}, "pruning.criterion must be one of magnitude"),
        ({"latency_variant": "dense"}, "pruning.latency_variant"),
        ({"tol": -1}, "pruning.tol"),
    ],
)
def test_bad_method_options(options, fragment):
    with pytest.raises(ConfigError) as err:
        build_method("adaptive", 0.99, distribution={"name": "global"}, **options)
    assert fragment in str(err.value)


@pytest.mark.parametrize("distribution", ["global", "uniform"])
def test_candidate_mask_keeps_the_largest_trained_magnitudes(distribution):
    method = build_method("adaptive", 0.99, distribution={"name": distribution})
    gen = torch.Generator().manual_seed(0)
    trained = {
        "a.weight": torch.randn(30, 20, generator=gen),
        "b.weight": torch.randn(10, 30, generator=gen),
    }
    method.setup({n: tuple(t.shape) for n, t in trained.items()}, 1, 1)
    mask = method.candidate_mask(trained, 0.8, seed=0, step=1)
    assert mask.sparsity() == pytest.approx(0.8, abs=1e-3)
    if distribution == "global":
        kept = torch.cat([trained[n][mask[n]].abs() for n in mask])
        dropped = torch.cat([trained[n][~mask[n]].abs() for n in mask])
        assert float(kept.min()) >= float(dropped.max())
    else:
        for name in mask:
            assert mask.layer_sparsity()[name] == pytest.approx(0.8, abs=0.01)
    # A stage trains its mask as given, from the first step, and counts as at target.
    stage = method.for_candidate(0.8, mask)
    assert stage.init_masks(trained, None).equal(mask) and stage.at_target(mask)
    assert method.for_candidate(0.0, None).sparsity_target() == 0.0
