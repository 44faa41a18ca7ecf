"""Start-up marks: when a run reaches each phase before its first training step.

Off unless ``PRUNELAB_STARTUP_MARK=<file>`` is set. Then each phase appends one line
``<phase> <time.time()>`` to that file: ``imports`` (the entry point's imports are done),
``config`` (Hydra has composed the config and made the run folder), ``framework`` (Lightning,
and with it torch, imported), ``built`` (datamodule,
model and Lightning module built), ``trainer`` (loggers and Trainer constructed, about to
call ``trainer.fit``), ``data`` (Lightning's ``on_fit_start``: the data is set up and the
optimizer built), ``loggers`` (``on_train_start``: the loggers have their hyperparameters,
W&B has started) and ``first_step`` (the first training batch starts; the initial masks are
decided between ``loggers`` and ``first_step``). With ``PRUNELAB_STARTUP_EXIT=1`` the process ends right after
``first_step`` (exit status 0, nothing else written), so that ``scripts/bench_startup.py``
does not wait for the training.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from typing import Any

MARK_ENV = "PRUNELAB_STARTUP_MARK"
EXIT_ENV = "PRUNELAB_STARTUP_EXIT"
PHASES = ("imports", "config", "framework", "built", "trainer", "data", "loggers", "first_step")


def enabled() -> bool:
    """Whether start-up marks are being recorded (``PRUNELAB_STARTUP_MARK`` is set)."""
    return bool(os.environ.get(MARK_ENV))


def mark(phase: str) -> None:
    """Append ``<phase> <time.time()>`` to the mark file, if one is set."""
    path = os.environ.get(MARK_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(f"{phase} {time.time():.6f}\n")


def first_step() -> None:
    """Mark the first training step; end the process there when ``PRUNELAB_STARTUP_EXIT=1``."""
    mark("first_step")
    if os.environ.get(EXIT_ENV) == "1":
        os._exit(0)


def read_marks(path: str | os.PathLike) -> dict[str, float]:
    """The marks written to ``path``: ``{phase: time.time()}`` (the first of each phase)."""
    marks: dict[str, float] = {}
    with open(path) as fh:
        for line in fh:
            phase, _, value = line.strip().partition(" ")
            if phase and value:
                marks.setdefault(phase, float(value))
    return marks


# Generation-2 threshold while the framework is imported (CPython's default is 10).
IMPORT_GC_THRESHOLD2 = 1000


@contextlib.contextmanager
def fewer_full_collections() -> Iterator[None]:
    """Defer CPython's full (generation 2) garbage collections while the block runs.

    Importing Lightning (with torch, torchmetrics and what they import) grows the heap from a
    few MB to about 700k tracked objects; CPython runs a full collection each time the old
    generation has grown by a quarter, so the import runs about seven of them, each scanning
    the whole heap (0.7 s of the 3.3 s the import takes here). Inside this block only the
    young generations are collected (garbage made there is still freed); afterwards the
    thresholds are as before and the next full collection, when it is due, scans the heap
    once. Nothing is disabled or frozen.
    """
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], max(before[2], IMPORT_GC_THRESHOLD2))
    try:
        yield
    finally:
        gc.set_threshold(*before)


def callback() -> Any:
    """A Lightning callback that marks ``data``, ``loggers`` and ``first_step``."""
    from pytorch_lightning.callbacks import Callback

    class StartupMarks(Callback):
        def __init__(self) -> None:
            self._stepped = False

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            mark("data")

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            mark("loggers")

        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if not self._stepped:
                self._stepped = True
                first_step()

    return StartupMarks()
