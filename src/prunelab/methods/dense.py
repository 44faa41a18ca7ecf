"""The dense baseline."""

from prunelab.methods.base import PruningMethod


class Dense(PruningMethod):
    """No pruning: the reference every sparse result is compared against."""

    name = "dense"
    is_dense = True
    schedule_kinds = ("fixed",)

    def __init__(self, sparsity: float = 0.0, distribution=None, schedule=None, **options) -> None:
        super().__init__(0.0, distribution, schedule, **options)
