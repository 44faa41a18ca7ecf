"""Structured pruning core: channel groups (Torch-Pruning's DepGraph), compaction that equals
the masked model, residual-block removal, and one-line errors for models it cannot trace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.cost.flops import layer_flops
from prunelab.errors import ConfigError
from prunelab.models import (
    MLP,
    VGG16,
    WRN22_2,
    CifarResNet,
    Conv4,
    LeNet5,
    ResNet20,
    prunable_parameters,
)
from prunelab.sparsity.masks import Masks
from prunelab.structured import (
    BiasMapConv2d,
    channel_groups,
    channel_norms,
    compact,
    compact_with_blocks,
    compact_with_report,
    removable_channels,
    remove_blocks,
    residual_blocks,
    structured_masks,
)

CIFAR = (3, 32, 32)


def _calibrate(model: nn.Module, shape, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics from a few train-mode
    passes, so that removed channels leave non-zero constants behind; eval mode after."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.5, generator=gen)
        model.train()
        for _ in range(2):
            model(torch.randn(4, *shape, generator=gen))
    return model.eval()


def _random_masks(model: nn.Module, shape, fraction: float = 0.5, seed: int = 1):
    groups = channel_groups(model, shape)
    gen = torch.Generator().manual_seed(seed)
    pruned = {g.root: torch.rand(g.size, generator=gen) < fraction for g in groups}
    return groups, structured_masks(model, groups, pruned)


def _masked(model: nn.Module, masks) -> nn.Module:
    out = copy.deepcopy(model).eval()
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return out


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _max_diff(a: nn.Module, b: nn.Module, shape, batch: int = 3) -> float:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def _macs(model: nn.Module, shape) -> float:
    return layer_flops(model, shape).total / 2


# -- groups ---------------------------------------------------------------------------------


def test_resnet20_groups_tie_the_residual_stream_and_leave_out_the_classifier():
    model = ResNet20(CIFAR, 10)
    groups = channel_groups(model, CIFAR)
    roots = [g.root for g in groups]
    assert "fc" not in roots
    # one residual-stream group per stage plus the first conv of each of the 9 blocks
    assert len(groups) == 3 + 9
    stem = groups[roots.index("conv1")]
    assert stem.size == 16
    assert stem.producers == (
        "conv1.weight",
        "layer1.0.conv2.weight",
        "layer1.1.conv2.weight",
        "layer1.2.conv2.weight",
    )
    params = set(stem.params)
    assert {("bn1.weight", 0), ("bn1.bias", 0), ("layer1.0.bn2.bias", 0)} <= params
    assert {("layer1.1.conv1.weight", 1), ("layer2.0.shortcut.0.weight", 1)} <= params
    assert ("layer2.0.conv1.weight", 1) in params
    assert stem.slice("bn1.running_mean").buffer
    # the stage-2 stream is rooted at its first producer in module order
    stage2 = next(g for g in groups if "layer2.0.shortcut.0.weight" in g.producers)
    assert stage2.root == "layer2.0.conv2"
    assert ("fc.weight", 1) in set(groups[roots.index("layer3.0.conv2")].params)
    # every prunable conv produces the channels of exactly one group
    produced = [p for g in groups for p in g.producers]
    assert sorted(produced) == sorted(n for n in prunable_parameters(model) if n != "fc.weight")


def test_groups_map_channels_through_flatten_and_residual_mlp():
    lenet = LeNet5((1, 28, 28), 10)
    groups = {g.root: g for g in channel_groups(lenet, (1, 28, 28))}
    assert list(groups) == ["features.0", "features.2", "classifier.1"]
    flat = groups["features.2"].slice("classifier.1.weight")
    assert (flat.dim, flat.role, len(flat.index)) == (1, "in", 50 * 4 * 4)
    assert len(groups["features.2"].positions("classifier.1.weight", [3])) == 16

    mlp = MLP((40,), 10, hidden=(8, 8), residual=True)
    (group,) = channel_groups(mlp, (40,))  # the skip ties both hidden layers' neurons
    assert group.root == "layers.0" and group.size == 8
    assert group.producers == ("layers.0.weight", "layers.1.weight")
    assert set(group.consumers) == {"layers.1.weight", "head.weight"}
    assert len(channel_groups(MLP((40,), 10, hidden=(8, 8)), (40,))) == 2


def test_a_channel_is_removable_only_when_every_coupled_producer_is_pruned():
    model = ResNet20(CIFAR, 10)
    groups = channel_groups(model, CIFAR)
    masks = Masks.dense_like(prunable_parameters(model))
    masks["conv1.weight"] = masks["conv1.weight"].index_fill(0, torch.tensor([2]), False)
    assert not removable_channels(model, groups, masks)["conv1"].any()
    full = structured_masks(model, groups, {"conv1": [2, 5]})
    removable = removable_channels(model, groups, full)["conv1"]
    assert torch.nonzero(removable).flatten().tolist() == [2, 5]
    net, report = compact_with_report(model, full, CIFAR)
    assert report.removed == {"conv1": (2, 5)}
    assert net.layer1[1].conv2.out_channels == 14 and net.layer2[0].conv1.in_channels == 14


def test_channel_norms_sum_over_coupled_producers():
    model = ResNet20(CIFAR, 10)
    group = channel_groups(model, CIFAR)[0]
    expected = sum(
        dict(model.named_parameters())[n].detach().abs().flatten(1).sum(1).double()
        for n in group.producers
    )
    assert torch.allclose(channel_norms(model, group, p=1), expected)


# -- compaction equals the masked model -----------------------------------------------------

MODELS = {
    "mlp": (lambda: MLP((40,), 10, hidden=(32, 32)), (40,)),
    "mlp_residual": (lambda: MLP((40,), 10, hidden=(32, 32, 32), residual=True), (40,)),
    "lenet5": (lambda: LeNet5((1, 28, 28), 10), (1, 28, 28)),
    "conv4": (lambda: Conv4(CIFAR, 10), CIFAR),
    "vgg16_bn": (lambda: VGG16(CIFAR, 10), CIFAR),
    "resnet20": (lambda: ResNet20(CIFAR, 10), CIFAR),
    "resnet20_pad_shortcut": (lambda: ResNet20(CIFAR, 10, shortcut="A"), CIFAR),
    "wrn22_2": (lambda: WRN22_2(CIFAR, 10), CIFAR),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_compacted_model_is_smaller_and_computes_the_masked_model(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = _calibrate(build(), shape)
    before = copy.deepcopy(model.state_dict())
    groups, masks = _random_masks(model, shape)
    net, report = compact_with_report(model, masks, shape)

    assert report.channels_removed > 0
    assert _n_params(net) < _n_params(model)
    assert report.params_after == _n_params(net)
    assert _max_diff(net, _masked(model, masks), shape) < 1e-5
    assert _macs(net, shape) < _macs(model, shape)
    # the original is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the report's channels match the layers
    for layer, ch in report.layers.items():
        module = net.get_submodule(layer)
        out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        assert out == ch.out_after
    if name in ("vgg16_bn", "resnet20", "wrn22_2"):  # BN shifts were folded, not dropped
        assert report.bias_maps or report.folded


def test_without_bias_maps_channels_feeding_padded_convs_with_a_constant_are_kept():
    model = _calibrate(ResNet20(CIFAR, 10), CIFAR)
    _, masks = _random_masks(model, CIFAR)
    net, report = compact_with_report(model, masks, CIFAR, bias_maps=False)
    assert not any(isinstance(m, BiasMapConv2d) for m in net.modules())
    assert report.kept and report.channels_removed > 0
    assert _max_diff(net, _masked(model, masks), CIFAR) < 1e-5
    # with zero BN shifts (a fresh model) every pruned channel goes, even without bias maps
    fresh = ResNet20(CIFAR, 10).eval()
    groups, masks = _random_masks(fresh, CIFAR)
    _, report = compact_with_report(fresh, masks, CIFAR, bias_maps=False)
    assert not report.kept
    removable = removable_channels(fresh, groups, masks)
    assert report.channels_removed == sum(int(v.sum()) for v in removable.values())


def test_a_fully_pruned_group_keeps_one_channel():
    model = MLP((40,), 10, hidden=(16, 16))
    groups = channel_groups(model, (40,))
    masks = structured_masks(model, groups, {"layers.0": range(16)})
    net, report = compact_with_report(model, masks, (40,))
    assert report.kept == {"layers.0": (0,)} and report.removed == {"layers.0": tuple(range(1, 16))}
    assert net.layers[0].out_features == 1
    assert _max_diff(net, _masked(model, masks), (40,)) < 1e-5


def test_compact_takes_plain_dict_masks_and_unstructured_zeros_stay():
    model = MLP((40,), 10, hidden=(16, 16))
    masks = {n: torch.rand(p.shape) > 0.5 for n, p in prunable_parameters(model).items()}
    net = compact(model, masks, (40,))
    assert _n_params(net) == _n_params(model)  # no whole row pruned: nothing to remove
    assert _max_diff(net, _masked(model, masks), (40,)) < 1e-6


def test_compact_rejects_masks_that_do_not_fit():
    model = MLP((40,), 10, hidden=(16, 16))
    with pytest.raises(ConfigError, match="not a model parameter"):
        compact(model, {"nope.weight": torch.ones(3, dtype=torch.bool)}, (40,))
    with pytest.raises(ConfigError, match="has shape"):
        compact(model, {"layers.0.weight": torch.ones(3, dtype=torch.bool)}, (40,))
    with pytest.raises(ConfigError, match="no channel group has root"):
        structured_masks(model, channel_groups(model, (40,)), {"head": [0]})


# -- residual blocks ------------------------------------------------------------------------


def _zero_branches(model: nn.Module, names) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            block = out.get_submodule(name)
            if hasattr(block, "bn2") and isinstance(out, CifarResNet):
                block.bn2.weight.zero_()  # the branch ends in bn2: its output is 0
                block.bn2.bias.zero_()
            else:
                block.conv2.weight.zero_()  # pre-activation: the branch ends in conv2
    return out


def test_resnet20_blocks_replaced_by_their_shortcuts_equal_zeroed_branches():
    model = _calibrate(ResNet20(CIFAR, 10), CIFAR)
    blocks = residual_blocks(model)
    assert len(blocks) == 9
    assert blocks["layer1.0"] == "identity" and blocks["layer2.0"] == "projection"
    names = ["layer1.1", "layer2.0", "layer3.2"]
    smaller = remove_blocks(model, names, exact=False)  # the branches' constants dropped
    assert "layer2.0.shortcut.0.weight" in dict(smaller.named_parameters())
    assert set(residual_blocks(smaller)) == set(blocks) - set(names)
    assert _n_params(smaller) < _n_params(model)
    assert _max_diff(smaller, _zero_branches(model, names), CIFAR) < 1e-5
    assert _macs(smaller, CIFAR) < _macs(model, CIFAR)
    # the result still has channel groups and compacts exactly
    _, masks = _random_masks(smaller, CIFAR)
    assert _max_diff(compact(smaller, masks, CIFAR), _masked(smaller, masks), CIFAR) < 1e-5


def test_wrn_and_pad_shortcut_blocks_are_removable():
    wrn = _calibrate(WRN22_2(CIFAR, 10), CIFAR)
    names = ["layer1.0", "layer2.1", "layer3.0"]  # projection, identity, projection
    assert [residual_blocks(wrn)[n] for n in names] == ["projection", "identity", "projection"]
    assert _max_diff(remove_blocks(wrn, names), _zero_branches(wrn, names), CIFAR) < 1e-5
    pad = _calibrate(ResNet20(CIFAR, 10, shortcut="A"), CIFAR)
    assert residual_blocks(pad)["layer3.0"] == "zero_pad"
    names = ["layer2.0", "layer3.1"]
    smaller = remove_blocks(pad, names, exact=False)
    assert _max_diff(smaller, _zero_branches(pad, names), CIFAR) < 1e-5


def test_remove_blocks_names_the_removable_blocks_on_a_bad_name():
    with pytest.raises(ConfigError) as err:
        remove_blocks(ResNet20(CIFAR, 10), ["layer4.0"])
    assert "\n" not in str(err.value) and "layer1.0, layer1.1" in str(err.value)


# -- models the graph cannot trace ----------------------------------------------------------


class _FunctionalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.fc(x)), self.w)


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).detach())


class _InputSkip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(x + self.fc1(x))


@pytest.mark.parametrize(
    ("model", "shape", "names"),
    [
        (_FunctionalHead(), (4,), "parameter 'w'"),
        (_Detached(), (4,), "layer 'fc1' (Linear) is not in the dependency graph"),
        (LeNet5((1, 28, 28), 10), (1, 8, 8), "module 'features.2' (Conv2d) failed"),
    ],
)
def test_a_model_the_graph_cannot_trace_gives_one_config_error_line(model, shape, names):
    for call in (lambda: channel_groups(model, shape), lambda: compact(model, {}, shape)):
        with pytest.raises(ConfigError) as err:
            call()
        assert names in str(err.value) and "\n" not in str(err.value)


def test_channels_tied_to_the_model_input_are_not_a_group():
    model = _InputSkip()  # fc1's outputs are added to the input: not removable
    assert channel_groups(model, (4,)) == []
    with pytest.raises(ConfigError, match="input_shape"):
        channel_groups(model, (0,))


def test_frozen_models_are_traced_and_their_modes_restored():
    model = ResNet20(CIFAR, 10).requires_grad_(False).train()
    assert len(channel_groups(model, CIFAR)) == 12
    assert model.training and not any(p.requires_grad for p in model.parameters())


def test_the_check_catches_a_compacted_model_that_differs(monkeypatch):
    from prunelab.structured import compaction

    model = _calibrate(ResNet20(CIFAR, 10), CIFAR)
    _, masks = _random_masks(model, CIFAR)
    # drop the folded constants of removed channels: the outputs change, and the check says so
    original = compaction._contribution
    monkeypatch.setattr(compaction, "_contribution", lambda *a: 0 * original(*a))
    with pytest.raises(ConfigError, match="differ from the masked model's") as err:
        compact(model, masks, CIFAR)
    assert "\n" not in str(err.value)


# -- block compaction ---------------------------------------------------------------------------

SMALL = (3, 16, 16)


def _branch_masks(model: nn.Module, blocks, masks=None) -> dict:
    """``masks`` (default: all True over the prunable weights) with the branches of
    ``blocks`` fully masked."""
    from prunelab.structured import branch_parameters

    out = {
        n: (masks[n].clone() if masks is not None else torch.ones_like(p, dtype=torch.bool))
        for n, p in prunable_parameters(model).items()
    }
    branches = branch_parameters(model)
    for block in blocks:
        for name in branches[block]:
            out[name].fill_(False)
    return out


@pytest.mark.parametrize(
    ("shortcut", "blocks"),
    [("B", ["layer1.1", "layer2.0", "layer3.2"]), ("A", ["layer1.2", "layer3.0"])],
)
def test_structured_compaction_removes_fully_masked_blocks_exactly(shortcut, blocks):
    from prunelab.cost import structured_compaction

    model = _calibrate(ResNet20(SMALL, 10, shortcut=shortcut), SMALL)
    kinds = residual_blocks(model)
    assert {kinds[b] for b in blocks} - {"identity"}  # a projection / zero-pad block is among them
    masks = _branch_masks(model, blocks)
    net, report = structured_compaction(model, masks, SMALL)
    assert report.blocks_removed == blocks and report.changed
    assert set(residual_blocks(net)) == set(kinds) - set(blocks)
    names = dict(net.named_modules())
    assert all(f"{b}.conv1" not in names for b in blocks)
    assert _max_diff(net, _masked(model, masks), SMALL) < 1e-5
    assert _macs(net, SMALL) < _macs(model, SMALL)
    # the internal channels of the removed branches count as removed; their layers are empty
    assert report.removed[f"{blocks[0]}.conv1"] == tuple(range(16))
    assert report.layers[f"{blocks[0]}.conv2"].out_after == 0
    assert report.params_before == _n_params(model) and report.params_after == _n_params(net)
    # the constant the masked branch still outputs matters: dropping it changes the logits
    inexact = remove_blocks(model, blocks, exact=False)
    assert _max_diff(inexact, _masked(model, masks), SMALL) > 1e-3


def test_block_and_channel_compaction_combine():
    model = _calibrate(ResNet20(SMALL, 10), SMALL)
    _, channels = _random_masks(model, SMALL, fraction=0.4)
    blocks = ["layer1.1", "layer2.0"]
    masks = _branch_masks(model, blocks, channels)
    net, report = compact_with_blocks(model, masks, SMALL)
    assert report.blocks_removed == blocks
    assert len(residual_blocks(net)) == 7
    # channels of surviving layers went too: in a block, in the residual stream (whose
    # ChannelBias is sliced with it), after the projection
    assert net.layer3[0].conv1.out_channels < 64
    assert net.layer1[1].shift.bias.numel() == net.layer1[0].conv2.out_channels < 16
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert _max_diff(net, _masked(model, masks), SMALL) < 1e-5
    assert _n_params(net) < _n_params(compact_with_report(model, masks, SMALL)[0])


def test_wrn_block_compaction_keeps_the_bias_of_the_last_branch_conv():
    model = WRN22_2(SMALL, 10)
    block = model.layer2[1]  # identity shortcut; its branch ends in conv2: give it a bias
    block.conv2.bias = nn.Parameter(torch.randn(block.conv2.out_channels))
    model = _calibrate(model, SMALL)
    masks = _branch_masks(model, ["layer2.1"])
    net, report = compact_with_blocks(model, masks, SMALL)
    assert report.blocks_removed == ["layer2.1"]
    assert "layer2.1" not in residual_blocks(net) and len(residual_blocks(net)) == 8
    assert torch.allclose(net.layer2[1].shift.bias, block.conv2.bias)
    assert _max_diff(net, _masked(model, masks), SMALL) < 1e-5
    # without a bias the branch outputs zero: the block becomes the identity
    plain = _calibrate(WRN22_2(SMALL, 10), SMALL)
    net = remove_blocks(plain, ["layer2.1"])
    assert isinstance(net.layer2[1], nn.Identity)


def test_remove_blocks_refuses_a_branch_whose_constant_varies():
    model = _calibrate(ResNet20(SMALL, 10), SMALL)
    conv = model.layer1[1].conv2
    mapped = BiasMapConv2d(16, 16, 3, padding=1, bias=False)
    mapped.weight.data.copy_(conv.weight.data)
    mapped.register_buffer("bias_map", torch.randn(16, 16, 16))
    model.layer1[1].conv2 = mapped
    with pytest.raises(ConfigError, match="layer1.1") as err:
        remove_blocks(model, ["layer1.1"])
    assert "\n" not in str(err.value)
    assert isinstance(remove_blocks(model, ["layer1.1"], exact=False).layer1[1], nn.ReLU)
