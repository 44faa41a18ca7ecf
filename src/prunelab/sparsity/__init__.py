"""Sparsity: layer-wise budgets (distributions) and step schedules (pure functions)."""

from prunelab.sparsity.distributions import (
    DISTRIBUTIONS,
    dense_layers,
    er,
    erk,
    global_magnitude,
    keep_counts,
    uniform,
)
from prunelab.sparsity.schedules import DropSchedule, SparsitySchedule, resolve_fraction

__all__ = [
    "DISTRIBUTIONS",
    "DropSchedule",
    "SparsitySchedule",
    "dense_layers",
    "er",
    "erk",
    "global_magnitude",
    "keep_counts",
    "resolve_fraction",
    "uniform",
]
