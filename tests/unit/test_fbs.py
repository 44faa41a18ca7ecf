"""Feature Boosting and Suppression (pruning=fbs): the gates, the dynamic executor against the
masked computation, the MAC accounting, the L1 penalty and the option checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunelab.cost import layer_flops
from prunelab.dynamic import DynamicExecutor, FBSGates, build_plan, gate_points, keep_count
from prunelab.dynamic.report import dynamic_cost_report, executed_counts
from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.models import MLP, WRN22_2, Conv4, LeNet300_100, ResNet20

SHAPE = (1, 28, 28)


def _gated(cls, density=0.5, gating="topk", threshold=None, seed=0):
    """A model of ``cls`` with gates whose predictors and BatchNorm statistics are random
    enough that different inputs choose different channels."""
    torch.manual_seed(seed)
    model = cls(SHAPE, 10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_(1.0, 0.2)
            module.bias.data.normal_(0.0, 0.2)
    gates = FBSGates(
        gate_points(model), dict(model.named_modules()), density, gating, threshold=threshold
    )
    for predictor in gates.predictors:
        predictor.weight.data.normal_(0, 0.3)
    return model, gates


def _calibrate(model, gates, batches=3):
    model.train()
    gates.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, *SHAPE))
    model.eval()
    gates.eval()


def _masked(model, gates, x):
    """The gated model's logits (every channel computed, the suppressed ones zeroed) and the
    executed channel counts per gate."""
    with gates.recording() as record, torch.no_grad():
        logits = model(x)
    return logits, torch.stack([torch.cat(r) for r in record], dim=1)


@pytest.mark.parametrize("cls", [Conv4, ResNet20])
@pytest.mark.parametrize("gating", ["topk", "threshold"])
def test_dynamic_execution_gives_the_masked_logits(cls, gating):
    model, gates = _gated(cls, gating=gating)
    _calibrate(model, gates)
    executor = DynamicExecutor(model, gates, SHAPE)
    executor.count_macs = True
    dense = executor.plan.dense_macs()
    for i in range(6):
        x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(i))
        reference, counts = _masked(model, gates, x)
        got = executor(x)
        assert (got - reference).abs().max().item() <= 1e-5
        # the executor skipped what the gates suppressed, and counted what it computed
        assert executor.executed_counts() == counts[0].tolist()
        assert executor.macs == int(executor.plan.macs(counts)[0])
        assert executor.macs < dense


@pytest.mark.parametrize("cls", [Conv4, ResNet20])
def test_dense_macs_match_the_flop_counter(cls):
    torch.manual_seed(0)
    model = cls(SHAPE, 10).eval()
    plan = build_plan(model, SHAPE)
    assert 2 * plan.dense_macs() == layer_flops(model, SHAPE).total


def test_topk_keeps_exactly_k_channels_per_input():
    model, gates = _gated(Conv4, density=0.3)
    model.eval()
    gates.eval()
    x = torch.randn(8, *SHAPE)
    seen = []
    for index, conv in enumerate(gates._convs):
        g = gates.saliency(index, torch.randn(8, conv.in_channels, 5, 5).abs())
        keep = gates.select(index, g)
        k = keep_count(0.3, conv.out_channels)
        assert k == -(-3 * conv.out_channels // 10)  # ceil(0.3 C)
        assert keep.sum(dim=1).tolist() == [k] * 8
        # the kept ones are the k largest saliencies
        assert torch.all(
            g.masked_fill(~keep, float("inf")).min(1).values
            >= g.masked_fill(keep, -1).max(1).values
        )
        seen.append(k)
    _, counts = _masked(model, gates, x)
    assert torch.all(counts <= torch.tensor(seen))


def test_threshold_gating_spends_different_macs_on_different_inputs():
    model, gates = _gated(Conv4, density=0.5, gating="threshold")
    _calibrate(model, gates)
    assert bool(gates.calibrated.all())
    counts = executed_counts(model, gates, [torch.randn(64, *SHAPE)])
    plan = DynamicExecutor(model, gates, SHAPE).plan
    macs = plan.macs(counts)
    assert macs.unique().numel() > 10
    # calibrated to about the density on average (per input it varies)
    assert 0.3 < counts.float().sum(1).div(sum(g.out_channels for g in plan.gates)).mean() < 0.7
    # top-k, by contrast, spends the same on every input whose winners all have g > 0
    topk_model, topk_gates = _gated(Conv4, density=0.5)
    topk_model.eval()
    topk_counts = executed_counts(topk_model, topk_gates, [torch.randn(64, *SHAPE).abs()])
    assert (topk_counts <= torch.tensor(topk_gates.k)).all()


def test_fixed_threshold_keeps_the_saliencies_above_it():
    model, gates = _gated(Conv4, gating="threshold", threshold=0.8)
    model.eval()
    g = gates.saliency(1, torch.randn(4, gates._convs[1].in_channels, 7, 7).abs())
    assert torch.equal(gates.select(1, g), g > 0.8)
    model.train()
    gates.train()
    model(torch.randn(4, *SHAPE))
    assert torch.all(gates.thresholds == 0.8)  # a fixed threshold is not calibrated


def test_l1_penalty_gradient_reaches_the_predictors():
    method = build_method("fbs", 0.5, l1_lambda=1e-3)
    torch.manual_seed(0)
    model = Conv4(SHAPE, 10)
    gates = method.attach(model, {})
    model.train()
    gates.train()
    model(torch.randn(4, *SHAPE))
    penalty = method.penalty({}, 0)
    expected = sum(g.sum(1).mean() for g in gates.saliencies)
    assert penalty.item() == pytest.approx(1e-3 * expected.item(), rel=1e-6)
    penalty.backward()
    for predictor in gates.predictors:
        assert predictor.weight.grad is not None and predictor.weight.grad.abs().sum() > 0
        assert predictor.bias.grad.abs().sum() > 0
    # and the task loss trains them through the kept channels (boosting)
    gates.zero_grad()
    model(torch.randn(4, *SHAPE)).sum().backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in gates.predictors)


def test_suppressed_channels_are_zero_after_the_gate():
    model, gates = _gated(ResNet20, density=0.25)
    model.eval()
    outputs = {}
    block = model.layer1[0]
    block.bn1.register_forward_hook(lambda m, a, out: outputs.__setitem__("bn1", out))
    with torch.no_grad():
        model(torch.randn(3, *SHAPE))
    kept = (outputs["bn1"].abs().sum(dim=(2, 3)) > 0).sum(1)
    assert kept.tolist() == [keep_count(0.25, 16)] * 3


def test_gate_points_follow_batchnorm_and_skip_nothing_else():
    points = {p.conv: p.point for p in gate_points(ResNet20(SHAPE, 10))}
    assert points["conv1"] == "bn1"
    assert points["layer1.0.conv2"] == "layer1.0.bn2"
    assert points["layer2.0.shortcut.0"] == "layer2.0.shortcut.1"
    assert len(points) == 21
    conv4 = {p.conv: p.point for p in gate_points(Conv4(SHAPE, 10))}
    assert conv4 == {f"features.{i}": f"features.{i}" for i in (0, 2, 5, 7)}
    wrn = {p.conv: p.point for p in gate_points(WRN22_2((3, 16, 16), 10))}
    assert wrn["layer1.0.conv1"] == "layer1.0.bn2" and wrn["layer1.0.conv2"] == "layer1.0.conv2"


def test_dynamic_cost_report_fields():
    model, gates = _gated(Conv4, gating="threshold")
    _calibrate(model, gates)
    batches = [(torch.randn(40, *SHAPE), torch.zeros(40)) for _ in range(2)]
    report = dynamic_cost_report(
        model, gates, SHAPE, batches, samples=50, latency_samples=3, latency_rounds=1
    )
    assert report["dynamic_samples"] == 50 and report["dynamic_latency_samples"] == 3
    assert report["macs_dynamic_min"] <= report["macs_dynamic_p50"] <= report["macs_dynamic_p90"]
    assert report["macs_dynamic_p90"] <= report["macs_dynamic_p99"] <= report["macs_dynamic_max"]
    assert report["macs_dynamic_mean"] < report["macs_dynamic_dense"]
    assert report["dynamic_max_abs_diff"] <= 1e-5 and report["dynamic_agreement"] == 1.0
    for variant in ("dense_plain", "gated_masked", "dynamic"):
        assert report[f"latency_ms/{variant}/b1"] > 0
    assert not model.training
    assert len(gates._handles) == 8  # the hooks are back after timing the plain model


def test_gates_state_survives_a_state_dict_round_trip():
    model, gates = _gated(Conv4, gating="threshold")
    _calibrate(model, gates)
    other_model, other = _gated(Conv4, gating="threshold", seed=1)
    other.load_state_dict(gates.state_dict())
    assert torch.equal(other.thresholds, gates.thresholds) and bool(other.calibrated.all())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"density": 0.0}, "pruning.density must be a number in (0, 1]"),
        ({"density": 1.5}, "pruning.density must be a number in (0, 1]"),
        ({"gating": "random"}, "pruning.gating must be one of topk, threshold"),
        ({"density": 0.3}, "sparsity = 1 - density"),
        ({"threshold": 0.5}, "works with pruning.gating=threshold"),
        ({"gating": "threshold", "threshold": -1.0}, "pruning.threshold must be null"),
        ({"gating": "threshold", "threshold": 0.5, "density": 0.5}, "set one of them to null"),
        ({"l1_lambda": -1.0}, "pruning.l1_lambda must be a number >= 0"),
        ({"threshold_decay": 1.0}, "pruning.threshold_decay must be a number in (0, 1)"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, message):
    with pytest.raises(ConfigError) as err:
        build_method("fbs", 0.5, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_density_defaults_to_one_minus_sparsity_and_may_repeat_it():
    assert build_method("fbs", 0.75).density == pytest.approx(0.25)
    assert build_method("fbs", 0.75, density=0.25).density == pytest.approx(0.25)
    assert build_method("fbs", 0.0, density=1.0).density == 1.0  # boosting only


@pytest.mark.parametrize("cls", [MLP, LeNet300_100])
def test_models_without_convolutions_are_refused(cls):
    model = cls((1, 28, 28), 10)
    with pytest.raises(ConfigError, match="has no convolution"):
        build_method("fbs", 0.5).check_model(model)


def test_the_model_mode_decides_calibration_not_the_gates_own():
    model, gates = _gated(Conv4, gating="threshold")
    _calibrate(model, gates)
    before = gates.thresholds.clone()
    gates.train()  # e.g. left in training mode by a wrapper; the model is in evaluation mode
    model.eval()
    with torch.no_grad():
        model(torch.randn(8, *SHAPE))
    assert torch.equal(gates.thresholds, before)
    assert all(s is None or not s.requires_grad for s in gates.saliencies)
