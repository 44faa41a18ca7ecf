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

import math
from typing import Any

import numpy as np
import torch

from prunelab.errors import ConfigError
from prunelab.sparsity.distributions import (
    check_distribution,
    dense_layers,
    describe_distribution,
    distribution_options,
    keep_counts,
)
from prunelab.sparsity.engine import Context
from prunelab.sparsity.indices import (
    fill_,
    flatnonzero,
    gather,
    merge_sorted,
    select,
    without,
)
from prunelab.sparsity.masks import Masks
from prunelab.sparsity.schedules import DropSchedule, SparsitySchedule, resolve_fraction

Params = dict[str, torch.Tensor]

# What the optimizer step of a mask-update step does (the engine reads ``update_step``):
# ``masked``: the step runs with the new masks and grown weights' gradients zeroed, so a grown
# weight ends the step at exactly 0 with zero optimizer state (sparse_learning, which changes
# the mask after the step, ends the same way); ``skip``: no weight or optimizer-state change at
# all on update steps (google-research/rigl skips the optimizer update on mask-update
# iterations); ``dense``: grown weights get their dense gradient in the step that grows them
# (the behaviour of prunelab before 0.2, kept for comparison).
UPDATE_STEPS = ("masked", "skip", "dense")
# Adam/AdamW after regrowth: ``per_weight`` bias-corrects a regrown weight by its own step
# count, so its updates equal those of a fresh Adam; ``per_tensor`` (the default) is torch's
# and the reference implementations' per-tensor step count, under which a regrown weight's
# first steps are up to ~6x larger. Measured on MNIST-1D (RigL, Adam 1e-3, 3 seeds) the
# per-tensor behaviour was 2.5-2.7 points more accurate at 90% and 95% sparsity, so it stays
# the default; see the README.
ADAM_BIAS_CORRECTIONS = ("per_weight", "per_tensor")
# What ``sparsity`` counts when layers are kept dense: ``all`` prunable weights (the kept-dense
# layers are paid for by the others) or only the ``pruned`` layers (the RigL reference).
BUDGETS = ("all", "pruned")


# Inputs from this size on find their k-th largest value through a sample (kth_largest).
SAMPLED_SELECTION_MIN = 1 << 15
_SAMPLE_SIZE = 1 << 13


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of the 1-D ``flat`` (1 <= k <= n, no NaN), exactly the
    value ``torch.topk(flat, k).values.min()`` is, at a fraction of its cost on large inputs.

    A strided sample of about 8k entries gives a threshold that, by the sample's ranks,
    about 1.5k entries reach; the k largest are then chosen among the entries at or above
    it. When at least k entries are, they hold the k largest of ``flat`` (any entry above
    the k-th largest exceeds the threshold too), so the answer is exact; otherwise (an
    unlucky sample) the whole input is searched. Selecting nearly all (k > 7n/8) searches for
    the (n - k + 1)-th smallest instead; a k in between is left to ``torch.topk``."""
    return _kth_and_superset(flat, k)[0]


def _kth_and_superset(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kth_largest`'s value and, when a sample found it, the indices (increasing) of
    the entries at or above the sample's threshold: every entry at or above the k-th
    largest value is among them. None stands for all entries."""
    n = flat.numel()
    if n < SAMPLED_SELECTION_MIN or n // 8 < min(k, n - k + 1) or k < 1:
        return _kth_value(flat, k), None
    if k > n // 2:
        return -kth_largest(-flat, n - k + 1), None
    sample = flat[:: max(1, n // _SAMPLE_SIZE)]
    rank = min(sample.numel(), int(1.5 * k * sample.numel() / n) + 16)
    threshold = _kth_value(sample, rank)
    # Indices rather than the values (flat[flat >= threshold]): as fast, and they locate
    # the chosen entries without another pass over the input.
    index = _at_least(flat, threshold)
    if index.numel() >= k:
        return _kth_value(gather(flat, index), k), index
    return _kth_value(flat, k), None


def _kth_value(values: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.topk(values, k).values.min()`` for a 1-D ``values`` without NaN (a 0-dim
    tensor). On the CPU through numpy's introselect, which finds the one value; topk
    partitions (value, index) pairs and measured 2-5x slower inside a mask update."""
    n = values.numel()
    if _numpy_selects(values) and 1 <= k <= n:
        array = values.detach().numpy()
        return torch.from_numpy(np.partition(array, n - k)[n - k : n - k + 1]).reshape(())
    return torch.topk(values, k, sorted=False).values.min()


def _at_least(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Indices (increasing) of the entries of the 1-D ``values`` at or above the 0-dim
    ``threshold``. On the CPU through numpy, whose comparison and nonzero measured 2-4x
    faster than torch's on the sizes a mask update sees."""
    if _numpy_selects(values):
        array = values.detach().numpy()
        return torch.from_numpy(np.flatnonzero(array >= array.dtype.type(threshold.item())))
    return torch.nonzero(values >= threshold, as_tuple=True)[0]


def _numpy_selects(values: torch.Tensor) -> bool:
    """Whether the selections here go through numpy for ``values``: float32 or float64 on
    the CPU (numpy has no bfloat16; other devices keep torch's kernels)."""
    return values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)


def _choose(
    values: torch.Tensor, kth: torch.Tensor, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Positions in the 1-D ``values`` of its ``k`` largest entries, given the k-th
    largest value ``kth``: every entry above it, and as many entries equal to it as places
    remain, taken in increasing position, or at random with ``generator``. The positions
    come out in increasing order."""
    chosen = _at_least(values, kth)
    if chosen.numel() == k:  # every entry equal to the k-th value has a place
        return chosen
    (above,) = torch.nonzero(values > kth, as_tuple=True)
    (ties,) = torch.nonzero(values == kth, as_tuple=True)
    need = k - above.numel()
    if generator is not None and ties.numel() > need:
        ties = ties[torch.randperm(ties.numel(), generator=generator)[:need].to(ties.device)]
    return merge_sorted(above, ties[:need].sort().values)


def top_index(
    flat: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
    minus_inf_excluded: bool = False,
) -> torch.Tensor | None:
    """Indices of the ``k`` largest entries of the 1-D float ``flat`` (no NaN; 1 <= k <=
    n), ties at the k-th value as in :func:`topk_mask`. With ``minus_inf_excluded`` (-inf
    marks entries that may not be chosen) None when the k-th value is -inf: the caller then
    restricts the ties itself. Works in index space: on a large input only the entries at
    or above a sampled threshold are examined after one pass, which spares the whole-layer
    masks of :func:`topk_mask`."""
    kth, index = _kth_and_superset(flat, k)
    if minus_inf_excluded and bool(kth == -math.inf):
        return None
    if index is None:
        return _choose(flat, kth, k, generator)
    return gather(index, _choose(gather(flat, index), kth, k, generator))


def topk_mask(
    scores: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Bool mask with True at exactly ``k`` of the largest entries of ``scores``.

    NaN scores rank below everything (a NaN never makes a layer lose weights: the result
    always holds exactly ``k``). Exact ties at the k-th value are broken at random with
    ``generator`` (seeded from (seed, step, layer), so every rank breaks them alike), or by
    lowest index without one. Only exact ties are randomised: distinct scores keep their
    order (the RigL reference adds N(0, 1e-5) noise instead, which also reorders near-ties).
    """
    flat = torch.nan_to_num(scores.detach().flatten().float(), nan=-math.inf)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    return _select(flat, k, None, generator).view_as(scores)


def _select(
    flat: torch.Tensor,
    k: int,
    candidates: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of the 1-D ``flat`` (no NaN) among
    ``candidates`` (all entries if None; the others must hold -inf), ties as in
    :func:`topk_mask`. Everything above the k-th largest value is kept; the remaining
    places go to entries equal to it. When a sample located the k-th value, only the
    entries at or above its threshold are examined; otherwise one linear pass, and the
    tied entries are located only when there are more of them than places. A full sort
    would cost an update ten times as much."""
    kth, index = _kth_and_superset(flat, k)
    minus_inf = bool(kth == -math.inf)  # then non-candidates tie with the k-th value
    if index is not None and not minus_inf:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[index[_choose(flat[index], kth, k, generator)]] = True
        return mask
    mask = flat >= kth
    if candidates is not None:
        mask &= candidates
    if int(mask.count_nonzero()) == k:  # every entry equal to the k-th value has a place
        return mask
    mask = flat > kth
    tied = flat == kth
    if candidates is not None:
        tied &= candidates
    ties = tied.nonzero().flatten()
    need = k - int(mask.count_nonzero())
    if generator is not None and ties.numel() > need:
        ties = ties[torch.randperm(ties.numel(), generator=generator)[:need].to(ties.device)]
    mask[ties[:need]] = True
    return mask


def top_among(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bool mask of ``k`` highest ``scores`` among the ``candidates`` entries (ties as in
    :func:`topk_mask`). When the candidates are a minority (dropping from a 10%-dense
    layer) it selects among them alone; otherwise (growing into the inactive 90%) over the
    whole layer with the other entries at -inf, which spares gathering most of it. Both
    choose the same entries, random tie-breaks included (the tied entries are taken in
    index order either way)."""
    cand = candidates.flatten()
    n_candidates = int(cand.count_nonzero())
    k = max(0, min(k, n_candidates))
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if 2 * n_candidates > cand.numel():
        flat = torch.nan_to_num(scores.detach().flatten().float(), nan=-math.inf)
        flat = flat.masked_fill(~cand, -math.inf)
        return _select(flat, k, cand, generator).view_as(scores)
    (index,) = torch.nonzero(cand, as_tuple=True)  # a third faster than .nonzero() here
    chosen = index[topk_mask(scores.flatten()[index], k, generator)]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[chosen] = True
    return mask.view_as(scores)


def positive_int(key: str, value: Any, example: int) -> int:
    """``value`` as an int >= 1, or a one-line ConfigError naming ``pruning.<key>``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        number = None
    else:
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not number.is_integer() or number < 1:
        raise ConfigError(
            f"pruning.{key} must be an integer >= 1, got {value!r}; e.g. pruning.{key}={example}"
        )
    return int(number)


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
    # True: the model computes other channels for every input (fbs); its cost per input is
    # measured on data (cost/macs_dynamic_*), and there is no one fixed model to export.
    input_adaptive = False
    # Kinds of `schedule=` this method accepts (see conf/schedule/).
    schedule_kinds: tuple[str, ...] = ("fixed",)

    # Methods that read the dense gradients at update steps (RigL's grow scores): the engine
    # skips an update whose gradients are not finite (an AMP overflow step).
    needs_dense_grads = False
    # False: the engine leaves the gradients of inactive weights in place, so the optimizer's
    # momentum tracks every weight (sparse momentum); the weights are still re-zeroed after
    # every step.
    mask_gradients = True
    # Optimizer state zeroed at an update: at the weights that "changed", or at every weight
    # "inactive" after it (sparse momentum).
    reset_state = "changed"

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        update_step: str = "masked",
        adam_bias_correction: str = "per_tensor",
    ) -> None:
        if not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}; e.g. sparsity=0.9")
        self.sparsity = float(sparsity)
        dist = dict(distribution or {"name": "uniform"})
        self.distribution = str(dist.get("name", "uniform"))
        self.dense_first = bool(dist.get("dense_first", False))
        self.dense_last = bool(dist.get("dense_last", False))
        self.power_scale = float(dist.get("power_scale", 1.0))
        self.budget = str(dist.get("budget", "all"))
        # The distribution's own options (sensitivity: ``curves``), checked now, before training.
        self.distribution_options = distribution_options(self.distribution, dist)
        # N:M semi-structured masks (None = off); only the magnitude methods build them.
        from prunelab.sparsity.patterns import parse_n_m

        self.n_m = parse_n_m(dist.get("n_m"))
        if self.n_m is not None and not self.is_dense and not getattr(self, "supports_n_m", False):
            raise ConfigError(
                f"distribution.n_m is supported by the magnitude methods (static, gmp), not "
                f"pruning={self.name}; remove distribution.n_m or choose pruning=static"
            )
        # Block-sparse masks (None = off): whole R x C blocks of each layer's [out, in*kh*kw]
        # matrix; built by the same methods as N:M (``supports_block_masks``, by default
        # ``supports_n_m``).
        from prunelab.sparsity.patterns import parse_block

        self.mask_block = parse_block(dist.get("block"))
        block_ok = getattr(self, "supports_block_masks", getattr(self, "supports_n_m", False))
        if self.mask_block is not None and not self.is_dense and not block_ok:
            raise ConfigError(
                f"distribution.block is supported by the magnitude methods (static, gmp), not "
                f"pruning={self.name}; remove distribution.block or choose pruning=static"
            )
        if self.mask_block is not None and self.n_m is not None:
            raise ConfigError(
                "distribution.block and distribution.n_m exclude each other (whole blocks vs "
                "N of every M weights); set one of them to null"
            )
        if self.budget not in BUDGETS:
            raise ConfigError(
                f"distribution.budget must be one of {', '.join(BUDGETS)}, got "
                f"{self.budget!r}; e.g. distribution.budget=pruned"
            )
        if update_step not in UPDATE_STEPS:
            raise ConfigError(
                f"pruning.update_step must be one of {', '.join(UPDATE_STEPS)}, got "
                f"{update_step!r}; e.g. pruning.update_step=masked"
            )
        self.update_step = str(update_step)
        if adam_bias_correction not in ADAM_BIAS_CORRECTIONS:
            raise ConfigError(
                "pruning.adam_bias_correction must be one of "
                f"{', '.join(ADAM_BIAS_CORRECTIONS)}, got {adam_bias_correction!r}; "
                "e.g. pruning.adam_bias_correction=per_weight"
            )
        self.adam_bias_correction = str(adam_bias_correction)
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
        check_distribution(self.distribution, self.shapes, self.dense, self.distribution_options)
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

    def keep_counts(
        self,
        sparsity: float,
        scores: Params | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, int]:
        """Weights to keep per layer for a global ``sparsity``, by the chosen distribution.

        With ``distribution.budget=pruned`` the sparsity counts only the layers that are not
        kept dense (the RigL reference's convention); with ``all`` it counts every prunable
        weight, so the kept-dense layers are paid for by the others.
        """
        return keep_counts(
            self.distribution,
            self.shapes,
            self.budget_sparsity(sparsity),
            dense=self.dense,
            scores=scores,
            power_scale=self.power_scale,
            generator=generator,
            options=self.distribution_options,
        )

    def distribution_report(self) -> dict[str, Any]:
        """What the distribution chose at the target sparsity, for the record (sensitivity:
        the per-layer rates and the curves they came from); {} for most distributions."""
        return describe_distribution(
            self.distribution,
            self.shapes,
            self.budget_sparsity(self.sparsity),
            self.dense,
            self.distribution_options,
        )

    def budget_sparsity(self, sparsity: float) -> float:
        """``sparsity`` as a fraction of all prunable weights (what the distributions take)."""
        if self.budget == "all" or not self.dense or not self.shapes:
            return sparsity
        numel = {n: math.prod(s) for n, s in self.shapes.items()}
        pruned = sum(v for n, v in numel.items() if n not in self.dense)
        return sparsity * pruned / max(1, sum(numel.values()))

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

    def penalty(self, params: Params, step: int) -> torch.Tensor | None:
        """A term added to the training loss at optimizer step ``step`` (L1, L0, ...), or
        None. Default: none."""
        return None

    def prune_scores(self, params: Params, ctx: Context) -> Params:
        """Importance of each weight, higher = keep. Default: magnitude |w|."""
        return {n: p.detach().abs() for n, p in params.items()}

    def at_target(self, masks: Masks) -> bool:
        """Whether ``masks`` hold this method's final sparsity (within one weight per
        layer): only such epochs compete for the best checkpoint."""
        names = (
            [n for n in masks if n not in self.dense] if self.budget == "pruned" else list(masks)
        )
        total = sum(masks[n].numel() for n in names)
        if not total:
            return True
        return masks.sparsity(names) >= self.sparsity_target() - len(masks) / total - 1e-9

    def target_report(self, masks: Masks) -> dict[str, Any]:
        """The start of a method's ``report``: the target, the masks' sparsity, the distance
        between them (realised - target) and whether the run counts as at target."""
        realised = masks.sparsity()
        return {
            "target": self.sparsity,
            "realised": realised,
            "distance": realised - self.sparsity,
            "at_target": self.at_target(masks),
        }

    def sparsity_target(self) -> float:
        """The final sparsity over the layers ``budget`` counts."""
        return self.sparsity if self.budget == "pruned" else self.budget_sparsity(self.sparsity)

    def masks_from_scores(self, scores: Params, ctx: Context) -> Masks:
        """Keep the highest ``scores`` at the target sparsity: per-layer counts from the
        distribution (``global``: one threshold over all layers), exact ties broken at
        random (pruning at initialisation: SNIP, GraSP)."""
        counts = self.keep_counts(self.sparsity, scores=scores, generator=ctx.generator(-1, "ties"))
        return Masks(
            {
                n: topk_mask(scores[n], counts[n], self.tie_generator(ctx, i, "init"))
                for i, n in enumerate(scores)
            }
        )

    def tie_generator(self, ctx: Context, layer: int, purpose: str) -> torch.Generator:
        """The generator that breaks exact score ties in ``layer`` at this step."""
        return ctx.generator(layer, stream=f"ties-{purpose}")

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
    supports_n_m = True
    # |sparsity - (1 - N/M)| allowed with distribution.n_m, so that 0.667 works for 1:3.
    N_M_SPARSITY_TOLERANCE = 1e-3

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        threshold: float | None = None,
        threshold_mode: str = "absolute",
        **options: Any,
    ) -> None:
        """Magnitude pruning to ``sparsity``, with two alternatives to the per-layer count.

        ``distribution.n_m="N:M"``: every pruning step keeps, in each group of M consecutive
        weights along the input dimension (:mod:`prunelab.sparsity.patterns`), the
        ``M - floor(s_t * M)`` largest magnitudes among the active ones, ``s_t`` the
        schedule's sparsity at that step. One-shot pruning keeps N of every M at once; GMP's
        ramp is the cubic curve rounded down to multiples of 1/M, ending exactly N:M at
        ``schedule.end``. ``sparsity`` must be ``1 - N/M`` (within 1e-3); the distribution's
        name and power_scale are ignored (every pruned layer is at 1 - N/M), kept-dense layers
        need ``distribution.budget=pruned``, and a pruned layer whose input dimension is not a
        multiple of M is an error when training starts.

        ``distribution.block="RxC"``: every pruning step keeps whole ``R x C`` blocks of each
        pruned layer's ``[out, in * kh * kw]`` matrix (:mod:`prunelab.sparsity.patterns`),
        ranked by the L2 norm of their weights' ``prune_scores``: a layer whose budget from
        the distribution (uniform/er/erk) is ``keep`` weights keeps its top
        ``round(keep / (R * C))`` blocks (at least one while ``keep > 0``); ``global`` gives
        every block its norm per weight (``norm / sqrt(R * C)``, broadcast to its weights)
        and takes the budget over all layers by one threshold, then each layer rounds to
        whole blocks. The sparsity so ends within one block per layer of the target, which
        ``at_target`` accepts. Pruned blocks stay pruned; a pruned layer whose matrix does
        not split into whole blocks is an error when training starts (keep it dense or pick
        a block size that divides it). Excludes ``n_m`` and ``threshold``.

        ``threshold``: one-shot magnitude pruning only (``static``): at the pruning step every
        layer not kept dense loses its weights with ``|w| < θ``, ``θ = threshold``
        (``threshold_mode=absolute``) or ``threshold`` times the layer's weight standard
        deviation (``std``, Han et al. 2015). ``sparsity`` and the distribution's name are
        then ignored; the sparsity reached is whatever the threshold gives.
        """
        super().__init__(sparsity, distribution, schedule, **options)
        from prunelab.sparsity.patterns import check_threshold

        self.threshold, self.threshold_mode = check_threshold(threshold, threshold_mode)
        kind = self.schedule_cfg.get("kind")
        if self.threshold is not None and kind != "one_shot":
            raise ConfigError(
                f"pruning.threshold works with one-shot pruning (pruning=static), not "
                f"pruning={self.name} with a '{kind}' schedule; set pruning.threshold=null"
            )
        if self.threshold is not None and self.n_m is not None:
            raise ConfigError(
                "pruning.threshold and distribution.n_m exclude each other (a threshold "
                "decides the count, N:M fixes it); set one of them to null"
            )
        if self.threshold is not None and self.mask_block is not None:
            raise ConfigError(
                "pruning.threshold and distribution.block exclude each other (a threshold "
                "prunes single weights, blocks go whole); set one of them to null"
            )
        if self.n_m is not None:
            n, m = self.n_m
            implied = 1.0 - n / m
            if abs(self.sparsity - implied) > self.N_M_SPARSITY_TOLERANCE:
                raise ConfigError(
                    f"distribution.n_m={n}:{m} prunes {implied:.4g} of every layer but "
                    f"sparsity={sparsity}; set sparsity={implied:.4g}"
                )
            self.sparsity = implied
            if (self.dense_first or self.dense_last) and self.budget == "all":
                raise ConfigError(
                    f"distribution.n_m={n}:{m} with dense_first/dense_last needs "
                    "distribution.budget=pruned (the N:M layers are at exactly "
                    f"{implied:.4g}); add distribution.budget=pruned"
                )

    def setup(
        self, shapes: dict[str, tuple[int, ...]], total_steps: int, steps_per_epoch: int
    ) -> None:
        super().setup(shapes, total_steps, steps_per_epoch)
        if self.n_m is not None:
            from prunelab.sparsity.patterns import check_n_m_shape

            for name, shape in self.shapes.items():
                if name not in self.dense:
                    check_n_m_shape(name, shape, self.n_m[1])
        if self.mask_block is not None:
            from prunelab.sparsity.patterns import check_block_shape

            for name, shape in self.shapes.items():
                if name not in self.dense:
                    check_block_shape(name, shape, self.mask_block)

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
        if self.threshold is not None:
            return self.threshold_update(params, masks)
        if self.n_m is not None:
            return self.n_m_update(step, params, masks, ctx)
        if self.mask_block is not None:
            return self.block_update(step, params, masks, ctx)
        target = self.schedule.sparsity_at(step, self.sparsity)
        scores = self.prune_scores(params, ctx)
        # Pruned weights are never revived: rank them below every active one.
        ranked = {n: torch.where(masks[n], s, torch.full_like(s, -1.0)) for n, s in scores.items()}
        counts = self.keep_counts(target, scores=ranked, generator=ctx.generator(-1, "ties-global"))
        return Masks(
            {
                n: topk_mask(
                    ranked[n],
                    min(counts[n], int(masks[n].sum())),
                    self.tie_generator(ctx, i, "prune"),
                )
                for i, n in enumerate(params)
            }
        )

    def n_m_update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        """Keep the ``M - floor(s_t * M)`` (never fewer than N) highest ``prune_scores`` of
        the active weights in every group of M; kept-dense layers are unchanged."""
        from prunelab.sparsity.patterns import n_m_mask

        n, m = self.n_m
        target = self.schedule.sparsity_at(step, self.sparsity)
        keep = max(n, m - math.floor(target * m + 1e-9))
        scores = self.prune_scores(params, ctx)
        return Masks(
            {
                name: masks[name]
                if name in self.dense
                else n_m_mask(
                    scores[name], keep, m, masks[name], self.tie_generator(ctx, i, "prune")
                )
                for i, name in enumerate(params)
            }
        )

    def block_update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        """Keep whole ``R x C`` blocks: each pruned layer its top ``round(keep / (R * C))``
        active blocks by the L2 norm of their ``prune_scores``, ``keep`` the layer's count
        from the distribution at the scheduled sparsity (``global``: one threshold over the
        blocks of all layers by their norm per weight); kept-dense layers are unchanged."""
        from prunelab.sparsity.patterns import block_mask, block_scores

        r, c = self.mask_block
        target = self.schedule.sparsity_at(step, self.sparsity)
        scores = self.prune_scores(params, ctx)
        ranked = None
        if self.distribution.strip().lower() == "global":
            # Every weight carries its block's norm per weight; pruned blocks rank last.
            ranked = {}
            for name, score in scores.items():
                if name in self.dense:
                    continue
                rows = score.shape[0]
                per = block_scores(score, (r, c)) / math.sqrt(r * c)
                live = masks[name].reshape(rows // r, r, -1, c).any(dim=3).any(dim=1)
                per = torch.where(live.to(per.device), per, torch.full_like(per, -1.0))
                grid = per[:, None, :, None].expand(per.shape[0], r, per.shape[1], c)
                ranked[name] = grid.reshape(score.shape)
        counts = self.keep_counts(target, scores=ranked, generator=ctx.generator(-1, "ties-global"))
        return Masks(
            {
                name: masks[name]
                if name in self.dense
                else block_mask(
                    scores[name],
                    min(counts[name], int(masks[name].sum())),
                    (r, c),
                    masks[name],
                    self.tie_generator(ctx, i, "prune"),
                )
                for i, name in enumerate(params)
            }
        )

    def at_target(self, masks: Masks) -> bool:
        # A threshold's sparsity is known only after its one pruning step: the masks are
        # final as soon as they prune anything.
        if self.threshold is not None:
            return masks.sparsity() > 0.0
        if self.mask_block is not None:
            # Whole blocks: each layer ends within one block of its budget.
            names = (
                [n for n in masks if n not in self.dense]
                if self.budget == "pruned"
                else list(masks)
            )
            total = sum(masks[n].numel() for n in names)
            if not total:
                return True
            slack = len(masks) * self.mask_block[0] * self.mask_block[1] / total
            return masks.sparsity(names) >= self.sparsity_target() - slack - 1e-9
        return super().at_target(masks)

    def report(self, masks: Masks) -> dict[str, Any]:
        """The mask pattern the run used, for tables to group by: ``pattern`` (``block``,
        ``n_m``, ``threshold`` or ``unstructured``), ``block`` (``"RxC"`` or None) and
        ``n_m`` (``"N:M"`` or None); with a target sparsity also the target, the realised
        sparsity and their distance."""
        block = f"{self.mask_block[0]}x{self.mask_block[1]}" if self.mask_block else None
        n_m = f"{self.n_m[0]}:{self.n_m[1]}" if self.n_m else None
        if self.threshold is not None:
            pattern = "threshold"
        else:
            pattern = "block" if block else "n_m" if n_m else "unstructured"
        head = {} if self.threshold is not None else self.target_report(masks)
        return {**head, "pattern": pattern, "block": block, "n_m": n_m}

    def threshold_update(self, params: Params, masks: Masks) -> Masks:
        """Prune the active weights with ``|w| < θ`` in every layer not kept dense."""
        from prunelab.sparsity.patterns import threshold_mask

        return Masks(
            {
                name: masks[name]
                if name in self.dense
                else threshold_mask(p, self.threshold, self.threshold_mode, masks[name])
                for name, p in params.items()
            }
        )


class PruneAndGrow(PruningMethod):
    """Every ΔT steps drop a fraction of each layer's active weights and regrow as many.

    The per-layer count of active weights is constant across an update. With
    ``regrow_dropped=True`` (the default) growth draws from every weight that is not kept
    after the drop, the weights just dropped included, as google-research/rigl and
    TimDettmers/sparse_learning do; a weight dropped and regrown in one update simply stays
    (its value and optimizer state are kept, as in the reference). With
    ``regrow_dropped=False`` growth draws only from weights that were inactive before the
    update, so the turnover is exactly the drop fraction, and a layer denser than
    1/(1 + α) drops fewer than α of its weights (there are not enough inactive ones).
    Exact score ties are broken at random, seeded from (seed, step, layer).
    """

    schedule_kinds = ("prune_grow",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        regrow_dropped: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if not isinstance(regrow_dropped, bool):
            raise ConfigError(
                f"pruning.regrow_dropped must be true or false, got {regrow_dropped!r}"
            )
        self.regrow_dropped = regrow_dropped

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
        # The default drop score is |w|: then only the active weights' magnitudes are taken.
        by_magnitude = type(self).prune_scores is PruningMethod.prune_scores
        drop_scores = params if by_magnitude else self.prune_scores(params, ctx)
        grow_scores = self.grow_scores(params, ctx)
        new: dict[str, torch.Tensor] = {}
        # The new masks' kept indices, which the next update starts from, and what changed
        # (dropped and grown indices), which the engine applies without comparing masks.
        indices: dict[str, torch.Tensor] = {}
        changes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, (name, mask) in enumerate(masks.items()):
            if name in self.dense:
                none = torch.empty(0, dtype=torch.long, device=mask.device)
                new[name], changes[name] = mask, (none, none)
                continue
            active = masks.kept_indices(name)
            n_active = active.numel()
            n_drop = int(fraction * n_active)
            if not self.regrow_dropped:
                n_drop = min(n_drop, mask.numel() - n_active)
            if n_drop <= 0:
                new[name], indices[name], changes[name] = mask, active, (active[:0], active[:0])
                continue
            new[name], indices[name], changes[name] = self._drop_and_grow(
                mask, active, n_drop, drop_scores[name], grow_scores[name], ctx, i, by_magnitude
            )
        return Masks(new, kept_indices=indices, changes=(masks, changes))

    def _drop_and_grow(
        self,
        mask: torch.Tensor,
        active: torch.Tensor,
        n_drop: int,
        drop_scores: torch.Tensor,
        grow_scores: torch.Tensor,
        ctx: Context,
        layer: int,
        magnitude: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One layer's new mask, its kept indices (increasing) and the indices it drops and
        grows (a weight dropped and regrown in one update is in neither). With ``magnitude``
        ``drop_scores`` holds the weights and the drop score is |w|. Keep the ``active``
        weights (increasing indices) with the highest ``drop_scores`` but ``n_drop``, then
        grow the highest ``grow_scores`` among the candidates. The same choice as
        :func:`top_among` for each (ties included), made in index space: the drop among the
        gathered active weights, the growth over the layer with the excluded weights at
        -inf, so no whole-layer bool mask is built but the result (bool operations over a
        layer cost more than float ones on a CPU)."""
        n_keep = active.numel() - n_drop
        kept, dropped = active[:0], active
        if n_keep > 0:
            values = gather(drop_scores.detach().reshape(-1), active)
            values = torch.nan_to_num(
                (values.abs() if magnitude else values).float(), nan=-math.inf
            )
            chosen = top_index(values, n_keep, self.tie_generator(ctx, layer, "drop"))
            assert chosen is not None  # -inf values are candidates here
            kept, dropped = gather(active, chosen), without(active, chosen)
        excluded = kept if self.regrow_dropped else active
        n_grow = min(n_drop, mask.numel() - excluded.numel())
        grow_generator = self.tie_generator(ctx, layer, "grow")
        old = mask.reshape(-1)
        new = fill_(old.clone(), dropped, False)
        grown = active[:0]
        if n_grow > 0:
            # (nan_to_num returns a new tensor: the scores are not written to.)
            key = torch.nan_to_num(grow_scores.detach().reshape(-1).float(), nan=-math.inf)
            chosen_grown = top_index(
                fill_(key, excluded, -math.inf), n_grow, grow_generator, minus_inf_excluded=True
            )
            if chosen_grown is None:  # fewer candidates with a finite score than places
                candidates = fill_(torch.ones_like(new), excluded, False)
                new |= top_among(
                    grow_scores, candidates.view_as(mask), n_grow, grow_generator
                ).flatten()
                changes = (flatnonzero(old & ~new), flatnonzero(new & ~old))
                return new.view_as(mask), flatnonzero(new), changes
            fill_(new, chosen_grown, True)
            kept = merge_sorted(kept, chosen_grown)
            grown = select(chosen_grown, ~gather(old, chosen_grown))  # regrown: unchanged
        dropped = select(dropped, ~gather(new, dropped))
        return new.view_as(mask), kept, (dropped, grown)
