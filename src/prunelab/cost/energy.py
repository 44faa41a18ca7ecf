"""An ESTIMATE of inference energy from operation counts and memory traffic.

Energy per operation, 45 nm CMOS at 0.9 V, from Horowitz (2014), "Computing's energy
problem (and what we can do about it)", ISSCC 2014, its 45 nm energy table, in the 32-bit
form tabulated by Han et al. (2015), "Learning both weights and connections for efficient
neural networks" (NeurIPS, figure 1) and Han et al. (2016), "EIE" (ISCA, table I):

====================================  ==========
operation                             energy
====================================  ==========
32-bit float add                      0.9 pJ
32-bit float multiply                 3.7 pJ
32-bit SRAM read (8 KB array)         5 pJ     (Horowitz: 10 pJ per 64-bit word)
32-bit DRAM read                      640 pJ   (Horowitz: 1.3-2.6 nJ per 64-bit word)
====================================  ==========

Model (all figures are estimates, per sample, labelled ``*_estimate``):

- compute: every MAC is one fp32 multiply and one fp32 add, ``MACs x (3.7 + 0.9) pJ``; a
  sparse model performs only the MACs of its non-zero weights (``macs_infer_sparse``);
- weights: the stored model (fp32 dense, or the sparse format's values *and* indices) is read
  once from DRAM per forward of a batch and shared by its samples: ``bytes / 4 x 640 pJ /
  batch_size`` (with batch 1, the default, every sample pays the whole model: the regime where
  DRAM dominates, as in Han et al.);
- activations: assumed to fit on chip; every input and output element of each prunable layer
  is read or written once from an 8 KB-class SRAM, ``elements x 5 pJ``, the same for the dense
  and the sparse model (activations are dense). Element-wise layers, caches, control, and
  leakage are ignored.

This is an order-of-magnitude model of a hypothetical accelerator, not a measurement of the
machine running the code.
"""

from __future__ import annotations

from prunelab.cost.flops import LayerFlops
from prunelab.errors import ConfigError

PJ_FP32_ADD = 0.9
PJ_FP32_MULT = 3.7
PJ_SRAM_READ_32 = 5.0
PJ_DRAM_READ_32 = 640.0


def energy_pj(
    macs: float, weight_bytes: float, activation_elements: float, batch_size: int = 1
) -> dict[str, float]:
    """Estimated energy (pJ) of one sample's forward and its parts (see the module doc)."""
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int")
    compute = macs * (PJ_FP32_MULT + PJ_FP32_ADD)
    weights = weight_bytes / 4 * PJ_DRAM_READ_32 / int(batch_size)
    activations = activation_elements * PJ_SRAM_READ_32
    return {
        "compute": compute,
        "weights": weights,
        "activations": activations,
        "total": compute + weights + activations,
    }


def energy_report(
    lf: LayerFlops,
    macs_dense: float,
    macs_sparse: float,
    bytes_dense: float,
    bytes_sparse: float,
    batch_size: int = 1,
) -> dict[str, float]:
    """Dense and sparse energy estimates per sample in microjoules.

    ``macs_*``: forward MACs per sample (:func:`prunelab.cost.flops.inference_report`);
    ``bytes_*``: stored model size (``bytes_dense_fp32`` and e.g. ``bytes_csr`` from
    :func:`prunelab.cost.size.size_report`). Keys: ``energy_uj_estimate_dense``,
    ``energy_uj_estimate_sparse``, their ``_compute``/``_weights``/``_activations`` parts and
    ``energy_ratio_estimate`` (dense / sparse).
    """
    elements = sum(a + b for a, b in lf.activations.values())
    out: dict[str, float] = {}
    for kind, macs, nbytes in (
        ("dense", macs_dense, bytes_dense),
        ("sparse", macs_sparse, bytes_sparse),
    ):
        parts = energy_pj(macs, nbytes, elements, batch_size)
        out[f"energy_uj_estimate_{kind}"] = parts["total"] * 1e-6
        for part in ("compute", "weights", "activations"):
            out[f"energy_uj_estimate_{kind}_{part}"] = parts[part] * 1e-6
    sparse = out["energy_uj_estimate_sparse"]
    out["energy_ratio_estimate"] = out["energy_uj_estimate_dense"] / sparse if sparse else 0.0
    return out
