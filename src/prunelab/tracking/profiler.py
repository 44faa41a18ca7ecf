"""A no-op Lightning profiler that costs nothing per call."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from pytorch_lightning.profilers import PassThroughProfiler


class NullProfiler(PassThroughProfiler):
    """Lightning's default PassThroughProfiler, minus its per-call generator.

    The Trainer wraps every hook, callback and loop step in ``profiler.profile(name)``, some
    seventy times per training batch. The stock ``profile`` is a ``@contextmanager``
    generator even when it records nothing; this one hands back one shared ``nullcontext``.
    Used when the trainer config names no profiler (``trainer.profiler=simple`` etc. still
    work as usual).
    """

    _NULL = nullcontext()

    def profile(self, action_name: str) -> AbstractContextManager:
        return self._NULL
