"""Iterative magnitude pruning with rewinding: the lottery-ticket procedure.

Frankle & Carbin 2019, "The lottery ticket hypothesis: finding sparse, trainable neural
networks" (ICLR, arXiv:1803.03635); rewinding to an early step k: Frankle, Dziugaite, Roy &
Carbin 2020, "Linear mode connectivity and the lottery ticket hypothesis" (ICML,
arXiv:1912.05671). The reference implementation is facebookresearch/open_lth.

This module is the pure-torch part: the level plan (how many weights each level keeps), the
pruning rule between levels, the masks of the control branches and the weight rewinding.
:mod:`prunelab.lottery` runs the levels as sub-runs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# mask_overlap lives with the other mask comparisons; imported from here too.
from prunelab.analysis.compare import mask_overlap as mask_overlap
from prunelab.errors import ConfigError
from prunelab.methods.base import (
    Params,
    PruningMethod,
    positive_int,
    random_mask,
    top_among,
)
from prunelab.sparsity.distributions import keep_counts as distribution_counts
from prunelab.sparsity.engine import Context, layer_generator
from prunelab.sparsity.masks import Masks

# Control branches trained from a level's lottery mask (open_lth's branches).
BRANCHES = ("reinit", "shuffle", "random")
LAYOUTS = ("uniform", "global")


@dataclass(frozen=True)
class Level:
    """One level of an IMP run: its nominal and realised global sparsity and, for layerwise
    pruning, the weights each layer keeps (``None`` for global pruning: the magnitudes
    decide)."""

    index: int
    sparsity: float  # nominal: the value tables group by
    realised: float  # kept weights counted over all prunable weights
    counts: dict[str, int] | None


def _fraction(key: str, value: Any, example: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(
            f"pruning.{key} must be a number in (0, 1), got {value!r}; e.g. {example}"
        )
    return float(value)


def parse_branches(value: Any) -> tuple[str, ...]:
    """``pruning.branch``: null/none, one branch name or a list of them."""
    if value is None or value == "none" or value == []:
        return ()
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)):
        names = [names]
    for name in names:
        if name not in BRANCHES:
            raise ConfigError(
                f"pruning.branch must be none or one of {', '.join(BRANCHES)} (or a list of "
                f"them), got {name!r}; e.g. pruning.branch=random"
            )
    return tuple(dict.fromkeys(str(n) for n in names))


class IterativeMagnitude(PruningMethod):
    """Iterative magnitude pruning (IMP) with weight rewinding: lottery tickets.

    Level 0 trains the dense network and keeps its weights at optimizer step
    ``rewind_step`` (k = 0: the initialisation θ0). Each later level prunes the
    smallest-magnitude weights among those still active, measured on the previous level's
    *trained* weights, then rewinds every surviving weight (and every other parameter and
    buffer) to the saved step-k values and trains again. A level's mask is a subset of the
    previous one's.

    How much each level prunes:

    - default: ``rate`` (20%) of the remaining weights of each layer per level, ``output_rate``
      (10%) for the last prunable layer (Frankle & Carbin's fully connected recipe), until the
      level that reaches ``sparsity``, which prunes exactly to it;
    - ``levels=N``: N levels whose global density falls geometrically to ``1 - sparsity``;
    - ``level_sparsities=[...]``: the global sparsity of each level after level 0, increasing,
      the last equal to ``sparsity``.

    ``distribution=uniform`` prunes layer by layer (the output layer at its own rate, the
    other layers sharing the level's budget at one density); ``distribution=global`` ranks
    all layers together with one threshold (open_lth's ``sparse_global``), and ``output_rate``
    is then unused. Layers kept dense (``dense_first``/``dense_last``) are never pruned.

    With ``rewind_step`` k > 0, levels after 0 train steps k..T of the level-0 run: T - k
    steps, with the learning-rate schedule continuing from step k (open_lth). The optimizer
    state starts afresh at every level (open_lth does the same).

    ``branch``: control runs trained from each level's lottery mask: ``reinit`` (same mask,
    fresh random initialisation), ``shuffle`` (each layer's mask permuted at random: same
    count per layer, rewound weights), ``random`` (a new random mask with the same count per
    layer, rewound weights); ``branch_levels`` limits them to the levels of those
    sparsities (default: every level after 0).

    Deviations from the references, on purpose: open_lth and Frankle & Carbin round each
    layer's count per level, so their level sparsities drift from the nominal values; here
    the last level (and every level given by ``levels``/``level_sparsities``) meets its
    global sparsity to within one weight per layer. Biases are not pruned (the MNIST-1D
    notebook prunes each layer's weight and bias together).
    """

    name = "imp"
    schedule_kinds = ("fixed",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        rate: float = 0.2,
        output_rate: float | None = 0.1,
        levels: int | None = None,
        level_sparsities: Sequence[float] | None = None,
        rewind_step: int = 0,
        branch: Any = None,
        branch_levels: Sequence[float] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if self.distribution not in LAYOUTS:
            raise ConfigError(
                f"pruning=imp prunes layerwise (distribution=uniform) or globally "
                f"(distribution=global), not distribution={self.distribution}"
            )
        self.rate = _fraction("rate", rate, "pruning.rate=0.2")
        self.output_rate = _fraction(
            "output_rate", output_rate, "pruning.output_rate=0.1 (or null)", allow_none=True
        )
        self.levels = None if levels is None else positive_int("levels", levels, 5)
        self.level_sparsities = self._check_level_sparsities(level_sparsities)
        if self.levels is not None and self.level_sparsities is not None:
            raise ConfigError(
                "pruning.levels and pruning.level_sparsities exclude each other; set one to null"
            )
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
            raise ConfigError(
                f"pruning.rewind_step must be an integer >= 0 (an optimizer step of level 0), "
                f"got {rewind_step!r}; e.g. pruning.rewind_step=0"
            )
        self.rewind_step = int(rewind_step)
        self.branches = parse_branches(branch)
        if branch_levels is not None and not isinstance(branch_levels, (list, tuple)):
            raise ConfigError(
                f"pruning.branch_levels must be a list of level sparsities or null, got "
                f"{branch_levels!r}; e.g. pruning.branch_levels=[0.8,0.95]"
            )
        self.branch_levels = (
            None
            if branch_levels is None
            else tuple(_fraction("branch_levels", v, "[0.8,0.95]") for v in branch_levels)
        )
        # Set on the copy that trains one level (for_level).
        self.level: Level | None = None
        self.level_mask: Masks | None = None

    def _check_level_sparsities(self, values: Any) -> tuple[float, ...] | None:
        if values is None:
            return None
        example = "pruning.level_sparsities=[0.5,0.8,0.9]"
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(
                f"pruning.level_sparsities must be a list, got {values!r}; e.g. {example}"
            )
        out = tuple(_fraction("level_sparsities", v, example) for v in values)
        if any(b <= a for a, b in zip(out, out[1:], strict=False)):
            raise ConfigError(f"pruning.level_sparsities must increase, got {list(out)}")
        if abs(out[-1] - self.sparsity) > 1e-9:
            raise ConfigError(
                f"pruning.level_sparsities ends at {out[-1]} but sparsity={self.sparsity}; "
                f"set sparsity={out[-1]}"
            )
        return out

    # -- the plan ---------------------------------------------------------------------------
    def _pruned_names(self) -> list[str]:
        return [n for n in self.shapes if n not in self.dense]

    def _output_layer(self) -> str | None:
        """The last prunable layer, pruned at ``output_rate`` in layerwise mode."""
        names = self._pruned_names()
        if self.distribution != "uniform" or self.output_rate is None or len(names) < 2:
            return None
        return names[-1]

    def _budget(self, sparsity: float) -> int:
        """Weights kept over the pruned layers at a global ``sparsity``."""
        numel = {n: math.prod(s) for n, s in self.shapes.items()}
        total = sum(numel.values())
        dense = sum(numel[n] for n in self.dense)
        if self.budget == "pruned":
            return round((total - dense) * (1.0 - sparsity))
        return max(0, round(total * (1.0 - sparsity)) - dense)

    def _layer_counts(self, delta: float) -> dict[str, int]:
        """Layerwise counts at base density ``delta`` (the output layer at ``delta**rho``)."""
        out = self._output_layer()
        rho = math.log1p(-self.output_rate) / math.log1p(-self.rate) if out else 1.0
        counts = {}
        for name in self._pruned_names():
            d = delta**rho if name == out else delta
            counts[name] = round(math.prod(self.shapes[name]) * d)
        return counts

    def _counts_for_budget(self, kept: int) -> dict[str, int]:
        """Layerwise counts whose sum is exactly ``kept``: bisect the base density, then give
        the rounding remainder to the largest non-output layer."""
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(self._layer_counts(mid).values()) > kept:
                hi = mid
            else:
                lo = mid
        counts = self._layer_counts(lo)
        out = self._output_layer()
        names = [n for n in counts if n != out] or list(counts)
        largest = max(names, key=lambda n: math.prod(self.shapes[n]))
        counts[largest] += kept - sum(counts.values())
        counts[largest] = min(max(counts[largest], 0), math.prod(self.shapes[largest]))
        return counts

    def _realised(self, kept: int) -> float:
        numel = {n: math.prod(s) for n, s in self.shapes.items()}
        total = sum(numel.values())
        dense = sum(numel[n] for n in self.dense)
        if self.budget == "pruned":
            return 1.0 - kept / max(1, total - dense)
        return 1.0 - (kept + dense) / max(1, total)

    def plan(self) -> list[Level]:
        """Every level, 0 (dense) first; needs :meth:`setup` (the layer shapes)."""
        if not self.shapes:
            raise RuntimeError("IterativeMagnitude.plan() needs setup() first")
        numel = sum(math.prod(self.shapes[n]) for n in self._pruned_names())
        levels = [Level(0, 0.0, 0.0, None)]
        target_kept = self._budget(self.sparsity)
        if self.level_sparsities is not None or self.levels is not None:
            if self.level_sparsities is not None:
                nominal = list(self.level_sparsities)
            else:
                n = self.levels
                nominal = [1.0 - (1.0 - self.sparsity) ** (i / n) for i in range(1, n + 1)]
                nominal = [round(s, 4) for s in nominal[:-1]] + [self.sparsity]
            for i, s in enumerate(nominal, start=1):
                kept = self._budget(s)
                levels.append(self._level(i, s, kept))
            return levels
        # Rate-driven: each level prunes `rate` of what remains, until the target.
        i = 0
        while True:
            i += 1
            if self.distribution == "uniform":
                kept = min(sum(self._layer_counts((1.0 - self.rate) ** i).values()), numel)
            else:
                kept = round(numel * (1.0 - self.rate) ** i)
            if kept <= target_kept or i > 10_000:
                levels.append(self._level(i, self.sparsity, target_kept))
                return levels
            realised = self._realised(kept)
            levels.append(self._level(i, round(realised, 4), kept))

    def branches_at(self, level: Level) -> tuple[str, ...]:
        """The control branches trained at ``level`` (all levels but 0, or those of
        ``branch_levels``)."""
        if level.index == 0:
            return ()
        if self.branch_levels is None:
            return self.branches
        hit = any(abs(level.sparsity - s) < 1e-6 for s in self.branch_levels)
        return self.branches if hit else ()

    def check_branch_levels(self, plan: list[Level]) -> None:
        """Every ``branch_levels`` entry must be the sparsity of a level of ``plan``."""
        nominal = [lv.sparsity for lv in plan[1:]]
        for value in self.branch_levels or ():
            if not any(abs(value - s) < 1e-6 for s in nominal):
                raise ConfigError(
                    f"pruning.branch_levels: {value} is not the sparsity of a level; the "
                    f"levels are {', '.join(f'{s:g}' for s in nominal)}"
                )

    def _level(self, index: int, nominal: float, kept: int) -> Level:
        counts = self._counts_for_budget(kept) if self.distribution == "uniform" else None
        return Level(index, float(nominal), self._realised(kept), counts)

    # -- between levels ---------------------------------------------------------------------
    def prune(self, level: Level, trained: Params, masks: Masks, seed: int) -> Masks:
        """The mask of ``level``: the largest trained magnitudes among the weights active in
        ``masks`` (the previous level's mask), ties broken at random from (seed, level)."""
        ctx = Context(seed, level.index)
        scores = {n: trained[n].detach().abs().float() for n in masks}
        if level.counts is not None:
            counts = {n: level.counts.get(n, masks[n].numel()) for n in masks}
        else:
            ranked = {
                n: torch.where(masks[n], s, torch.full_like(s, -1.0)) for n, s in scores.items()
            }
            counts = distribution_counts(
                "global",
                self.shapes,
                self.budget_sparsity_of(level),
                dense=self.dense,
                scores=ranked,
                generator=ctx.generator(-1, "ties-global"),
            )
        new = {}
        for i, (name, mask) in enumerate(masks.items()):
            if name in self.dense:
                new[name] = mask.clone()
                continue
            keep = min(int(counts[name]), int(mask.sum()))
            new[name] = top_among(scores[name], mask, keep, ctx.generator(i, "ties-prune"))
        return Masks(new)

    def budget_sparsity_of(self, level: Level) -> float:
        """``level``'s sparsity over all prunable weights (what the distributions take)."""
        return self.budget_sparsity(level.realised) if self.budget == "pruned" else level.realised

    def for_level(self, level: Level, mask: Masks | None) -> IterativeMagnitude:
        """A copy that trains ``level`` with ``mask`` fixed (None: dense, level 0)."""
        twin = copy.copy(self)
        twin.level, twin.level_mask = level, mask
        return twin

    # -- template ---------------------------------------------------------------------------
    def init_masks(self, params: Params, ctx: Context) -> Masks:
        if self.level_mask is None:
            return Masks.dense_like(params)
        return Masks({n: self.level_mask[n].to(p.device) for n, p in params.items()})

    def at_target(self, masks: Masks) -> bool:
        # A level trains with its mask fixed from the first step: always at its target.
        return True

    def sparsity_target(self) -> float:
        return self.level.realised if self.level is not None else self.sparsity


def branch_mask(kind: str, lottery: Masks, seed: int, level: int) -> Masks:
    """The mask of control branch ``kind`` at ``level``: ``reinit`` keeps the lottery mask;
    ``shuffle`` permutes each layer's mask; ``random`` draws a new random mask with each
    layer's count. Seeded from (seed, level, layer)."""
    out = {}
    for i, (name, mask) in enumerate(lottery.items()):
        gen = layer_generator(seed, level, i, f"branch-{kind}")
        if kind == "reinit":
            out[name] = mask.clone()
        elif kind == "shuffle":
            flat = mask.flatten().cpu()
            out[name] = flat[torch.randperm(flat.numel(), generator=gen)].view_as(mask)
        elif kind == "random":
            out[name] = random_mask(mask.shape, int(mask.sum()), gen)
        else:
            raise ConfigError(f"unknown IMP branch {kind!r}; choose one of {', '.join(BRANCHES)}")
        out[name] = out[name].to(mask.device)
    return Masks(out)


@torch.no_grad()
def rewind(
    model: torch.nn.Module, saved: Mapping[str, torch.Tensor], masks: Masks, params: Params
) -> None:
    """Load the saved state (every parameter and buffer) and zero the pruned weights: the
    surviving weights hold exactly the saved values."""
    model.load_state_dict(saved)
    masks.apply_(params)
