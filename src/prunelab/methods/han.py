"""Iterative magnitude pruning with retraining (Han et al. 2015)."""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import MagnitudePruning, Params, positive_int, topk_mask
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks

log = logging.getLogger(__name__)

# LR schedulers that compute the next learning rate from each param group's current one
# (``group["lr"] * factor``), so a retraining factor applied to the group carries through
# every later step. Others (LambdaLR, OneCycleLR, CyclicLR, CosineAnnealingWarmRestarts,
# SequentialLR, ...) recompute it from the base learning rate and would silently undo it.
CHAINABLE_SCHEDULERS = tuple(
    f"torch.optim.lr_scheduler.{name}"
    for name in (
        "CosineAnnealingLR",
        "MultiStepLR",
        "StepLR",
        "ExponentialLR",
        "MultiplicativeLR",
        "PolynomialLR",
        "LinearLR",
        "ConstantLR",
    )
)


@dataclass(frozen=True)
class IterativeSchedule:
    """Pruning steps of iterative pruning: a pure function of the optimizer step.

    ``steps`` are the optimizer steps (non-decreasing) before which the masks are pruned, one
    per iteration; steps that coincide (a very short run) merge into one update that jumps to
    the later iteration. Iteration ``i`` (1-based) of ``n`` ends at the sparsity
    ``1 - (1 - s)^(i / n)``: every iteration removes the same fraction of the weights that
    survived the previous one, and the last reaches the target ``s`` exactly.
    """

    steps: tuple[int, ...]
    kind: str = "iterative"

    @classmethod
    def spread(cls, begin: int, end: int, iterations: int) -> IterativeSchedule:
        """``iterations`` steps spread evenly from ``begin`` to ``end`` (both included)."""
        if iterations == 1:
            return cls((begin,))
        return cls(
            tuple(begin + round(i * (end - begin) / (iterations - 1)) for i in range(iterations))
        )

    @property
    def begin_step(self) -> int:
        return self.steps[0]

    @property
    def end_step(self) -> int:
        return self.steps[-1]

    def iteration_at(self, step: int) -> int:
        """How many pruning iterations have run once the update at ``step`` is done."""
        return bisect.bisect_right(self.steps, int(step))

    def is_update_step(self, step: int) -> bool:
        return int(step) in self.steps

    def sparsity_at(self, step: int, target: float) -> float:
        """The sparsity in force after the update at ``step``: 0 while dense."""
        done, total = self.iteration_at(step), len(self.steps)
        if done == 0:
            return 0.0
        if done >= total:
            return float(target)
        return 1.0 - (1.0 - float(target)) ** (done / total)


def active_std(weight: torch.Tensor, active: torch.Tensor) -> float:
    """Standard deviation (Bessel's correction) of a layer's active weights, computed as
    :func:`prunelab.sparsity.patterns.threshold_mask` does; 0 with fewer than two."""
    values = weight.detach()[active.bool()].float()
    return float(values.std()) if values.numel() > 1 else 0.0


class HanPruning(MagnitudePruning):
    """Han, Pool, Tran & Dally 2015, "Learning both weights and connections for efficient
    neural networks" (NeurIPS): train dense, then iterations of prune and retrain.

    Phases (``schedule=iterative``): dense training until ``schedule.begin`` (a fraction of
    the optimizer steps, or the start of epoch ``schedule.begin_epoch``); then
    ``pruning.iterations`` pruning steps spread evenly from ``begin`` to ``schedule.end``
    (``end_epoch``), each followed by retraining until the next one; the last pruning step
    reaches the final sparsity and the rest of training retrains at it. Pruning removes the
    active weights with ``|w| < q * std``, ``std`` the standard deviation of the layer's
    active weights (Bessel's correction) and ``q`` the paper's quality parameter. Pruned
    weights never return (their weights and optimizer state are zeroed by the engine and
    stay so); the surviving weights keep their trained values (no re-initialisation) and
    their optimizer state.

    ``q`` is chosen per iteration so that ``sparsity`` is reached exactly: iteration ``i`` of
    ``n`` prunes to ``1 - (1 - sparsity)^(i/n)`` (each iteration removes the same fraction
    of the surviving weights). With ``distribution=global`` (the default) one ``q`` serves
    every layer: the cut is one threshold over ``|w| / std`` of all non-dense layers; with
    ``uniform``, ``er`` or ``erk`` each layer gets its own ``q`` so that it keeps its count
    from the distribution. ``q`` is not bisected but read off the sorted scores: the mask
    keeps the top-k scores, which is ``|w| >= q * std`` with ``q`` (stored in
    ``last_quality``, logged) the midpoint between the largest pruned and the smallest kept
    ``|w| / std``; exact ties at the cut are broken at random (seeded), so every layer keeps
    exactly its count and the total number of zeros is ``round(sparsity * N)``.

    ``pruning.quality=q`` prunes by the paper's rule alone instead: every iteration prunes
    the active weights with ``|w| < q * std`` in each layer not kept dense (``std`` recomputed
    over the survivors, so the sparsity still grows). ``sparsity`` and the distribution's
    name are then ignored; the sparsity reached is reported and the run records no target
    (as ``pruning.threshold`` of ``pruning=static``).

    Retraining learning rate: before the optimizer step of the first pruning step, the
    ``lr`` of every optimizer param group is multiplied by ``pruning.retrain_lr_factor``
    (0.1: Han et al. retrain at a tenth of the original learning rate); it stays so for the
    rest of training, later iterations do not scale it again. The factor lives in the
    optimizer's param groups, so it survives a checkpoint round trip (the optimizer's state
    dict stores each group's ``lr``). An LR scheduler that derives the next learning rate
    from the current one (cosine, multistep, step, exponential, ...) keeps the factor; one
    that recomputes it from the base learning rate (LambdaLR, OneCycleLR, CyclicLR,
    CosineAnnealingWarmRestarts, SequentialLR, ...) would undo it and is a ConfigError unless
    ``retrain_lr_factor=1`` (``pruning.lr_scheduler`` is filled in from ``lr_scheduler=``).

    Deviations from the paper: the pruning steps sit at fixed points of a fixed training
    budget (not "retrain until convergence"); the per-iteration sparsities (geometric) and
    the choice of q to meet them are this implementation's (the paper sets q by hand per
    layer from a sensitivity analysis; ``pruning.quality`` is the closest to that); conv and
    fully connected layers are pruned in the same iterations (section 3.3 retrains them
    separately); the dropout rate is not adjusted for the smaller layers (section 3.2);
    neurons left without connections are not removed (section 3.5; their remaining weights
    stay active); ``std`` is over the active weights, not all weights of the layer; with a
    cosine schedule whose ``eta_min`` is above 0 the retraining learning rate decays from
    the scaled value to ``eta_min`` (not ``eta_min * factor``). The scheduler check sees
    only the scheduler named in the config (``pruning.lr_scheduler``); one attached in code
    is not checked.
    """

    name = "han"
    schedule_kinds = ("iterative",)
    supports_n_m = False

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        iterations: int = 3,
        quality: float | None = None,
        retrain_lr_factor: float = 0.1,
        lr_scheduler: str | None = None,
        **options: Any,
    ) -> None:
        for key in ("threshold", "threshold_mode"):
            if key in options:
                raise ConfigError(
                    f"pruning=han has no pruning.{key}; its threshold is pruning.quality "
                    "times each layer's weight std (e.g. pruning.quality=1.0), or null to "
                    "prune to `sparsity`"
                )
        # build_schedule (called by the base class) needs the number of iterations.
        self.iterations = positive_int("iterations", iterations, 3)
        super().__init__(sparsity, distribution, schedule, **options)
        self.quality = _check_quality(quality)
        self.retrain_lr_factor = _check_factor(retrain_lr_factor)
        self.lr_scheduler = None if lr_scheduler is None else str(lr_scheduler)
        if (
            self.retrain_lr_factor != 1.0
            and self.lr_scheduler is not None
            and self.lr_scheduler not in CHAINABLE_SCHEDULERS
        ):
            short = self.lr_scheduler.rsplit(".", 1)[-1]
            raise ConfigError(
                f"pruning=han multiplies the learning rate by pruning.retrain_lr_factor="
                f"{self.retrain_lr_factor:g} at its first pruning step, but {short} "
                "recomputes it from the base learning rate and would undo that; use "
                "lr_scheduler=none, cosine or multistep, or set pruning.retrain_lr_factor=1"
            )
        if self.quality is not None:
            # What the run record reads: no target sparsity, the threshold decides it.
            self.threshold, self.threshold_mode = self.quality, "std"
        # Per layer, the q of the latest pruning iteration (|w| < q * std was pruned).
        self.last_quality: dict[str, float] = {}
        # The latest step the engine asked about (it asks before every optimizer step): with
        # pruning.quality the masks are final once the last pruning step has passed.
        self._last_step_seen = -1

    # -- schedule ---------------------------------------------------------------------------
    def build_schedule(self) -> None:
        begin, end = self._step_of("begin", 0.25), self._step_of("end", 0.75)
        if end < begin:
            raise ConfigError(
                f"schedule.end (step {end}) is before schedule.begin (step {begin}) for "
                "pruning=han; set schedule.end >= schedule.begin (or end_epoch >= begin_epoch)"
            )
        self.schedule = IterativeSchedule.spread(begin, end, self.iterations)

    def is_update_step(self, step: int) -> bool:
        self._last_step_seen = int(step)
        return self.schedule.is_update_step(step)

    # -- pruning ----------------------------------------------------------------------------
    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        if step == self.schedule.begin_step:
            self.scale_learning_rate(ctx.optimizer)
        if self.quality is not None:
            new = self.threshold_update(params, masks)
            self.last_quality = {n: self.quality for n in params if n not in self.dense}
        else:
            new = self.prune_to_schedule(step, params, masks, ctx)
        log.info(
            "han: pruning iteration %d/%d at step %d: sparsity %.4f, q %s",
            min(self.schedule.iteration_at(step), self.iterations),
            self.iterations,
            step,
            new.sparsity(),
            {n: round(q, 4) for n, q in self.last_quality.items()},
        )
        return new

    def prune_to_schedule(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        """Keep the top ``|w| / std`` of the active weights at this iteration's sparsity;
        set ``last_quality`` to the q that separates kept from pruned."""
        target = self.schedule.sparsity_at(step, self.sparsity)
        stds = {n: active_std(p, masks[n]) for n, p in params.items()}
        common = self.distribution.strip().lower() == "global"
        scores: Params = {}
        for name, p in params.items():
            score = p.detach().abs()
            if common:  # one q for all layers: compare |w| / std across layers
                score = score / (stds[name] if stds[name] > 0 else 1.0)
            # Pruned weights are never revived: rank them below every active one.
            scores[name] = torch.where(masks[name], score, torch.full_like(score, -1.0))
        counts = self.keep_counts(target, scores=scores, generator=ctx.generator(-1, "ties-global"))
        new = Masks(
            {
                n: topk_mask(
                    scores[n],
                    min(counts[n], int(masks[n].sum())),
                    self.tie_generator(ctx, i, "prune"),
                )
                for i, n in enumerate(params)
            }
        )
        pruned = [n for n in params if n not in self.dense]
        groups = [pruned] if common else [[n] for n in pruned]
        self.last_quality = {}
        for names in groups:
            q = _separating_quality(params, masks, new, stds, names)
            self.last_quality.update(dict.fromkeys(names, q))
        return new

    def scale_learning_rate(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Multiply every param group's ``lr`` by ``retrain_lr_factor`` (once, at the first
        pruning step)."""
        factor = self.retrain_lr_factor
        if factor == 1.0:
            return
        if optimizer is None:
            raise ValueError(
                "pruning=han scales the learning rate at its first pruning step but got no "
                "optimizer; pass it to engine.before_optimizer_step or set "
                "pruning.retrain_lr_factor=1"
            )
        for group in optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].mul_(factor)
            else:
                group["lr"] = group["lr"] * factor
        log.info("han: learning rate x %g for retraining from here on", factor)

    def at_target(self, masks: Masks) -> bool:
        """Whether the last pruning iteration has run: with a target, once the masks hold
        no more weights than the final count (earlier iterations hold more); with
        ``pruning.quality``, once the engine has passed the last pruning step."""
        if self.quality is not None:
            return self._last_step_seen >= self.schedule.end_step
        total = sum(m.numel() for m in masks.values())
        active = sum(int(m.sum()) for m in masks.values())
        final_keep = total - round(self.budget_sparsity(self.sparsity) * total)
        return active <= final_keep


def _separating_quality(
    params: Params, before: Masks, after: Masks, stds: dict[str, float], names: list[str]
) -> float:
    """The q with ``|w| >= q * std`` exactly the kept weights of ``names`` (up to ties): the
    midpoint between the largest pruned and the smallest kept ``|w| / std``; 0 when this
    iteration pruned nothing there, inf when it kept nothing."""
    kept_min, pruned_max = math.inf, -math.inf
    for name in names:
        std = stds[name] if stds[name] > 0 else 1.0
        score = params[name].detach().abs().double() / std
        kept, pruned = after[name], before[name] & ~after[name]
        if bool(kept.any()):
            kept_min = min(kept_min, float(score[kept].min()))
        if bool(pruned.any()):
            pruned_max = max(pruned_max, float(score[pruned].max()))
    if pruned_max == -math.inf:
        return 0.0
    if kept_min == math.inf:
        return math.inf
    return (pruned_max + kept_min) / 2


def _check_quality(value: Any) -> float | None:
    if value is None:
        return None
    number = _finite(value)
    if number is None or number <= 0:
        raise ConfigError(
            f"pruning.quality must be a number > 0 or null, got {value!r}; e.g. "
            "pruning.quality=1.0 (prune |w| < 1.0 x std), or null to prune to `sparsity`"
        )
    return number


def _check_factor(value: Any) -> float:
    number = _finite(value)
    if number is None or not 0 < number <= 1:
        raise ConfigError(
            f"pruning.retrain_lr_factor must be a number in (0, 1], got {value!r}; e.g. "
            "pruning.retrain_lr_factor=0.1 (Han et al.) or 1 to keep the learning rate"
        )
    return number


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
