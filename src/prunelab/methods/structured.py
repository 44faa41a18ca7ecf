"""Structured pruning: whole output channels (conv filters) or neurons (Linear rows).

Every method here ranks the channels of each *channel group* of the model
(:func:`prunelab.structured.channel_groups`: the output channels that residual additions,
BatchNorm and the next layers' inputs tie together) by a per-channel score and masks the
lowest-scored channels whole: every producer row of the channel and every consumer column
that reads it. The classifier (and anything tied to the logits) is in no group, so it keeps
all its outputs; only its input columns go with removed channels. Pruned channels stay pruned.

**What ``sparsity`` counts.** As everywhere in prunelab: the fraction of the prunable weights
that the masks remove. A removed channel removes its producer rows and its consumer columns
(a weight that is both, in a row and a column of removed channels, counts once). The number of
channels is chosen so that the removed fraction is as close to the target as whole channels
allow (over the target on a tie):

- ``distribution=uniform`` (layerwise): every group loses the same fraction ``q`` of its
  channels, ``round(q * size)``, and ``q`` is chosen among the fractions ``j / size`` of all
  groups;
- ``distribution=global``: one ranking over the channels of all groups, removed one by one
  from the lowest until the removed fraction is closest to the target. Scores that are not
  comparable across layers (L1 norms, the L1/L2 ratio) are divided by the L2 norm of their
  group's scores first (the layer-wise normalisation of Molchanov et al. 2017); Taylor scores
  estimate a change of the loss and are ranked as they are (Molchanov et al. 2019).

Every group keeps at least one channel: a target that would empty a group is capped there
(a warning; the record's ``sparsity.method.capped`` names the groups) and the removed
fraction may then fall short of the target. The realised sparsity is
``sparsity.method.realised`` and ``sparsity.global`` of the record, the fraction of output
channels/neurons removed per prunable layer ``sparsity.method.channels_removed``.

**Schedules.** ``schedule=one_shot``: train dense, prune once at ``schedule.at``, fine-tune
(Li et al. 2017's prune-once-and-retrain). ``schedule=cubic`` (or ``linear``): the removed
fraction follows the gradual ramp of Zhu & Gupta (2017), channels never revived.

**The model.** The groups are built once, at ``init_masks`` (before the first training step),
from ``ctx.model`` and one sample's shape, read from the first training batch or given as
``pruning.input_shape``. A model the dependency graph cannot trace, or one without any
prunable channel group, is a one-line ConfigError there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import MagnitudePruning, Params, PruningMethod, positive_int
from prunelab.models.base import check_input_shape
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks
from prunelab.structured import ChannelGroup, channel_groups

STRUCTURED_DISTRIBUTIONS = ("uniform", "global")


def check_input_shape_option(value: Any) -> tuple[int, ...] | None:
    """``pruning.input_shape`` as a tuple of positive ints, or None; else a ConfigError."""
    return None if value is None else check_input_shape(value, "pruning.input_shape")


def sample_shape(ctx: Context, given: tuple[int, ...] | None, method: str) -> tuple[int, ...]:
    """One sample's input shape: ``given``, else that of the first training batch."""
    if given is not None:
        return given
    if ctx.batches is not None:
        for x, _ in ctx.batches():
            return tuple(int(s) for s in x.shape[1:])
    raise ConfigError(
        f"pruning={method} needs one sample's input shape to find the channel groups: "
        "train with a datamodule or set pruning.input_shape, e.g. pruning.input_shape=[1,28,28]"
    )


def channels_removed(masks: Masks) -> dict[str, float]:
    """Per prunable weight: the fraction of its output rows (channels/neurons) fully masked."""
    out = {}
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1).any(dim=1)
        out[name] = 1.0 - float(rows.sum()) / max(1, rows.numel())
    return out


def _all_reduce_sum(tensors: dict[str, torch.Tensor]) -> None:
    """Sum ``tensors`` in place over the ranks of the default process group, if any."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for tensor in tensors.values():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


class _Accounting:
    """Counts the prunable weights removed by sets of channels (rows and columns, a weight in
    both counted once): weight ``W`` of shape ``(O, I, k...)`` with ``R`` rows and ``C`` input
    positions removed loses ``k (R I + C O - R C)`` entries."""

    def __init__(self, groups: Sequence[ChannelGroup], params: Params) -> None:
        self.total = sum(p.numel() for p in params.values())
        self.dims: dict[str, tuple[int, int, int]] = {}
        for name, p in params.items():
            rows, cols = int(p.shape[0]), int(p.shape[1]) if p.dim() > 1 else 1
            self.dims[name] = (rows, cols, p.numel() // max(1, rows * cols))
        # Per group: (weight, is_row, positions per channel) of every prunable slice.
        self.slices: list[list[tuple[str, bool, torch.Tensor]]] = []
        for g in groups:
            entries = []
            for s in g.slices:
                if s.buffer or s.name not in params or s.role not in ("out", "in"):
                    continue
                counts = torch.bincount(torch.tensor(s.channel, dtype=torch.long), minlength=g.size)
                entries.append((s.name, s.role == "out", counts))
            self.slices.append(entries)

    def removed(self, rows: dict[str, int], cols: dict[str, int]) -> int:
        total = 0
        for name in set(rows) | set(cols):
            o, i, k = self.dims[name]
            r, c = rows.get(name, 0), cols.get(name, 0)
            total += k * (r * i + c * o - r * c)
        return total


class StructuredPruning(PruningMethod):
    """Shared recipe of the channel-ranking methods (module docstring); subclasses define
    :meth:`channel_scores`."""

    schedule_kinds = ("one_shot", "polynomial")
    # Global ranking divides each group's scores by the L2 norm of the group's scores.
    normalise_global = True

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        input_shape: Sequence[int] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if self.distribution not in STRUCTURED_DISTRIBUTIONS:
            raise ConfigError(
                f"pruning={self.name} takes distribution=uniform (the same fraction of "
                f"channels per layer) or global (one ranking), not {self.distribution}"
            )
        if self.budget != "all":
            raise ConfigError(
                f"pruning={self.name} counts sparsity over all prunable weights; set "
                "distribution.budget=all"
            )
        self.input_shape = check_input_shape_option(input_shape)
        self.groups: list[ChannelGroup] | None = None
        self._accounting: _Accounting | None = None
        self.final_sparsity: float | None = None
        self.capped: list[str] = []

    def build_schedule(self) -> None:
        MagnitudePruning.build_schedule(self)  # one_shot at `at`, or the polynomial ramp

    # -- groups -----------------------------------------------------------------------------
    def prepare(self, params: Params, ctx: Context) -> list[ChannelGroup]:
        """Find (once) the channel groups of ``ctx.model`` that the masks can prune: every
        producer a prunable weight and none kept dense (``distribution.dense_first``)."""
        if self.groups is not None:
            return self.groups
        if ctx.model is None:
            raise ConfigError(f"pruning={self.name} needs the model to find its channel groups")
        self.input_shape = sample_shape(ctx, self.input_shape, self.name)
        groups = [
            g
            for g in channel_groups(ctx.model, self.input_shape)
            if g.producers and all(n in params and n not in self.dense for n in g.producers)
        ]
        if not groups:
            raise ConfigError(
                f"pruning={self.name}: {type(ctx.model).__name__} has no prunable channel "
                "group (every output is tied to the logits or the input); choose another model"
            )
        self.groups = groups
        self._accounting = _Accounting(groups, params)
        return groups

    # -- template ---------------------------------------------------------------------------
    def init_masks(self, params: Params, ctx: Context) -> Masks:
        self.prepare(params, ctx)  # fails here, before training, for an untraceable model
        return Masks.dense_like(params)

    def channel_scores(self, params: Params, ctx: Context) -> dict[str, torch.Tensor]:
        """``{group root: float64 CPU tensor of its size}``, higher = keep."""
        raise NotImplementedError

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        self.prepare(params, ctx)
        target = self.schedule.sparsity_at(step, self.sparsity)
        scores = self.channel_scores(params, ctx)
        before = self.pruned_channels(masks)
        if self.distribution == "global":
            chosen, capped = self.choose_global(target, scores, before)
        else:
            chosen, capped = self.choose_uniform(target, scores, before)
        new = self.channel_masks(params, chosen)
        realised = new.sparsity()
        self.capped = sorted(set(self.capped) | set(capped))
        if capped:
            warnings.warn(
                f"pruning={self.name}: sparsity {target:.4g} would remove every channel of "
                f"{', '.join(capped[:3])}{' ...' if len(capped) > 3 else ''}; capped at one "
                f"channel per group (realised {realised:.4g})",
                stacklevel=2,
            )
        if target >= self.sparsity - 1e-12:
            self.final_sparsity = realised
        return new

    def at_target(self, masks: Masks) -> bool:
        """After the last pruning step: the target as closely as whole channels allow."""
        if self.final_sparsity is not None:
            return masks.sparsity() >= self.final_sparsity - 1e-9
        return masks.sparsity() >= self.sparsity - 1e-9

    # -- choosing channels --------------------------------------------------------------------
    def pruned_channels(self, masks: Masks) -> dict[str, torch.Tensor]:
        """Per group root: True where every producer row of the channel is masked."""
        assert self.groups is not None
        out = {}
        for g in self.groups:
            pruned = torch.ones(g.size, dtype=torch.bool)
            for name in g.producers:
                s = g.slice(name)
                mask = masks[name]
                dead = (~mask.reshape(mask.shape[0], -1).any(dim=1)).cpu()
                alive = torch.zeros(g.size, dtype=torch.long)
                alive.index_add_(
                    0,
                    torch.tensor(s.channel, dtype=torch.long),
                    (~dead[torch.tensor(s.index, dtype=torch.long)]).long(),
                )
                pruned &= alive == 0
            out[g.root] = pruned
        return out

    def _order(self, scores: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
        """Channel indices to remove first to last: already pruned ones, then by score
        (ties by index)."""
        key = torch.nan_to_num(scores.double(), nan=-math.inf).clone()
        key[forced] = -math.inf
        return torch.tensor(
            sorted(range(len(key)), key=lambda i: (float(key[i]), i)), dtype=torch.long
        )

    def choose_uniform(
        self, target: float, scores: dict[str, torch.Tensor], before: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The same fraction of channels per group, closest to ``target`` (module doc)."""
        assert self.groups is not None and self._accounting is not None
        acc = self._accounting
        orders = [self._order(scores[g.root], before[g.root]) for g in self.groups]
        # Per group and prunable slice: positions removed after the first j channels.
        prefix = [
            [
                (name, is_row, torch.cat([torch.zeros(1), counts[o].cumsum(0).double()]))
                for name, is_row, counts in entries
            ]
            for entries, o in zip(acc.slices, orders, strict=True)
        ]
        floors = [int(before[g.root].sum()) for g in self.groups]
        candidates = sorted({j / g.size for g in self.groups for j in range(g.size + 1)})

        def evaluate(q: float) -> tuple[float, list[int], list[str]]:
            counts, capped = [], []
            for g, floor in zip(self.groups, floors, strict=True):
                k = math.floor(q * g.size + 0.5)
                if k >= g.size:
                    k = g.size - 1
                    if q > 0:
                        capped.append(g.root)
                counts.append(max(k, floor))
            rows: dict[str, int] = {}
            cols: dict[str, int] = {}
            for entries, k in zip(prefix, counts, strict=True):
                for name, is_row, cum in entries:
                    bucket = rows if is_row else cols
                    bucket[name] = bucket.get(name, 0) + int(cum[k])
            return acc.removed(rows, cols) / max(1, acc.total), counts, capped

        best = None
        reached = False
        for q in candidates:
            value, counts, capped = evaluate(q)
            rank = (abs(value - target), value < target)
            if best is None or rank < best[0]:
                best = (rank, counts, capped)
            if value >= target:
                reached = True
                break  # the removed fraction only grows with q
        assert best is not None
        _, counts, capped = best
        if not reached and target > 0:  # out of reach: every group is down to one channel
            capped = [g.root for g, k in zip(self.groups, counts, strict=True) if k == g.size - 1]
        chosen = {}
        for g, o, k in zip(self.groups, orders, counts, strict=True):
            pruned = torch.zeros(g.size, dtype=torch.bool)
            pruned[o[:k]] = True
            chosen[g.root] = pruned
        return chosen, capped

    def choose_global(
        self, target: float, scores: dict[str, torch.Tensor], before: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """One ranking over all channels, removed from the lowest until the removed
        fraction is closest to ``target`` (module doc)."""
        assert self.groups is not None and self._accounting is not None
        acc = self._accounting
        ranked = []
        for gi, g in enumerate(self.groups):
            s = torch.nan_to_num(scores[g.root].double(), nan=-math.inf)
            if self.normalise_global:
                norm = float(s[torch.isfinite(s)].norm()) if bool(torch.isfinite(s).any()) else 0
                s = s / norm if norm > 0 else s
            s = s.clone()
            s[before[g.root]] = -math.inf
            ranked += [(float(v), gi, c) for c, v in enumerate(s.tolist())]
        ranked.sort()
        rows: dict[str, int] = {}
        cols: dict[str, int] = {}
        left = [g.size for g in self.groups]
        chosen = {g.root: torch.zeros(g.size, dtype=torch.bool) for g in self.groups}
        capped: list[str] = []
        value = 0.0
        for score, gi, c in ranked:
            forced = score == -math.inf
            if value >= target and not forced:
                break
            g = self.groups[gi]
            if left[gi] == 1:
                if g.root not in capped:
                    capped.append(g.root)
                continue
            for name, is_row, counts in acc.slices[gi]:
                bucket = rows if is_row else cols
                bucket[name] = bucket.get(name, 0) + int(counts[c])
            new_value = acc.removed(rows, cols) / max(1, acc.total)
            if not forced and new_value > target and new_value - target > target - value:
                for name, is_row, counts in acc.slices[gi]:  # the previous step was closer
                    bucket = rows if is_row else cols
                    bucket[name] -= int(counts[c])
                break
            value = new_value
            left[gi] -= 1
            chosen[g.root][c] = True
        return chosen, capped

    def channel_masks(self, params: Params, chosen: dict[str, torch.Tensor]) -> Masks:
        """All-True masks except every prunable row and column of the ``chosen`` channels."""
        assert self.groups is not None
        out = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        for g in self.groups:
            pruned = chosen.get(g.root)
            if pruned is None or not bool(pruned.any()):
                continue
            channels = torch.nonzero(pruned).flatten().tolist()
            for s in g.slices:
                if s.buffer or s.name not in out or s.role not in ("out", "in"):
                    continue
                positions = s.positions(channels)
                if positions:
                    mask = out[s.name]
                    index = torch.tensor(positions, dtype=torch.long, device=mask.device)
                    mask.index_fill_(s.dim, index, False)
        return Masks(out)

    # -- record -------------------------------------------------------------------------------
    def report(self, masks: Masks) -> dict[str, Any]:
        """Target and realised sparsity, the groups capped at one channel, the fraction of
        output channels/neurons removed per prunable layer and over all groups."""
        out: dict[str, Any] = {
            **self.target_report(masks),
            "distribution": self.distribution,
            "capped": list(self.capped),
            "channels_removed": channels_removed(masks),
        }
        if self.groups is not None:
            before = self.pruned_channels(masks)
            total = sum(g.size for g in self.groups)
            out["channels_removed_groups"] = sum(int(v.sum()) for v in before.values()) / max(
                1, total
            )
        return out

    def describe(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape) if self.input_shape else None}

    def state_dict(self) -> dict[str, Any]:
        return {
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "final_sparsity": self.final_sparsity,
            "capped": list(self.capped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = state.get("input_shape")
        if shape is not None and self.input_shape is None:
            self.input_shape = tuple(int(s) for s in shape)
        self.final_sparsity = state.get("final_sparsity")
        self.capped = list(state.get("capped", []))


def _row_sums(
    params: Params, group: ChannelGroup, fn: Any, grads: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Per channel of ``group``: the sum over its producer rows of ``fn(w)`` (or ``fn(w, g)``
    with ``grads``), float64 on the CPU."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for name in group.producers:
        s = group.slice(name)
        w = params[name].detach().double()
        value = fn(w) if grads is None else fn(w, grads[name].detach().double())
        rows = value.reshape(value.shape[0], -1).sum(dim=1).cpu()
        total.index_add_(
            0,
            torch.tensor(s.channel, dtype=torch.long),
            rows[torch.tensor(s.index, dtype=torch.long)],
        )
    return total


class StructuredL1(StructuredPruning):
    """Li et al. 2017, "Pruning Filters for Efficient ConvNets" (ICLR).

    A filter's (neuron's) importance is the L1 norm of its weights, ``s_j = Σ |w_j|`` over the
    filter's kernel (the neuron's incoming weights); for channels that several layers produce
    together (a residual addition) the norms of all producer rows are summed, as Torch-Pruning's
    group importance does. The smallest-norm filters of each layer go
    (``distribution=uniform``, the paper's layer-wise pruning with one ratio for all layers),
    or of all layers after dividing each layer's norms by their L2 norm (``global``), once
    after training (``schedule=one_shot``, then the remaining training fine-tunes, as in the
    paper's prune-once-and-retrain) or along a gradual ramp (``schedule=cubic``). The rest is
    in the :mod:`module docstring <prunelab.methods.structured>`.
    """

    name = "structured_l1"

    def channel_scores(self, params: Params, ctx: Context) -> dict[str, torch.Tensor]:
        assert self.groups is not None
        return {g.root: _row_sums(params, g, torch.abs) for g in self.groups}


class NeuronSensitivity(StructuredPruning):
    """Neurons/filters ranked by this project's L1/L2-ratio score.

    ``s_i = Σ_j |w_ij| / sqrt(Σ_k w_ik²)`` over neuron ``i``'s incoming weights (a filter's
    whole kernel; for channels produced by several layers, over all their producer rows
    together); a neuron whose weights are all zero scores 0. I know of no published pruning
    criterion defined as exactly this score: it is prunelab's own. It is a monotone
    transform of Hoyer's sparseness measure of the weight vector (Hoyer 2004, "Non-negative
    matrix factorization with sparseness constraints", JMLR): ``s = sqrt(n) - (sqrt(n) - 1)
    · sparseness`` for ``n`` weights, in ``[1, sqrt(n)]``. It ignores the scale of the
    weights: a neuron whose incoming weights are spread evenly scores high, one that reads a
    few inputs scores low and is pruned first. Pruned as :class:`StructuredL1` is
    (layer-wise or global with per-layer L2-normalised scores, one-shot or gradual).
    """

    name = "neuron_sensitivity"

    def channel_scores(self, params: Params, ctx: Context) -> dict[str, torch.Tensor]:
        assert self.groups is not None
        out = {}
        for g in self.groups:
            l1 = _row_sums(params, g, torch.abs)
            l2 = _row_sums(params, g, torch.square).sqrt()
            out[g.root] = torch.where(l2 > 0, l1 / l2.clamp_min(1e-300), torch.zeros_like(l1))
        return out


class TaylorPruning(StructuredPruning):
    """Molchanov et al. 2017, "Pruning Convolutional Neural Networks for Resource Efficient
    Inference" (ICLR), and 2019, "Importance Estimation for Neural Network Pruning" (CVPR).

    First-order Taylor importance of a channel: the squared change of the loss its removal
    is estimated to cause, ``Θ_c = Σ_b (Σ_{w ∈ c} g_b(w) · w)²``, with ``w`` the channel's
    producer weight rows (the filters/neurons the masks prune; for a channel produced by
    several layers, all of them) and ``g_b`` the loss gradient on mini-batch ``b``,
    accumulated over batches as in the 2019 paper. The gradients come from ``batches``
    training batches drawn at each pruning step (the model in training mode, gradients taken
    with ``torch.autograd.grad`` so the training step's own gradients are untouched, every
    buffer of the model restored afterwards; under DDP the scores are summed over the
    ranks); when the run has no data loader (the engine was initialised without one) the
    update step's own gradients (one batch) are used. The scores estimate a change of the
    loss, so ``distribution=global`` ranks them across layers as they are (the 2019 paper;
    the 2017 paper L2-normalised them per layer). Pruned channels are masked whole as in
    :class:`StructuredL1`, one-shot or gradually.
    """

    name = "taylor"
    normalise_global = False

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        batches: int = 8,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        self.batches = positive_int("batches", batches, example=8)
        self._data: Any = None
        self._loss_fn: Any = None

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        self._data, self._loss_fn = ctx.batches, ctx.loss_fn
        return super().init_masks(params, ctx)

    def channel_scores(self, params: Params, ctx: Context) -> dict[str, torch.Tensor]:
        assert self.groups is not None
        data = ctx.batches or self._data
        loss_fn = ctx.loss_fn or self._loss_fn
        if data is not None and loss_fn is not None and ctx.model is not None:
            scores = self._batch_scores(params, ctx.model, data, loss_fn)
        else:
            grads = {n: g for n, g in ctx.grads.items() if g is not None}
            missing = [n for g in self.groups for n in g.producers if n not in grads]
            if missing:
                raise ConfigError(
                    f"pruning=taylor needs training batches or the gradient of '{missing[0]}' "
                    "at the pruning step"
                )
            scores = {g.root: self._contribution(params, g, grads).square() for g in self.groups}
        _all_reduce_sum(scores)
        return {k: v.cpu() for k, v in scores.items()}

    @staticmethod
    def _contribution(params: Params, group: ChannelGroup, grads: dict) -> torch.Tensor:
        """Per channel: Σ g · w over its producer rows (float64, CPU)."""
        return _row_sums(params, group, lambda w, g: w * g, grads)

    def _batch_scores(
        self, params: Params, model: torch.nn.Module, data: Any, loss_fn: Any
    ) -> dict[str, torch.Tensor]:
        assert self.groups is not None
        names = list(dict.fromkeys(n for g in self.groups for n in g.producers))
        tensors = [params[n] for n in names]
        device = tensors[0].device
        was_training = model.training
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        scores = {g.root: torch.zeros(g.size, dtype=torch.float64) for g in self.groups}
        model.train()
        try:
            with torch.enable_grad():
                for seen, (x, y) in enumerate(data()):
                    if seen >= self.batches:
                        break
                    loss = loss_fn(model(x.to(device)), y.to(device))
                    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                    by_name = {
                        n: g if g is not None else torch.zeros_like(p)
                        for n, p, g in zip(names, tensors, grads, strict=True)
                    }
                    for g in self.groups:
                        scores[g.root] += self._contribution(params, g, by_name).square()
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
            model.train(was_training)
        return scores

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "batches": self.batches}
