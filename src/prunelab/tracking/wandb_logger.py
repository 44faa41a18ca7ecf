"""A Lightning WandbLogger whose W&B run starts in a background thread.

``wandb.init`` takes around a second (importing W&B, starting its service process, writing
the run's first files), more when many modules are loaded. :meth:`BackgroundWandbLogger.start`
runs it in a thread, so that the data set-up and the first training steps do not wait for
it. Until the run is up, the hyperparameters and metrics logged to it are kept, in order, and
handed to the run in the same order as soon as it is up: the run's history, config and
summary are the same as with a run started up front (only W&B's own ``_timestamp`` of the
entries logged while it started is the time they were handed over). Any other use of the run
(:attr:`~BackgroundWandbLogger.experiment`: artifacts, tables, the summary) waits for it; an
error of ``wandb.init`` is raised there and at every later log call, so a run whose W&B
start failed fails as it did when W&B started up front. Without :meth:`start`, the logger
starts its run on first use, like the stock WandbLogger.

Lightning reads ``experiment`` of each of its loggers before it sets up the data, to start
them; the Trainer is therefore given :meth:`BackgroundWandbLogger.trainer_view`, which
forwards everything a Trainer calls but has no ``experiment``.

This module imports Lightning's loggers: import it only when W&B is on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers import Logger, WandbLogger

# wandb.init is not meant to run twice at once in one process: starts take turns.
_START_LOCK = threading.Lock()
# Loggers started in the background and not yet waited for by wait_for_starts().
_STARTED: list[BackgroundWandbLogger] = []


def wait_for_starts() -> None:
    """Wait for every background start of this process (errors are left to the run's own
    calls), handing each run the log calls kept for it; before ``wandb.finish``."""
    while _STARTED:
        logger = _STARTED.pop()
        with contextlib.suppress(Exception):
            logger.wait()


class BackgroundWandbLogger(WandbLogger):
    """WandbLogger with :meth:`start` (``wandb.init`` in a thread) and the kept log calls.

    ``settings`` are the keyword arguments of ``wandb.Settings``, built where the run starts,
    so that W&B is imported there too.
    """

    def __init__(self, *, settings: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._settings_kwargs = dict(settings or {})
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._kept: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._kept_lock = threading.Lock()

    # -- starting the run -------------------------------------------------------------------
    def _init_run(self) -> Any:
        """``wandb.init`` as the stock logger does it (its ``experiment``), with the settings."""
        import wandb

        if self._settings_kwargs and "settings" not in self._wandb_init:
            self._wandb_init["settings"] = wandb.Settings(**self._settings_kwargs)
        return WandbLogger.experiment.fget(self)

    def _start_in_thread(self) -> None:
        try:
            with _START_LOCK:
                self._init_run()
        except BaseException as err:  # raised again where the run is used
            self._start_error = err

    def start(self) -> None:
        """Start the W&B run in a background thread and return at once (once; no-op when the
        run is up already)."""
        if self._thread is not None or self._experiment is not None:
            return
        self._thread = threading.Thread(
            target=self._start_in_thread, name="wandb-start", daemon=True
        )
        _STARTED.append(self)
        self._thread.start()

    @property
    def starting(self) -> bool:
        """Whether the background start is still under way."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def wait(self) -> None:
        """Wait for a background start to end, raise its error if it failed, and hand the
        log calls kept meanwhile to the run."""
        thread = self._thread
        if thread is not None:
            thread.join()
        if self._start_error is not None:
            with self._kept_lock:
                self._kept.clear()  # there is no run to hand them to
            raise self._start_error
        with self._kept_lock:
            kept, self._kept = self._kept, []
        for name, args, kwargs in kept:
            getattr(WandbLogger, name)(self, *args, **kwargs)

    def _keep(self, name: str, *args: Any, **kwargs: Any) -> bool:
        """Keep a log call while the run starts (True); otherwise hand over what was kept
        before, so that the caller logs after it (False)."""
        with self._kept_lock:
            if self.starting:
                copied = tuple(dict(a) if isinstance(a, Mapping) else a for a in args)
                self._kept.append((name, copied, kwargs))
                return True
        self.wait()
        return False

    # -- the WandbLogger interface ------------------------------------------------------------
    @property
    def experiment(self) -> Any:
        """The W&B run: waits for a background start (or starts the run now)."""
        self.wait()
        if self._experiment is None:
            with _START_LOCK:
                return self._init_run()
        return WandbLogger.experiment.fget(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # starts the run (waits for it) first
        state.update(_thread=None, _start_error=None, _kept=[], _kept_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._kept_lock = threading.Lock()

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if not self._keep("log_hyperparams", params, *args, **kwargs):
            super().log_hyperparams(params, *args, **kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._keep("log_metrics", metrics, step=step):
            super().log_metrics(metrics, step=step)

    def finalize(self, status: str) -> None:
        try:
            self.wait()
        except BaseException:
            if status == "success":
                raise
        super().finalize(status)

    def trainer_view(self) -> Logger:
        """What to give the Trainer in place of this logger (see the module's docstring)."""
        return _TrainerView(self)


class _TrainerView(Logger):
    """Forwards a Trainer's calls to a :class:`BackgroundWandbLogger`; has no ``experiment``,
    so that Lightning does not wait for the run before setting up the data."""

    def __init__(self, logger: BackgroundWandbLogger) -> None:
        super().__init__()
        self.wandb_logger = logger

    @property
    def name(self) -> str | None:
        return self.wandb_logger.name

    @property
    def version(self) -> int | str | None:
        # The run's id; "" (no version: none shown in the progress bar) while it starts.
        logger = self.wandb_logger
        return "" if logger.starting and logger._id is None else logger.version

    @property
    def save_dir(self) -> str | None:
        return self.wandb_logger.save_dir

    @property
    def root_dir(self) -> str | None:
        return self.wandb_logger.root_dir

    @property
    def log_dir(self) -> str | None:
        return self.wandb_logger.log_dir

    @property
    def group_separator(self) -> str:
        return self.wandb_logger.group_separator

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.wandb_logger.log_hyperparams(params, *args, **kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.wandb_logger.log_metrics(metrics, step=step)

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        self.wandb_logger.log_graph(model, input_array)

    def save(self) -> None:
        self.wandb_logger.save()

    def finalize(self, status: str) -> None:
        self.wandb_logger.finalize(status)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.wandb_logger.after_save_checkpoint(checkpoint_callback)
