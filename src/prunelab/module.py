"""The Lightning module: loss, metrics, optimizer set-up, and the hooks that drive the
sparsity engine (the one place where pruning meets Lightning).

Per-step work outside forward, backward and the optimizer step is kept close to nothing:
training loss and accuracy are reduced in batched windows (:class:`TrainStats`) and logged
once per window (handed straight to the loggers, as the engine's statistics are) and per
epoch, and the attribute Lightning sets around every hook call skips nn.Module's registry
checks.

The training step uses Lightning's manual optimization (its automatic optimization costs
a closure, a dozen hook dispatches and progress bookkeeping per step, some 20% of a small
model's step on a CPU) and does what automatic optimization did, in the same order, so that
the same seeds give the same numbers: the loss divided by ``accumulate_grad_batches``,
``zero_grad`` at the first batch of each accumulation window, backward through the precision
plugin (:meth:`manual_backward`), and the optimizer step (through Lightning's optimizer
wrapper, so ``global_step``, AMP and the ``on_before_optimizer_step`` hooks work as before)
at the window's last batch or the epoch's last batch; gradient clipping after the engine
has masked the gradients; learning-rate schedulers stepped after the optimizer step
(``interval: step``) or after the epoch's last optimizer step (``interval: epoch``). The
Trainer is therefore built without ``gradient_clip_val`` and ``accumulate_grad_batches``:
the module takes them (:func:`prunelab.train.build`).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from prunelab.analysis.diagnostics import DisconnectionWatch, diagnostic_metrics, gradient_norms
from prunelab.methods.base import PruningMethod
from prunelab.sparsity.engine import SparsityEngine


def _accuracy_metrics(num_classes: int) -> MetricCollection:
    metrics: dict[str, Any] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class TrainStats:
    """Training loss and top-1 accuracy over an epoch, at almost no cost per step.

    A step only keeps references to its (detached) loss, logits and targets; the reductions
    run once per window of ``window`` steps (or when the kept logits pass ``max_elements``),
    as a few batched operations, instead of half a dozen tiny tensor operations (kernel
    launches, on a GPU) in every step. ``max_elements`` bounds the memory held.
    """

    def __init__(self, window: int, max_elements: int = 1 << 22) -> None:
        self.window = max(1, int(window))
        self.max_elements = int(max_elements)
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self._losses: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._elements = 0
        self._loss_sum: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self._seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor):
        """Keep one step's batch; return the window's mean loss when a window closes."""
        self._losses.append(loss.detach())
        self._logits.append(logits.detach())
        self._targets.append(targets)
        self._elements += logits.numel()
        if len(self._losses) >= self.window or self._elements >= self.max_elements:
            return self._reduce()
        return None

    @torch.no_grad()
    def _reduce(self) -> torch.Tensor | None:
        """Fold the kept steps into the epoch totals; the mean loss of those steps."""
        if not self._losses:
            return None
        sizes = [t.shape[0] for t in self._targets]
        losses = torch.stack(self._losses).float()
        weights = torch.tensor(sizes, dtype=losses.dtype, device=losses.device)
        loss_sum = (losses * weights).sum()
        logits, targets = torch.cat(self._logits), torch.cat(self._targets)
        correct = (logits.argmax(dim=1) == targets).sum()
        seen = sum(sizes)
        self._loss_sum = loss_sum if self._loss_sum is None else self._loss_sum + loss_sum
        self._correct = correct if self._correct is None else self._correct + correct
        self._seen += seen
        self._losses, self._logits, self._targets, self._elements = [], [], [], 0
        return loss_sum / seen

    def epoch_totals(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean loss, accuracy) over every sample of the epoch so far, or None if none."""
        self._reduce()
        if self._seen == 0 or self._loss_sum is None or self._correct is None:
            return None
        return self._loss_sum / self._seen, self._correct.float() / self._seen


_AUTOMATIC_STEPS = "epoch_loop.automatic_optimization.optim_progress"
_MANUAL_STEPS = "epoch_loop.manual_optimization.optim_step_progress"


def _carry_optimizer_steps(checkpoint: dict[str, Any]) -> None:
    """A checkpoint written while the module used automatic optimization counts its optimizer
    steps in that loop's progress, and ``global_step`` now reads the manual loop's: carry the
    count over (before Lightning restores the loops from the checkpoint), so that resuming
    such a checkpoint continues at its step (schedules, mask updates, ``max_steps``)."""
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    automatic = ((loop.get(_AUTOMATIC_STEPS) or {}).get("optimizer") or {}).get("step")
    manual = loop.get(_MANUAL_STEPS)
    if not automatic or not manual:
        return
    done = int(automatic["total"]["completed"])
    if done > 0 and int(manual["total"]["completed"]) == 0:
        total = {"ready": done, "completed": done}
        loop[_MANUAL_STEPS] = {"total": dict(total), "current": dict(total)}


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification with top-1 (and top-5) accuracy per stage."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        log_every_n_steps: int = 50,
        engine: SparsityEngine | None = None,
        weight_decay_norm_bias: bool = True,
        lr_schedule_offset: int = 0,
        lr_schedule_total: int | None = None,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        accumulate_grad_batches: int = 1,
    ) -> None:
        """``lr_schedule_offset``/``lr_schedule_total``: a run that continues a longer
        schedule (an IMP level rewound to step k trains steps k..T) starts its learning-rate
        schedule ``lr_schedule_offset`` optimizer steps in, on a schedule sized for
        ``lr_schedule_total`` steps (default: this run's own length).

        ``gradient_clip_val`` (``gradient_clip_algorithm``: ``norm``, the default, or
        ``value``) and ``accumulate_grad_batches`` mean what they mean to Lightning's Trainer,
        which must not be given them as well (the trainer config's values come here)."""
        super().__init__()
        self.automatic_optimization = False
        accumulate = int(accumulate_grad_batches or 1)
        if accumulate < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate}")
        self._accumulate = accumulate
        self._clip_val = float(gradient_clip_val) if gradient_clip_val else 0.0
        self._clip_algorithm = str(gradient_clip_algorithm or "norm").lower()
        if self._clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}"
            )
        # Set per fit (configure_optimizers, on_train_start).
        self._lr_scheduler: Any = None
        self._optimizer: Any = None
        self._mid_window = False  # gradients of an unfinished accumulation window are held
        self.model = model
        self.engine = engine
        self.num_classes = num_classes
        self._optimizer_factory = optimizer
        self._scheduler_factory = scheduler
        self._scheduler_interval = scheduler_interval
        self._log_every = max(1, int(log_every_n_steps))
        self._weight_decay_norm_bias = bool(weight_decay_norm_bias)
        self._lr_offset = max(0, int(lr_schedule_offset))
        self._lr_total = None if lr_schedule_total is None else int(lr_schedule_total)
        # Only methods that define a loss term pay for a call per step.
        method = getattr(engine, "method", None)
        self._has_penalty = (
            method is not None
            and getattr(type(method), "penalty", None) is not PruningMethod.penalty
        )
        metrics = _accuracy_metrics(num_classes)
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives a resume from checkpoint
        self._train_stats = TrainStats(window=self._log_every)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets (and restores) ``_current_fx_name`` around every hook, callback and
        # strategy call: some forty times per training batch. It is a plain string, never a
        # parameter, buffer or submodule, so it skips nn.Module's registry checks.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def accumulate_grad_batches(self) -> int:
        """Batches whose gradients add up to one optimizer step."""
        return self._accumulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- sparsity engine --------------------------------------------------------------------
    def optimizer_steps(self) -> int | float:
        """Optimizer steps of this fit: what ``trainer.estimated_stepping_batches`` counts
        under automatic optimization (it counts batches under manual optimization, which
        does the accumulation): ceil(batches per epoch / accumulate_grad_batches) per epoch,
        at most ``max_steps``."""
        trainer = self.trainer
        estimate = trainer.estimated_stepping_batches  # sets the data up if need be
        if self._accumulate == 1 or trainer.max_epochs == -1:
            return estimate
        batches = trainer.num_training_batches
        if batches == float("inf"):  # an iterable dataset: max_steps, as Lightning has it
            return trainer.max_steps
        steps = math.ceil(batches / self._accumulate) * max(int(trainer.max_epochs or 1), 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    def on_train_start(self) -> None:
        """Size the schedules to this run and decide the initial masks (unless resumed)."""
        self._optimizer = self.optimizers()
        self._mid_window = False
        if self.engine is None:
            return
        total = int(self.optimizer_steps())
        per_epoch = max(1, total // max(1, int(self.trainer.max_epochs or 1)))
        self.engine.setup(total_steps=total, steps_per_epoch=per_epoch)
        if not self.engine.initialized:
            datamodule = self.trainer.datamodule
            self.engine.initialize(
                batches=(lambda: iter(datamodule.train_dataloader())) if datamodule else None,
                loss_fn=F.cross_entropy,
            )
            if self.engine.active and self.trainer.world_size > 1:
                self._check_masks_agree()  # data-driven initial masks (SNIP) included
        self._log_engine(force_layers=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Dense gradients are here (accumulated, unscaled, DDP-reduced): update the masks on
        update steps, then mask the gradients; then clip them (``gradient_clip_val``)."""
        engine = self.engine
        if engine is not None and engine.active:
            step = self.global_step
            gradients = None
            if engine.masks is not None and engine.method.is_update_step(step):
                # Only on update steps: the dense gradients against the masks they were
                # computed under, before the update changes the masks and masks the gradients.
                grads = {n: p.grad for n, p in engine.params.items()}
                gradients = gradient_norms(engine.masks, grads)
            if engine.before_optimizer_step(step, optimizer):
                if self.trainer.world_size > 1:
                    self._check_masks_agree()
                self._log_engine(force_layers=True, gradients=gradients)
        if self._clip_val > 0:
            # Where automatic optimization clips: after this hook, on the masked gradients.
            self.clip_gradients(optimizer, self._clip_val, self._clip_algorithm)

    def _check_masks_agree(self) -> None:
        """Under DDP, fail loudly if any rank chose a different mask (at initialisation and
        at every update)."""
        digest = torch.tensor(self.engine.mask_digest(), device=self.device)
        digests = self.all_gather(digest)
        if not bool((digests == digest).all()):
            raise RuntimeError(
                f"masks differ across DDP ranks at step {self.global_step}: {digests.tolist()}"
            )
        self.engine.rank_checks += 1

    def _log_engine(
        self, force_layers: bool = False, gradients: dict[str, Any] | None = None
    ) -> None:
        """Log the engine's last statistics; with ``force_layers`` (at initialisation and at
        every mask update) also the per-layer sparsity and the masks' diagnostics under
        ``mask/`` (``gradients``: :func:`~prunelab.analysis.gradient_norms` taken before the
        update), and warn once per layer that becomes disconnected."""
        if self.engine is None or not self.engine.active or not self.engine.last_stats:
            return
        stats = {k: v for k, v in self.engine.last_stats.items() if k != "step"}
        if force_layers and self.engine.masks is not None:
            for name, value in self.engine.masks.layer_sparsity().items():
                stats[f"sparsity/{name}"] = value
            diagnostics = self.engine.diagnostics()
            if gradients is not None:
                diagnostics["gradients"] = gradients
            stats.update(diagnostic_metrics(diagnostics))
            watch = getattr(self, "_disconnection_watch", None)
            if watch is None:
                watch = self._disconnection_watch = DisconnectionWatch()
            if self.global_rank == 0:
                watch.check(diagnostics, self.global_step)
        self._write(stats)

    def _write(self, metrics: dict[str, Any]) -> None:
        """Hand ``metrics`` to the loggers at the current optimizer step, now. Unlike
        ``self.log``, nothing stays in Lightning's result collection, which the fit loop
        would otherwise walk on every batch that follows (some 15 us a batch)."""
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.engine is not None:
            checkpoint["sparsity_engine"] = self.engine.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.engine is not None and "sparsity_engine" in checkpoint:
            self.engine.load_state_dict(checkpoint["sparsity_engine"])
        _carry_optimizer_steps(checkpoint)

    # -- training ---------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._train_stats.reset()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        return self._optimize(self.training_loss(batch), batch_idx)

    # Lightning reads training_step's signature before every batch (whether to pass
    # batch_idx); with the signature precomputed, inspect returns it instead of rebuilding it
    # (some sixty Python calls per step).
    training_step.__signature__ = inspect.signature(training_step)  # type: ignore[attr-defined]

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """An (inputs, targets) pair of tensors moves as Lightning would move it (non-blocking
        except to the CPU), without its generic walk over the collection; a batch already on
        ``device`` (CPU training) is passed through. Anything else goes to Lightning."""
        if type(batch) in (tuple, list) and all(type(t) is torch.Tensor for t in batch):
            if all(t.device == device for t in batch):
                return batch
            non_blocking = device.type not in ("cpu", "mps")
            return type(batch)(t.to(device, non_blocking=non_blocking) for t in batch)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The loss to minimise on a training batch: cross-entropy, plus the pruning method's
        penalty if it has one (L1, L0); the batch's loss and accuracy go to the statistics."""
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        window_loss = self._train_stats.add(loss, logits, y)
        if window_loss is not None:
            self._write({"train/loss_step": float(window_loss), "epoch": self.current_epoch})
        if self._has_penalty:  # penalty-based pruning (L1): the data loss is logged above
            penalty = self.engine.penalty(self.global_step)
            if penalty is not None:
                return loss + penalty
        return loss

    def _optimize(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Backward and, at the end of an accumulation window, the optimizer step and the
        learning-rate schedulers: automatic optimization's sequence (see the module's
        docstring). Returns the loss as automatic optimization reports it (divided by
        ``accumulate_grad_batches``)."""
        optimizer = self._optimizer
        if optimizer is None:
            optimizer = self._optimizer = self.optimizers()
        accumulate = self._accumulate
        if accumulate == 1:
            optimizer.zero_grad()
            self.manual_backward(loss)
        else:
            loss = loss / accumulate
            if batch_idx % accumulate == 0:
                optimizer.zero_grad()
            stepping = (batch_idx + 1) % accumulate == 0 or self._last_batch(batch_idx)
            if stepping or self.trainer.world_size == 1:
                self.manual_backward(loss)
            else:  # no gradient all-reduce until the window's last batch
                with self.trainer.strategy.block_backward_sync():
                    self.manual_backward(loss)
            # (An nn.Module attribute: set only with accumulation, where it can change.)
            self._mid_window = not stepping
            if not stepping:
                return loss
        optimizer.step()
        scheduler = self._lr_scheduler
        if scheduler is not None and (
            self._scheduler_interval == "step" or self._last_batch(batch_idx)
        ):
            scheduler.step()
        return loss

    def _last_batch(self, batch_idx: int) -> bool:
        """Whether ``batch_idx`` is the epoch's last training batch (Lightning's test for
        the last optimizer step of an epoch and for epoch-interval schedulers)."""
        trainer = self.trainer
        return (
            batch_idx + 1 == trainer.num_training_batches
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        )

    # Lightning's fit loop counts every batch as one that stepped the optimizer under manual
    # optimization (automatic optimization counted only the batches that did); that count is
    # the step of the metrics logged through self.log and decides when they are written
    # (log_every_n_steps). With accumulation, these two hooks keep it in optimizer steps, as
    # automatic optimization had it: set to global_step before each batch, and held off the
    # next multiple of log_every_n_steps after a batch that did not step (whose metrics
    # automatic optimization did not write).
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._accumulate > 1 and self.trainer.training:
            loop = self.trainer.fit_loop.epoch_loop
            if hasattr(loop, "_batches_that_stepped"):
                loop._batches_that_stepped = self.trainer.global_step
        return batch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._mid_window:
            loop = self.trainer.fit_loop.epoch_loop
            every = self.trainer.log_every_n_steps
            if (
                hasattr(loop, "_batches_that_stepped")
                and every > 1
                and (loop._batches_that_stepped + 1) % every == 0
            ):
                loop._batches_that_stepped -= 1

    def on_validation_model_zero_grad(self) -> None:
        # Validation inside an accumulation window (val_check_interval) keeps its gradients.
        if not self._mid_window:
            super().on_validation_model_zero_grad()

    def on_train_epoch_end(self) -> None:
        totals = self._train_stats.epoch_totals()
        if totals is None:
            return
        loss, acc = totals
        self.log("train/loss", loss, on_epoch=True, sync_dist=True)
        self.log("train/acc", acc, on_epoch=True, sync_dist=True)

    # -- evaluation -------------------------------------------------------------------------
    def _eval_step(self, batch, metrics: MetricCollection, loss_metric: MeanMetric) -> None:
        x, y = batch
        logits = self.model(x)
        loss_metric.update(F.cross_entropy(logits, y), weight=y.shape[0])
        metrics.update(logits, y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss)

    def at_target(self) -> bool:
        """Whether the model holds its final sparsity: only such epochs compete for
        ``val/acc_best`` and the best checkpoint (a static run is dense until it prunes)."""
        return self.engine is None or self.engine.at_target()

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        if self.at_target() and not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
        self.log_dict(values, prog_bar=False)
        self.log("val/loss", self.val_loss.compute())
        if self.val_acc_best.update_count > 0:  # no value before the first epoch at target
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        self.val_metrics.reset()
        self.val_loss.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.log("test/loss", self.test_loss.compute())
        self.test_metrics.reset()
        self.test_loss.reset()

    # -- optimisation -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """A pruning method that trains parameters of its own (L0's gates) attaches them here,
        before a checkpoint is restored and the optimizer is built: they become the submodule
        ``pruning_state``, saved, restored and moved to the device with this module."""
        attach = getattr(getattr(self.engine, "method", None), "attach", None)
        if attach is not None and "pruning_state" not in self._modules:
            state = attach(self.engine.model, self.engine.params)
            if state is not None:
                self.pruning_state = state

    def parameter_groups(self) -> list[dict[str, Any]] | Any:
        """The model's parameters, or two groups when normalisation layers and biases take no
        weight decay (``weight_decay_norm_bias=false``, as in the RigL and WRN recipes); plus
        the groups of a pruning method's own parameters (L0's gates, without weight decay)."""
        method_groups = getattr(getattr(self.engine, "method", None), "parameter_groups", None)
        extra = list(method_groups()) if method_groups is not None else []
        if self._weight_decay_norm_bias:
            if extra:
                return [{"params": list(self.model.parameters())}, *extra]
            return self.model.parameters()
        decay, no_decay = [], []
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        for module in self.model.modules():
            for name, param in module.named_parameters(recurse=False):
                skip = isinstance(module, norms) or name == "bias" or param.ndim <= 1
                (no_decay if skip else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}, *extra]

    def configure_optimizers(self):
        optimizer = self._optimizer_factory(params=self.parameter_groups())
        if self.engine is not None:
            self.engine.attach(optimizer)  # re-mask after every optimizer step
        self._lr_scheduler = None
        if self._scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        target = getattr(self._scheduler_factory, "func", self._scheduler_factory)
        steps = int(self.optimizer_steps())
        # Optimizer steps per epoch (optimizer_steps has set up the data).
        batches = self.trainer.num_training_batches
        accumulate = self._accumulate
        per_epoch = max(1, int(batches) // accumulate) if math.isfinite(batches) else 1
        total_steps = self._lr_total if self._lr_total is not None else steps
        if target is torch.optim.lr_scheduler.CosineAnnealingLR and "T_max" not in getattr(
            self._scheduler_factory, "keywords", {}
        ):
            total = total_steps
            if self._scheduler_interval == "epoch":
                total = (
                    self.trainer.max_epochs
                    if self._lr_total is None
                    else math.ceil(total_steps / per_epoch)
                )
            kwargs["T_max"] = max(1, int(total))
        scheduler = self._scheduler_factory(optimizer=optimizer, **kwargs)
        if self._lr_offset:
            skip = self._lr_offset
            if self._scheduler_interval == "epoch":
                skip = self._lr_offset // per_epoch
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(skip):
                    scheduler.step()
        # Stepped by _optimize; Lightning saves and restores its state with the checkpoint.
        self._lr_scheduler = scheduler
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self._scheduler_interval},
        }
