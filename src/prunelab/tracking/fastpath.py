"""Exact shortcuts through the per-batch bookkeeping of Lightning's fit loop.

A pruning study is hundreds of short runs of small models, whose training steps last about a
millisecond on a CPU; Lightning's fit loop spends some 20% on top of that in Python
(``scripts/bench_overhead.py``). Most of it is generic work whose answer cannot change during
a fit, redone at every batch. :func:`install` replaces five of Lightning's internal functions
with versions that return the same values, call the same hooks of the same objects in the
same order, and skip only work whose result is not observable:

- hook dispatch (``pytorch_lightning.trainer.call``: ``_call_callback_hooks``,
  ``_call_lightning_module_hook``, ``_call_strategy_hook``). Lightning formats a debug
  message and a profiler label for every call, enters the profiler, and calls every
  callback's hook, Callback's own empty ones included. For a trainer whose profiler is
  :class:`~prunelab.tracking.profiler.NullProfiler` (which records nothing) while the
  dispatch logger is not at DEBUG level, the shortcuts skip the message, the label and the
  profiler, and call only the callbacks that override the hook (the list is kept per trainer
  and rebuilt whenever ``trainer.callbacks`` changes). Any other trainer (``trainer.profiler=
  simple``, ...) or a DEBUG logger goes through Lightning's own functions.
- which object implements a batch-transfer hook (``_DataHookSelector.get_instance``): decided
  by which classes override it, so it is remembered per selector (one per fit) and hook.
- ``Trainer.training``: ``state.stage == RunningStage.TRAINING`` compares enum values as
  lower-cased strings (a dozen times per batch); the stage is a ``RunningStage`` or None, and
  distinct stages have distinct values, so identity gives the same answer.
- whether ``training_step`` takes ``batch_idx`` (``is_param_in_hook_signature``, which
  rebuilds the method's full argument spec every batch): remembered per function and code
  object.

The shortcuts are installed only on the Lightning release they were checked against (the
pinned one, ``LIGHTNING_VERSIONS``); on any other, Lightning runs unchanged.
``tests/unit/test_fastpath.py`` checks each against Lightning's own function, and a fit with
them against a fit without (same hooks, same order, same weights).
"""

from __future__ import annotations

import dis
import logging
import weakref
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Checkpoint, EarlyStopping
from pytorch_lightning.loops import training_epoch_loop
from pytorch_lightning.trainer import call
from pytorch_lightning.trainer.connectors.data_connector import _DataHookSelector
from pytorch_lightning.trainer.states import RunningStage

from prunelab.tracking.profiler import NullProfiler

# Lightning releases whose internals these shortcuts were checked against.
LIGHTNING_VERSIONS = ("2.6.",)

_DISPATCH_LOG = call.log


def _exact(trainer: pl.Trainer) -> bool:
    """Whether skipping the profiler and the debug messages changes nothing observable."""
    return type(trainer.profiler) is NullProfiler and not _DISPATCH_LOG.isEnabledFor(logging.DEBUG)


def _overrides(callback: Callback, hook_name: str) -> bool:
    """Whether ``callback``'s ``hook_name`` may do something (Callback's own hooks are all
    empty)."""
    if hook_name in vars(callback):
        return True
    return getattr(type(callback), hook_name, None) is not getattr(Callback, hook_name, None)


class _CallbackHooks:
    """One trainer's callbacks and, per (hook, monitoring_callbacks), the bound hooks among
    them that do something."""

    __slots__ = ("callbacks", "hooks")

    def __init__(self, callbacks: tuple[Callback, ...]) -> None:
        self.callbacks = callbacks
        self.hooks: dict[tuple[str, bool | None], list[Any]] = {}

    def get(self, hook_name: str, monitoring: bool | None) -> list[Any]:
        key = (hook_name, monitoring)
        hooks = self.hooks.get(key)
        if hooks is None:
            callbacks = self.callbacks
            if monitoring is not None:  # Lightning's split: early stopping and checkpoints
                callbacks = tuple(
                    cb
                    for cb in callbacks
                    if isinstance(cb, (EarlyStopping, Checkpoint)) is monitoring
                )
            hooks = self.hooks[key] = [
                getattr(cb, hook_name) for cb in callbacks if _overrides(cb, hook_name)
            ]
        return hooks


def _call_callback_hooks(
    trainer: pl.Trainer,
    hook_name: str,
    *args: Any,
    monitoring_callbacks: bool | None = None,
    **kwargs: Any,
) -> None:
    if not _exact(trainer):
        _ORIGINAL["_call_callback_hooks"](
            trainer, hook_name, *args, monitoring_callbacks=monitoring_callbacks, **kwargs
        )
        return
    callbacks = tuple(trainer.callbacks)
    cache = trainer.__dict__.get("_prunelab_hooks")
    if cache is None or cache.callbacks != callbacks:
        cache = trainer.__dict__["_prunelab_hooks"] = _CallbackHooks(callbacks)
    pl_module = trainer.lightning_module
    if pl_module:
        prev_fx_name = pl_module._current_fx_name
        pl_module._current_fx_name = hook_name
    for fn in cache.get(hook_name, monitoring_callbacks):
        fn(trainer, trainer.lightning_module, *args, **kwargs)
    if pl_module:
        pl_module._current_fx_name = prev_fx_name


def _passing(function: Any) -> str | None:
    """For a function that only returns None: ""; one that only returns its first argument
    after ``self``: that argument's name; else None (read from the bytecode)."""
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    ops = [
        (i.opname, i.argval)
        for i in dis.get_instructions(function)
        if i.opname not in ("RESUME", "NOP", "CACHE")
    ]
    if ops in ([("RETURN_CONST", None)], [("LOAD_CONST", None), ("RETURN_VALUE", None)]):
        return ""
    first = code.co_varnames[1] if code.co_argcount >= 2 else None
    if first is not None and ops == [("LOAD_FAST", first), ("RETURN_VALUE", None)]:
        return first
    return None


# LightningModule's own hooks that do nothing but return None or their input: a module that
# does not override one needs no call (its result is known).
_PASSING_HOOKS = {
    function: passing
    for name in dir(pl.LightningModule)
    if name.startswith("on_")
    and callable(function := getattr(pl.LightningModule, name))
    and (passing := _passing(function)) is not None
}


def _call_lightning_module_hook(
    trainer: pl.Trainer,
    hook_name: str,
    *args: Any,
    pl_module: pl.LightningModule | None = None,
    **kwargs: Any,
) -> Any:
    if not _exact(trainer):
        return _ORIGINAL["_call_lightning_module_hook"](
            trainer, hook_name, *args, pl_module=pl_module, **kwargs
        )
    pl_module = pl_module or trainer.lightning_module
    if pl_module is None:
        raise TypeError("No `LightningModule` is available to call hooks on.")
    fn = getattr(pl_module, hook_name)
    if not callable(fn):
        return None
    passing = _PASSING_HOOKS.get(getattr(fn, "__func__", None))
    if passing == "":  # LightningModule's own hook, which returns None
        return None
    if passing is not None and (args or passing in kwargs):  # ... which returns its input
        return args[0] if args else kwargs[passing]
    prev_fx_name = pl_module._current_fx_name
    pl_module._current_fx_name = hook_name
    output = fn(*args, **kwargs)
    pl_module._current_fx_name = prev_fx_name
    return output


def _call_strategy_hook(trainer: pl.Trainer, hook_name: str, *args: Any, **kwargs: Any) -> Any:
    if not _exact(trainer):
        return _ORIGINAL["_call_strategy_hook"](trainer, hook_name, *args, **kwargs)
    pl_module = trainer.lightning_module
    prev_fx_name = pl_module._current_fx_name
    pl_module._current_fx_name = hook_name
    fn = getattr(trainer.strategy, hook_name)
    if not callable(fn):
        return None
    output = fn(*args, **kwargs)
    pl_module._current_fx_name = prev_fx_name
    return output


def _get_instance(self: _DataHookSelector, hook_name: str) -> Any:
    chosen = self.__dict__.setdefault("_prunelab_chosen", {})
    instance = chosen.get(hook_name)
    if instance is None:
        instance = chosen[hook_name] = _ORIGINAL["get_instance"](self, hook_name)
    return instance


def _training(self: pl.Trainer) -> bool:
    return self.state.stage is RunningStage.TRAINING


_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _is_param_in_hook_signature(
    hook_fx: Any, param: str, explicit: bool = False, min_args: int | None = None
) -> bool:
    function = getattr(hook_fx, "__func__", hook_fx)  # a bound method: its function
    try:
        answers = _SIGNATURES.setdefault(function, {})
    except TypeError:  # not weak-referenceable
        return _ORIGINAL["is_param_in_hook_signature"](hook_fx, param, explicit, min_args)
    key = (getattr(function, "__code__", None), param, explicit, min_args)
    answer = answers.get(key)
    if answer is None:
        answer = answers[key] = _ORIGINAL["is_param_in_hook_signature"](
            hook_fx, param, explicit, min_args
        )
    return answer


_ORIGINAL: dict[str, Any] = {
    "_call_callback_hooks": call._call_callback_hooks,
    "_call_lightning_module_hook": call._call_lightning_module_hook,
    "_call_strategy_hook": call._call_strategy_hook,
    "get_instance": _DataHookSelector.get_instance,
    "training": pl.Trainer.training,
    "is_param_in_hook_signature": training_epoch_loop.is_param_in_hook_signature,
}


def supported() -> bool:
    """Whether the installed Lightning is one the shortcuts were checked against."""
    return pl.__version__.startswith(LIGHTNING_VERSIONS)


def installed() -> bool:
    return call._call_callback_hooks is _call_callback_hooks


def install() -> bool:
    """Install the shortcuts (idempotent); False, and nothing changed, on a Lightning release
    they were not checked against."""
    if not supported():
        return False
    call._call_callback_hooks = _call_callback_hooks
    call._call_lightning_module_hook = _call_lightning_module_hook
    call._call_strategy_hook = _call_strategy_hook
    _DataHookSelector.get_instance = _get_instance  # type: ignore[method-assign]
    pl.Trainer.training = property(_training, _ORIGINAL["training"].fset)  # type: ignore[method-assign]
    training_epoch_loop.is_param_in_hook_signature = _is_param_in_hook_signature
    return True


def uninstall() -> None:
    """Put Lightning's own functions back."""
    call._call_callback_hooks = _ORIGINAL["_call_callback_hooks"]
    call._call_lightning_module_hook = _ORIGINAL["_call_lightning_module_hook"]
    call._call_strategy_hook = _ORIGINAL["_call_strategy_hook"]
    _DataHookSelector.get_instance = _ORIGINAL["get_instance"]  # type: ignore[method-assign]
    pl.Trainer.training = _ORIGINAL["training"]  # type: ignore[method-assign]
    training_epoch_loop.is_param_in_hook_signature = _ORIGINAL["is_param_in_hook_signature"]
