"""Structured pruning methods (structured_l1, neuron_sensitivity, taylor, block): each one's
ranking, whole coupled channels, the sparsity rule, caps, errors, and the compacted cost."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.cost import cost_report
from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.models import ResNet20, prunable_parameters
from prunelab.sparsity.engine import Context, SparsityEngine
from prunelab.structured import compact, remove_blocks

ONE_SHOT = {"kind": "one_shot", "at": 0.5, "at_epoch": None}
CUBIC = {"kind": "polynomial", "begin": 0.0, "end": 0.5, "frequency": 1, "power": 3}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)
    )


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


class TinyResidual(nn.Module):
    """stem -> (branch conv) + stem -> head conv -> classifier: the stem's and the branch's
    output channels are tied by the addition."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.branch(h) + h)
        h = F.relu(self.head(h))
        return self.fc(h.mean(dim=(2, 3)))


def batches(shape, classes: int = 3, n: int = 3, size: int = 5, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, *shape, generator=gen),
            torch.randint(0, classes, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def run(
    name: str,
    model: nn.Module,
    shape,
    sparsity: float = 0.5,
    distribution: str = "uniform",
    schedule: dict | None = None,
    steps: int = 4,
    **options,
) -> SparsityEngine:
    """Build the method, initialise with data, run ``steps`` engine steps (no training)."""
    method = build_method(
        name,
        sparsity,
        distribution={"name": distribution},
        schedule=schedule or ONE_SHOT,
        **options,
    )
    engine = SparsityEngine(model, prunable_parameters(model), method, seed=0)
    engine.setup(total_steps=steps, steps_per_epoch=steps)
    data = batches(shape)
    engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)
    for step in range(steps):
        engine.before_optimizer_step(step)
    return engine


def dead_rows(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(~mask.reshape(mask.shape[0], -1).any(dim=1)).flatten().tolist())


def dead_cols(mask: torch.Tensor) -> set[int]:
    return set(
        torch.nonzero(~mask.transpose(0, 1).reshape(mask.shape[1], -1).any(dim=1))
        .flatten()
        .tolist()
    )


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# -- rankings -------------------------------------------------------------------------------


def test_l1_prunes_the_smallest_norm_filters_and_their_consumer_columns():
    model = TinyCNN()
    with torch.no_grad():  # filters 4 and 1 have the smallest L1 norms
        for j, scale in enumerate([1.0, 0.05, 0.8, 0.9, 0.01, 0.7]):
            model.conv1.weight[j] = scale * torch.sign(model.conv1.weight[j])
    engine = run("structured_l1", model, (1, 4, 4), sparsity=0.41)
    masks = engine.masks
    assert dead_rows(masks["conv1.weight"]) == {1, 4}
    assert dead_cols(masks["conv2.weight"]) == {1, 4}  # the next layer's inputs go too
    assert dead_rows(masks["fc.weight"]) == set(), "the classifier is never pruned"
    scores = engine.method.channel_scores(prunable_parameters(model), Context(0, 0))
    assert scores["conv1"][0] == pytest.approx(float(model.conv1.weight[0].detach().abs().sum()))
    assert scores["conv1"][4] == 0.0  # masked now


def test_sensitivity_score_is_the_l1_over_l2_ratio_of_incoming_weights():
    model = mlp()
    method = build_method(
        "neuron_sensitivity", 0.5, distribution={"name": "uniform"}, schedule=ONE_SHOT
    )
    params = prunable_parameters(model)
    method.setup({n: tuple(p.shape) for n, p in params.items()}, 10, 10)
    method.init_masks(params, Context(0, 0, model=model, batches=lambda: iter(batches((6,)))))
    scores = method.channel_scores(params, Context(0, 0))
    for root, name in (("1", "1.weight"), ("3", "3.weight")):
        w = params[name].detach().double()
        expected = w.abs().sum(1) / w.square().sum(1).sqrt()
        assert torch.allclose(scores[root], expected)
        assert bool((scores[root] >= 1).all()) and bool(
            (scores[root] <= math.sqrt(w.shape[1])).all()
        )


def test_taylor_score_matches_a_hand_computation():
    model = mlp()
    data = batches((6,), n=3)
    method = build_method(
        "taylor", 0.5, distribution={"name": "global"}, schedule=ONE_SHOT, batches=2
    )
    params = prunable_parameters(model)
    method.setup({n: tuple(p.shape) for n, p in params.items()}, 10, 10)
    ctx = Context(0, 0, model=model, batches=lambda: iter(data), loss_fn=F.cross_entropy)
    method.init_masks(params, ctx)
    scores = method.channel_scores(params, Context(0, 5, model=model))  # the data cached at init
    expected = {"1": torch.zeros(10, dtype=torch.float64), "3": torch.zeros(8, dtype=torch.float64)}
    for x, y in data[:2]:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for root, layer in (("1", model[1]), ("3", model[3])):
            expected[root] += (layer.weight.grad * layer.weight).sum(1).double().square()
    for root in expected:
        assert torch.allclose(scores[root], expected[root], rtol=1e-5)


def test_taylor_leaves_the_training_gradients_and_buffers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    x, y = batches((6,))[0]
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    engine = run("taylor", model, (6,), sparsity=0.3, steps=2)
    assert engine.masks.sparsity() > 0
    for n, p in model.named_parameters():
        if n not in engine.params:  # the engine masks only the prunable weights' gradients
            assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n


def test_taylor_without_data_uses_the_update_step_gradients():
    model = mlp()
    method = build_method("taylor", 0.3, distribution={"name": "uniform"}, schedule=ONE_SHOT)
    engine = SparsityEngine(model, prunable_parameters(model), method, seed=0)
    engine.setup(total_steps=4, steps_per_epoch=4)
    method.input_shape = (6,)
    engine.initialize()
    x, y = batches((6,))[0]
    for step in range(4):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        engine.before_optimizer_step(step)
    assert engine.masks.sparsity() > 0.2


# -- coupled channels, sparsity rule, caps --------------------------------------------------


def test_coupled_channels_of_a_residual_add_are_pruned_together():
    model = TinyResidual()
    engine = run("structured_l1", model, (1, 5, 5), sparsity=0.4)
    masks = engine.masks
    stem = dead_rows(masks["stem.weight"])
    assert stem and stem == dead_rows(masks["branch.weight"])  # tied by the addition
    assert dead_cols(masks["branch.weight"]) == stem
    assert dead_cols(masks["head.weight"]) == stem
    net = compact(model, masks, (1, 5, 5))
    assert net.stem.out_channels == 6 - len(stem) and net.head.in_channels == 6 - len(stem)


@pytest.mark.parametrize("name", ["structured_l1", "neuron_sensitivity", "taylor"])
@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_the_realised_sparsity_counts_rows_and_consumer_columns(name, distribution):
    model = mlp()
    engine = run(name, model, (6,), sparsity=0.5, distribution=distribution)
    masks = engine.masks
    # Recount: removed rows and the columns they feed, each weight once.
    r1, r2 = dead_rows(masks["1.weight"]), dead_rows(masks["3.weight"])
    removed = len(r1) * 6 + (len(r1) * 8 + len(r2) * 10 - len(r1) * len(r2)) + len(r2) * 3
    assert masks.sparsity() == pytest.approx(removed / (60 + 80 + 24))
    report = engine.sparsity_report()["method"]
    assert report["realised"] == pytest.approx(masks.sparsity())
    assert report["channels_removed"]["1.weight"] == pytest.approx(len(r1) / 10)
    assert report["channels_removed"]["5.weight"] == 0.0
    assert engine.at_target()
    # No other whole-channel choice of the same kind is closer to the target.
    assert abs(masks.sparsity() - 0.5) < 0.06


def test_uniform_removes_the_same_fraction_of_each_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 3)
    )
    engine = run("structured_l1", model, (8,), sparsity=0.5)
    fractions = engine.sparsity_report()["method"]["channels_removed"]
    assert fractions["0.weight"] == fractions["2.weight"] > 0


def test_gradual_pruning_never_revives_a_channel():
    model = mlp()
    method = build_method("structured_l1", 0.6, distribution={"name": "global"}, schedule=CUBIC)
    engine = SparsityEngine(model, prunable_parameters(model), method, seed=0)
    engine.setup(total_steps=10, steps_per_epoch=10)
    data = batches((6,))
    engine.initialize(batches=lambda: iter(data), loss_fn=F.cross_entropy)
    previous: set[int] = set()
    sparsities = []
    for step in range(10):
        with torch.no_grad():  # let the weights move so the ranking changes
            for p in engine.params.values():
                p.add_(0.3 * torch.randn_like(p))
            engine.masks.apply_(engine.params)
        engine.before_optimizer_step(step)
        now = dead_rows(engine.masks["1.weight"])
        assert previous <= now
        previous = now
        sparsities.append(engine.masks.sparsity())
    assert sparsities == sorted(sparsities) and engine.at_target()


def test_a_sparsity_that_would_empty_a_layer_is_capped_with_a_warning():
    model = mlp()
    with pytest.warns(UserWarning, match="capped"):
        engine = run("structured_l1", model, (6,), sparsity=0.99, distribution="uniform")
    assert len(dead_rows(engine.masks["1.weight"])) == 9
    assert len(dead_rows(engine.masks["3.weight"])) == 7
    assert engine.sparsity_report()["method"]["capped"] == ["1", "3"]
    assert engine.at_target()  # as close as the cap allows
    model = mlp()
    with pytest.warns(UserWarning, match="capped"):
        engine = run("taylor", model, (6,), sparsity=0.99, distribution="global")
    assert len(dead_rows(engine.masks["1.weight"])) == 9


# -- block ------------------------------------------------------------------------------------


def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return ResNet20(num_classes=3, input_shape=(3, 8, 8))


def test_block_removes_whole_branches_and_equals_the_shortcut_model():
    model = resnet20()
    engine = run("block", model, (3, 8, 8), sparsity=0.3, distribution="global")
    report = engine.sparsity_report()["method"]
    removed = report["blocks_removed"]
    assert removed and report["at_target"]
    for name, mask in engine.masks.items():
        in_removed = any(name.startswith(f"{b}.conv") for b in removed)
        assert bool(mask.all()) != in_removed, name
    # With the removed branches' last BatchNorm silenced, the masked model is the model with
    # those blocks replaced by their shortcuts.
    with torch.no_grad():
        for b in removed:
            bn = model.get_submodule(f"{b}.bn2")
            bn.weight.zero_()
            bn.bias.zero_()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(model(x), remove_blocks(model, removed)(x), atol=1e-5)


def test_block_scores_are_the_mean_absolute_branch_weight_and_lowest_goes_first():
    model = resnet20()
    with torch.no_grad():
        for p in model.layer1[1].parameters():
            p.mul_(0.01)
    engine = run("block", model, (3, 8, 8), sparsity=0.01, distribution="global")
    assert engine.sparsity_report()["method"]["blocks_removed"] == ["layer1.1"]


def test_block_keeps_one_block_with_a_warning():
    model = resnet20()
    with pytest.warns(UserWarning, match="capped"):
        engine = run("block", model, (3, 8, 8), sparsity=0.99, distribution="global")
    assert len(engine.sparsity_report()["method"]["blocks_removed"]) == 8


def test_block_refuses_a_model_without_residual_blocks():
    with pytest.raises(ConfigError, match="residual") as err:
        run("block", mlp(), (6,), sparsity=0.5, distribution="global")
    one_line(err)


# -- errors -----------------------------------------------------------------------------------


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(F.linear(x, self.fc1.weight.detach(), self.fc1.bias)))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("structured_l1", {"distribution": {"name": "erk"}}, "distribution"),
        ("neuron_sensitivity", {"distribution": {"name": "uniform", "budget": "pruned"}}, "budget"),
        ("taylor", {"batches": 0}, "pruning.batches"),
        ("structured_l1", {"input_shape": [0, 3]}, "input_shape"),
        ("structured_l1", {"schedule": {"kind": "prune_grow"}}, "prune_grow"),
        ("block", {"distribution": {"name": "uniform"}}, "global"),
        ("structured_l1", {"distribution": {"name": "uniform", "n_m": "2:4"}}, "n_m"),
    ],
)
def test_bad_options_are_one_line_config_errors(name, options, match):
    kwargs = {"distribution": {"name": "uniform"}, "schedule": ONE_SHOT, **options}
    with pytest.raises(ConfigError, match=match) as err:
        build_method(name, 0.5, **kwargs)
    one_line(err)


def test_an_untraceable_model_fails_at_init_masks():
    with pytest.raises(ConfigError) as err:
        run("structured_l1", _Functional(), (6,), sparsity=0.5)
    assert "fc1" in one_line(err)


def test_no_input_shape_and_no_data_is_a_config_error():
    model = mlp()
    method = build_method("structured_l1", 0.5, distribution={"name": "uniform"}, schedule=ONE_SHOT)
    engine = SparsityEngine(model, prunable_parameters(model), method, seed=0)
    engine.setup(total_steps=4, steps_per_epoch=4)
    with pytest.raises(ConfigError, match="input_shape") as err:
        engine.initialize()
    one_line(err)


def test_state_round_trips_the_final_sparsity():
    engine = run("structured_l1", mlp(), (6,), sparsity=0.5)
    state = engine.method.state_dict()
    fresh = build_method("structured_l1", 0.5, distribution={"name": "uniform"}, schedule=ONE_SHOT)
    fresh.load_state_dict(state)
    assert fresh.final_sparsity == engine.method.final_sparsity
    assert fresh.input_shape == (6,)


# -- cost -------------------------------------------------------------------------------------


def test_cost_report_counts_the_compacted_model():
    model = TinyCNN()
    engine = run("structured_l1", model, (1, 4, 4), sparsity=0.5)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = cost_report(
            model,
            engine.masks,
            (1, 4, 4),
            latency_batch_sizes=(1,),
            latency_repeats=1,
        )
    net = compact(model, engine.masks, (1, 4, 4))
    assert report["params_compact"] == sum(p.numel() for p in net.parameters())
    assert report["params_compact"] < report["params_total"]
    assert report["macs_infer_compact"] < report["macs_infer_dense"]
    assert report["channels_removed"] > 0
    assert report["latency_ms/compact/b1"] > 0


def test_cost_report_has_no_compacted_figures_for_unstructured_masks():
    model = TinyCNN()
    masks = {n: torch.rand_like(p) > 0.3 for n, p in prunable_parameters(model).items()}
    report = cost_report(model, masks, (1, 4, 4), measure_latency=False)
    assert "macs_infer_compact" not in report


# -- block compaction -------------------------------------------------------------------------


def calibrated_resnet20() -> nn.Module:
    """ResNet-20 with random BatchNorm affine parameters and running statistics, so that a
    masked branch still outputs a non-zero constant (its last BatchNorm's shift)."""
    model = resnet20()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.5, generator=gen)
                m.running_mean.normal_(0.0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model.eval()


def masked_copy(model: nn.Module, masks) -> nn.Module:
    out = copy.deepcopy(model).eval()
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return out


def test_block_pruning_compacts_to_a_shallower_model_with_the_same_outputs():
    from prunelab.cost import layer_flops, structured_compaction
    from prunelab.structured import residual_blocks

    shape = (3, 8, 8)
    model = calibrated_resnet20()
    engine = run("block", model, shape, sparsity=0.5, distribution="global")
    removed = engine.sparsity_report()["method"]["blocks_removed"]
    assert len(removed) >= 2
    model.eval()
    net, report = structured_compaction(model, engine.masks, shape)
    assert report.blocks_removed == removed
    assert len(residual_blocks(net)) == 9 - len(removed)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = float((net(x) - masked_copy(model, engine.masks)(x)).abs().max())
    assert diff <= 1e-5
    assert layer_flops(net, shape).total < layer_flops(model, shape).total
    cost = cost_report(model, engine.masks, shape, measure_latency=False)
    assert cost["blocks_removed"] == len(removed)
    assert cost["macs_infer_compact"] < cost["macs_infer_dense"]


def test_compact_export_round_trips_removed_blocks(tmp_path):
    from prunelab.cost.export import export_compact, load_compact_checkpoint
    from prunelab.structured import branch_parameters, residual_blocks

    shape = (3, 8, 8)
    model = calibrated_resnet20()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model).items()}
    branches = branch_parameters(model)
    for block in ("layer1.2", "layer2.0"):
        for name in branches[block]:
            masks[name].fill_(False)
    masks["layer3.1.conv1.weight"][:20] = False  # and some channels of another block
    paths, net, report = export_compact(model, masks, shape, tmp_path)
    assert report.blocks_removed == ["layer1.2", "layer2.0"]
    assert paths["compact"].is_file() and paths["compact_onnx"].is_file()
    reloaded = load_compact_checkpoint(paths["compact"], model, masks)
    assert len(residual_blocks(reloaded)) == 7
    assert reloaded.layer3[1].conv1.out_channels == 44
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(x), net(x))
        assert float((reloaded(x) - masked_copy(model, masks)(x)).abs().max()) <= 1e-5
    # masks that remove another block do not fit the file
    other = dict(masks)
    for name in branches["layer2.0"]:
        other[name] = torch.ones_like(masks[name])
    with pytest.raises(ConfigError, match="residual blocks") as err:
        load_compact_checkpoint(paths["compact"], model, other)
    one_line(err)
