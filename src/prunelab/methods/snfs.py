"""Sparse momentum (SNFS)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruneAndGrow, top_among
from prunelab.sparsity.distributions import round_to_total
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks

# What counts as Adam's momentum: ``normalized`` is the reference's exp_avg / (sqrt(exp_avg_sq)
# + 1e-8) (the direction of Adam's step), ``exp_avg`` the raw first moment.
ADAM_MOMENTA = ("normalized", "exp_avg")
_ADAM_EPS = 1e-8


def redistribute(
    total: int, weights: Mapping[str, float], caps: Mapping[str, int]
) -> dict[str, int]:
    """Split ``total`` regrown weights over the layers in proportion to ``weights``, never
    more than ``caps[name]`` in a layer; ints that sum to exactly ``total``.

    A layer whose share exceeds its cap is capped and the excess is split evenly over the
    layers still below their caps, repeated until none is over (the fixed point of the
    reference's residual loop). Weights that are all zero or not finite split ``total`` in
    proportion to the caps.
    """
    names = list(weights)
    if total <= 0 or not names:
        return dict.fromkeys(names, 0)
    w = {n: float(weights[n]) for n in names}
    w = {n: v if math.isfinite(v) and v > 0.0 else 0.0 for n, v in w.items()}
    if sum(w.values()) <= 0.0:
        w = {n: float(caps[n]) for n in names}
    scale = sum(w.values())
    ideal = {n: total * w[n] / scale for n in names}
    free = set(names)
    while True:
        over = [n for n in names if n in free and ideal[n] > caps[n]]
        if not over:
            break
        excess = sum(ideal[n] - caps[n] for n in over)
        for n in over:
            ideal[n] = float(caps[n])
            free.discard(n)
        if not free:
            break
        for n in free:
            ideal[n] += excess / len(free)
    return round_to_total(ideal, {n: int(caps[n]) for n in names}, int(total))


class SNFS(PruneAndGrow):
    """Dettmers & Zettlemoyer 2019, "Sparse networks from scratch: faster training without
    losing performance" (arXiv:1907.04840); reference code TimDettmers/sparse_learning.

    Every ΔT steps, with the drop fraction α of the prune-and-grow schedule:

    - prune: each layer drops the fraction α of its active weights with the smallest |w|;
    - redistribute: the total dropped is regrown across the layers in proportion to each
      layer's mean momentum magnitude over its active weights (SGD's ``momentum_buffer``,
      Adam's exp_avg / (sqrt(exp_avg_sq) + 1e-8) as the reference, or the raw ``exp_avg``
      with ``adam_momentum=exp_avg``), never more than a layer's free positions; the excess
      of a capped layer is split evenly over the others, as the reference does;
    - grow: each layer grows its share at the candidate positions with the largest momentum
      magnitude (see the deviations for where that momentum comes from).

    The total number of active weights is exactly constant, so the global sparsity stays on
    target while the per-layer densities move. Layers kept dense (``dense_first`` /
    ``dense_last``) take no part. ``regrow_dropped`` is the base's: ``true`` (default, the
    reference) grows among all weights not kept after the drop; ``false`` only among those
    inactive before the update (a layer then drops at most as many as it has inactive).
    Exact ties are broken by the seeded ``tie_generator``.

    Deliberate deviations from the reference:

    - Momentum of inactive weights, as the reference: the engine does not mask this method's
      gradients (``mask_gradients = False``), so the optimizer's momentum tracks every
      weight, and the inactive weights are re-zeroed after every step; at an update the
      optimizer state is zeroed at every weight inactive after it (``reset_state =
      "inactive"``, the reference's ``reset_momentum``), so grown weights keep the momentum
      that made them grow. Where the optimizer holds no momentum at inactive positions
      (SGD without momentum), growth ranks the candidates by the dense gradient |∂L/∂w|
      of the update step instead (RigL's criterion).
    - No momentum state yet (before the first optimizer step, SGD without momentum, or no
      optimizer given): the redistribution uses the mean dense-gradient magnitude instead.
      Momentum is read before the optimizer step of the update step (the reference updates
      after it), so it lacks that one step's gradient.
    - Schedule: prunelab's prune-and-grow schedule (default ΔT = 100 steps, α = 0.3 cosine
      to 0 at 75% of training), as SET and RigL here; the reference prunes at the end of
      every epoch but the last with α = 0.5, cosine-annealed over all training to 0.005.
      ``schedule.drop_fraction=0.5 schedule.end=1.0 schedule.update_every=<steps/epoch>``
      comes close.
    - Counts: α·n is floored per layer (the reference rounds up) and regrowth is rounded so
      the global count is exactly preserved (the reference floors it and carries the
      shortfall forward in a smoothed "adjusted growth"). A layer may fill up to its full
      size (the reference caps regrowth at 99% of its free positions), and there is no
      reference-style reduction of α for near-dense growing layers (``adjust_prune_rate``).
    - Initial mask: the yaml's distribution with exact per-layer counts (uniform by default,
      the reference's ``constant`` init, which draws each weight with probability = density).
    """

    name = "snfs"
    needs_dense_grads = True
    mask_gradients = False
    reset_state = "inactive"

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        adam_momentum: str = "normalized",
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if adam_momentum not in ADAM_MOMENTA:
            raise ConfigError(
                f"pruning.adam_momentum must be one of {', '.join(ADAM_MOMENTA)}, got "
                f"{adam_momentum!r}; e.g. pruning.adam_momentum=normalized"
            )
        self.adam_momentum = str(adam_momentum)

    def momentum(self, param: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        """The optimizer's momentum of ``param``, or None when it holds none (yet)."""
        state = ctx.optimizer.state.get(param) if ctx.optimizer is not None else None
        if not state:
            return None
        if torch.is_tensor(state.get("exp_avg")):
            m = state["exp_avg"].detach().float()
            if self.adam_momentum == "normalized" and torch.is_tensor(state.get("exp_avg_sq")):
                m = m / (state["exp_avg_sq"].detach().float().sqrt() + _ADAM_EPS)
        elif torch.is_tensor(state.get("momentum_buffer")):
            m = state["momentum_buffer"].detach().float()
        else:
            return None
        return m if m.shape == param.shape else None

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        fraction = self.drop_schedule.fraction_at(step)
        layers = [n for n in masks if n not in self.dense]
        index = {n: i for i, n in enumerate(masks)}
        grads = {}
        for n in layers:
            g = ctx.grads.get(n)
            grads[n] = (
                g.detach().float().abs()
                if g is not None
                else torch.zeros_like(masks[n], dtype=torch.float)
            )
        drop_scores = self.prune_scores(params, ctx)
        found = {n: self.momentum(params[n], ctx) for n in layers}
        momenta = {n: m.abs() for n, m in found.items() if m is not None}
        # Redistribution signal: momentum if every layer has some, else the dense gradient.
        signal = momenta if len(momenta) == len(layers) else grads

        kept: dict[str, torch.Tensor] = {}
        caps: dict[str, int] = {}
        stats: dict[str, float] = {}
        removed = 0
        for name in layers:
            mask = masks[name]
            n_active = int(mask.sum())
            n_drop = int(fraction * n_active)
            if not self.regrow_dropped:
                n_drop = min(n_drop, mask.numel() - n_active)
            if n_drop > 0:
                kept[name] = top_among(
                    drop_scores[name],
                    mask,
                    n_active - n_drop,
                    self.tie_generator(ctx, index[name], "drop"),
                )
            else:
                kept[name] = mask
            removed += n_drop
            # Candidates for growth and their number (the layer's free capacity).
            free = (
                mask.numel() - (n_active - n_drop)
                if self.regrow_dropped
                else mask.numel() - n_active
            )
            caps[name] = free
            stats[name] = float(signal[name][mask].mean()) if n_active else 0.0

        regrow = redistribute(removed, stats, caps)
        new = dict(masks.items())
        for name in layers:
            mask = masks[name]
            candidates = ~kept[name] if self.regrow_dropped else ~mask
            momentum = momenta.get(name)
            # Rank by momentum only where the optimizer tracks it for inactive weights.
            tracked = momentum is not None and bool((momentum[~mask] != 0).any())
            scores = momentum if tracked else grads[name]
            grown = top_among(
                scores, candidates, regrow[name], self.tie_generator(ctx, index[name], "grow")
            )
            new[name] = kept[name] | grown
        return Masks(new)
