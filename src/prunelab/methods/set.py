"""Sparse Evolutionary Training."""

import torch

from prunelab.methods.base import Params, PruneAndGrow
from prunelab.sparsity.engine import Context


class SET(PruneAndGrow):
    """Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
    sparse connectivity inspired by network science".

    Starts from a random sparse mask (Erdős–Rényi by default); every ΔT steps drops the
    smallest-magnitude fraction α of each layer's active weights and regrows as many at
    random positions, which start at zero.
    """

    name = "set"

    def grow_scores(self, params: Params, ctx: Context) -> Params:
        return {
            n: torch.rand(p.shape, generator=ctx.generator(i)).to(p.device)
            for i, (n, p) in enumerate(params.items())
        }
