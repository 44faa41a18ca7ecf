"""Pruning at initialisation by connection sensitivity."""

from __future__ import annotations

from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruningMethod, topk_mask
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks


class SNIP(PruningMethod):
    """Lee et al. 2019, "SNIP: single-shot network pruning based on connection sensitivity".

    Before training, the saliency |g ⊙ w| is summed over ``batches`` mini-batches and the
    highest-saliency weights are kept (one threshold over all layers with
    ``distribution=global``, as in the paper); the mask is then fixed.
    """

    name = "snip"
    schedule_kinds = ("fixed",)

    def __init__(self, sparsity: float, distribution=None, schedule=None, batches: int = 1):
        super().__init__(sparsity, distribution, schedule)
        if int(batches) < 1:
            raise ConfigError(f"pruning.batches must be >= 1, got {batches}; e.g. 1")
        self.batches = int(batches)

    def saliency(self, params: Params, ctx: Context) -> Params:
        """|dL/dw ⊙ w| summed over the first ``batches`` training batches."""
        if ctx.batches is None or ctx.loss_fn is None or ctx.model is None:
            raise ValueError("SNIP needs training batches, a loss and the model at init")
        model, was_training = ctx.model, ctx.model.training
        model.train()
        scores = {n: torch.zeros_like(p) for n, p in params.items()}
        saved = {n: p.grad for n, p in params.items()}
        seen = 0
        with torch.enable_grad():
            for x, y in ctx.batches():
                device = next(iter(params.values())).device
                grads = torch.autograd.grad(
                    ctx.loss_fn(model(x.to(device)), y.to(device)),
                    list(params.values()),
                    allow_unused=True,
                )
                for (n, p), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        scores[n] += (g * p.detach()).abs()
                seen += 1
                if seen >= self.batches:
                    break
        for n, p in params.items():
            p.grad = saved[n]
        model.train(was_training)
        return scores

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        scores = self.saliency(params, ctx)
        counts = self.keep_counts(self.sparsity, scores=scores)
        return Masks({n: topk_mask(scores[n], counts[n]) for n in params})

    def describe(self) -> dict[str, Any]:
        return {"batches": self.batches}
