"""Parameter counts, compression ratio and storage sizes of a pruned model (arithmetic only).

Definitions:

- ``params_total``: every parameter of the model (``model.parameters()``; buffers such as
  BatchNorm running statistics are not parameters and are left out of every size below).
- ``params_nonzero``: parameters that are non-zero (and kept by the mask, for prunable ones).
- ``compression_ratio`` = ``params_total / params_nonzero``, the definition of Blalock et al.
  (2020), "What is the state of neural network pruning?" (ShrinkBench, section 4).

Storage formats, in bytes, each = the prunable weights in that format + every non-prunable
parameter stored densely in fp32 (biases, normalisation). A prunable weight is viewed as a
2-D matrix ``(rows, cols)``: ``(out, in)`` for a linear layer, ``(out, in * k * k)`` for a
convolution (``weight.flatten(1)``):

- ``bytes_dense_fp32``: 4 bytes per parameter.
- ``bytes_csr`` (compressed sparse row, Saad 2003, "Iterative methods for sparse linear
  systems", section 3.4): per layer ``4 nnz`` (fp32 values) + ``4 nnz`` (int32 column indices)
  + ``4 (rows + 1)`` (int32 row pointers).
- ``bytes_bitmask``: per layer ``ceil(numel / 8)`` (one bit per weight) + ``4 nnz`` (fp32
  non-zero values in row-major order).
- ``bytes_int8_sparse``: CSR with int8 values: per layer ``nnz`` + 4 (one fp32 scale,
  symmetric per-layer quantisation) + ``4 nnz`` + ``4 (rows + 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models import prunable_parameters

FP32 = 4
INT32 = 4
INT8 = 1


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """The 2-D view ``(rows, cols)`` of a weight: ``(out, prod(rest))``; a vector is 1 row."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def csr_bytes(shape: tuple[int, ...] | torch.Size, nnz: int, value_bytes: int = FP32) -> int:
    """Bytes of a CSR matrix: ``value_bytes * nnz + 4 nnz + 4 (rows + 1)`` (int32 indices)."""
    rows, _ = matrix_shape(shape)
    return value_bytes * nnz + INT32 * nnz + INT32 * (rows + 1)


def bitmask_bytes(shape: tuple[int, ...] | torch.Size, nnz: int) -> int:
    """Bytes of a bitmask + fp32 values: ``ceil(numel / 8) + 4 nnz``."""
    return math.ceil(math.prod(int(s) for s in shape) / 8) + FP32 * nnz


def int8_sparse_bytes(shape: tuple[int, ...] | torch.Size, nnz: int) -> int:
    """Bytes of CSR with int8 values and one fp32 scale: ``nnz + 4 + 4 nnz + 4 (rows + 1)``."""
    return csr_bytes(shape, nnz, value_bytes=INT8) + FP32


def support(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool tensor of the entries that must be stored: non-zero and (if given) kept by mask."""
    out = weight.detach() != 0
    if mask is not None:
        if tuple(mask.shape) != tuple(weight.shape):
            raise ConfigError(
                f"mask of shape {tuple(mask.shape)} does not fit a weight of shape "
                f"{tuple(weight.shape)}"
            )
        out = out & mask.to(device=weight.device, dtype=torch.bool)
    return out


def size_report(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Counts and sizes of ``model`` whose prunable weights are those named by ``masks``
    (default: :func:`prunelab.models.prunable_parameters`), see the module docstring.

    Keys: ``params_total``, ``params_nonzero``, ``params_prunable``,
    ``params_prunable_nonzero``, ``compression_ratio``, ``bytes_dense_fp32``, ``bytes_csr``,
    ``bytes_bitmask``, ``bytes_int8_sparse``.
    """
    params = dict(model.named_parameters())
    prunable = list(masks) if masks is not None else list(prunable_parameters(model))
    missing = [n for n in prunable if n not in params]
    if missing:
        raise ConfigError(f"masks name parameters the model does not have: {missing[:3]}")
    total = nonzero = prunable_total = prunable_nonzero = 0
    csr = bitmask = int8 = dense_rest = 0
    for name, p in params.items():
        total += p.numel()
        if name in prunable:
            mask = masks[name] if masks is not None else None
            nnz = int(support(p, mask).sum())
            prunable_total += p.numel()
            prunable_nonzero += nnz
            csr += csr_bytes(p.shape, nnz)
            bitmask += bitmask_bytes(p.shape, nnz)
            int8 += int8_sparse_bytes(p.shape, nnz)
        else:
            nnz = int((p.detach() != 0).sum())
            dense_rest += FP32 * p.numel()
        nonzero += nnz
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "params_prunable": prunable_total,
        "params_prunable_nonzero": prunable_nonzero,
        "compression_ratio": total / nonzero if nonzero else float("inf"),
        "bytes_dense_fp32": FP32 * total,
        "bytes_csr": csr + dense_rest,
        "bytes_bitmask": bitmask + dense_rest,
        "bytes_int8_sparse": int8 + dense_rest,
    }
