"""Gradual magnitude pruning."""

from prunelab.methods.base import MagnitudePruning


class GradualMagnitude(MagnitudePruning):
    """Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for
    model compression".

    Sparsity rises from 0 to the target along s_t = s_f (1 - (1 - (t - t0)/(n Δt))^3)
    (``schedule=cubic``; ``linear`` for power 1), pruning the smallest magnitudes every
    ``frequency`` steps between ``begin`` and ``end``.

    With ``distribution.n_m=N:M`` (and ``sparsity=1-N/M``) each update keeps, in every group of
    M consecutive weights along the input dimension, the ``M - floor(s_t M)`` largest active
    magnitudes: the ramp rounded down to multiples of 1/M, exactly N:M from ``end`` on.
    With ``distribution.block=RxC`` each update keeps whole ``R x C`` blocks of each layer's
    ``[out, in * kh * kw]`` matrix, the ``round(keep_t / (R * C))`` active ones with the
    largest L2 norm (``keep_t``: the layer's count at ``s_t``); pruned blocks stay pruned and
    the final sparsity is within one block per layer of the target.
    ``pruning.threshold`` is for one-shot pruning only (``pruning=static``); here it is an error.
    """

    name = "gmp"
    schedule_kinds = ("polynomial",)
