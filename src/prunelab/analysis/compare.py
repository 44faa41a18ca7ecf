"""How alike two (or many) sets of masks are: Jaccard overlap and Hamming distance.

Pure torch. Masks are ordered mappings ``name -> bool tensor`` (a
:class:`~prunelab.sparsity.masks.Masks` is one). For two masks ``a`` and ``b`` of one layer:

- Jaccard overlap ``|a ∩ b| / |a ∪ b|`` of the active weights: 1.0 for identical masks, 0.0
  for disjoint ones, 1.0 where both are empty;
- Hamming distance: the number of weights active in exactly one of them (``hamming``), also
  as a fraction of the layer's weights (``hamming_fraction``).

Global values pool the counts of every layer (not the mean of the layers' values).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Masks = Mapping[str, torch.Tensor]


def check_same_layers(a: Masks, b: Masks) -> None:
    """Raise ValueError (one line) unless ``a`` and ``b`` hold the same layer names, in the
    same order, with the same shapes."""
    if list(a) != list(b):
        only_a = [n for n in a if n not in b]
        only_b = [n for n in b if n not in a]
        if only_a or only_b:
            raise ValueError(
                f"the masks cover different layers: only in the first {only_a[:3]}, "
                f"only in the second {only_b[:3]}"
            )
        raise ValueError("the masks list the same layers in a different order")
    for name in a:
        if tuple(a[name].shape) != tuple(b[name].shape):
            raise ValueError(
                f"layer {name} has shape {tuple(a[name].shape)} in the first masks and "
                f"{tuple(b[name].shape)} in the second"
            )


def _counts(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int]:
    """(intersection, union, numel) of two bool masks of one layer."""
    a, b = a.bool(), b.bool().to(a.device)
    return int((a & b).sum()), int((a | b).sum()), a.numel()


def _jaccard(inter: int, union: int) -> float:
    return inter / union if union else 1.0


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard overlap of the active entries of two masks of one layer (1.0 if both empty)."""
    inter, union, _ = _counts(a, b)
    return _jaccard(inter, union)


def hamming(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of entries active in exactly one of two masks of one layer."""
    inter, union, _ = _counts(a, b)
    return union - inter


def mask_overlap(a: Masks, b: Masks) -> dict[str, Any]:
    """Jaccard overlap |a ∩ b| / |a ∪ b| of two masks' active weights: over all layers
    (``global``) and per layer (``layers``); 1.0 where both are empty."""
    layers, inter_total, union_total = {}, 0, 0
    for name in a:
        inter, union, _ = _counts(a[name], b[name])
        layers[name] = _jaccard(inter, union)
        inter_total += inter
        union_total += union
    return {"global": _jaccard(inter_total, union_total), "layers": layers}


def compare_masks(a: Masks, b: Masks) -> dict[str, Any]:
    """Jaccard overlap and Hamming distance of two sets of masks over the same layers (checked
    with :func:`check_same_layers`): ``{"global": {...}, "layers": {name: {...}}}``, each entry
    holding ``jaccard``, ``hamming``, ``hamming_fraction``, ``active_a``, ``active_b`` and
    ``numel``."""
    check_same_layers(a, b)
    layers: dict[str, dict[str, Any]] = {}
    totals = [0, 0, 0, 0, 0]  # inter, union, numel, active a, active b
    for name in a:
        inter, union, numel = _counts(a[name], b[name])
        active_a, active_b = int(a[name].sum()), int(b[name].sum())
        layers[name] = _entry(inter, union, numel, active_a, active_b)
        for i, value in enumerate((inter, union, numel, active_a, active_b)):
            totals[i] += value
    return {"global": _entry(*totals), "layers": layers}


def _entry(inter: int, union: int, numel: int, active_a: int, active_b: int) -> dict[str, Any]:
    return {
        "jaccard": _jaccard(inter, union),
        "hamming": union - inter,
        "hamming_fraction": (union - inter) / numel if numel else 0.0,
        "active_a": active_a,
        "active_b": active_b,
        "numel": numel,
    }


def pairwise_matrix(
    masks: Sequence[Masks], metric: Callable[[Masks, Masks], float]
) -> list[list[float]]:
    """``metric`` for every pair of ``masks`` (assumed symmetric: each pair computed once)."""
    n = len(masks)
    matrix = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            matrix[i][j] = matrix[j][i] = float(metric(masks[i], masks[j]))
    return matrix


def jaccard_matrix(masks: Sequence[Masks]) -> list[list[float]]:
    """Global Jaccard overlap of every pair of ``masks`` (symmetric, ones on the diagonal)."""
    for other in masks[1:]:
        check_same_layers(masks[0], other)
    return pairwise_matrix(masks, lambda a, b: mask_overlap(a, b)["global"])
