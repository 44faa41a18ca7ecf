"""Input-adaptive (dynamic) channel pruning: saliency predictors and gates (Feature Boosting and
Suppression, Gao et al. 2019), the static analysis of where they go and what a skipped channel
saves, a batch-1 executor that skips the suppressed channels' computation, and the cost
report of a gated model (MACs actually spent per input, measured latency).

Pure torch: no Lightning, no Hydra.
"""

from __future__ import annotations

from prunelab.dynamic.executor import DynamicExecutor
from prunelab.dynamic.gates import GATINGS, FBSGates, keep_count
from prunelab.dynamic.plan import GatePoint, Op, Plan, build_plan, gate_points, trace

__all__ = [
    "GATINGS",
    "DynamicExecutor",
    "FBSGates",
    "GatePoint",
    "Op",
    "Plan",
    "build_plan",
    "gate_points",
    "keep_count",
    "trace",
]
