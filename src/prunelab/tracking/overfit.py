"""``trainer.overfit_batches`` for loaders that Lightning cannot make sequential."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import Callback


class SameBatchesEachEpoch(Callback):
    """With ``trainer.overfit_batches``, train on the same batches in every epoch.

    Lightning makes a ``torch.utils.data.DataLoader`` sequential when asked to overfit, but
    leaves other loaders alone: :class:`~prunelab.data.base.TensorBatchLoader` would go on
    drawing a new order each epoch, so the first ``overfit_batches`` batches would differ
    every epoch. Pinning the loader's sampler at epoch 0 (after Lightning sets the epoch, before
    the epoch's batches are drawn) repeats the first batches of that order instead. Loaders
    without ``sampler.set_epoch`` are left as Lightning made them.
    """

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.overfit_batches:
            return
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        loaders = combined.flattened if combined is not None else [trainer.train_dataloader]
        for loader in loaders:
            sampler = getattr(loader, "sampler", None)
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(0)
