"""Terminal output: the progress bar (Rich, redrawn at most a few times a second) and the
model summary at the start of fit."""

from __future__ import annotations

import time
from typing import Any

from pytorch_lightning.callbacks import RichModelSummary, RichProgressBar


class ThrottledRichProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, redrawn at most every ``min_interval_s`` seconds.

    The stock bar reads the logged metrics and redraws after every batch (or every
    ``refresh_rate`` batches); each redraw costs milliseconds, a large share of a small
    model's step on a CPU. A bar that moves twice a second looks the same and costs ~1%.
    """

    def __init__(self, min_interval_s: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_interval_s = float(min_interval_s)
        self._last_draw = 0.0
        self._epoch_total: Any = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._epoch_total = self.total_train_batches  # read once per epoch, not per batch

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        total = self._epoch_total
        last = isinstance(total, int) and batch_idx + 1 >= total
        if last or now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class FitStartModelSummary(RichModelSummary):
    """Lightning's RichModelSummary, which leaves the Trainer's callbacks once it has printed.

    The summary is printed at the start of fit and the callback does nothing afterwards, but
    Lightning would still dispatch every hook of every batch to it (some fifty Python calls
    per training step). Stateless, so checkpoints are the same without it.
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        # A new list: Lightning may be iterating over the current one.
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self]
