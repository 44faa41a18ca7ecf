"""Quantization of pruned models with the masks kept exactly zero.

- :mod:`prunelab.quantize.int8`: post-training static int8 quantization through
  onnxruntime (:func:`quantize_int8`), the int8 model's runner and reader
  (:func:`load_int8`, :func:`int8_weights`).
- :mod:`prunelab.quantize.qat`: quantization-aware fine-tuning with fake quantization
  matching that deployment scheme (:func:`qat_finetune`, or :func:`prepare_qat` /
  :func:`finalize_qat` inside another training loop).
- :mod:`prunelab.quantize.deep_compression`: Han et al. 2016's weight sharing (k-means per
  layer), centroid fine-tuning and the Huffman-coded sparse file (:func:`share_weights`,
  :func:`finetune_centroids`, :func:`save_compressed` / :func:`load_compressed`).

Only torch is imported here; onnx and onnxruntime are imported when a function needs them.
"""

from prunelab.quantize.deep_compression import (
    CentroidTrainer,
    CompressionReport,
    LayerSize,
    SharedLayer,
    SharedWeights,
    cluster_weights,
    dense_file_bytes,
    finetune_centroids,
    load_compressed,
    read_compressed,
    save_compressed,
    share_weights,
)
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
    "CentroidTrainer",
    "CompressionReport",
    "Int8Model",
    "Int8Report",
    "Int8Weight",
    "OnnxModel",
    "LayerSize",
    "QATResult",
    "SharedLayer",
    "SharedWeights",
    "activation_ranges",
    "apply_masks",
    "cluster_weights",
    "dense_file_bytes",
    "fake_quant_weight",
    "finalize_qat",
    "finetune_centroids",
    "int8_weights",
    "load_compressed",
    "load_int8",
    "ort_session",
    "prepare_qat",
    "qat_finetune",
    "quantize_int8",
    "read_compressed",
    "save_compressed",
    "share_weights",
]
