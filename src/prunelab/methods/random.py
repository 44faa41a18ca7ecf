"""Static sparse training from a random mask."""

from prunelab.methods.base import Params, PruningMethod
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks


class RandomStatic(PruningMethod):
    """A fixed random mask chosen at initialisation with the given layer distribution.

    The "static" baseline of Evci et al. 2020 (RigL) and the random re-initialisation
    control of Frankle & Carbin 2019; with ERK it is the sparse baseline of Liu et al. 2022,
    "The unreasonable effectiveness of random pruning".
    """

    name = "random"
    schedule_kinds = ("fixed",)

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        return self.random_init_masks(params, ctx)
