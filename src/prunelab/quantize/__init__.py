"""Quantization of pruned models with the masks kept exactly zero.

- :mod:`prunelab.quantize.int8`: post-training static int8 quantization through
  onnxruntime (:func:`quantize_int8`), the int8 model's runner and reader
  (:func:`load_int8`, :func:`int8_weights`).
- :mod:`prunelab.quantize.qat`: quantization-aware fine-tuning with fake quantization
  matching that deployment scheme (:func:`qat_finetune`, or :func:`prepare_qat` /
  :func:`finalize_qat` inside another training loop).

Only torch is imported here; onnx and onnxruntime are imported when a function needs them.
"""

from prunelab.quantize.int8 import (
    Int8Model,
    Int8Report,
    Int8Weight,
    OnnxModel,
    int8_weights,
    load_int8,
    ort_session,
    quantize_int8,
)
from prunelab.quantize.qat import (
    QATResult,
    activation_ranges,
    apply_masks,
    fake_quant_weight,
    finalize_qat,
    prepare_qat,
    qat_finetune,
)

__all__ = [
    "Int8Model",
    "Int8Report",
    "Int8Weight",
    "OnnxModel",
    "QATResult",
    "activation_ranges",
    "apply_masks",
    "fake_quant_weight",
    "finalize_qat",
    "int8_weights",
    "load_int8",
    "ort_session",
    "prepare_qat",
    "qat_finetune",
    "quantize_int8",
]
