"""Sparse kernels of a masked Linear, the fused chain, the autotune and its cache.

Layers are tiny and the autotune's timing minimal (one round of sub-millisecond blocks), so
each test runs in well under two seconds once numba's kernels are compiled (cached on disk).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.cost import latency
from prunelab.cost.latency import (
    KERNELS,
    FusedLinearChain,
    SparseChain,
    SparseLinear,
    block_size,
    build_sparse_model,
)
from prunelab.errors import ConfigError
from prunelab.models import MLP, prunable_parameters

HAS_NUMBA = latency._numba_kernels() is not None
FAST = {"tune_rounds": 1, "tune_min_block_s": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile numba's kernels once (seconds on a fresh checkout, then read from numba's
    on-disk cache), so that no single test pays for it; the first parallel call (which
    starts numba's OpenMP pool) is made with torch set to one thread, and whether torch kept
    that count is returned."""
    if not HAS_NUMBA:
        return True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer = masked_linear(8, 8, torch.rand(8, 8) < 0.5)
        fused = FusedLinearChain([layer.weight], [layer.bias], [False])
        split = FusedLinearChain([layer.weight], [layer.bias], [False], split_small=True)
        with torch.inference_mode():
            fused(torch.randn(9, 8))
            kept = torch.get_num_threads() == 1
            split(torch.randn(1, 8))
            for batch in (1, 9):
                SparseLinear(layer, kernel="numba_csr")(torch.randn(batch, 8))
                fused(torch.randn(batch, 8))
            kept = kept and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    return kept


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_numba_kernels_leave_torch_threads_alone(compiled_kernels):
    assert compiled_kernels


def block_mask(shape: tuple[int, int], block: tuple[int, int], density: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape[0] // block[0], shape[1] // block[1]
    kept = torch.rand(rows, cols, generator=generator) < density
    return kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def masked_linear(out_f: int, in_f: int, mask: torch.Tensor) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer.eval()


def small_mlp() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An MLP 64-32-16-10 at ~80% sparsity with dead inputs (columns 0-5 of the first layer)
    and a dead hidden neuron (row 3 of the first layer)."""
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10, hidden=(32, 16)).eval()
    generator = torch.Generator().manual_seed(1)
    masks = {
        n: torch.rand(p.shape, generator=generator) < 0.2
        for n, p in prunable_parameters(model).items()
    }
    masks["layers.0.weight"][:, :6] = False
    masks["layers.0.weight"][3] = False
    return model, masks


def masked_model(model: nn.Module, masks) -> nn.Module:
    return latency._masked_copy(model, masks)


def kernels_to_test() -> list[str]:
    return [k for k in KERNELS if HAS_NUMBA or not k.startswith("numba")]


@pytest.mark.parametrize("kernel", kernels_to_test())
def test_each_kernel_equals_the_masked_layer(kernel):
    mask = block_mask((24, 32), (4, 4), 0.3)
    layer = masked_linear(24, 32, mask)
    sparse = SparseLinear(layer, kernel=kernel)
    assert sparse.kernel == kernel and (sparse.blocksize == (4, 4)) == kernel.endswith("_bsr")
    with torch.inference_mode():
        for batch in (1, 5, 40):
            x = torch.randn(batch, 32)
            ref = F.linear(x, layer.weight, layer.bias)
            assert torch.allclose(sparse(x), ref, atol=1e-5), (kernel, batch)
            assert torch.allclose(sparse.forward_t(x.t().contiguous()).t(), ref, atol=1e-5)
        x = torch.randn(2, 3, 32)  # leading dimensions are kept
        assert torch.allclose(sparse(x), layer(x), atol=1e-5)


def test_kernel_arguments_are_checked():
    layer = masked_linear(8, 8, torch.rand(8, 8) < 0.5)
    with pytest.raises(ConfigError, match="unknown sparse kernel"):
        SparseLinear(layer, kernel="magic")
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0, 1] = False  # not block-constant at any size
    with pytest.raises(ConfigError, match="block-structured"):
        SparseLinear(masked_linear(8, 8, mask), kernel="torch_bsr")


def test_block_size_is_the_largest_that_fits():
    assert block_size(block_mask((16, 32), (4, 4), 0.5)) == (4, 4)
    assert block_size(block_mask((16, 32), (1, 4), 0.5, seed=3)) == (1, 4)
    assert block_size(block_mask((32, 32), (8, 8), 0.5)) == (8, 8)
    assert block_size(torch.eye(8)) is None
    assert block_size(torch.ones(3)) is None


def test_autotune_false_keeps_the_csr_path():
    model, masks = small_mlp()
    sparse = build_sparse_model(model, masks)
    layers = (*sparse.layers, sparse.head)
    assert all(isinstance(m, SparseLinear) and m.kernel == "torch_csr" for m in layers)
    assert sparse.kernels == {"layers.0": "torch_csr", "layers.1": "torch_csr", "head": "torch_csr"}
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), masked_model(model, masks)(x), atol=1e-5)


def test_compacted_chain_drops_dead_inputs_and_neurons():
    model, masks = small_mlp()
    ref = masked_model(model, masks)
    names, linears, acts, flatten, keep, in_features = latency._chain_parts(ref)
    assert names == ["layers.0", "layers.1", "head"] and flatten and in_features == 64
    w0 = ref.layers[0].weight
    used = (w0 != 0).any(0)
    assert not bool(used[:6].any())
    assert torch.equal(keep, torch.nonzero(used).flatten())
    assert linears[0].in_features == int(used.sum()) <= 58
    assert linears[0].out_features <= 31  # the dead neuron 3 is gone
    assert linears[1].in_features == linears[0].out_features
    assert [len(a) for a in acts] == [1, 1, 0]
    chain = SparseChain([SparseLinear(m, kernel="dense") for m in linears], acts, keep)
    x = torch.randn(7, 1, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(chain(x), ref(x), atol=1e-5)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
@pytest.mark.parametrize(
    ("formats", "split"),
    [(["csr", "csr", "csr"], False), (["dense", "csr", "dense"], False), (["csr"] * 3, True)],
)
def test_fused_chain_equals_the_masked_model(formats, split, monkeypatch):
    model, masks = small_mlp()
    ref = masked_model(model, masks)
    _, linears, _, _, keep, _ = latency._chain_parts(ref)
    monkeypatch.setattr(FusedLinearChain, "split_min_work", 100)  # split the tiny layers too
    fused = FusedLinearChain(
        [m.weight for m in linears],
        [m.bias for m in linears],
        [True, True, False],
        formats,
        16,
        keep,
        split_small=split,
    )
    with torch.inference_mode():
        for batch in (1, 7, 8, 37):  # sample by sample, then tiles of 16 (the last partial)
            x = torch.randn(batch, 1, 8, 8)
            assert torch.allclose(fused(x), ref(x), atol=1e-5), batch


@pytest.mark.parametrize("batch", [1, 16])
def test_autotuned_chain_equals_the_masked_model(tmp_path, batch):
    model, masks = small_mlp()
    path = tmp_path / "kernels.json"
    sparse = build_sparse_model(model, masks, autotune=True, batch_size=batch, cache=path, **FAST)
    assert isinstance(sparse, SparseChain | FusedLinearChain)
    assert set(sparse.kernels) == {"layers.0", "layers.1", "head"}
    x = torch.randn(batch, 1, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), masked_model(model, masks)(x), atol=1e-5)
    assert path.is_file()


def test_cache_is_written_read_back_and_keyed(tmp_path, monkeypatch):
    model, masks = small_mlp()
    path = tmp_path / "kernels.json"
    tune = {**FAST, "kernels": ("dense", "torch_csr")}  # two candidates: quick
    threads = torch.get_num_threads()
    first = build_sparse_model(model, masks, autotune=True, batch_size=4, cache=path, **tune)
    blob = json.loads(path.read_text())
    keys = list(blob["entries"])
    assert blob["version"] == latency._CACHE_VERSION
    assert any(k.startswith("chain|") for k in keys) and any(k.startswith("linear|") for k in keys)
    assert all(f"|b4|t{threads}|torch{torch.__version__}|" in k for k in keys)
    assert all(latency.cpu_model() in k for k in keys)

    raced = []
    original = latency._race
    monkeypatch.setattr(latency, "_race", lambda *a, **k: raced.append(1) or original(*a, **k))
    again = build_sparse_model(model, masks, autotune=True, batch_size=4, cache=path, **tune)
    assert raced == [] and again.kernels == first.kernels  # read back, nothing timed
    other = 1 if threads > 1 else 2
    try:
        torch.set_num_threads(other)
        build_sparse_model(model, masks, autotune=True, batch_size=4, cache=path, **tune)
    finally:
        torch.set_num_threads(threads)
    assert raced  # another thread count: tuned again
    keys = json.loads(path.read_text())["entries"]
    assert any(f"|t{other}|" in k for k in keys) and any(f"|t{threads}|" in k for k in keys)
    raced.clear()
    build_sparse_model(model, masks, autotune=True, batch_size=5, cache=path, **tune)
    assert raced  # another batch size too


def test_unreadable_cache_reads_as_empty(tmp_path):
    path = tmp_path / "kernels.json"
    path.write_text("{not json")
    cache = latency.KernelCache(path)
    assert cache.entries == {}
    cache.put("k", {"kernel": "dense"})
    assert latency.KernelCache(path).get("k") == {"kernel": "dense"}


def test_autotune_in_a_model_that_is_not_a_chain(tmp_path):
    class ConvFc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.fc = nn.Linear(36, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model = ConvFc().eval()
    masks = {"conv.weight": torch.rand(4, 2, 3, 3) < 0.3, "fc.weight": torch.rand(5, 36) < 0.2}
    sparse = build_sparse_model(
        model, masks, autotune=True, batch_size=3, cache=tmp_path / "k.json", **FAST
    )
    assert isinstance(sparse.conv, nn.Conv2d)
    assert set(sparse.kernels) == {"fc"} and sparse.kernels["fc"] in KERNELS
    x = torch.randn(3, 2, 5, 5)
    with torch.inference_mode():
        assert torch.allclose(sparse(x), masked_model(model, masks)(x), atol=1e-5)


def test_latency_report_records_kernels_and_threads(tmp_path, monkeypatch):
    model, masks = small_mlp()

    def fake_measure(net, input_shape, batch_sizes, repeats, min_block_s=0.01):
        return {f"b{b}": {"latency_ms": 1.0} for b in batch_sizes}

    monkeypatch.setattr(latency, "measure_latency", fake_measure)
    monkeypatch.setattr(latency, "_race", lambda fns, *a: {n: float(i) for i, n in enumerate(fns)})
    out = latency.latency_report(
        model, masks, (1, 8, 8), (1, 4), repeats=1, kernel_cache=tmp_path / "k.json"
    )
    assert out["latency_threads"] == torch.get_num_threads()
    assert out["latency_ms/sparse/b1"] == out["latency_ms/sparse/b4"] == 1.0
    assert set(out["latency_kernels"]) == {"b1", "b4"}
    # The fake timing ranks candidates in the order tried: the first kernel of each race wins.
    assert out["latency_kernels"]["b1"] == {n: "dense" for n in ("layers.0", "layers.1", "head")}
