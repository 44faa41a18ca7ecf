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
    # The epoch (and the sparsity of its masks) that best.ckpt holds; None before one is saved.
    best_epoch: int | None = None
    best_sparsity: float | None = None

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

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        """Only epochs whose masks hold the final sparsity may become best.ckpt: a static
        run's dense epochs or a gradual ramp's early ones would otherwise win."""
        module = trainer.lightning_module
        if hasattr(module, "at_target") and not module.at_target():
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _update_best_and_save(self, current: Any, trainer: Any, monitor_candidates: Any) -> None:
        # Set before the save, so that best.ckpt itself carries them (a test run that loads
        # it restores this callback's state).
        self.best_epoch = int(trainer.current_epoch)
        masks = getattr(getattr(trainer.lightning_module, "engine", None), "masks", None)
        self.best_sparsity = float(masks.sparsity()) if masks is not None else 0.0
        super()._update_best_and_save(current, trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "best_epoch": self.best_epoch,
            "best_sparsity": (self.best_sparsity),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = state_dict.get("best_epoch")
        self.best_sparsity = state_dict.get("best_sparsity")

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
