"""The index operations of a mask update give the same tensors through numpy (CPU) and
through torch (the path GPUs and bfloat16 take)."""

import math

import pytest
import torch

from prunelab.sparsity import indices


def _both(monkeypatch, fn):
    """``fn()`` through numpy, then through torch's own operations."""
    through_numpy = fn()
    with monkeypatch.context() as m:
        m.setattr(indices, "numpy_backed", lambda *tensors: False)
        through_torch = fn()
    return through_numpy, through_torch


def test_index_operations_agree_through_numpy_and_torch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5000, generator=g)
    flags = torch.rand(5000, generator=g) < 0.1
    index = torch.randperm(5000, generator=g)[:300].sort().values
    other = torch.randperm(5000, generator=g)[:200].sort().values
    cases = {
        "gather": lambda: indices.gather(values, index),
        "select": lambda: indices.select(values, flags),
        "flatnonzero": lambda: indices.flatnonzero(flags),
        "without": lambda: indices.without(index, torch.tensor([0, 5, 299])),
        "merge_sorted": lambda: indices.merge_sorted(index, other),
        "fill_float": lambda: indices.fill_(values.clone(), index, -math.inf),
        "fill_bool": lambda: indices.fill_(flags.clone(), index, True),
    }
    for name, fn in cases.items():
        a, b = _both(monkeypatch, fn)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert indices.count(flags) == int(flags.count_nonzero())
    assert torch.equal(indices.flatnonzero(flags), flags.nonzero()[:, 0])
    rest = [i for i in range(300) if i not in (0, 5, 299)]
    assert torch.equal(indices.without(index, torch.tensor([0, 5, 299])), index[rest])
    assert torch.equal(indices.merge_sorted(index, other), torch.cat([index, other]).sort().values)


def test_numpy_is_used_only_where_it_can_hold_the_tensor():
    assert indices.numpy_backed(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    assert not indices.numpy_backed(torch.zeros(3, dtype=torch.bfloat16))
    bf16 = torch.arange(6, dtype=torch.bfloat16)
    assert torch.equal(indices.gather(bf16, torch.tensor([1, 4])), bf16[[1, 4]])


def test_fill_leaves_a_tensor_that_requires_grad_to_torch():
    weight = torch.nn.Parameter(torch.ones(6))
    with torch.no_grad():
        indices.fill_(weight.view(-1), torch.tensor([1, 3]), 0.0)
    assert weight.tolist() == [1, 0, 1, 0, 1, 1]
    with torch.no_grad():  # (a write autograd knows of)
        before = weight._version
        indices.fill_(weight.view(-1), torch.tensor([0]), 0.0)
    assert weight._version > before
    with pytest.raises(RuntimeError):  # outside no_grad, torch refuses, as index_fill_ does
        indices.fill_(weight, torch.tensor([0]), 0.0)
