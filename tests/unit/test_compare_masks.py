"""Mask comparison: Jaccard overlap and Hamming distance on hand-built masks."""

from __future__ import annotations

import pytest
import torch

from prunelab.analysis import compare
from prunelab.analysis.compare import (
    check_same_layers,
    compare_masks,
    hamming,
    jaccard,
    jaccard_matrix,
    mask_overlap,
    pairwise_matrix,
)
from prunelab.methods import imp
from prunelab.sparsity.masks import Masks


def _bits(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def test_jaccard_and_hamming_of_one_layer():
    a, b = _bits(1, 1, 0, 0, 1), _bits(1, 0, 1, 0, 1)
    assert jaccard(a, b) == pytest.approx(2 / 4)  # {0, 4} of {0, 1, 2, 4}
    assert hamming(a, b) == 2  # positions 1 and 2
    assert jaccard(a, a) == 1.0 and hamming(a, a) == 0
    assert jaccard(a, ~a) == 0.0 and hamming(a, ~a) == 5
    empty = _bits(0, 0, 0, 0, 0)
    assert jaccard(empty, empty) == 1.0 and hamming(empty, empty) == 0


def test_compare_masks_per_layer_and_pooled():
    a = Masks({"w": _bits(1, 1, 0, 0), "v": torch.ones(2, 3, dtype=torch.bool)})
    b = Masks({"w": _bits(1, 0, 1, 0), "v": torch.tensor([[1, 1, 1], [0, 0, 0]]).bool()})
    result = compare_masks(a, b)
    w, v, total = result["layers"]["w"], result["layers"]["v"], result["global"]
    assert (w["jaccard"], w["hamming"], w["hamming_fraction"]) == (1 / 3, 2, 0.5)
    assert (v["jaccard"], v["hamming"], v["hamming_fraction"]) == (0.5, 3, 0.5)
    assert (w["active_a"], w["active_b"], w["numel"]) == (2, 2, 4)
    # Global values pool the counts: 1 + 3 shared of 3 + 6 in the union.
    assert total["jaccard"] == pytest.approx(4 / 9)
    assert (total["hamming"], total["numel"]) == (5, 10)
    assert total["hamming_fraction"] == pytest.approx(0.5)
    assert mask_overlap(a, b) == {"global": pytest.approx(4 / 9), "layers": {"w": 1 / 3, "v": 0.5}}


def test_imp_uses_the_shared_mask_overlap():
    assert imp.mask_overlap is compare.mask_overlap


def test_masks_of_different_layers_are_refused():
    a = {"w": _bits(1, 0), "v": _bits(1)}
    with pytest.raises(ValueError, match="different layers: only in the first \\['v'\\]"):
        check_same_layers(a, {"w": _bits(1, 0)})
    with pytest.raises(ValueError, match="layer w has shape \\(2,\\) in the first"):
        compare_masks(a, {"w": _bits(1, 0, 1), "v": _bits(1)})
    with pytest.raises(ValueError, match="different order"):
        check_same_layers(a, {"v": _bits(1), "w": _bits(1, 0)})


def test_matrix_is_symmetric_with_ones_on_the_diagonal():
    gen = torch.Generator().manual_seed(0)
    masks = [
        Masks({"w": torch.rand(4, 5, generator=gen) > 0.5, "v": torch.rand(3, generator=gen) > 0.3})
        for _ in range(4)
    ]
    matrix = jaccard_matrix(masks)
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    for i in range(4):
        assert matrix[i][i] == 1.0
        for j in range(4):
            assert matrix[i][j] == matrix[j][i]
            assert matrix[i][j] == pytest.approx(
                compare_masks(masks[i], masks[j])["global"]["jaccard"]
            )
    distances = pairwise_matrix(masks, lambda a, b: compare_masks(a, b)["global"]["hamming"])
    assert [distances[i][i] for i in range(4)] == [0.0] * 4
    with pytest.raises(ValueError):
        jaccard_matrix([masks[0], Masks({"w": torch.ones(4, 5, dtype=torch.bool)})])
