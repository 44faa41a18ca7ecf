"""The run's checkpoint callback: the best checkpoint by the monitored metric, plus the latest
state at the end of every epoch (what ``ckpt_path=`` resumes from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import ModelCheckpoint

from prunelab import files


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that also writes ``last.ckpt`` after every epoch.

    Stock ``save_last=True`` writes the last checkpoint only when a top-k checkpoint was
    saved in the same step, i.e. when the monitored metric improved; a resume must start from
    the end of the latest epoch whatever the metric did. Doing both in one callback (rather
    than a second, unmonitored ModelCheckpoint) halves the checkpoint callbacks that Lightning
    dispatches on every batch. ``state_key`` is computed once: Lightning formats it for every
    callback hook call, and the stock property rebuilds it from the settings each time.
    """

    CHECKPOINT_NAME_LAST = Path(files.LAST_CHECKPOINT).stem

    def __init__(self, run_dir: str | Path, monitor: str = "val/acc", mode: str = "max") -> None:
        super().__init__(
            dirpath=str(files.checkpoint_dir(run_dir)),
            filename=Path(files.BEST_CHECKPOINT).stem,
            monitor=monitor,
            mode=mode,
            save_last=True,
        )
        self._state_key = super().state_key

    @property
    def state_key(self) -> str:
        return self._state_key

    def _save_latest(self, trainer: Any) -> None:
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(
            trainer
        ) and self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(
            trainer
        ) and not self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)
