"""Pruning at initialisation by connection sensitivity."""

from __future__ import annotations

from typing import Any

import torch

from prunelab.methods.base import Params, PruningMethod, positive_int
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks


class SNIP(PruningMethod):
    """Lee et al. 2019, "SNIP: single-shot network pruning based on connection sensitivity".

    Before training, the gradient of the loss is accumulated over ``batches`` mini-batches
    (the saliency of a larger batch, as in the paper's reference code: |g ⊙ w| of the
    accumulated g, not the sum of per-batch |g ⊙ w|), and the weights of highest saliency are
    kept (one threshold over all layers with ``distribution=global``, as in the paper); the
    mask is then fixed. The forward passes run in training mode, and BatchNorm running
    statistics (every buffer of the model) are restored afterwards, so the saliency passes
    leave no trace on the model. Under DDP the accumulated gradient is summed over the
    ranks (each saw its own shard) before the scores are taken, so every rank keeps the same
    mask; the engine's cross-rank digest check confirms it.
    """

    name = "snip"
    schedule_kinds = ("fixed",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        batches: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        self.batches = positive_int("batches", batches, example=1)

    def saliency(self, params: Params, ctx: Context) -> Params:
        """|g ⊙ w|, with g the loss gradient summed over the first ``batches`` batches (and
        over DDP ranks)."""
        if ctx.batches is None or ctx.loss_fn is None or ctx.model is None:
            raise ValueError("SNIP needs training batches, a loss and the model at init")
        model, was_training = ctx.model, ctx.model.training
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        model.train()
        grad_sum = {n: torch.zeros_like(p) for n, p in params.items()}
        device = next(iter(params.values())).device
        seen = 0
        with torch.enable_grad():
            for x, y in ctx.batches():
                grads = torch.autograd.grad(
                    ctx.loss_fn(model(x.to(device)), y.to(device)),
                    list(params.values()),
                    allow_unused=True,
                )
                for n, g in zip(params, grads, strict=True):
                    if g is not None:
                        grad_sum[n] += g
                seen += 1
                if seen >= self.batches:
                    break
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        model.train(was_training)
        _all_reduce_sum(grad_sum)
        return {n: (grad_sum[n] * p.detach()).abs() for n, p in params.items()}

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        return self.masks_from_scores(self.saliency(params, ctx), ctx)

    def describe(self) -> dict[str, Any]:
        return {"batches": self.batches}


def _all_reduce_sum(tensors: Params) -> None:
    """Sum ``tensors`` in place over the ranks of the default process group, if there is one."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for tensor in tensors.values():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
