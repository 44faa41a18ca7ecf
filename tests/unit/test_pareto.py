"""Pareto fronts (maximise a metric, minimise a cost), the Pareto figure, and the
``optimized_metric`` list of a multi-objective search (validation and the returned values)."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from prunelab.config import optimized_metrics
from prunelab.errors import ConfigError
from prunelab.report.plots import pareto_filename, pareto_front, pareto_points, plot_pareto
from prunelab.report.records import Record


def _dominated(p, q) -> bool:
    """Whether q dominates p (x lower or equal, y higher or equal, one strictly)."""
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


# -- pareto_front ------------------------------------------------------------------------------
def test_front_keeps_the_non_dominated_points_sorted_by_cost():
    points = [(3.0, 0.9), (1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (4.0, 0.85)]
    assert pareto_front(points) == [(1.0, 0.5), (2.0, 0.7), (3.0, 0.9)]


def test_front_of_nothing_and_of_one_point():
    assert pareto_front([]) == []
    assert pareto_front([(5, 0.1)]) == [(5, 0.1)]


def test_equal_cost_keeps_only_the_best_score():
    assert pareto_front([(1, 0.2), (1, 0.6), (1, 0.4)]) == [(1, 0.6)]


def test_equal_score_keeps_only_the_cheapest():
    assert pareto_front([(3, 0.5), (1, 0.5), (2, 0.5)]) == [(1, 0.5)]


def test_duplicates_on_the_front_are_all_kept_in_input_order():
    a, b, c = (1, 0.5, "a"), (1, 0.5, "b"), (2, 0.8, "c")
    assert pareto_front([c, b, a]) == [b, a, c]
    assert pareto_front([(2, 0.8), (2, 0.8), (2, 0.8)]) == [(2, 0.8)] * 3


def test_duplicates_of_a_dominated_point_are_all_dropped():
    assert pareto_front([(2, 0.3), (2, 0.3), (1, 0.4)]) == [(1, 0.4)]


def test_extra_items_ride_along_and_are_the_same_objects():
    runs = [[10, 0.9, {"run": 1}], [5, 0.95, {"run": 2}], [1, 0.1, {"run": 3}]]
    front = pareto_front(runs)
    assert [p[2]["run"] for p in front] == [3, 2]
    assert front[0] is runs[2]


def test_points_without_a_value_are_left_out():
    nan = float("nan")
    points = [(1, None), (None, 0.9), (nan, 1.0), (2, nan), (3, 0.5)]
    assert pareto_front(points) == [(3, 0.5)]


def test_infinite_cost_stays_when_nothing_beats_its_score():
    assert pareto_front([(math.inf, 0.99), (1, 0.5)]) == [(1, 0.5), (math.inf, 0.99)]


def test_front_matches_the_definition_on_random_points_with_ties():
    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.randint(0, 6), rng.randint(0, 6) / 6, i) for i in range(rng.randint(1, 25))]
        expected = [p for p in points if not any(_dominated(p, q) for q in points)]
        front = pareto_front(points)
        assert sorted(front, key=lambda p: p[2]) == expected
        assert [p[0] for p in front] == sorted(p[0] for p in front)
        for p, q in itertools.pairwise(front):  # the score rises along the front
            assert q[1] > p[1] or (q[0], q[1]) == (p[0], p[1])


# -- the figure ------------------------------------------------------------------------------
def _record(pruning: str, sparsity: float, acc: float | None, flops: float | None, **kw) -> Record:
    data = {
        "status": kw.pop("status", "completed"),
        "seed": 0,
        "config": {"sparsity": sparsity, "pruning": {"name": pruning}},
        "choices": {"pruning": pruning},
        "metrics": {} if acc is None else {"val/acc_best": acc},
        "cost": {} if flops is None else {"flops_train": flops, "latency_ms/sparse/b1": 0.1},
        "run_dir": f"/runs/{pruning}/{sparsity}",
    }
    return Record(data=data, source=data["run_dir"])


def test_pareto_points_use_completed_records_with_both_values():
    records = [
        _record("rigl", 0.9, 0.8, 1e6),
        _record("set", 0.8, 0.7, None),
        _record("gmp", 0.95, None, 2e6),
        _record("static", 0.5, 0.9, 3e6, status="failed"),
    ]
    points = pareto_points(records, "val/acc_best", "cost.flops_train")
    assert [(x, y, r.get("pruning")) for x, y, r in points] == [(1e6, 0.8, "rigl")]
    assert pareto_points(records, "val/acc_best", "cost/flops_train") == points


def test_plot_pareto_writes_a_png_and_skips_when_nothing_to_draw(tmp_path):
    records = [
        _record("rigl", 0.9, 0.80, 1e6),
        _record("rigl", 0.95, 0.75, 5e5),
        _record("set", 0.9, 0.78, 1.2e6),
        _record("static", 0.6, 0.85, 4e7),
        _record("dense", 0.0, 0.86, 9e7),
    ]
    path = plot_pareto(records, tmp_path / "p.png", "val/acc_best", "cost.flops_train")
    assert path == tmp_path / "p.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latency = plot_pareto(records, tmp_path / "l.png", "val/acc_best", "cost.latency_ms/sparse/b1")
    assert latency is not None and latency.exists()
    assert plot_pareto(records, tmp_path / "none.png", "test/acc", "cost.flops_train") is None
    assert not (tmp_path / "none.png").exists()


def test_pareto_filename_names_the_cost():
    assert pareto_filename("cost.flops_train") == "pareto_flops_train.png"
    assert pareto_filename("cost/latency_ms/sparse/b1") == "pareto_latency_ms_sparse_b1.png"


# -- optimized_metric --------------------------------------------------------------------------
def test_the_pareto_search_optimises_accuracy_and_training_flops(compose_cfg):
    from prunelab.config import validate

    cfg = compose_cfg("hparams_search=pareto_optuna")
    validate(cfg)
    assert optimized_metrics(cfg) == ["val/acc_best", "cost/flops_train"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ((), []),
        (("optimized_metric=val/acc_best",), ["val/acc_best"]),
        (
            ("optimized_metric=[test/acc,cost.macs_infer_sparse]",),
            ["test/acc", "cost.macs_infer_sparse"],
        ),
        (("optimized_metric=[val/acc_best,cost/latency_ms/masked/b256]",), None),
        (("optimized_metric=[val/acc_best,cost/energy_uj_estimate_sparse_weights]",), None),
        (
            (
                "model=mnist1d_cnn",
                "pruning=fbs",
                "sparsity=0.5",
                "optimized_metric=[val/acc_best,cost/macs_dynamic_mean]",
            ),
            ["val/acc_best", "cost/macs_dynamic_mean"],
        ),
    ],
)
def test_valid_optimized_metrics(compose_cfg, overrides, expected):
    cfg = compose_cfg(*overrides)
    names = optimized_metrics(cfg)
    if expected is not None:
        assert names == expected


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (("optimized_metric=[val/acc_best,cost/flops_trian]",), "'cost/flops_trian' is not a cost"),
        (("optimized_metric=[val/acc_best,cost/latency_threads]",), "is not a cost"),
        (("optimized_metric=[val/acc_best,cost/latency_under_load]",), "is not a cost"),
        (
            ("optimized_metric=[val/acc_best,cost/latency_ms/sparse/b1]", "cost.latency=false"),
            "cost.latency=true",
        ),
        (("optimized_metric=[val/acc_best,cost/latency_ms/sparse/b8]",), "batch 8 is not timed"),
        (
            ("optimized_metric=[val/acc_best,cost/flops_train]", "cost.enabled=false"),
            "cost.enabled",
        ),
        (("optimized_metric=[val/acc_best,val/acc_best]",), "twice"),
        (
            ("optimized_metric=[val/acc_best,cost/macs_dynamic_p99]",),
            "only for input-adaptive runs",
        ),
        (("optimized_metric=[]",), "a name or a list of names"),
        (("optimized_metric=[val/acc_best,3]",), "a name or a list of names"),
        (("hparams_search=pareto_optuna", "optimized_metric=val/acc_best"), "has 2"),
        (
            ("hparams_search=rigl_optuna", "optimized_metric=[val/acc_best,cost/flops_train]"),
            "has 1",
        ),
    ],
)
def test_bad_optimized_metrics_are_one_line_before_training(compose_cfg, overrides, words):
    from prunelab.config import validate

    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message and words in message and "optimized_metric" in message


# -- what the train function returns -----------------------------------------------------------
RESULT = {
    "run_dir": "/runs/x",
    "metrics": {"val/acc_best": 0.75, "test/acc": 0.7},
    "cost": {"flops_train": 12345, "latency_ms/sparse/b1": 0.25, "latency_under_load": False},
}


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("null", None),
        ("val/acc_best", 0.75),
        ("cost/flops_train", 12345.0),
        ("[val/acc_best,cost/flops_train]", [0.75, 12345.0]),
        ("[cost.latency_ms/sparse/b1,test/acc]", [0.25, 0.7]),
        ("[val/acc_best]", [0.75]),
    ],
)
def test_hydra_main_returns_the_values_in_order(compose_cfg, monkeypatch, metric, expected):
    from prunelab import train as train_module

    cfg = compose_cfg(f"optimized_metric={metric}")
    monkeypatch.setattr(train_module, "train", lambda cfg: RESULT)
    value = train_module._hydra_main.__wrapped__(cfg)
    assert value == expected
    assert type(value) is type(expected)


def test_hydra_main_names_a_missing_value_in_one_line(compose_cfg, monkeypatch, capsys):
    from prunelab import train as train_module

    cfg = compose_cfg("optimized_metric=[val/acc_best,train/acc]")
    monkeypatch.setattr(train_module, "train", lambda cfg: RESULT)
    assert train_module._hydra_main.__wrapped__(cfg) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: optimized_metric 'train/acc' is not in the run's metrics")
    assert "\n" not in err and "val/acc_best" in err
