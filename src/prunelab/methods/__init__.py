"""Pruning methods: one small class per method on the template in :mod:`.base`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prunelab.errors import ConfigError
from prunelab.lazy import LazyClasses, lazy_attributes
from prunelab.methods.base import MagnitudePruning, PruneAndGrow, PruningMethod

# Each method's module is imported on first use (``prunelab.methods.RigL``, ``METHODS["rigl"]``),
# so that a run imports the one method it builds, not all of them (the structured methods
# import torch_pruning).
_LAZY = {
    "AdaptiveMagnitude": "prunelab.methods.adaptive",
    "BlockPruning": "prunelab.methods.block",
    "Dense": "prunelab.methods.dense",
    "DynamicNetworkSurgery": "prunelab.methods.dns",
    "FeatureBoostingSuppression": "prunelab.methods.fbs",
    "GradualMagnitude": "prunelab.methods.gmp",
    "GraSP": "prunelab.methods.grasp",
    "HanPruning": "prunelab.methods.han",
    "IterativeMagnitude": "prunelab.methods.imp",
    "L0Regularization": "prunelab.methods.l0",
    "L1Penalty": "prunelab.methods.l1",
    "RandomStatic": "prunelab.methods.random",
    "RigL": "prunelab.methods.rigl",
    "SET": "prunelab.methods.set",
    "SNFS": "prunelab.methods.snfs",
    "SNIP": "prunelab.methods.snip",
    "StaticMagnitude": "prunelab.methods.static",
    "NeuronSensitivity": "prunelab.methods.structured",
    "StructuredL1": "prunelab.methods.structured",
    "StructuredPruning": "prunelab.methods.structured",
    "TaylorPruning": "prunelab.methods.structured",
    "SynFlow": "prunelab.methods.synflow",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

#: ``pruning.name`` -> method class.
METHODS: Mapping[str, type[PruningMethod]] = LazyClasses(
    __name__,
    {
        "dense": "Dense",
        "static": "StaticMagnitude",
        "random": "RandomStatic",
        "snip": "SNIP",
        "grasp": "GraSP",
        "synflow": "SynFlow",
        "gmp": "GradualMagnitude",
        "l1": "L1Penalty",
        "l0": "L0Regularization",
        "han": "HanPruning",
        "imp": "IterativeMagnitude",
        "adaptive": "AdaptiveMagnitude",
        "dns": "DynamicNetworkSurgery",
        "set": "SET",
        "rigl": "RigL",
        "snfs": "SNFS",
        "structured_l1": "StructuredL1",
        "neuron_sensitivity": "NeuronSensitivity",
        "taylor": "TaylorPruning",
        "block": "BlockPruning",
        "fbs": "FeatureBoostingSuppression",
    },
)


def build_method(
    name: str,
    sparsity: float,
    distribution: dict[str, Any] | None = None,
    schedule: dict[str, Any] | None = None,
    **options: Any,
) -> PruningMethod:
    """The method registered as ``name``, with its method-specific ``options``."""
    if name not in METHODS:
        raise ConfigError(f"unknown pruning method '{name}'; choose one of: {', '.join(METHODS)}")
    try:
        return METHODS[name](sparsity, distribution=distribution, schedule=schedule, **options)
    except TypeError as err:
        raise ConfigError(f"pruning={name}: {err}; check the keys under pruning.") from None


__all__ = [
    "METHODS",
    "SET",
    "SNFS",
    "SNIP",
    "AdaptiveMagnitude",
    "BlockPruning",
    "Dense",
    "DynamicNetworkSurgery",
    "FeatureBoostingSuppression",
    "GraSP",
    "GradualMagnitude",
    "HanPruning",
    "IterativeMagnitude",
    "L0Regularization",
    "L1Penalty",
    "MagnitudePruning",
    "NeuronSensitivity",
    "PruneAndGrow",
    "PruningMethod",
    "RandomStatic",
    "RigL",
    "StaticMagnitude",
    "StructuredL1",
    "StructuredPruning",
    "SynFlow",
    "TaylorPruning",
    "build_method",
]
