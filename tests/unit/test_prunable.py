"""Which weights pruning touches, and which weight matrices it leaves out."""

from __future__ import annotations

import pytest
from torch import nn

from prunelab.models import MLP, ResNet20, prunable_parameters, unpruned_share, unpruned_weights


class _Mixed(nn.Module):
    """Layers of every kind: prunable (Conv2d, Linear) and left out (the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)  # 40
        self.conv3d = nn.Conv3d(1, 2, 3)  # 54
        self.deconv = nn.ConvTranspose2d(2, 3, 2)  # 24
        self.attn = nn.MultiheadAttention(4, 2)  # in_proj 48, out_proj 16 (a Linear)
        self.conv = nn.Conv2d(1, 2, 3)  # 18
        self.norm = nn.BatchNorm2d(2)
        self.fc = nn.Linear(4, 5)  # 20


def test_unpruned_weights_names_every_matrix_left_out():
    model = _Mixed()
    prunable = prunable_parameters(model)
    assert set(prunable) == {"attn.out_proj.weight", "conv.weight", "fc.weight"}
    unpruned = unpruned_weights(model, prunable)
    assert unpruned == {
        "embed.weight": 40,
        "conv3d.weight": 54,
        "deconv.weight": 24,
        "attn.in_proj_weight": 48,
    }
    total = 40 + 54 + 24 + 48 + 16 + 18 + 20  # every weight with two or more dimensions
    assert unpruned_share(model, prunable) == pytest.approx((40 + 54 + 24 + 48) / total)
    assert unpruned_weights(model) == unpruned  # default: prunable_parameters(model)


def test_zoo_models_leave_no_matrix_out():
    for model in (MLP((40,), 10), ResNet20((3, 32, 32), 10)):
        assert unpruned_weights(model) == {}
        assert unpruned_share(model) == 0.0


def test_a_model_without_matrices_has_share_zero():
    assert unpruned_share(nn.BatchNorm1d(3)) == 0.0
