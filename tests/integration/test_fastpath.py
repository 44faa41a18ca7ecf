"""The shortcuts through Lightning's per-batch bookkeeping (prunelab.tracking.fastpath) give
what Lightning's own functions give: the same hooks of the same objects in the same order,
the same weights, the same answers."""

from __future__ import annotations

import inspect

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loops import training_epoch_loop
from pytorch_lightning.profilers import SimpleProfiler
from pytorch_lightning.trainer import call
from pytorch_lightning.trainer.connectors.data_connector import _DataHookSelector
from pytorch_lightning.trainer.states import RunningStage

from prunelab.tracking import fastpath
from prunelab.tracking.profiler import NullProfiler

CALLBACK_HOOKS = [
    name for name, fn in vars(Callback).items() if name.startswith("on_") and inspect.isfunction(fn)
] + ["setup", "teardown"]
MODULE_HOOKS = [
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_validation_epoch_end",
    "on_save_checkpoint",
    "on_train_end",
    "on_fit_end",
]


@pytest.fixture
def lightning_own():
    """Lightning's own functions during the test; the shortcuts as they were afterwards."""
    was = fastpath.installed()
    fastpath.uninstall()
    yield
    if was:
        fastpath.install()


class Recorder(Callback):
    """Records every callback hook Lightning dispatches to it."""

    def __init__(self, log: list) -> None:
        self.calls = log


def _recording(name: str):
    def hook(self, *args, **kwargs):
        self.calls.append(f"callback.{name}")

    return hook


for _name in CALLBACK_HOOKS:
    setattr(Recorder, _name, _recording(_name))


class Silent(Callback):
    """Overrides nothing: the shortcuts skip it, Lightning calls its empty hooks."""


class Tiny(pl.LightningModule):
    """Manual optimization, as prunelab's module; records its hooks (those of LightningModule
    it does not override are not recorded, and return what the base class returns)."""

    def __init__(self, log: list, record: bool) -> None:
        super().__init__()
        self.log_ = log
        self.net = torch.nn.Linear(4, 3)
        self.automatic_optimization = False
        if record:
            for name in MODULE_HOOKS:
                base = getattr(pl.LightningModule, name)

                def hook(*args, _name=name, _base=base, **kwargs):
                    self.log_.append(f"module.{_name}")
                    return _base(self, *args, **kwargs)

                setattr(self, name, hook)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = F.cross_entropy(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _fit(tmp_path, record: bool = True, profiler=None) -> tuple[list, dict, pl.Trainer]:
    log: list = []
    pl.seed_everything(0, verbose=False)
    module = Tiny(log, record)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        default_root_dir=str(tmp_path),
        profiler=profiler if profiler is not None else NullProfiler(),
        callbacks=[Recorder(log), Silent(), ModelCheckpoint(dirpath=str(tmp_path), monitor=None)],
    )
    trainer.fit(module, train_dataloaders=_data(), val_dataloaders=_data())
    return log, {k: v.clone() for k, v in module.state_dict().items()}, trainer


def test_a_fit_calls_the_same_hooks_in_the_same_order_and_ends_with_the_same_weights(
    tmp_path, lightning_own
):
    own_log, own_weights, own = _fit(tmp_path / "own")
    assert fastpath.install()
    fast_log, fast_weights, fast = _fit(tmp_path / "fast")
    assert fast_log == own_log
    assert "callback.on_train_batch_end" in fast_log and "module.on_before_backward" in fast_log
    assert fast_weights.keys() == own_weights.keys()
    for name, value in own_weights.items():
        assert torch.equal(fast_weights[name], value), name
    assert fast.global_step == own.global_step == 12
    assert set(fast.callback_metrics) == set(own.callback_metrics)
    for name, value in own.callback_metrics.items():
        assert torch.equal(fast.callback_metrics[name], value), name


def test_a_trainer_that_profiles_gets_lightnings_own_dispatch(tmp_path, lightning_own):
    assert fastpath.install()
    profiler = SimpleProfiler()
    _fit(tmp_path, record=False, profiler=profiler)
    actions = set(profiler.recorded_durations)
    # Lightning's dispatch times every callback's hook, empty ones included, and every
    # module hook.
    assert "[Callback]Silent.on_train_batch_end" in actions
    assert "[LightningModule]Tiny.on_train_batch_start" in actions


def test_lightning_modules_own_hooks_are_known_to_return_none_or_their_input():
    module = pl.LightningModule()
    batch = object()
    assert fastpath._PASSING_HOOKS  # found at all
    for function, passing in fastpath._PASSING_HOOKS.items():
        name = function.__name__
        assert getattr(pl.LightningModule, name) is function
        n_args = function.__code__.co_argcount - 1
        args = ([batch] + [0] * n_args)[:n_args]
        expected = batch if passing else None
        assert function(module, *args) is expected, name
    passing = {f.__name__: p for f, p in fastpath._PASSING_HOOKS.items()}
    assert passing["on_train_batch_start"] == "" and passing["on_after_batch_transfer"] == "batch"
    assert "configure_optimizers" not in passing and "on_validation_model_zero_grad" not in passing


def test_training_is_the_same_answer_for_every_stage(lightning_own):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    own = fastpath._ORIGINAL["training"]
    for stage in [*RunningStage, None]:
        trainer.state.stage = stage
        assert fastpath._training(trainer) is own.fget(trainer), stage


def test_the_batch_hook_owner_is_the_same(lightning_own):
    class WithTransfer(pl.LightningDataModule):
        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch

    class Plain(pl.LightningDataModule):
        pass

    module = Tiny([], record=False)
    for datamodule in (None, WithTransfer(), Plain()):
        own = _DataHookSelector(module, datamodule)
        fast = _DataHookSelector(module, datamodule)
        for hook in own._valid_hooks:
            for _ in range(2):  # computed, then remembered
                assert fastpath._get_instance(fast, hook) is own.get_instance(hook)
        with pytest.raises(ValueError):
            fastpath._get_instance(fast, "training_step")


def test_the_training_step_signature_answer_is_the_same_and_follows_a_new_code_object():
    own = fastpath._ORIGINAL["is_param_in_hook_signature"]

    class A:
        def with_index(self, batch, batch_idx):
            pass

        def without(self, batch):
            pass

        def star(self, *args):
            pass

    a = A()
    for fn in (a.with_index, a.without, a.star, A.with_index, lambda batch, i: None):
        for kwargs in ({}, {"min_args": 2}, {"explicit": True}):
            for _ in range(2):
                assert fastpath._is_param_in_hook_signature(fn, "batch_idx", **kwargs) == own(
                    fn, "batch_idx", **kwargs
                )
    assert fastpath._is_param_in_hook_signature(a.without, "batch_idx", min_args=2) is False
    A.without.__code__ = A.with_index.__code__
    assert fastpath._is_param_in_hook_signature(a.without, "batch_idx", min_args=2) is True


def test_install_only_on_the_release_it_was_checked_against(monkeypatch, lightning_own):
    monkeypatch.setattr(pl, "__version__", "9.0.0")
    assert not fastpath.install()
    assert not fastpath.installed()
    assert call._call_callback_hooks is fastpath._ORIGINAL["_call_callback_hooks"]
    monkeypatch.undo()
    assert fastpath.install() and fastpath.installed()
    assert training_epoch_loop.is_param_in_hook_signature is fastpath._is_param_in_hook_signature
    fastpath.uninstall()
    assert not fastpath.installed()
    assert pl.Trainer.training is fastpath._ORIGINAL["training"]
