"""Residual-block pruning: whole residual blocks removed, each replaced by its shortcut."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import MagnitudePruning, Params, PruningMethod
from prunelab.methods.structured import channels_removed
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks
from prunelab.structured import branch_parameters, residual_blocks


class BlockPruning(PruningMethod):
    """Whole residual blocks removed by the importance of their residual branch.

    A residual block computes ``y = post(branch(x) + shortcut(x))``; removing it leaves
    ``post(shortcut(x))``, the layer-dropping view of residual networks (Veit et al. 2016,
    "Residual networks behave like ensembles of relatively shallow networks"; Huang et al.
    2016, "Deep networks with stochastic depth"). Here a block is removed by masking every
    prunable weight of its branch (the convolutions outside ``shortcut``/``downsample``);
    the shortcut, projection convolutions included, is kept. The branch's last BatchNorm then
    reads zeros, so what survives of the branch is its shift ``β`` (in eval mode ``β - γ
    μ / sqrt(σ² + ε)``, with running statistics that decay towards that): a per-channel bias
    added to the shortcut, no weights. :func:`prunelab.structured.remove_blocks` is the
    physical removal: it keeps that bias (the eval-mode constant) as a per-channel
    ``ChannelBias`` after the shortcut, so the result equals the masked model in eval mode.

    **Importance.** The mean absolute value of the branch's prunable weights (its L1 norm
    divided by its number of weights, so blocks of different widths compare), computed at
    the pruning step; the blocks of lowest importance go first. Blocks are ranked over the
    whole network (``distribution=global``).

    **Sparsity** counts as everywhere, the fraction of prunable weights removed: blocks are
    removed from the least important until the removed fraction is closest to ``sparsity``
    (over it on a tie). At least one block is kept: a sparsity that would remove them all is
    capped with a warning. One-shot (``schedule=one_shot``) or gradual (``schedule=cubic``);
    removed blocks stay removed. A model without residual blocks (the recognised ones:
    CIFAR ResNet-20/32/56, WRN-22-2, torchvision ResNets) is a one-line ConfigError at
    ``init_masks``, before the first training step.
    """

    name = "block"
    schedule_kinds = ("one_shot", "polynomial")

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if self.distribution != "global":
            raise ConfigError(
                f"pruning=block ranks blocks over the whole network: set distribution=global, "
                f"not {self.distribution}"
            )
        if self.budget != "all":
            raise ConfigError(
                "pruning=block counts sparsity over all prunable weights; set "
                "distribution.budget=all"
            )
        self.blocks: dict[str, list[str]] | None = None
        self.final_sparsity: float | None = None
        self.capped = False

    def build_schedule(self) -> None:
        MagnitudePruning.build_schedule(self)

    def prepare(self, params: Params, ctx: Context) -> dict[str, list[str]]:
        """``{block: prunable weights of its residual branch}`` of ``ctx.model`` (once)."""
        if self.blocks is not None:
            return self.blocks
        model = ctx.model
        if model is None:
            raise ConfigError("pruning=block needs the model to find its residual blocks")
        found = residual_blocks(model)
        if not found:
            raise ConfigError(
                f"pruning=block needs a residual network, and {type(model).__name__} has no "
                "residual block; choose e.g. model=resnet20 or another pruning method"
            )
        blocks = branch_parameters(model, params)
        if not blocks:
            raise ConfigError(
                "pruning=block: no residual block of the model has a prunable weight in its "
                "branch; check prunable_parameters()"
            )
        self.blocks = blocks
        return blocks

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        self.prepare(params, ctx)
        return Masks.dense_like(params)

    def block_scores(self, params: Params) -> dict[str, float]:
        """Mean |w| over each block's branch weights (higher = keep)."""
        assert self.blocks is not None
        out = {}
        for block, names in self.blocks.items():
            total = sum(float(params[n].detach().abs().sum()) for n in names)
            out[block] = total / max(1, sum(params[n].numel() for n in names))
        return out

    def removed_blocks(self, masks: Masks) -> list[str]:
        """Blocks whose branch weights are all masked."""
        assert self.blocks is not None
        return [
            b for b, names in self.blocks.items() if not any(bool(masks[n].any()) for n in names)
        ]

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        blocks = self.prepare(params, ctx)
        target = self.schedule.sparsity_at(step, self.sparsity)
        scores = self.block_scores(params)
        before = set(self.removed_blocks(masks))
        order = sorted(blocks, key=lambda b: (b not in before, scores[b], list(blocks).index(b)))
        total = sum(p.numel() for p in params.values())
        size = {b: sum(params[n].numel() for n in names) for b, names in blocks.items()}
        removed: list[str] = []
        value, capped = 0.0, False
        for block in order:
            forced = block in before
            if value >= target and not forced:
                break
            if len(removed) == len(blocks) - 1:
                capped = True
                break
            new_value = value + size[block] / max(1, total)
            if not forced and new_value - target > target - value:
                break  # stopping one block short is closer
            removed.append(block)
            value = new_value
        out = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        for block in removed:
            for name in blocks[block]:
                out[name].fill_(False)
        new = Masks(out)
        if capped:
            self.capped = True
            warnings.warn(
                f"pruning=block: sparsity {target:.4g} would remove every residual block; "
                f"capped at one block kept (realised {new.sparsity():.4g})",
                stacklevel=2,
            )
        if target >= self.sparsity - 1e-12:
            self.final_sparsity = new.sparsity()
        return new

    def at_target(self, masks: Masks) -> bool:
        """After the last pruning step: the target as closely as whole blocks allow."""
        if self.final_sparsity is not None:
            return masks.sparsity() >= self.final_sparsity - 1e-9
        return masks.sparsity() >= self.sparsity - 1e-9

    def report(self, masks: Masks) -> dict[str, Any]:
        """Target and realised sparsity, the removed blocks and their fraction, and the
        fraction of output channels removed per prunable layer."""
        out: dict[str, Any] = {
            **self.target_report(masks),
            "capped": self.capped,
            "channels_removed": channels_removed(masks),
        }
        if self.blocks is not None:
            gone = self.removed_blocks(masks)
            out["blocks_removed"] = gone
            out["blocks_removed_fraction"] = len(gone) / max(1, len(self.blocks))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"final_sparsity": self.final_sparsity, "capped": self.capped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.final_sparsity = state.get("final_sparsity")
        self.capped = bool(state.get("capped", False))


__all__ = ["BlockPruning"]
