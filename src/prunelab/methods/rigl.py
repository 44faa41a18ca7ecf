"""Rigging the lottery."""

import torch

from prunelab.methods.base import Params
from prunelab.methods.set import SET
from prunelab.sparsity.engine import Context


class RigL(SET):
    """Evci et al. 2020, "Rigging the lottery: making all tickets winners".

    SET's drop step, but regrowth picks the inactive weights with the largest dense
    gradient magnitude |∂L/∂w| (read before the gradients are masked). Defaults of the paper:
    ERK distribution, ΔT = 100, α = 0.3 with cosine decay, updates end at 75% of training.
    New weights start at zero with zeroed optimizer state.
    """

    name = "rigl"
    needs_dense_grads = True

    def grow_scores(self, params: Params, ctx: Context) -> Params:
        scores = {}
        for n, p in params.items():
            g = ctx.grads.get(n)
            scores[n] = g.detach().abs() if g is not None else torch.zeros_like(p)
        return scores
