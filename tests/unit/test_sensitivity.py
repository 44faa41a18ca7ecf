"""Layer sensitivity curves and the ``sensitivity`` distribution.

A hand-built two-layer linear model on synthetic data has one robust layer (``a``: an
identity plus tiny noise, so magnitude pruning removes only noise up to 15/16 sparsity) and
one sensitive layer (``b``: the classifier that made the labels, all weights of similar
size). No training: every test runs in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from prunelab import files
from prunelab.analysis.sensitivity import (
    SensitivityCurves,
    curves_path,
    layer_sensitivity,
    load_curves,
    write_sensitivity,
)
from prunelab.errors import ConfigError
from prunelab.sparsity.distributions import (
    DISTRIBUTIONS,
    check_distribution,
    describe_distribution,
    distribution_options,
    keep_counts,
    sensitivity,
)

GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def _model_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    a = nn.Linear(16, 16, bias=False)
    b = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.eye(16) + 0.01 * torch.randn(16, 16, generator=gen))
        signs = torch.randint(0, 2, (4, 16), generator=gen) * 2 - 1
        b.weight.copy_(signs * (1.0 + 0.1 * torch.rand(4, 16, generator=gen)))
    model = nn.Sequential(OrderedDict(a=a, b=b))
    x = torch.randn(512, 16, generator=gen)
    y = (x @ b.weight.detach().T).argmax(dim=1)
    return model, [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]


@pytest.fixture(scope="module")
def measured() -> SensitivityCurves:
    model, batches = _model_and_batches()
    return layer_sensitivity(model, None, batches, GRID)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def test_curves_single_out_the_sensitive_layer(measured):
    c = measured
    assert c.layers == ["a.weight", "b.weight"]
    assert c.numel == {"a.weight": 256, "b.weight": 64}
    assert c.reference > 0.95
    assert c.start == {"a.weight": 0.0, "b.weight": 0.0}
    acc_a, acc_b = c.accuracy["a.weight"], c.accuracy["b.weight"]
    # a keeps its diagonal up to 15/16: nothing lost by 0.9; b loses a lot at once.
    assert all(acc >= c.reference - 0.01 for s, acc in zip(GRID, acc_a, strict=True) if s <= 0.9)
    assert acc_b[0] < c.reference - 0.1
    assert all(d_b > d_a for d_a, d_b in zip(c.drops("a.weight"), c.drops("b.weight"), strict=True))
    for acc in (acc_a, acc_b):  # monotone-ish: never recovers by more than noise
        assert all(later <= earlier + 0.02 for earlier, later in zip(acc, acc[1:], strict=False))
        assert acc[-1] < acc[0]
    assert c.meta["samples"] == 512


def test_weights_masks_and_mode_are_restored_and_masks_respected():
    model, batches = _model_and_batches()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask_a = torch.zeros(16, 16, dtype=torch.bool)
    mask_a.view(-1)[:26] = True  # ~90% sparse: the first 26 entries in order
    mask_a |= torch.eye(16, dtype=torch.bool)
    curves = layer_sensitivity(model, {"a.weight": mask_a}, batches, GRID)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    start = 1 - int(mask_a.sum()) / 256
    assert curves.start["a.weight"] == pytest.approx(start)
    # At or below the layer's own sparsity nothing changes: the reference accuracy.
    for s, acc in zip(GRID, curves.accuracy["a.weight"], strict=True):
        if round(s * 256) <= 256 - int(mask_a.sum()):
            assert acc == curves.reference


def test_layers_subset_and_callable_score():
    model, batches = _model_and_batches()
    calls = []

    def inverse(params):
        calls.append(sorted(params))
        return {n: -p.abs() for n, p in params.items()}  # prune the largest first

    curves = layer_sensitivity(model, None, batches, (0.5,), score=inverse, layers=["a.weight"])
    assert curves.layers == ["a.weight"] and curves.score == "inverse"
    assert calls == [["a.weight", "b.weight"]]
    # Removing the diagonal first hurts far more than removing the noise.
    assert curves.accuracy["a.weight"][0] < curves.reference - 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsities": ()}, "non-empty"),
        ({"sparsities": (0.9, 0.5)}, "increasing"),
        ({"sparsities": (0.5, 1.5)}, r"\[0, 1\]"),
        ({"layers": ["nope"]}, "not prunable layers"),
        ({"score": "taylor"}, "not known"),
        ({"score": lambda params: {}}, "no tensor shaped"),
    ],
)
def test_measuring_mistakes_are_one_line_errors(kwargs, match):
    model, batches = _model_and_batches()
    with pytest.raises(ConfigError, match=match) as err:
        layer_sensitivity(model, None, batches, **{"sparsities": GRID, **kwargs})
    _one_line(err)


# --------------------------------------------------------------------------------------
# allocation
# --------------------------------------------------------------------------------------


def _synthetic(numel=None) -> SensitivityCurves:
    grid = [0.2, 0.4, 0.6, 0.8, 1.0]
    # Convex drops: a quadratic (cheap), b cubic, c steep.
    return SensitivityCurves(
        sparsities=grid,
        reference=0.9,
        accuracy={
            "a": [0.9 - 0.3 * s * s for s in grid],
            "b": [0.9 - 0.6 * s**3 for s in grid],
            "c": [0.9 - 0.8 * s for s in grid],
        },
        numel=numel or {"a": 100, "b": 300, "c": 50},
    )


def test_allocation_meets_the_target_and_spares_the_sensitive_layer(measured):
    sizes = {"a.weight": 256, "b.weight": 64}
    rates = measured.allocate(0.6, sizes)
    zeros = sum(rates[n] * sizes[n] for n in sizes)
    assert zeros == pytest.approx(0.6 * 320, abs=1e-6)
    assert rates["a.weight"] > rates["b.weight"]
    assert rates["b.weight"] == 0.0  # 192 zeros fit in a's free 15/16
    shapes = {"a.weight": (16, 16), "b.weight": (4, 16)}
    counts = keep_counts("sensitivity", shapes, 0.6, options={"curves": measured})
    assert sum(counts.values()) == 320 - round(0.6 * 320)
    for n, size in sizes.items():
        assert abs(counts[n] - size * (1 - rates[n])) <= 1


@pytest.mark.parametrize("target", [0.0, 0.05, 0.3, 0.55, 0.77, 0.9, 0.999, 1.0])
def test_allocation_is_exact_and_optimal_on_convex_curves(target):
    c = _synthetic()
    rates = c.allocate(target)
    total = sum(c.numel.values())
    assert sum(rates[n] * c.numel[n] for n in rates) == pytest.approx(target * total, abs=1e-6)
    assert all(0.0 <= r <= 1.0 for r in rates.values())
    # Brute force over (a, b) on a fine grid, c taking the rest: greedy is never worse.
    best = math.inf
    steps = 200
    for i in range(steps + 1):
        for j in range(steps + 1):
            sa, sb = i / steps, j / steps
            sc = (target * total - sa * 100 - sb * 300) / 50
            if -1e-12 <= sc <= 1 + 1e-12:
                best = min(best, c.predicted_drop({"a": sa, "b": sb, "c": min(max(sc, 0), 1)}))
    assert c.predicted_drop(rates) <= best + 1e-9


def test_allocation_is_nested_as_the_target_grows():
    c = _synthetic()
    previous = dict.fromkeys(c.layers, 0.0)
    for i in range(1, 100):
        rates = c.allocate(i / 100)
        assert all(rates[n] >= previous[n] - 1e-12 for n in c.layers)
        previous = rates


def test_allocation_with_flat_curves_is_uniform_and_honours_dense():
    grid = [0.5, 0.9]
    flat = SensitivityCurves(grid, 0.8, {n: [0.8, 0.8] for n in "xyz"}, {"x": 10, "y": 30, "z": 60})
    rates = flat.allocate(0.45)
    assert rates == pytest.approx({"x": 0.45, "y": 0.45, "z": 0.45})
    rates = flat.allocate(0.24, dense_first=True, dense_last=True)
    assert rates["x"] == rates["z"] == 0.0
    assert rates["y"] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="dense") as err:
        flat.allocate(0.5, dense={"z"})
    _one_line(err)


def test_distribution_counts_are_exact_for_every_target():
    c = _synthetic()
    shapes = {"a": (10, 10), "b": (30, 10), "c": (5, 10)}
    before = None
    for i in range(0, 100):
        s = i / 100
        counts = sensitivity(shapes, s, curves=c)
        assert sum(counts.values()) == 450 - round(s * 450)
        rates = c.allocate(round(s * 450) / 450, {n: math.prod(v) for n, v in shapes.items()})
        for n, shape in shapes.items():
            assert abs(counts[n] - math.prod(shape) * (1 - rates[n])) <= 1 + 1e-9
        if before is not None:  # nested: what gmp needs (within one weight of rounding)
            assert all(counts[n] <= before[n] + 1 for n in shapes)
        before = counts
    dense = sensitivity(shapes, 0.5, frozenset({"a"}), curves=c)
    assert dense["a"] == 100 and sum(dense.values()) == 450 - 225


# --------------------------------------------------------------------------------------
# files and errors
# --------------------------------------------------------------------------------------


def test_json_round_trip_and_files(measured, tmp_path):
    text = measured.to_json()
    again = SensitivityCurves.from_json(text)
    assert again == measured
    out = files.sensitivity_dir(tmp_path / "run")
    paths = write_sensitivity(measured, out)
    assert paths["json"] == tmp_path / "run" / "sensitivity" / "sensitivity.json"
    assert SensitivityCurves.from_json(paths["json"]) == measured
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    table = paths["table"].read_text()
    assert table.count("\n| ") == 3  # header + two layers
    assert "a.weight" in table and "| 0.99 |" in table
    digest = hashlib.sha256(paths["json"].read_bytes()).hexdigest()
    assert measured.digest() == digest
    # A run folder, the output folder and the file all name the same curves.
    for source in (tmp_path / "run", out, paths["json"], str(paths["json"])):
        assert curves_path(source) == paths["json"]
        loaded, sha = load_curves(source)
        assert sha == digest and loaded.accuracy == measured.accuracy
        assert loaded.source == str(paths["json"].resolve())
        assert "path" not in loaded.to_dict()["meta"]


def test_bad_curves_are_one_line_errors_saying_how_to_make_them(tmp_path, measured):
    cases = {
        "missing": tmp_path / "nowhere.json",
        "not json": tmp_path / "bad.json",
        "not curves": tmp_path / "other.json",
        "malformed": tmp_path / "short.json",
    }
    cases["not json"].write_text("{nope")
    cases["not curves"].write_text(json.dumps({"hello": 1}))
    data = measured.to_dict()
    data["layers"]["a.weight"]["accuracy"] = [0.5]
    cases["malformed"].write_text(json.dumps(data))
    for source in [None, "", *cases.values()]:
        with pytest.raises(ConfigError) as err:
            load_curves(source)
        assert "scripts/sensitivity.py" in _one_line(err)


def test_layers_must_match_the_model(measured):
    shapes = {"a.weight": (16, 16), "b.weight": (4, 16)}
    check_distribution("sensitivity", shapes, options={"curves": measured})
    for bad, match in [
        ({"a.weight": (16, 16)}, "the model does not have"),
        ({**shapes, "c.weight": (2, 2)}, "no curve for layers"),
        ({"a.weight": (16, 8), "b.weight": (4, 16)}, "128"),
    ]:
        with pytest.raises(ConfigError, match=match) as err:
            keep_counts("sensitivity", bad, 0.5, options={"curves": measured})
        assert "scripts/sensitivity.py" in _one_line(err)
    # A layer kept dense needs no curve.
    wider = {**shapes, "c.weight": (2, 2)}
    counts = keep_counts(
        "sensitivity", wider, 0.5, frozenset({"c.weight"}), {}, 1.0, None, {"curves": measured}
    )
    assert counts["c.weight"] == 4


def test_registry_options_and_record(measured, tmp_path):
    assert DISTRIBUTIONS["sensitivity"] is sensitivity
    shapes = {"a.weight": (16, 16), "b.weight": (4, 16)}
    path = tmp_path / "s.json"
    measured.to_json(path)
    # Other distributions ignore options; sensitivity's are picked from a config and checked.
    assert keep_counts("uniform", shapes, 0.5, options={"curves": "x"}) == keep_counts(
        "uniform", shapes, 0.5
    )
    assert distribution_options("uniform", {"name": "uniform", "power_scale": 1.0}) == {}
    assert distribution_options("no-such", {}) == {}
    options = distribution_options("sensitivity", {"name": "sensitivity", "curves": str(path)})
    assert options == {"curves": str(path.resolve())}
    with pytest.raises(ConfigError, match="distribution.curves") as err:
        distribution_options("sensitivity", {"name": "sensitivity", "curves": None})
    assert "scripts/sensitivity.py" in _one_line(err)
    described = describe_distribution("sensitivity", shapes, 0.6, options=options)
    counts = keep_counts("sensitivity", shapes, 0.6, options=options)
    assert described["rates"] == {n: 1 - counts[n] / math.prod(s) for n, s in shapes.items()}
    assert described["curves"]["path"] == str(path.resolve())
    assert described["curves"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert described["curves"]["accuracy"] == measured.accuracy
    assert described["predicted_drop"] >= 0.0
    assert describe_distribution("erk", shapes, 0.6) == {}


# --------------------------------------------------------------------------------------
# the methods that use keep_counts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["static", "gmp", "rigl"])
def test_methods_use_the_curves(method, measured, tmp_path):
    from prunelab.methods import build_method

    path = tmp_path / "s.json"
    measured.to_json(path)
    dist = {"name": "sensitivity", "curves": str(path), "dense_first": False, "budget": "all"}
    kinds = {"static": "one_shot", "gmp": "polynomial", "rigl": "prune_grow"}
    schedule = {"kind": kinds[method]}
    m = build_method(method, 0.6, distribution=dist, schedule=schedule)
    shapes = {"a.weight": (16, 16), "b.weight": (4, 16)}
    m.setup(shapes, total_steps=100, steps_per_epoch=10)
    expected = keep_counts("sensitivity", shapes, 0.6, options={"curves": measured})
    assert m.keep_counts(0.6) == expected
    rates = m.distribution_report()["rates"]
    assert rates["b.weight"] < rates["a.weight"]
    if method == "gmp":  # the schedule's rising targets never ask a layer to grow back
        before = None
        for step in range(0, 100, 5):
            counts = m.keep_counts(m.schedule.sparsity_at(step, 0.6))
            if before is not None:
                assert all(counts[n] <= before[n] + 1 for n in counts)
            before = counts
    with pytest.raises(ConfigError, match="distribution.curves") as err:
        build_method(method, 0.6, distribution={"name": "sensitivity"}, schedule=schedule)
    _one_line(err)
    with pytest.raises(ConfigError, match="do not match") as err:
        build_method(method, 0.6, distribution=dist, schedule=schedule).setup(
            {"other.weight": (4, 4)}, 100, 10
        )
    _one_line(err)
