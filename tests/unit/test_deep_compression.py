"""Deep Compression (Han, Mao & Dally 2016): k-means weight sharing with linear initialisation,
centroid fine-tuning by summed gradients, relative indices with filler zeros, canonical
Huffman coding, the compressed file's exact round trip, and bad bit widths."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
import sklearn.cluster
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import ConfigError
from prunelab.quantize import deep_compression as dc
from prunelab.quantize import huffman


class Tiny(nn.Module):
    """A conv layer with BatchNorm (buffers, an int64 counter) and two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 40)
        self.fc2 = nn.Linear(40, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


def random_masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                masks[name] = torch.rand(p.shape, generator=gen) < density
                p.mul_(masks[name])
    return masks


def test_linear_init_and_at_most_2_pow_bits_clusters(monkeypatch):
    torch.manual_seed(0)
    weight = torch.randn(30, 20)
    mask = torch.rand(30, 20) < 0.5
    inits = []
    real = sklearn.cluster.KMeans

    def spy(*args, **kwargs):
        inits.append(np.array(kwargs["init"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sklearn.cluster, "KMeans", spy)
    codebook, assignments = dc.cluster_weights(weight, mask, bits=3)
    kept = weight[mask].double()
    # linear initialisation: 2**3 - 1 centroids evenly over [min, max] of the surviving weights
    expected = np.linspace(kept.min().item(), kept.max().item(), 7).reshape(-1, 1)
    assert len(inits) == 1 and np.allclose(inits[0], expected)
    assert len(codebook) <= 2**3 and codebook[0] == 0
    assert torch.all(codebook[1:].diff() > 0)  # ascending, distinct
    assert assignments[mask].min() >= 1 and assignments[mask].max() <= len(codebook) - 1
    # converged k-means: every weight sits at its nearest centroid
    nearest = (kept[:, None] - codebook[1:].double()[None, :]).abs().argmin(1) + 1
    assert torch.equal(nearest, assignments[mask])
    for bits in (2, 5, 8):
        cb, _ = dc.cluster_weights(torch.randn(400), None, bits)
        assert len(cb) - 1 == 2**bits - 1  # 400 distinct values: every centroid used


def test_pruned_weights_stay_zero_and_are_not_clustered():
    torch.manual_seed(1)
    model = Tiny()
    masks = random_masks(model, 0.3)
    with torch.no_grad():  # huge pruned values would drag a centroid if they were clustered
        model.fc1.weight[~masks["fc1.weight"]] = 100.0
    shared = dc.share_weights(model, masks, bits=4)
    for name, layer in shared.layers.items():
        weight = dict(model.named_parameters())[name]
        assert torch.equal(layer.assignments == 0, ~masks[name])
        assert torch.all(weight[~masks[name]] == 0)
        assert layer.codebook[0] == 0 and layer.num_centroids <= 2**4 - 1
        assert weight.unique().numel() <= 2**4
    assert shared.layers["fc1.weight"].codebook.abs().max() < 10
    # fewer distinct surviving values than centroids: each value is its own centroid
    codebook, assignments = dc.cluster_weights(torch.tensor([0.0, 0.5, -1.0, 0.5, 0.0]), None, 2)
    assert codebook.tolist() == [0.0, -1.0, 0.5] and assignments.tolist() == [0, 2, 1, 2, 0]


def test_centroid_finetuning_sums_gradients_and_keeps_assignments():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    masks = random_masks(model, 0.6)
    shared = dc.share_weights(model, masks, bits=2)
    before = {
        n: (layer.codebook.clone(), layer.assignments.clone()) for n, layer in shared.layers.items()
    }
    bias = model[0].bias.detach().clone()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    # the hand computation: dL/dC_k = sum of dL/dW_ij over the weights with I_ij = k (Eq. 3)
    reference = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(x), y).backward()
    grads = {"0.weight": reference[0].weight.grad, "2.weight": reference[2].weight.grad}
    lr = 0.3
    losses = dc.finetune_centroids(model, shared, [(x, y)], steps=1, lr=lr)
    assert len(losses) == 1
    for name, layer in shared.layers.items():
        codebook, assignments = before[name]
        summed = torch.zeros_like(codebook).index_add_(
            0, assignments.flatten(), grads[name].flatten()
        )
        expected = codebook - lr * summed
        expected[0] = 0.0  # the zero of pruned weights is not trained
        assert torch.allclose(layer.codebook, expected, atol=1e-6)
        assert not torch.allclose(layer.codebook, codebook)
        assert torch.equal(layer.assignments, assignments)
        weight = dict(model.named_parameters())[name]
        assert torch.equal(weight, layer.codebook[assignments])
        assert torch.all(weight[~masks[name]] == 0)
    assert torch.equal(model[0].bias, bias) and model[0].weight.grad is None


def test_relative_indices_insert_filler_zeros_for_a_long_gap():
    codes = np.zeros(200, dtype=np.int64)
    codes[[3, 4, 110, 199]] = [2, 1, 3, 1]
    relative, entry_codes, fillers = dc.relative_entries(codes, index_bits=3)  # span 8
    # gap 106 from position 4 to 110 needs 13 fillers of distance 8; gap 89 to 199 needs 11
    assert fillers == (106 - 1) // 8 + (89 - 1) // 8 == 24
    assert relative[:3].tolist() == [3, 0, 7] and entry_codes[:3].tolist() == [2, 1, 0]
    assert relative.max() <= 7 and np.count_nonzero(entry_codes) == 4
    assert np.array_equal(dc.entries_to_codes(relative, entry_codes, 200), codes)
    # a layer without kept weights stores no entry
    empty = dc.relative_entries(np.zeros(50, dtype=np.int64), 5)
    assert len(empty[0]) == 0 and empty[2] == 0


def huffman_cost(counts: list[int]) -> int:
    """Total bits of an optimal prefix code: the sum of all merged weights."""
    heap = [c for c in counts if c > 0]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


def test_huffman_is_lossless_and_shorter_on_a_skewed_distribution(monkeypatch):
    rng = np.random.default_rng(0)
    symbols = np.minimum(rng.geometric(0.35, size=5000) - 1, 31)
    counts = np.bincount(symbols, minlength=32)
    lengths = huffman.code_lengths(counts)
    data = huffman.encode(symbols, lengths)
    assert np.array_equal(huffman.decode(data, lengths, len(symbols)), symbols)
    assert len(data) < len(huffman.pack_fixed(symbols, 5)) * 0.7
    assert huffman.encoded_bits(symbols, lengths) == huffman_cost(counts.tolist())
    assert len(data) == -(-huffman.encoded_bits(symbols, lengths) // 8)
    monkeypatch.setattr(huffman, "LUT_MAX_BITS", 0)  # the bit-by-bit canonical decoder
    assert np.array_equal(huffman.decode(data, lengths, len(symbols)), symbols)
    table = huffman.table_to_bytes(lengths)
    assert np.array_equal(huffman.table_from_bytes(b"x" + table, 1, 32)[0], lengths)
    assert np.array_equal(huffman.unpack_fixed(huffman.pack_fixed(symbols, 5), 5, 5000), symbols)
    one = huffman.code_lengths([0, 7, 0])  # a single symbol still costs one bit
    assert one.tolist() == [0, 1, 0]
    assert huffman.decode(huffman.encode([1] * 7, one), one, 7).tolist() == [1] * 7
    with pytest.raises(ValueError):
        huffman.decode(data[:10], lengths, len(symbols))


@pytest.mark.parametrize("coding", ["huffman", "fixed"])
def test_compressed_file_round_trips_to_identical_weights(tmp_path, coding):
    torch.manual_seed(3)
    model = Tiny()
    model.train()
    model(torch.randn(8, 1, 6, 6))  # BatchNorm running statistics and counter
    masks = random_masks(model, 0.25)
    masks["fc2.weight"][:] = False  # a layer with nothing kept
    with torch.no_grad():
        model.fc2.weight.zero_()
    shared = dc.share_weights(model, masks, bits=5, layer_bits={"conv.weight": 8})
    path = tmp_path / "model.dc"
    report = dc.save_compressed(model, masks, shared, path, index_bits={"fc": 4}, coding=coding)
    assert report.bytes_total == path.stat().st_size == sum(report.parts.values())
    assert report.ratio_vs_dense_file > 1 and report.dense_file_bytes > report.dense_fp32_bytes
    sizes = {s.name: s for s in report.layers}
    assert sizes["conv.weight"].index_bits == 8 and sizes["fc1.weight"].index_bits == 4
    assert sizes["fc2.weight"].n_entries == 0
    fresh = Tiny()
    dc.load_compressed(path, fresh)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    _, reread = dc.read_compressed(path)
    for name, layer in shared.layers.items():
        assert torch.equal(reread.layers[name].assignments, layer.assignments)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError):
        dc.read_compressed(path)


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, True, "6"])
def test_bits_outside_2_to_8_is_a_one_line_config_error(bits):
    model = Tiny()
    with pytest.raises(ConfigError) as error:
        dc.share_weights(model, None, bits)
    assert "\n" not in str(error.value) and "2..8" in str(error.value)
    with pytest.raises(ConfigError):
        dc.cluster_weights(torch.randn(5), None, bits)
    with pytest.raises(ConfigError) as error:
        dc.share_weights(model, None, 6, layer_bits={"fc1.weight": bits})
    assert "\n" not in str(error.value) and "fc1.weight" in str(error.value)
