"""Analysis of masks: health diagnostics of one set of masks and comparisons between several;
layer sensitivity curves and the per-layer sparsities allocated from them.

Pure torch (no Lightning, no Hydra): functions of ``name -> bool tensor`` mappings (a
:class:`~prunelab.sparsity.masks.Masks` is one) and, optionally, of gradients.
"""

from prunelab.analysis.compare import (
    compare_masks,
    hamming,
    jaccard,
    jaccard_matrix,
    mask_overlap,
    pairwise_matrix,
)
from prunelab.analysis.diagnostics import (
    DisconnectionWatch,
    diagnostic_metrics,
    gradient_norms,
    has_skip_connections,
    mask_diagnostics,
)
from prunelab.analysis.sensitivity import (
    SensitivityCurves,
    layer_sensitivity,
    load_curves,
    write_sensitivity,
)

__all__ = [
    "DisconnectionWatch",
    "SensitivityCurves",
    "compare_masks",
    "diagnostic_metrics",
    "gradient_norms",
    "hamming",
    "has_skip_connections",
    "jaccard",
    "jaccard_matrix",
    "layer_sensitivity",
    "load_curves",
    "mask_diagnostics",
    "mask_overlap",
    "pairwise_matrix",
    "write_sensitivity",
]
