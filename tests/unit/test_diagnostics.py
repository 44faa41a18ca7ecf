"""Mask-health diagnostics: dead units on hand-built masks, disconnection warnings, gradient
norms, and what the Lightning module logs at a mask update."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from test_engine import OPTIMIZERS, backward, build_model, make_batches, make_engine, start
from torch import nn

import prunelab.module as module_mod
from prunelab.analysis.diagnostics import (
    DisconnectionWatch,
    chain_links,
    diagnostic_metrics,
    gradient_norms,
    has_skip_connections,
    mask_diagnostics,
)
from prunelab.models import MLP, ResNet20
from prunelab.module import ClassificationModule


def _chain_masks() -> dict[str, torch.Tensor]:
    """3 inputs -> 4 units (layer a) -> 2 outputs (layer b).

    a: unit 0 has no incoming weight, input 2 has no outgoing weight;
    b: unit 1 of a feeds nothing (column 1 pruned).
    """
    a = torch.ones(4, 3, dtype=torch.bool)
    a[0] = False
    a[:, 2] = False
    b = torch.ones(2, 4, dtype=torch.bool)
    b[:, 1] = False
    return {"a": a, "b": b}


def test_dead_units_of_a_hand_built_chain():
    diag = mask_diagnostics(_chain_masks())
    a, b = diag["layers"]["a"], diag["layers"]["b"]
    assert (a["out_units"], a["in_units"], a["active"]) == (4, 3, 6)
    assert a["dead_out"] == 1  # unit 0: no incoming weight
    assert a["dead_in"] == 1  # input 2: no outgoing weight
    # Unit 0 (no input) and unit 1 (no output) carry no input-to-output path.
    assert a["dead_units"] == 2
    assert a["stranded_weights"] == 2  # the two weights into unit 1
    assert (b["dead_out"], b["dead_in"], b["dead_units"]) == (0, 1, 0)
    assert b["stranded_weights"] == 2  # the weights out of unit 0, which has no input
    assert not a["chained"] and b["chained"]
    assert diag["dead_units"] == 2 and diag["dead_in"] == 2 and diag["stranded_weights"] == 4
    # 20 weights, 12 active, 8 of them on a path.
    assert diag["effective_sparsity"] == pytest.approx(1 - 8 / 20)
    assert diag["disconnected_layers"] == [] and not diag["network_disconnected"]
    json.dumps(diag)  # plain values, ready for results.json


def test_without_a_chain_dead_units_are_the_local_dead_outputs():
    diag = mask_diagnostics(_chain_masks(), chain=False)
    for layer in diag["layers"].values():
        assert layer["dead_units"] == layer["dead_out"]
        assert layer["stranded_weights"] == 0 and not layer["chained"]
    assert diag["effective_sparsity"] == pytest.approx(1 - 12 / 20)


def test_conv_channels_chain_into_a_flattened_linear():
    # Conv1d weight [out=2, in=1, k=3] over length 4 -> flatten (2 * 4 = 8) -> Linear [3, 8].
    conv = torch.ones(2, 1, 3, dtype=torch.bool)
    linear = torch.ones(3, 8, dtype=torch.bool)
    linear[:, 4:] = False  # channel 1 (inputs 4..7, channel-major) feeds nothing
    assert chain_links([conv.shape, linear.shape]) == [None, 4]
    diag = mask_diagnostics({"conv": conv, "linear": linear})
    assert diag["layers"]["conv"]["dead_out"] == 0
    assert diag["layers"]["conv"]["dead_units"] == 1  # channel 1
    assert diag["layers"]["conv"]["stranded_weights"] == 3  # its kernel
    assert diag["layers"]["linear"]["dead_in"] == 4


def test_shapes_that_do_not_chain_start_a_new_chain():
    assert chain_links([(4, 3), (2, 5), (6, 2)]) == [None, None, 1]
    masks = {"a": torch.zeros(4, 3, dtype=torch.bool), "b": torch.ones(2, 5, dtype=torch.bool)}
    diag = mask_diagnostics(masks)
    # b does not read a's outputs: a's death does not reach it.
    assert diag["layers"]["b"]["dead_units"] == 0 and not diag["layers"]["b"]["chained"]


def test_empty_full_and_disconnected_layers():
    masks = _chain_masks()
    masks["c"] = torch.ones(3, 2, dtype=torch.bool)
    diag = mask_diagnostics(masks)
    assert diag["full_layers"] == ["c"] and diag["empty_layers"] == []
    assert diag["disconnected_layers"] == []
    # Every unit of a dead without a being empty: unit 0 has no input, units 1-3 feed nothing.
    masks["b"][:, 2:] = False
    diag = mask_diagnostics(masks)
    a = diag["layers"]["a"]
    assert (a["dead_out"], a["dead_units"], a["empty"]) == (1, 4, False)
    assert diag["disconnected_layers"] == ["a", "b", "c"] and diag["network_disconnected"]
    assert diag["effective_sparsity"] == 1.0
    # An empty layer disconnects its chain; without the chain only itself.
    masks = _chain_masks()
    masks["b"] = torch.zeros(2, 4, dtype=torch.bool)
    diag = mask_diagnostics(masks)
    assert diag["empty_layers"] == ["b"] and diag["layers"]["b"]["density"] == 0.0
    assert diag["disconnected_layers"] == ["a", "b"] and diag["network_disconnected"]
    local = mask_diagnostics(masks, chain=False)
    assert local["disconnected_layers"] == ["b"] and local["network_disconnected"]
    # Kernel positions belong to one (output, input) pair.
    masks["a"] = masks["a"].unsqueeze(-1).expand(4, 3, 2).clone()
    assert mask_diagnostics(masks)["layers"]["a"]["dead_out"] == 1


def test_disconnection_is_warned_once_per_layer(caplog):
    watch = DisconnectionWatch()
    masks = _chain_masks()
    with caplog.at_level(logging.WARNING, logger="prunelab.analysis.diagnostics"):
        assert watch.check(mask_diagnostics(masks), step=3) == []
        masks["b"] = torch.zeros(2, 4, dtype=torch.bool)
        assert watch.check(mask_diagnostics(masks), step=7) == ["a", "b"]
        assert watch.check(mask_diagnostics(masks), step=9) == []
        masks["c"] = torch.ones(3, 2, dtype=torch.bool)
        assert watch.check(mask_diagnostics(masks), step=11) == ["c"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("step 7: layer a is disconnected: none of its 4 output units")
    assert lines[0].endswith("(empty: b); no input-dependent signal leaves it")
    assert lines[1] == (
        "step 7: layer b is disconnected: every weight is pruned (density 0); "
        "no input-dependent signal leaves it"
    )
    assert lines[2].startswith("step 11: layer c is disconnected")


def test_gradient_norms_of_active_and_inactive_weights():
    mask = torch.tensor([[True, False], [False, False]])
    grad = torch.tensor([[3.0, 4.0], [0.0, 12.0]])
    norms = gradient_norms({"w": mask, "v": mask}, {"w": grad, "v": None})
    layer = norms["layers"]["w"]
    assert list(norms["layers"]) == ["w"]  # a layer without a gradient is left out
    assert layer["grad_norm_active"] == pytest.approx(3.0)
    assert layer["grad_norm_inactive"] == pytest.approx(math.sqrt(16 + 144))
    assert layer["grad_rms_active"] == pytest.approx(3.0)
    assert layer["grad_rms_inactive"] == pytest.approx(math.sqrt(160 / 3))
    # Over two layers the squares add up.
    both = gradient_norms({"w": mask, "u": ~mask}, {"w": grad, "u": grad})
    assert both["grad_norm_active"] == pytest.approx(math.sqrt(9 + 160))
    assert both["grad_norm_inactive"] == pytest.approx(math.sqrt(160 + 9))
    diag = mask_diagnostics({"w": mask}, grads={"w": grad})
    metrics = diagnostic_metrics(diag)
    assert metrics["mask/grad_norm_active/w"] == pytest.approx(3.0)
    assert metrics["mask/grad_rms_inactive"] == pytest.approx(math.sqrt(160 / 3))
    # A fully active layer has no inactive weights: RMS 0.0, not a division by zero.
    full = gradient_norms({"w": torch.ones(2, 2, dtype=torch.bool)}, {"w": grad})
    assert full["grad_rms_inactive"] == 0.0 and full["grad_norm_inactive"] == 0.0


def test_gradient_norms_with_non_finite_gradients_keep_each_side_apart():
    """An infinite gradient of an inactive weight makes the inactive norm infinite and
    leaves the active one as it is (multiplying by the mask would make both NaN)."""
    mask = torch.tensor([True, False, True, False])
    grad = torch.tensor([3.0, math.inf, 4.0, 1.0])
    layer = gradient_norms({"w": mask}, {"w": grad})["layers"]["w"]
    assert layer["grad_norm_active"] == pytest.approx(5.0)
    assert layer["grad_norm_inactive"] == math.inf
    huge = torch.tensor([3e20, 0.0, 4e20, 1.0])  # float32 squares overflow
    layer = gradient_norms({"w": mask}, {"w": huge})["layers"]["w"]
    assert layer["grad_norm_active"] == pytest.approx(5e20)
    assert layer["grad_norm_inactive"] == pytest.approx(1.0)


def test_bool_any_by_byte_maximum_matches_any():
    from prunelab.analysis.diagnostics import _any

    generator = torch.Generator().manual_seed(0)
    for shape in [(7, 5), (1, 9), (300, 784), (4, 3, 2), (0, 4), (3, 0)]:
        x = torch.rand(shape, generator=generator) < 0.05
        for dim in range(-len(shape), len(shape)):
            assert torch.equal(_any(x, dim), x.any(dim)), (shape, dim)
            assert torch.equal(_any(x.transpose(0, -1), dim), x.transpose(0, -1).any(dim))
    assert not _any(torch.zeros(4, 4, dtype=torch.bool), 0).any()


def test_skip_connections_are_recognised():
    assert not has_skip_connections(MLP(input_shape=(40,), num_classes=10))
    assert has_skip_connections(ResNet20(input_shape=(3, 32, 32), num_classes=10))
    model = nn.Sequential(nn.Linear(2, 2))
    model.has_skip_connections = True
    assert has_skip_connections(model)


def test_engine_report_holds_the_final_diagnostics():
    model = build_model([6, 8, 4])
    engine = make_engine("random", 0.5, model)
    engine.initialize()
    report = engine.sparsity_report()
    diag = report["diagnostics"]
    assert list(diag["layers"]) == list(engine.params)
    assert diag["chain"] is True
    json.dumps(report)


class _Recorder:
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((step, dict(metrics)))


def _module_with_engine(method: str = "rigl"):
    widths = [6, 8, 4]
    model = build_model(widths)
    batches = make_batches(widths)
    optimizer = OPTIMIZERS["adam"](model)
    engine = make_engine(method, 0.7, model)
    start(engine, model, batches, optimizer)
    module = ClassificationModule(model, num_classes=4, optimizer=torch.optim.Adam, engine=engine)
    recorder = _Recorder()
    trainer = SimpleNamespace(loggers=[recorder], global_step=0, world_size=1, global_rank=0)
    module.trainer = trainer
    return module, engine, optimizer, batches, trainer, recorder


def test_module_logs_diagnostics_at_init_and_on_update_steps_only(monkeypatch):
    module, engine, optimizer, batches, trainer, recorder = _module_with_engine()
    calls = {"grads": 0, "diagnostics": 0}
    inactive_norms = []

    def counting_norms(masks, grads):
        calls["grads"] += 1
        out = gradient_norms(masks, grads)
        inactive_norms.append(out["grad_norm_inactive"])
        return out

    real_diagnostics = engine.diagnostics

    def counting_diagnostics(*args, **kwargs):
        calls["diagnostics"] += 1
        return real_diagnostics(*args, **kwargs)

    monkeypatch.setattr(module_mod, "gradient_norms", counting_norms)
    monkeypatch.setattr(engine, "diagnostics", counting_diagnostics)
    module._log_engine(force_layers=True)  # what on_train_start does after initialising
    assert calls == {"grads": 0, "diagnostics": 1}
    init_step, init_stats = recorder.logged[0]
    assert init_step == 0 and "mask/dead_units" in init_stats
    assert "mask/grad_norm_active" not in init_stats  # no gradients at initialisation

    update_steps = []
    for step in range(12):
        trainer.global_step = step
        backward(module.model, optimizer, batches[step % len(batches)])
        if engine.method.is_update_step(step):
            update_steps.append(step)
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
    assert update_steps == [5, 10]
    # Nothing computed on the other steps.
    assert calls == {"grads": 2, "diagnostics": 3}
    assert [s for s, _ in recorder.logged] == [0, 5, 10]
    _, stats = recorder.logged[1]
    names = list(engine.params)
    for key in (
        "mask/dead_units",
        "mask/dead_in",
        "mask/dead_out",
        "mask/effective_sparsity",
        "mask/disconnected_layers",
        "mask/grad_norm_active",
        "mask/grad_norm_inactive",
        "mask/grad_rms_active",
        "mask/grad_rms_inactive",
        *(f"mask/dead_units/{n}" for n in names),
        *(f"mask/grad_norm_inactive/{n}" for n in names),
        "mask/turnover",
        "sparsity/global",
    ):
        assert key in stats, key
    # The norms are those of the dense gradients, read before the engine masks them.
    assert all(v > 0 for v in inactive_norms)
    assert stats["mask/grad_norm_inactive"] == pytest.approx(inactive_norms[0])


def test_module_warns_once_when_a_layer_disconnects(caplog):
    module, engine, _, _, trainer, recorder = _module_with_engine("random")
    first, last = list(engine.params)[0], list(engine.params)[-1]
    engine.masks[last] = torch.zeros_like(engine.masks[last])
    trainer.global_step = 4
    with caplog.at_level(logging.WARNING, logger="prunelab.analysis.diagnostics"):
        module._log_engine(force_layers=True)
        trainer.global_step = 5
        module._log_engine(force_layers=True)
    warnings = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    # The empty head, and the layer before it whose units now feed nothing: once each.
    assert len(warnings) == 2
    assert warnings[0].startswith(f"step 4: layer {first} is disconnected: none of its 8 ")
    assert f"(empty: {last})" in warnings[0]
    assert warnings[1] == (
        f"step 4: layer {last} is disconnected: every weight is pruned (density 0); "
        "no input-dependent signal leaves it"
    )
    assert recorder.logged[-1][1]["mask/disconnected_layers"] == 2.0


def test_analysis_is_pure_torch():
    code = (
        "import sys, prunelab.analysis; "
        "print([m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'hydra', 'omegaconf')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_residual_mlp_declares_its_skip_connection():
    from prunelab.analysis.diagnostics import has_skip_connections
    from prunelab.models import MLP

    assert has_skip_connections(MLP((40,), 10, hidden=(16, 16), residual=True))
    assert not has_skip_connections(MLP((40,), 10, hidden=(16, 16), residual=False))
    assert not has_skip_connections(MLP((40,), 10, hidden=(16, 8), residual=True))


def test_gradient_norms_from_masks_and_from_a_plain_mapping_agree():
    """Masks hand gradient_norms their cached 0/1 factors (those that mask the gradients
    each step); the norms are those computed from the plain bool tensors, exactly."""
    from prunelab.analysis.diagnostics import gradient_norms
    from prunelab.sparsity.masks import Masks

    g = torch.Generator().manual_seed(0)
    plain = {
        "a": torch.rand(30, 40, generator=g) < 0.2,
        "b": torch.ones(10, 30, dtype=torch.bool),  # kept dense: no factor
        "c": torch.rand(8, 4, 3, 3, generator=g) < 0.5,
    }
    grads = {n: torch.randn(m.shape, generator=g) for n, m in plain.items()}
    masks = Masks(plain)
    masks.apply_({n: torch.ones_like(t) for n, t in grads.items()})  # fills the cache
    assert gradient_norms(masks, grads) == gradient_norms(dict(plain), grads)


def test_mask_diagnostics_from_masks_with_known_counts_and_from_a_plain_mapping_agree():
    from prunelab.analysis.diagnostics import mask_diagnostics
    from prunelab.sparsity.masks import Masks

    g = torch.Generator().manual_seed(1)
    plain = {
        "conv": torch.rand(8, 3, 3, 3, generator=g) < 0.4,
        "fc1": torch.rand(20, 8 * 4, generator=g) < 0.2,
        "fc2": torch.rand(5, 20, generator=g) < 0.5,
    }
    indices = {n: m.flatten().nonzero()[:, 0] for n, m in plain.items()}
    masks = Masks(plain, kept_indices=indices)
    for chain in (True, False):
        assert mask_diagnostics(masks, chain=chain) == mask_diagnostics(dict(plain), chain=chain)


def test_diagnostics_from_active_indices_agree_with_whole_layer_masks():
    """On the CPU a Masks is diagnosed from its active weights' indices (numpy), a plain
    mapping from whole-layer bool operations: every count agrees, over random chains with
    convolutions, flattens, 1-D masks, empty and full layers, sparse enough to strand weights
    and kill units. Fails if either path's reachability or counting drifts."""
    from prunelab.analysis.diagnostics import mask_diagnostics
    from prunelab.sparsity.masks import Masks

    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        c1, c2, side, hidden = (int(v) for v in torch.randint(1, 6, (4,), generator=g))
        shapes = [
            (c1, 2, 3, 3),  # conv
            (c2, c1, 1, 1),  # chained conv
            (hidden, c2 * side),  # flatten of ``side`` positions per channel
            (hidden,),  # 1-D (a bias-like mask): not chained
            (3, hidden),
        ]
        plain = {}
        for i, shape in enumerate(shapes):
            density = float(torch.rand((), generator=g)) ** 2
            if trial % 7 == i:
                density = 0.0  # an empty layer
            elif trial % 5 == i:
                density = 1.0  # a full layer
            plain[f"l{i}"] = torch.rand(shape, generator=g) < density
        masks = Masks(plain)
        for chain in (True, False):
            assert mask_diagnostics(masks, chain=chain) == mask_diagnostics(
                dict(plain), chain=chain
            ), (trial, chain)


@pytest.mark.parametrize("active_scale", [1.0, 1e3])
def test_gradient_norms_match_float64_sums_whichever_side_dominates(active_scale):
    """On the CPU the inactive sum is the layer's sum minus the active one where the inactive
    side holds most of it, and is summed directly where it does not (the difference would
    lose its digits): both agree with float64 sums to float32 precision."""
    from prunelab.sparsity.masks import Masks

    g = torch.Generator().manual_seed(5)
    mask = torch.rand(200, 300, generator=g) < 0.1
    grad = torch.randn(200, 300, generator=g)
    grad[mask] *= active_scale
    exact = grad.double()
    active, inactive = exact[mask].square().sum(), exact[~mask].square().sum()
    for masks in ({"w": mask}, Masks({"w": mask})):
        layer = gradient_norms(masks, {"w": grad})["layers"]["w"]
        assert layer["grad_norm_active"] == pytest.approx(math.sqrt(active), rel=1e-6)
        assert layer["grad_norm_inactive"] == pytest.approx(math.sqrt(inactive), rel=1e-6)
