"""Early stopping that waits for the pruning schedule: only epochs at the target sparsity count.

Lightning's EarlyStopping compares every validation epoch with the best so far. A static run
is dense until its pruning step and a gradual one ramps its sparsity over many epochs; their
early epochs are not comparable with the final ones (a dense epoch usually beats every pruned
one), so stock early stopping would stop such a run before it reaches its final sparsity, and
the run would report the accuracy of a model that is not at target.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import EarlyStopping


class AtTargetEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, blind to the epochs before the masks reach their final
    sparsity.

    An epoch whose module says ``at_target()`` is false neither sets the best score nor
    counts towards ``patience``, and never stops the run; patience starts counting at the
    first epoch at target. Modules without ``at_target`` (and dense runs, always at target)
    behave as with the stock callback.
    """

    def _run_early_stopping_check(self, trainer: Any) -> None:
        at_target = getattr(trainer.lightning_module, "at_target", None)
        if callable(at_target) and not at_target():
            return
        super()._run_early_stopping_check(trainer)
