"""The template every pruning method fills in.

A method answers four questions, each a small override:

- ``init_masks``: which weights are active when training starts (dense, random, SNIP, ...);
- ``is_update_step``: does the mask change at this optimizer step (a pure schedule);
- ``update``: the new masks at an update step. Two shared recipes cover the methods here:
  :class:`MagnitudePruning` (prune to the scheduled sparsity by ``prune_scores``) and
  :class:`PruneAndGrow` (drop the lowest ``prune_scores``, grow the same number by
  ``grow_scores`` per layer);
- ``prune_scores`` / ``grow_scores``: higher = keep / grow first.

Pure torch: no Lightning, no Hydra. Methods see weights, dense gradients and a
:class:`~prunelab.sparsity.engine.Context`; the engine applies what they return.
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.sparsity.distributions import dense_layers, keep_counts
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks
from prunelab.sparsity.schedules import DropSchedule, SparsitySchedule, resolve_fraction

Params = dict[str, torch.Tensor]


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask with True at the ``k`` largest entries of ``scores`` (ties: lowest index)."""
    flat = scores.flatten().float()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    # Everything above the k-th largest value is kept; among entries equal to it, the lowest
    # indices fill the remaining places (torch.topk alone leaves ties to the device). One
    # topk and two linear passes: a full sort would cost an update ten times as much.
    kth = torch.topk(flat, k, sorted=False).values.min()
    mask = flat > kth
    ties = (flat == kth).nonzero().flatten()[: k - int(mask.sum())]
    mask[ties] = True
    return mask.view_as(scores)


def top_among(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` highest ``scores`` among the ``candidates`` entries (ties:
    lowest index). Works on the candidates alone, so dropping from a 10%-dense layer sorts
    a tenth of it."""
    index = candidates.flatten().nonzero().flatten()
    chosen = index[topk_mask(scores.flatten()[index], k)]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[chosen] = True
    return mask.view_as(scores)


def random_mask(shape: torch.Size, k: int, generator: torch.Generator) -> torch.Tensor:
    """Bool mask (CPU) with exactly ``k`` True entries at random positions."""
    numel = int(torch.Size(shape).numel())
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:k]] = True
    return mask.view(shape)


class PruningMethod:
    """Base class: dense masks, never updated. Subclasses override the template methods."""

    name = "base"
    is_dense = False
    # Kinds of `schedule=` this method accepts (see conf/schedule/).
    schedule_kinds: tuple[str, ...] = ("fixed",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
    ) -> None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}; e.g. sparsity=0.9")
        self.sparsity = float(sparsity)
        dist = dict(distribution or {"name": "uniform"})
        self.distribution = str(dist.get("name", "uniform"))
        self.dense_first = bool(dist.get("dense_first", False))
        self.dense_last = bool(dist.get("dense_last", False))
        self.power_scale = float(dist.get("power_scale", 1.0))
        self.schedule_cfg = dict(schedule or {"kind": "fixed"})
        kind = self.schedule_cfg.get("kind", "fixed")
        if kind not in self.schedule_kinds:
            raise ConfigError(
                f"pruning={self.name} cannot use a '{kind}' schedule; it takes "
                f"{' or '.join(self.schedule_kinds)} (choose a matching schedule=...)"
            )
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dense: frozenset[str] = frozenset()
        # Build the schedule once for a nominal run so bad schedule values fail now, before
        # training; setup() rebuilds it for the real length of training.
        self.total_steps, self.steps_per_epoch = 1000, 10
        self.build_schedule()

    # -- set-up -----------------------------------------------------------------------------
    def setup(
        self, shapes: dict[str, tuple[int, ...]], total_steps: int, steps_per_epoch: int
    ) -> None:
        """Learn the layer shapes and the length of training; build the schedule."""
        self.shapes = dict(shapes)
        self.dense = dense_layers(list(shapes), self.dense_first, self.dense_last)
        self.total_steps = int(total_steps)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.build_schedule()

    def build_schedule(self) -> None:
        """Turn the schedule config (fractions of training) into a schedule over steps."""
        self.schedule = SparsitySchedule(kind="fixed")

    def _step_of(self, key: str, default: float) -> int:
        """A schedule point: ``<key>_epoch`` (epochs) if set, else ``<key>`` (fraction),
        clamped to the last step of training."""
        epoch = self.schedule_cfg.get(f"{key}_epoch")
        if epoch is not None:
            step = int(epoch) * self.steps_per_epoch
        else:
            step = resolve_fraction(float(self.schedule_cfg.get(key, default)), self.total_steps)
        # Steps run from 0 to total_steps - 1: a point at the very end happens on the last one.
        return min(step, max(0, self.total_steps - 1))

    def keep_counts(self, sparsity: float, scores: Params | None = None) -> dict[str, int]:
        """Weights to keep per layer for a global ``sparsity``, by the chosen distribution."""
        return keep_counts(
            self.distribution,
            self.shapes,
            sparsity,
            dense=self.dense,
            scores=scores,
            power_scale=self.power_scale,
        )

    # -- template ---------------------------------------------------------------------------
    def init_masks(self, params: Params, ctx: Context) -> Masks:
        """Masks at the start of training. Default: everything active."""
        return Masks.dense_like(params)

    def is_update_step(self, step: int) -> bool:
        """Whether the masks change before optimizer step ``step``."""
        return self.schedule.is_update_step(step)

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        """New masks at an update step. Default: unchanged."""
        return masks

    def prune_scores(self, params: Params, ctx: Context) -> Params:
        """Importance of each weight, higher = keep. Default: magnitude |w|."""
        return {n: p.detach().abs() for n, p in params.items()}

    def random_init_masks(self, params: Params, ctx: Context) -> Masks:
        """Random masks with the distribution's exact count per layer (static sparse init)."""
        counts = self.keep_counts(self.sparsity)
        return Masks(
            {
                n: random_mask(p.shape, counts[n], ctx.generator(i)).to(p.device)
                for i, (n, p) in enumerate(params.items())
            }
        )


class MagnitudePruning(PruningMethod):
    """Prune to the scheduled sparsity by ``prune_scores``; pruned weights stay pruned."""

    schedule_kinds = ("one_shot", "polynomial")

    def build_schedule(self) -> None:
        cfg = self.schedule_cfg
        if cfg.get("kind") == "one_shot":
            at = self._step_of("at", 0.5)
            self.schedule = SparsitySchedule(kind="one_shot", begin_step=at, end_step=at)
        else:
            begin, end = self._step_of("begin", 0.0), self._step_of("end", 0.75)
            self.schedule = SparsitySchedule(
                kind="polynomial",
                begin_step=begin,
                end_step=max(begin, end),
                frequency=int(cfg.get("frequency", 100)),
                power=float(cfg.get("power", 3.0)),
            )

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        target = self.schedule.sparsity_at(step, self.sparsity)
        scores = self.prune_scores(params, ctx)
        # Pruned weights are never revived: rank them below every active one.
        ranked = {n: torch.where(masks[n], s, torch.full_like(s, -1.0)) for n, s in scores.items()}
        counts = self.keep_counts(target, scores=ranked)
        return Masks({n: topk_mask(ranked[n], min(counts[n], int(masks[n].sum()))) for n in params})


class PruneAndGrow(PruningMethod):
    """Every ΔT steps drop a fraction of each layer's active weights and regrow as many.

    The per-layer count of active weights is constant across an update, and a weight dropped
    in an update is never regrown in the same update (growth draws only from weights that
    were inactive before it).
    """

    schedule_kinds = ("prune_grow",)

    def build_schedule(self) -> None:
        cfg = self.schedule_cfg
        self.drop_schedule = DropSchedule(
            update_every=int(cfg.get("update_every", 100)),
            drop_fraction=float(cfg.get("drop_fraction", 0.3)),
            anneal=str(cfg.get("anneal", "cosine")),
            begin_step=self._step_of("begin", 0.0),
            end_step=self._step_of("end", 0.75),
        )

    def is_update_step(self, step: int) -> bool:
        return self.drop_schedule.is_update_step(step)

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        return self.random_init_masks(params, ctx)

    def grow_scores(self, params: Params, ctx: Context) -> Params:
        """Priority of inactive weights for regrowth, higher = grow first."""
        raise NotImplementedError

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        fraction = self.drop_schedule.fraction_at(step)
        drop_scores = self.prune_scores(params, ctx)
        grow_scores = self.grow_scores(params, ctx)
        new: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if name in self.dense:
                new[name] = mask
                continue
            n_active = int(mask.sum())
            n_drop = min(int(fraction * n_active), mask.numel() - n_active)
            if n_drop <= 0:
                new[name] = mask
                continue
            kept = top_among(drop_scores[name], mask, n_active - n_drop)
            grown = top_among(grow_scores[name], ~mask, n_drop)
            new[name] = kept | grown
        return Masks(new)
