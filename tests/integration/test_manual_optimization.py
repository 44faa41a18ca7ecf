"""The module's manual optimization against Lightning's automatic optimization.

The module steps the optimizer itself (see :mod:`prunelab.module`); a test-only subclass
that hands optimization back to Lightning (the Trainer clips and accumulates, Lightning steps
the schedulers) is the reference: same seeds, same data, the same weights after training.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torch.amp import GradScaler
from torch.utils.data import DataLoader, TensorDataset

from prunelab import files
from prunelab.config import validate
from prunelab.errors import ConfigError
from prunelab.methods import build_method
from prunelab.module import ClassificationModule
from prunelab.sparsity.engine import SparsityEngine
from prunelab.train import train

WIDTHS = [6, 24, 16, 4]
BATCH = 8
BATCHES = 7  # per epoch: not a multiple of 3, so accumulation over 3 ends on a short window
EPOCHS = 2


class AutomaticReference(ClassificationModule):
    """The module under Lightning's automatic optimization: the Trainer clips and
    accumulates, Lightning steps the schedulers and counts ``estimated_stepping_batches``
    in optimizer steps (the module's behaviour before it optimized manually)."""

    def __init__(self, *args, accumulate_grad_batches: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = True
        self._accumulate = accumulate_grad_batches  # for the optimizer steps per epoch

    def optimizer_steps(self):
        return self.trainer.estimated_stepping_batches

    def _optimize(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return loss  # Lightning does the rest

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        pass


class Data(pl.LightningDataModule):
    def __init__(self, batches: int = BATCHES) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        n = batches * BATCH
        self.x = torch.randn(n, WIDTHS[0], generator=gen)
        self.y = torch.randint(0, WIDTHS[-1], (n,), generator=gen)

    def train_dataloader(self) -> DataLoader:
        # The same batches in the same order every epoch: a run resumed at an epoch's start
        # sees what the uninterrupted run saw.
        return DataLoader(TensorDataset(self.x, self.y), batch_size=BATCH)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_engine(model: nn.Module, method: str) -> SparsityEngine:
    prunable = {
        f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    schedules = {
        "dense": {"kind": "fixed"},
        "rigl": {
            "kind": "prune_grow",
            "update_every": 2,
            "drop_fraction": 0.3,
            "anneal": "cosine",
            "begin": 0.0,
            "end": 0.9,
            "begin_epoch": None,
            "end_epoch": None,
        },
        "gmp": {
            "kind": "polynomial",
            "begin": 0.0,
            "end": 0.7,
            "begin_epoch": None,
            "end_epoch": None,
            "frequency": 2,
            "power": 3,
        },
        "l1": {"kind": "one_shot", "at": 0.5, "at_epoch": None},
    }
    sparsity = 0.0 if method == "dense" else 0.8
    dist = {"name": "uniform", "dense_first": False, "dense_last": False, "power_scale": 1.0}
    options = {"l1": 1e-2} if method == "l1" else {}
    built = build_method(method, sparsity, distribution=dist, schedule=schedules[method], **options)
    return SparsityEngine(model, prunable, built, seed=0)


SCHEDULERS = {
    None: (None, "epoch"),
    # T_max is filled in with the run's optimizer steps.
    "cosine_step": (partial(torch.optim.lr_scheduler.CosineAnnealingLR, eta_min=0.0), "step"),
    "step_epoch": (partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5), "epoch"),
}


def fit(
    tmp_path: Path,
    *,
    automatic: bool,
    method: str = "dense",
    clip: float | None = None,
    algorithm: str | None = None,
    accumulate: int = 1,
    scheduler: str | None = None,
    precision: str = "32-true",
    optimizer: str = "adam",
    epochs: int = EPOCHS,
    max_steps: int = -1,
    batches: int = BATCHES,
    logger: bool = False,
    ckpt_path: str | None = None,
    stop_after_epoch: int | None = None,
    grad_scaler: float | None = None,
):
    """Train from the same seeds; the module, its engine and the trainer."""
    pl.seed_everything(0, verbose=False)
    model = build_model()
    engine = make_engine(model, method)
    factory, interval = SCHEDULERS[scheduler]
    options = {
        "gradient_clip_val": clip,
        "gradient_clip_algorithm": algorithm,
        "accumulate_grad_batches": accumulate,
    }
    opt = {
        "adam": partial(torch.optim.Adam, lr=1e-2),
        "sgd": partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
    }[optimizer]
    cls = AutomaticReference if automatic else ClassificationModule
    module = cls(
        model,
        num_classes=WIDTHS[-1],
        optimizer=opt,
        scheduler=factory,
        scheduler_interval=interval,
        engine=engine,
        log_every_n_steps=2,
        **(
            {"accumulate_grad_batches": accumulate}
            if automatic
            else {k: v for k, v in options.items() if v is not None}
        ),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        max_steps=max_steps,
        # fp16 AMP with a loss scaler (Lightning has none on the CPU unless given one).
        **(
            {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu", grad_scaler))]}
            if grad_scaler
            else {"precision": precision}
        ),
        logger=CSVLogger(str(tmp_path), name="csv", version="") if logger else False,
        log_every_n_steps=2,
        callbacks=[
            ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True),
            *([] if stop_after_epoch is None else [_StopAfterEpoch(stop_after_epoch)]),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=str(tmp_path),
        **({k: v for k, v in options.items() if v is not None} if automatic else {}),
    )
    trainer.fit(module, datamodule=Data(batches), ckpt_path=ckpt_path)
    return module, engine, trainer


def weights(module: ClassificationModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def assert_same_run(tmp_path: Path, **settings) -> tuple:
    ours = fit(tmp_path / "manual", automatic=False, **settings)
    ref = fit(tmp_path / "automatic", automatic=True, **settings)
    (module, engine, trainer), (ref_module, ref_engine, ref_trainer) = ours, ref
    assert trainer.global_step == ref_trainer.global_step
    a, b = weights(module), weights(ref_module)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    if engine.masks is not None:
        for name in ref_engine.masks:
            assert torch.equal(engine.masks[name], ref_engine.masks[name]), name
    assert engine.method.total_steps == ref_engine.method.total_steps
    assert engine.method.steps_per_epoch == ref_engine.method.steps_per_epoch
    assert engine.history == ref_engine.history
    lr = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lr == [g["lr"] for g in ref_trainer.optimizers[0].param_groups]
    return ours, ref


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"clip": 0.05},
        {"clip": 0.01, "algorithm": "value"},
        {"accumulate": 3},
        {"accumulate": 3, "clip": 0.05, "optimizer": "sgd"},
        {"scheduler": "cosine_step"},
        {"scheduler": "step_epoch", "optimizer": "sgd"},
        {"scheduler": "cosine_step", "accumulate": 3},
        {"scheduler": "step_epoch", "accumulate": 2, "batches": 8},
        {"method": "rigl"},
        {"method": "rigl", "accumulate": 3, "clip": 0.05, "scheduler": "cosine_step"},
        {"method": "gmp", "optimizer": "sgd", "scheduler": "step_epoch"},
        {"method": "l1", "accumulate": 2},  # a penalty in the loss
        {"accumulate": 3, "max_steps": 4},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "plain",
)
def test_same_weights_as_automatic_optimization(tmp_path, settings):
    assert_same_run(tmp_path, **settings)


def test_global_step_and_schedule_sizes_count_optimizer_steps(tmp_path):
    (module, engine, trainer), _ = assert_same_run(
        tmp_path, method="rigl", accumulate=3, scheduler="cosine_step"
    )
    per_epoch = math.ceil(BATCHES / 3)
    assert trainer.global_step == per_epoch * EPOCHS
    assert engine.method.total_steps == per_epoch * EPOCHS
    assert engine.method.steps_per_epoch == per_epoch
    assert module.lr_schedulers().T_max == per_epoch * EPOCHS
    assert module.optimizer_steps() == per_epoch * EPOCHS


def test_clipping_changes_the_weights(tmp_path):
    """The clipping cases above are not vacuous: the bound is reached."""
    clipped, _, _ = fit(tmp_path / "a", automatic=False, clip=0.05)
    plain, _, _ = fit(tmp_path / "b", automatic=False)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(weights(clipped).values(), weights(plain).values(), strict=True)
    )


@pytest.mark.parametrize("accumulate", [1, 3])
def test_the_csv_log_is_the_same(tmp_path, accumulate):
    """Every row of the CSV log: the metrics logged through Lightning (written every
    log_every_n_steps optimizer steps, at the optimizer step) and the engine's statistics."""
    for automatic in (False, True):
        fit(
            tmp_path / str(automatic),
            automatic=automatic,
            method="rigl",
            accumulate=accumulate,
            logger=True,
        )
    ours, ref = (files.csv_metrics(tmp_path / str(a)).read_text() for a in (False, True))
    assert ours == ref
    assert "train/loss_step" in ref.splitlines()[0]


def test_bf16_mixed_precision_keeps_masks_exact(tmp_path):
    module, engine, trainer = fit(
        tmp_path, automatic=False, method="rigl", precision="bf16-mixed", accumulate=2
    )
    assert trainer.global_step == math.ceil(BATCHES / 2) * EPOCHS
    assert engine.n_updates >= 2
    for name, param in engine.params.items():
        assert param.dtype == torch.float32
        assert torch.all(param[~engine.masks[name]] == 0), name
    assert abs(engine.masks.sparsity() - 0.8) < 0.02
    ref = fit(tmp_path / "ref", automatic=True, method="rigl", precision="bf16-mixed", accumulate=2)
    for name, value in weights(ref[0]).items():
        torch.testing.assert_close(weights(module)[name], value, rtol=0, atol=1e-6, msg=name)


def test_fp16_loss_scaling_matches_automatic_optimization(tmp_path):
    """Under a GradScaler (fp16 AMP) the gradients are unscaled before the engine and the
    clipping see them, and steps whose gradients overflow are skipped, mask updates included,
    as under automatic optimization: the scale starts so high that most steps overflow."""
    settings = {"method": "rigl", "accumulate": 2, "clip": 0.5, "optimizer": "sgd"}
    ours, ref = assert_same_run(tmp_path, grad_scaler=2.0**24, **settings)
    scaler = ours[2].precision_plugin.scaler
    assert scaler.get_scale() == ref[2].precision_plugin.scaler.get_scale() < 2.0**24
    assert ours[1].n_skipped_updates == ref[1].n_skipped_updates > 0
    assert ours[1].n_updates == ref[1].n_updates > 0
    for name, param in ours[1].params.items():
        assert torch.all(param[~ours[1].masks[name]] == 0), name


def test_the_trainer_config_options_reach_the_module(compose_cfg, monkeypatch):
    """trainer.accumulate_grad_batches / gradient_clip_* go to the module, not the Trainer."""
    import prunelab.cost

    seen = {}
    real = prunelab.cost.cost_report

    def cost_report(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(prunelab.cost, "cost_report", cost_report)
    record = train(
        compose_cfg(
            "pruning=rigl",
            "sparsity=0.8",
            "epochs=2",
            "trainer.limit_train_batches=7",
            "+trainer.accumulate_grad_batches=3",
            "trainer.gradient_clip_val=0.5",
            "+trainer.gradient_clip_algorithm=value",
            "lr_scheduler=cosine",
        )
    )
    assert record["status"] == "completed"
    assert record["global_step"] == math.ceil(7 / 3) * 2
    assert seen["samples_per_step"] == 3 * record["config"]["dataset"]["batch_size"]
    assert seen["total_steps"] == record["global_step"]
    config = record["config"]["trainer"]
    assert config["accumulate_grad_batches"] == 3 and config["gradient_clip_val"] == 0.5
    assert files.last_checkpoint(record["run_dir"]).exists()


class _StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(files.last_checkpoint(run_dir), map_location="cpu", weights_only=False)


def test_resume_mid_run_gives_the_same_final_weights(compose_cfg, tmp_path):
    """With accumulation (a short last window per epoch), clipping and an epoch-interval
    schedule, a run stopped after its second epoch and resumed from last.ckpt ends with the
    weights, optimizer state, learning rate, masks and global_step of the uninterrupted run."""
    overrides = (
        "pruning=rigl",
        "sparsity=0.8",
        "schedule.update_every=2",
        "epochs=3",
        "trainer.limit_train_batches=12",  # windows of 5, 5 and 2 batches
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.deterministic=true",
        "+trainer.accumulate_grad_batches=5",
        "trainer.gradient_clip_val=0.5",
        "lr_scheduler=multistep",
        "lr_scheduler.scheduler.milestones=[1,2]",
        "cost.latency=false",
    )
    full = train(compose_cfg(*overrides, fast=False, run_dir=tmp_path / "full"))
    train(
        compose_cfg(*overrides, fast=False, run_dir=tmp_path / "part"),
        callbacks=[_StopAfterEpoch(1)],
    )
    resumed = train(
        compose_cfg(
            *overrides,
            f"ckpt_path={files.last_checkpoint(tmp_path / 'part')}",
            fast=False,
            run_dir=tmp_path / "resumed",
        )
    )
    a, b = _checkpoint(tmp_path / "full"), _checkpoint(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] == full["global_step"]
    assert a["global_step"] == 3 * 3
    assert a["lr_schedulers"][0]["last_epoch"] == 3
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    assert a["lr_schedulers"] == b["lr_schedulers"]
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for key in state_a:
        for buf in state_a[key]:
            assert torch.equal(
                torch.as_tensor(state_a[key][buf]), torch.as_tensor(state_b[key][buf])
            )
    assert a["sparsity_engine"]["history"] == b["sparsity_engine"]["history"]
    assert full["metrics"] == resumed["metrics"]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("+trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be > 0"),
        ("+trainer.accumulate_grad_batches=1.5", "must be a positive integer"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be >= 0"),
        ("+trainer.gradient_clip_algorithm=max", "must be 'norm' or 'value'"),
    ],
)
def test_bad_optimization_options_are_config_errors(compose_cfg, override, needle):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(override))
    assert needle in str(err.value) and "\n" not in str(err.value)


DDP_PROBE = """
import sys
from functools import partial

import pytorch_lightning as pl
import torch

sys.path[:0] = [{src!r}, {here!r}]
from prunelab.module import ClassificationModule
from test_manual_optimization import WIDTHS, Data, build_model, make_engine

reduced = []


def count(state, bucket):  # a DDP communication hook: one call per bucket all-reduce
    reduced.append(1)
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class Probe(ClassificationModule):
    def on_train_start(self):
        super().on_train_start()
        self.trainer.strategy.model.register_comm_hook(None, count)
        self.per_batch = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.per_batch.append(len(reduced))
        reduced.clear()

    def on_train_end(self):
        print(f"rank {{self.global_rank}}: {{self.per_batch}} {{self.global_step}}")


pl.seed_everything(0, verbose=False)
model = build_model()
module = Probe(
    model,
    WIDTHS[-1],
    optimizer=partial(torch.optim.SGD, lr=0.1),
    engine=make_engine(model, "dense"),
    accumulate_grad_batches=3,
)
trainer = pl.Trainer(
    accelerator="cpu",
    devices=2,
    strategy="ddp",
    max_epochs=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    limit_val_batches=0,
)
trainer.fit(module, datamodule=Data(14))  # 7 batches per rank: windows of 3, 3 and 1
"""


@pytest.mark.slow
def test_ddp_reduces_gradients_only_at_optimizer_steps(tmp_path):
    """Under DDP the batches inside an accumulation window skip the gradient all-reduce,
    as Lightning's automatic optimization did."""
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    script = tmp_path / "probe.py"
    script.write_text(DDP_PROBE.format(src=str(here.parents[1] / "src"), here=str(here)))
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0: [0, 0, 1, 0, 0, 1, 1] 3", "rank 1: [0, 0, 1, 0, 0, 1, 1] 3"]


def test_resume_from_a_checkpoint_of_automatic_optimization(tmp_path):
    """A checkpoint written while the module optimized automatically (runs started before
    the module optimized manually) resumes at its global_step, to the same final weights."""
    settings = {"method": "rigl", "accumulate": 3, "scheduler": "cosine_step", "clip": 0.05}
    fit(tmp_path / "old", automatic=True, stop_after_epoch=0, **settings)
    last = tmp_path / "old" / "ckpt" / "last.ckpt"
    module, engine, trainer = fit(
        tmp_path / "resumed", automatic=False, ckpt_path=str(last), **settings
    )
    full, full_engine, full_trainer = fit(tmp_path / "full", automatic=True, **settings)
    assert trainer.global_step == full_trainer.global_step == math.ceil(BATCHES / 3) * EPOCHS
    for name, value in weights(full).items():
        torch.testing.assert_close(weights(module)[name], value, rtol=0, atol=1e-6, msg=name)
    assert engine.history == full_engine.history
