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
import sys
import time
from collections.abc import Iterator
from typing import Any

MARK_ENV = "PRUNELAB_STARTUP_MARK"
EXIT_ENV = "PRUNELAB_STARTUP_EXIT"
_import_garbage = False  # framework_import froze cyclic garbage not yet collected
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


@contextlib.contextmanager
def framework_import() -> Iterator[None]:
    """Import the framework (torch, Lightning and what they pull in) without the garbage
    collector, then freeze what was imported.

    The import grows the heap from a few MB to about 450k tracked objects that live as long
    as the process: its modules, classes, functions and tables. With the collector on,
    CPython runs a full collection each time the old generation has grown by a quarter,
    several during the import and one more soon after, each scanning the whole heap (0.2 s
    apiece here), and every later full collection of the run scans those objects again. So
    this block runs with the collector off and then calls ``gc.freeze()`` on everything
    alive: later collections (which run as usual) skip the imported objects. Only the first
    import in a process does this; if the framework is already imported the block changes
    nothing.

    The import also leaves some cyclic garbage (about 13k objects here: exceptions raised
    and caught while modules load, with their tracebacks). Frozen, it is never collected,
    and its frames reach, through their callers, the frame that entered this block, with
    whatever that frame later holds (a run's data and model). A process that goes on to
    further runs calls :func:`release_import_garbage` once after its first run.
    """
    global _import_garbage
    first = "pytorch_lightning" not in sys.modules
    enabled = gc.isenabled()
    if first:
        gc.disable()
    try:
        yield
    finally:
        if first:
            if enabled:
                gc.enable()
            gc.freeze()
            _import_garbage = True


def release_import_garbage() -> None:
    """Collect the cyclic garbage that :func:`framework_import` froze with the framework,
    then freeze the framework again: one full collection (about 0.35 s here), done once per
    process and only where a later run would otherwise carry an earlier run's objects (a
    sweep's worker). Does nothing if nothing was frozen or it was already done."""
    global _import_garbage
    if _import_garbage:
        _import_garbage = False
        gc.unfreeze()
        gc.collect()
        gc.freeze()


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
