"""Gradual magnitude pruning."""

from prunelab.methods.base import MagnitudePruning


class GradualMagnitude(MagnitudePruning):
    """Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for
    model compression".

    Sparsity rises from 0 to the target along s_t = s_f (1 - (1 - (t - t0)/(n Δt))^3)
    (``schedule=cubic``; ``linear`` for power 1), pruning the smallest magnitudes every
    ``frequency`` steps between ``begin`` and ``end``.
    """

    name = "gmp"
    schedule_kinds = ("polynomial",)
