"""Pruning methods: one small class per method on the template in :mod:`.base`."""

from __future__ import annotations

from typing import Any

from prunelab.errors import ConfigError
from prunelab.methods.adaptive import AdaptiveMagnitude
from prunelab.methods.base import MagnitudePruning, PruneAndGrow, PruningMethod
from prunelab.methods.block import BlockPruning
from prunelab.methods.dense import Dense
from prunelab.methods.dns import DynamicNetworkSurgery
from prunelab.methods.gmp import GradualMagnitude
from prunelab.methods.grasp import GraSP
from prunelab.methods.han import HanPruning
from prunelab.methods.imp import IterativeMagnitude
from prunelab.methods.l0 import L0Regularization
from prunelab.methods.l1 import L1Penalty
from prunelab.methods.random import RandomStatic
from prunelab.methods.rigl import RigL
from prunelab.methods.set import SET
from prunelab.methods.snfs import SNFS
from prunelab.methods.snip import SNIP
from prunelab.methods.static import StaticMagnitude
from prunelab.methods.structured import (
    NeuronSensitivity,
    StructuredL1,
    StructuredPruning,
    TaylorPruning,
)
from prunelab.methods.synflow import SynFlow

METHODS: dict[str, type[PruningMethod]] = {
    "dense": Dense,
    "static": StaticMagnitude,
    "random": RandomStatic,
    "snip": SNIP,
    "grasp": GraSP,
    "synflow": SynFlow,
    "gmp": GradualMagnitude,
    "l1": L1Penalty,
    "l0": L0Regularization,
    "han": HanPruning,
    "imp": IterativeMagnitude,
    "adaptive": AdaptiveMagnitude,
    "dns": DynamicNetworkSurgery,
    "set": SET,
    "rigl": RigL,
    "snfs": SNFS,
    "structured_l1": StructuredL1,
    "neuron_sensitivity": NeuronSensitivity,
    "taylor": TaylorPruning,
    "block": BlockPruning,
}


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
