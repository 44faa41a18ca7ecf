"""The Lightning module's own bookkeeping: training statistics and its attribute fast path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.module import ClassificationModule, TrainStats


def _batches(sizes: list[int], classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        logits = torch.randn(n, classes, generator=g)
        targets = torch.randint(0, classes, (n,), generator=g)
        yield F.cross_entropy(logits, targets), logits, targets


@pytest.mark.parametrize(
    ("window", "max_elements"), [(1, 1 << 22), (2, 1 << 22), (50, 1 << 22), (50, 30)]
)
def test_train_stats_equal_the_per_sample_loss_and_accuracy(window, max_elements):
    sizes = [7, 7, 7, 3, 7]
    batches = list(_batches(sizes))
    stats = TrainStats(window=window, max_elements=max_elements)
    windows = [w for b in batches if (w := stats.add(*b)) is not None]
    loss, acc = stats.epoch_totals()
    logits = torch.cat([b[1] for b in batches])
    targets = torch.cat([b[2] for b in batches])
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert acc.item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    if window == 1:  # each window is one batch: its own mean loss
        assert [w.item() for w in windows] == pytest.approx([b[0].item() for b in batches])
    if window == 2:  # the first window averages the first two batches by sample
        assert windows[0].item() == pytest.approx((batches[0][0] + batches[1][0]).item() / 2)


def test_train_stats_reset_and_empty_epoch():
    stats = TrainStats(window=3)
    assert stats.epoch_totals() is None
    for batch in _batches([4, 4]):
        stats.add(*batch)
    stats.reset()
    assert stats.epoch_totals() is None


def test_train_stats_keep_no_autograd_graph():
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    stats = TrainStats(window=10)
    stats.add(loss, logits, y)
    assert all(not t.requires_grad for t in stats._losses + stats._logits)


def test_module_fast_attribute_path_keeps_module_registration():
    module = ClassificationModule(nn.Linear(4, 3), num_classes=3, optimizer=torch.optim.SGD)
    module._current_fx_name = "training_step"
    assert module._current_fx_name == "training_step"
    assert "_current_fx_name" not in module._modules
    module.extra = nn.Linear(3, 3)  # the ordinary path still registers submodules
    module.scale = nn.Parameter(torch.ones(()))  # ... and parameters
    assert "extra" in module._modules and "scale" in module._parameters
