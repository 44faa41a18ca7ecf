"""Mask patterns beyond a per-layer count: N:M semi-structured groups and magnitude thresholds.

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
    "check_n_m_shape",
    "check_threshold",
    "from_groups",
    "is_n_m",
    "n_m_mask",
    "parse_n_m",
    "threshold_mask",
    "to_groups",
]

THRESHOLD_MODES = ("absolute", "std")
_N_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


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
