"""Mask patterns beyond a per-layer count: N:M groups, block-sparse masks, magnitude thresholds.

N:M (Mishra et al. 2021, "Accelerating sparse deep neural networks", arXiv:2104.08378; NVIDIA's
ASP in apex.contrib.sparsity): in every group of ``M`` consecutive weights along the input
dimension at most ``N`` are non-zero; ``2:4`` is what Ampere-and-later sparse tensor cores run.

Grouping convention, as ASP's ``create_mask``: groups run along dimension 1 (the input
features of a Linear weight ``[out, in]``, the input channels of a convolution weight
``[out, in, *kernel]``), one row of groups for every output unit and kernel position. A
convolution weight is therefore grouped as ``weight.movedim(1, -1).reshape(-1, M)``, i.e. as
the ``[out * kh * kw, in]`` matrix of ASP (input channels innermost, the NHWC/implicit-GEMM
layout the sparse kernels read). A layer's input dimension must be a multiple of ``M``; a
1-D weight is grouped along its only dimension.

Thresholds (Han et al. 2015, "Learning both weights and connections for efficient neural
networks"): prune ``|w| < θ``, with ``θ`` given directly (``absolute``) or as a multiple of
each layer's weight standard deviation (``std``, the "quality parameter" times the std, as
Distiller's sensitivity pruner computes it: ``torch.std`` with Bessel's correction).

Block-sparse masks (Narang et al. 2017, "Block-sparse recurrent neural networks",
arXiv:1711.02782; Gray et al. 2017, "GPU kernels for block-sparse weights", OpenAI,
arXiv:1711.09224): whole ``R x C`` blocks of a layer are kept or pruned, the pattern a BSR
(block sparse row) kernel multiplies. Blocks tile the 2-D view of the weight,
``weight.reshape(out, -1)`` (Linear ``[out, in]``; convolution ``[out, in * kh * kw]``): R
rows (output units) by C columns. Both sides must divide the layer's matrix (no ragged edge
blocks). A block's score is the L2 norm of its weights' scores (with ``|w|``, the block's
Frobenius norm, the group norm of the group-lasso variant of Narang et al.; at ``1x1`` it is
``|w|`` itself).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from prunelab.errors import ConfigError

__all__ = [
    "THRESHOLD_MODES",
    "block_count",
    "block_mask",
    "block_scores",
    "check_block_shape",
    "check_n_m_shape",
    "check_threshold",
    "from_groups",
    "is_block_sparse",
    "is_n_m",
    "n_m_mask",
    "parse_block",
    "parse_n_m",
    "threshold_mask",
    "to_groups",
]

THRESHOLD_MODES = ("absolute", "std")
_N_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*(\d+)\s*[xX\u00d7]\s*(\d+)\s*$")
_BLOCK_HOW = "write it as 'RxC' (rows x columns), e.g. distribution.block=1x4, 4x4 or [4,4]"


# --------------------------------------------------------------------------------------
# N:M
# --------------------------------------------------------------------------------------


def parse_n_m(value: Any) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; ``None`` (or an empty string) -> ``None``.

    Requires ``1 <= N < M``; anything else is a one-line :class:`ConfigError`.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124.
        raise ConfigError(
            f"distribution.n_m={value!r} is a number, not 'N:M'; quote it in YAML files "
            "(n_m: '2:4', an unquoted 2:4 reads as 124) or pass distribution.n_m=2:4"
        )
    match = _N_M.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            f"distribution.n_m={value!r} is not of the form 'N:M' with integers N and M; "
            "e.g. distribution.n_m=2:4"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ConfigError(
            f"distribution.n_m={value!r} needs 1 <= N < M (keep N of every M weights); "
            "e.g. distribution.n_m=2:4"
        )
    return n, m


def check_n_m_shape(name: str, shape: Sequence[int], m: int) -> None:
    """One-line :class:`ConfigError` unless ``name``'s grouped dimension is a multiple of M."""
    dims = tuple(int(d) for d in shape)
    grouped = dims[1] if len(dims) >= 2 else (dims[0] if dims else 0)
    if grouped < 1 or grouped % m:
        raise ConfigError(
            f"layer '{name}' (weight {dims}) has {grouped} input features/channels, not a "
            f"multiple of M={m}, so it cannot be N:M-grouped; keep it dense "
            "(distribution.dense_first/dense_last with distribution.budget=pruned) or pick "
            "another M"
        )


def to_groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """``tensor`` as ``[groups, M]``: M consecutive entries along dimension 1 per row."""
    moved = tensor.movedim(1, -1) if tensor.dim() >= 2 else tensor
    return moved.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_groups` for a tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        return groups.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved).movedim(-1, 1).contiguous()


def n_m_mask(
    scores: torch.Tensor,
    keep: int,
    m: int,
    active: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool mask with exactly ``keep`` True entries in every group of ``m`` (see module doc).

    Within a group, entries of ``active`` (if given) rank before inactive ones, then higher
    ``scores`` first; NaN scores rank last among their kind. Exact ties are broken at random
    with ``generator`` (a random order per group before stable sorts, so distinct scores keep
    their order), or by lowest index without one. A group with fewer than ``keep`` active
    entries keeps inactive ones too (never the case when ``keep`` only falls over time).
    """
    shape = tuple(scores.shape)
    check_n_m_shape("scores", shape, m)
    if not 0 <= keep <= m:
        raise ConfigError(f"cannot keep {keep} of every {m} weights; keep must be in [0, {m}]")
    key = torch.nan_to_num(to_groups(scores.detach().float(), m), nan=-math.inf)
    n_groups = key.shape[0]
    if generator is not None:
        perm = torch.rand(n_groups, m, generator=generator).argsort(dim=1).to(key.device)
    else:
        perm = torch.arange(m, device=key.device).expand(n_groups, m)
    key = key.gather(1, perm)
    order = key.sort(dim=1, descending=True, stable=True).indices
    if active is not None:
        flags = to_groups(active.to(key.device), m).gather(1, perm).gather(1, order)
        first = flags.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
        order = order.gather(1, first)
    chosen = perm.gather(1, order[:, :keep])
    mask = torch.zeros(n_groups, m, dtype=torch.bool, device=key.device)
    mask.scatter_(1, chosen, True)
    return from_groups(mask, shape)


def is_n_m(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` (see module doc) holds exactly ``n`` True entries."""
    try:
        check_n_m_shape("mask", tuple(mask.shape), m)
    except ConfigError:
        return False
    return bool((to_groups(mask.bool(), m).sum(dim=1) == n).all())


# --------------------------------------------------------------------------------------
# block-sparse masks
# --------------------------------------------------------------------------------------


def parse_block(value: Any) -> tuple[int, int] | None:
    """``"1x4"`` (or ``"1X4"``, ``"1×4"``, ``[1, 4]``) -> ``(1, 4)``; ``None`` or ``""`` ->
    ``None`` (off).

    ``R`` rows (output units) by ``C`` columns of the layer's ``[out, in * kh * kw]`` matrix,
    both integers >= 1. A bare number (``4``) is an error rather than a guess between
    ``1x4`` and ``4x4``; anything malformed is a one-line :class:`ConfigError`.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        pair = None
    elif isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        raise ConfigError(
            f"distribution.block={value!r} is one number, ambiguous between 1xN and NxN "
            f"blocks; {_BLOCK_HOW}"
        )
    elif isinstance(value, str):
        match = _BLOCK.match(value)
        pair = (int(match.group(1)), int(match.group(2))) if match else None
    elif isinstance(value, Sequence) and len(value) == 2:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        pair = (int(value[0]), int(value[1])) if ok else None
    else:
        pair = None
    if pair is None:
        raise ConfigError(f"distribution.block={value!r} is not a block size; {_BLOCK_HOW}")
    if min(pair) < 1:
        raise ConfigError(f"distribution.block={value!r} needs R >= 1 and C >= 1; {_BLOCK_HOW}")
    return pair


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view ``[out, rest]`` of a weight of ``shape`` (``weight.reshape(out, -1)``)."""
    dims = tuple(int(d) for d in shape)
    if not dims:
        return 0, 0
    return dims[0], math.prod(dims[1:])


def check_block_shape(name: str, shape: Sequence[int], block: tuple[int, int]) -> None:
    """One-line :class:`ConfigError` unless ``name``'s ``[out, in * kh * kw]`` matrix splits
    into whole ``R x C`` blocks; it suggests the largest block size within ``block`` that
    does, or keeping the layer dense."""
    r, c = block
    rows, cols = _matrix_shape(shape)
    if rows >= 1 and cols >= 1 and rows % r == 0 and cols % c == 0:
        return
    dims = tuple(int(d) for d in shape)
    fits = f"{math.gcd(r, rows) or 1}x{math.gcd(c, cols) or 1}"
    raise ConfigError(
        f"layer '{name}' (weight {dims}, a {rows}x{cols} matrix) does not split into "
        f"{r}x{c} blocks; use a block size that divides it (e.g. distribution.block={fits}) "
        "or keep the layer dense (distribution.dense_first/dense_last)"
    )


def _to_blocks(tensor: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``tensor`` as ``[rows / R, R, cols / C, C]`` (its 2-D view cut into blocks)."""
    r, c = block
    rows, cols = _matrix_shape(tensor.shape)
    return tensor.reshape(rows // r, r, cols // c, c)


def block_scores(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[rows / R, cols / C]``: the L2 norm of ``scores`` over every ``R x C`` block."""
    check_block_shape("scores", tuple(scores.shape), block)
    blocks = _to_blocks(scores.detach().float(), block)
    return blocks.pow(2).sum(dim=(1, 3)).sqrt()


def block_count(keep: int, block: tuple[int, int]) -> int:
    """Blocks kept for a budget of ``keep`` weights: ``keep / (R * C)`` rounded to the nearest
    integer (halves up), and at least one block while ``keep > 0``, so a layer ends within one
    block of its budget and never empty unless its budget is zero."""
    if keep <= 0:
        return 0
    return max(1, math.floor(keep / (block[0] * block[1]) + 0.5))


def block_mask(
    scores: torch.Tensor,
    keep: int,
    block: tuple[int, int],
    active: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool mask, shaped like ``scores``, of the :func:`block_count` ``(keep)`` whole ``R x C``
    blocks with the highest :func:`block_scores` (see module doc).

    Blocks holding an ``active`` entry (if given) rank before the others, so a pruned block
    is revived only if too few active ones remain (never when ``keep`` only falls over time);
    NaN block scores rank last among their kind. Exact ties are broken at random with
    ``generator`` (a random order before a stable sort, so distinct scores keep their order),
    or by lowest block index (row-major over the block grid) without one.
    """
    shape = tuple(scores.shape)
    check_block_shape("scores", shape, block)
    per_block = block_scores(scores, block)
    grid = per_block.shape
    key = torch.nan_to_num(per_block.flatten(), nan=-math.inf)
    n_blocks = key.numel()
    count = min(block_count(int(keep), block), n_blocks)
    if generator is not None:
        perm = torch.randperm(n_blocks, generator=generator).to(key.device)
    else:
        perm = torch.arange(n_blocks, device=key.device)
    order = perm[key[perm].sort(descending=True, stable=True).indices]
    if active is not None:
        live = _to_blocks(active.to(key.device).bool(), block).any(dim=3).any(dim=1).flatten()
        first = live[order].to(torch.uint8).sort(descending=True, stable=True).indices
        order = order[first]
    kept = torch.zeros(n_blocks, dtype=torch.bool, device=key.device)
    kept[order[:count]] = True
    r, c = block
    mask = kept.view(grid[0], 1, grid[1], 1).expand(grid[0], r, grid[1], c)
    return mask.reshape(shape).contiguous()


def is_block_sparse(mask: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether every ``R x C`` block of ``mask``'s 2-D view is all True or all False (and
    the view splits into whole blocks)."""
    try:
        check_block_shape("mask", tuple(mask.shape), block)
    except ConfigError:
        return False
    blocks = _to_blocks(mask.bool(), block)
    return bool((blocks.all(dim=3).all(dim=1) == blocks.any(dim=3).any(dim=1)).all())


# --------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------


def check_threshold(threshold: Any, mode: Any) -> tuple[float | None, str]:
    """Validate ``pruning.threshold`` (None or a finite number > 0) and its mode."""
    mode = "absolute" if mode is None else mode
    if mode not in THRESHOLD_MODES:
        raise ConfigError(
            f"pruning.threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, got "
            f"{mode!r}; e.g. pruning.threshold_mode=std"
        )
    if threshold is None:
        return None, str(mode)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigError(
            f"pruning.threshold must be a number > 0 or null, got {threshold!r}; "
            "e.g. pruning.threshold=0.05"
        )
    value = float(threshold)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(
            f"pruning.threshold must be a finite number > 0, got {threshold!r}; "
            "e.g. pruning.threshold=0.05 (or null to prune to a target sparsity)"
        )
    return value, str(mode)


def threshold_mask(
    weight: torch.Tensor,
    threshold: float,
    mode: str = "absolute",
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool mask keeping the ``active`` weights with ``|w| >= θ`` (prunes ``|w| < θ``).

    ``absolute``: ``θ = threshold``. ``std``: ``θ = threshold * std`` of the layer's active
    weights (all of them when ``active`` is None), with Bessel's correction; a layer with a
    single active weight has std 0. NaN weights are kept (``NaN < θ`` is false).
    """
    w = weight.detach()
    keep = torch.ones_like(w, dtype=torch.bool) if active is None else active.bool().clone()
    if mode == "std":
        values = w[keep].float()
        std = float(values.std()) if values.numel() > 1 else 0.0
        theta = threshold * std
    elif mode == "absolute":
        theta = float(threshold)
    else:
        raise ConfigError(f"threshold mode must be one of {', '.join(THRESHOLD_MODES)}")
    return keep & ~(w.abs() < theta)
