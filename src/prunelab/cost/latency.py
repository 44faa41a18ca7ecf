"""Measured inference latency and peak memory: dense, masked, real-sparse and compacted models.

Four variants of one network are compared on the device its weights live on:

- **dense** (:func:`dense_copy`): the same architecture with dense weights: a copy of the
  model in which every pruned (or zero) entry of a prunable weight is refilled with a normal
  value scaled like the layer's surviving weights, run on dense kernels. This stands for the
  dense network the pruned one is compared with; timing the pruned weights themselves
  would leave zeros in place, and zeros (or denormal values) can make a kernel look faster
  or slower than it is on trained dense weights;
- **masked**: the same dense kernels on weights that are zero where pruned: what a pruned
  model costs when nothing exploits its zeros;
- **sparse** (:func:`build_sparse_model` with ``autotune``, tuned for each batch size): the
  sparse ``nn.Linear`` layers run on the fastest kernel measured on this machine (below).
  Convolutions stay dense with zeros: PyTorch has no unstructured-sparse convolution kernel
  (an im2col + CSR product would be possible; it is not implemented here, as im2col
  materialises ``k x k`` copies of every input activation);
- **compact**: the model without the channels/neurons its masks prune whole, when the caller
  passes one (:func:`prunelab.cost.structured_compaction`, built with
  :func:`prunelab.structured.compact`: any Conv/Linear/BatchNorm network, residual ones
  included); otherwise, for a chain of ``nn.Linear`` layers and element-wise activations,
  :func:`compact_linear_chain` (dead neurons removed). Dense kernels on smaller tensors.

Timing: a warm-up, then ``repeats`` timed blocks of ``number`` calls each (``number`` chosen
so one block lasts at least ``min_block_s``); the reported latency is the median per-call time
over the blocks, with the interquartile range, the method of
:class:`torch.utils.benchmark.Timer.blocked_autorange`. CUDA is synchronised around each
block. On a shared CPU expect noise: compare variants measured in the same process. The
report records the number of intra-op threads used (``latency_threads``); latency measured
while other jobs of a parallel sweep share the machine is flagged by the caller
(``latency_under_load`` in :func:`prunelab.cost.cost_report`).

Memory of one forward, beyond the model and its input: on CUDA ``peak_cuda_alloc_mb`` =
``torch.cuda.max_memory_allocated`` during the call minus the allocation before it. On CPU
``peak_tensor_alloc_mb`` = the peak total size of the tensor storages that the forward's
ops create and that are alive at once, tracked op by op with a ``TorchDispatchMode`` (views
and in-place results are not new storage). It counts tensors only: allocator slack and the
private workspaces of MKL/oneDNN kernels are not included. (The process's resident-set
increase was tried first and read 0 for LeNet-300-100: the allocator reuses freed memory.)

Kernels of a masked Linear layer (:data:`KERNELS`, :class:`SparseLinear`), all computing
``W x^T + b`` on a feature-major input ``x^T`` (features x batch, contiguous):

- ``dense``: the dense GEMM (MKL) on the masked weight;
- ``torch_csr``: ``torch.addmm(b, W_csr, x^T)`` (int32 indices), the kernel used when nothing
  is tuned. On the project's 2-core CPU (torch 2.14.1) ``torch.sparse.mm``, ``torch.mm`` and
  ``torch.addmm`` with a CSR left operand run the same MKL kernel (``addmm`` fuses the bias);
  ``dense @ CSR^T`` (sparse right operand) and COO were 5-20x slower; a strided (transposed)
  ``x^T`` was as slow as an explicit copy plus the contiguous product; int64 indices were
  slower than int32;
- ``torch_csr_sum``: ``torch.sparse.mm(W_csr, x^T, reduce="sum")``, torch's own vectorised
  CPU SpMM (not MKL's), plus the bias;
- ``torch_bsr``: ``addmm`` with ``W`` in BSR layout, for block-structured masks (MKL on CPU:
  square blocks only);
- ``scipy_csr``/``scipy_bsr``: ``scipy.sparse`` products, single-threaded, little overhead;
- ``numba_csr`` (when numba is installed): a CSR kernel compiled for this CPU; each non-zero
  ``W[i, j]`` adds ``W[i, j] x^T[j, :]`` to the output row, a contiguous AVX-512 axpy over
  the batch, rows spread over the threads; at batch 1 a CSR dot product per row,
  vectorised with AVX-512 gathers (uint16 column indices when they fit).

:func:`build_sparse_model` with ``autotune=True`` times the candidates of each layer at the
given batch size with torch's thread count (numba's threads follow it) and keeps the
fastest; each choice is cached in a JSON file (:class:`KernelCache`, by default
``~/.cache/prunelab/sparse_kernels.json``) under a key of the layer's shape, density (to
1%), block size, batch size, thread count, library versions and CPU model. A chain of
Linear layers (an MLP) is first compacted: dead neurons removed
(:func:`compact_linear_chain`) and the first layer's unused input columns dropped (exact:
"less work"); then it runs as a whole, either as a :class:`SparseChain` (per-layer winners,
the activations kept feature-major so only the input and output are transposed) or, when
its activations are ReLUs, as a :class:`FusedLinearChain`: the whole forward in one numba
call (per layer CSR or dense, bias and ReLU fused, one tile of samples per thread; no
per-layer dispatch, which dominates at batch 1), whichever is faster.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prunelab import files
from prunelab.errors import ConfigError

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
)


# -- kernels for a masked Linear --------------------------------------------------------------

#: Per-layer kernels :class:`SparseLinear` can run (see the module docstring). ``dense`` is the
#: masked weight on the dense GEMM; the ``*_bsr`` kernels need a block-structured mask.
KERNELS: tuple[str, ...] = (
    "dense",
    "torch_csr",
    "torch_csr_sum",
    "torch_bsr",
    "scipy_csr",
    "scipy_bsr",
    "numba_csr",
)
#: Block sizes looked for in a mask (largest area first), for the BSR kernels.
BLOCK_SIZES: tuple[tuple[int, int], ...] = ((16, 16), (8, 8), (4, 4), (2, 2), (1, 8), (1, 4))
#: Activations a fused chain applies itself (ReLU), or that are the identity in eval mode.
_FUSABLE_ACTS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Identity, nn.Dropout)
# Bumped whenever the candidate set or a kernel changes, so cached choices are re-tuned.
_CACHE_VERSION = 1

_NUMBA: dict[str, Callable] | None = None
_NUMBA_MISSING = False


def _numba_kernels() -> dict[str, Callable] | None:
    """The numba-compiled kernels (compiled on first use, cached on disk by numba), or
    ``None`` when numba is not installed."""
    global _NUMBA, _NUMBA_MISSING
    if _NUMBA is not None or _NUMBA_MISSING:
        return _NUMBA
    try:
        import numba
    except ImportError:
        _NUMBA_MISSING = True
        return None
    import numpy as np

    # reassoc/contract only: reductions may be reordered and fused into FMAs (float rounding
    # of ~1e-7 relative), NaN and infinity keep their IEEE meaning.
    fast = {"reassoc", "contract"}

    # Loops index slices from 0 so that LLVM sees non-negative, affine indices (an offset
    # index pays numba's negative-index wraparound check on every access).
    @numba.njit(fastmath=fast, cache=True, nogil=True)
    def csr_row(indptr, indices, data, ptr_off, nnz_off, row, a):
        # One CSR row times a vector: vectorised with AVX-512 gathers (dword gathers when
        # the indices are uint16, see _index_array).
        start = nnz_off + indptr[ptr_off + row]
        n = nnz_off + indptr[ptr_off + row + 1] - start
        d = data[start : start + n]
        ix = indices[start : start + n]
        s = np.float32(0.0)
        for jj in range(n):
            s += d[jj] * a[ix[jj]]
        return s

    @numba.njit(fastmath=fast, cache=True, nogil=True)
    def dense_row(weight, base, a, n):
        w = weight[base : base + n]
        s = np.float32(0.0)
        for j in range(n):
            s += w[j] * a[j]
        return s

    @numba.njit(fastmath=fast, cache=True, nogil=True)
    def axpy_rows(acc, d, ix, a, nb):
        # acc[:nb] += sum_j d[j] * a[ix[j], :nb]: contiguous AVX-512 axpys, four non-zeros at
        # a time so that acc is loaded and stored once per four.
        n = d.size
        n4 = n - n % 4
        for jj in range(0, n4, 4):
            v0, v1, v2, v3 = d[jj], d[jj + 1], d[jj + 2], d[jj + 3]
            s0, s1, s2, s3 = a[ix[jj]], a[ix[jj + 1]], a[ix[jj + 2]], a[ix[jj + 3]]
            for k in range(nb):
                acc[k] += (v0 * s0[k] + v1 * s1[k]) + (v2 * s2[k] + v3 * s3[k])
        for jj in range(n4, n):
            v = d[jj]
            src = a[ix[jj]]
            for k in range(nb):
                acc[k] += v * src[k]

    @numba.njit(fastmath=fast, cache=True, nogil=True)
    def dense_axpy_rows(acc, w, a, nb):
        # acc[:nb] += sum_j w[j] * a[j, :nb], four inputs at a time.
        n = w.size
        n4 = n - n % 4
        for j in range(0, n4, 4):
            v0, v1, v2, v3 = w[j], w[j + 1], w[j + 2], w[j + 3]
            s0, s1, s2, s3 = a[j], a[j + 1], a[j + 2], a[j + 3]
            for k in range(nb):
                acc[k] += (v0 * s0[k] + v1 * s1[k]) + (v2 * s2[k] + v3 * s3[k])
        for j in range(n4, n):
            v = w[j]
            src = a[j]
            for k in range(nb):
                acc[k] += v * src[k]

    @numba.njit(cache=True, nogil=True)
    def transpose_into(x, b0, nb, a):
        # a[j, k] = x[b0 + k, j] for all j and k < nb, by 8 x 8 blocks (the compiler turns a
        # block into vector shuffles; a plain loop is 2-3x slower).
        n_in = x.shape[1]
        jm = n_in - n_in % 8
        km = nb - nb % 8
        for j0 in range(0, jm, 8):
            for k0 in range(0, km, 8):
                r0, r1, r2, r3 = x[b0 + k0], x[b0 + k0 + 1], x[b0 + k0 + 2], x[b0 + k0 + 3]
                r4, r5, r6, r7 = x[b0 + k0 + 4], x[b0 + k0 + 5], x[b0 + k0 + 6], x[b0 + k0 + 7]
                for j in range(j0, j0 + 8):
                    d = a[j]
                    d[k0], d[k0 + 1], d[k0 + 2], d[k0 + 3] = r0[j], r1[j], r2[j], r3[j]
                    d[k0 + 4], d[k0 + 5], d[k0 + 6], d[k0 + 7] = r4[j], r5[j], r6[j], r7[j]
            for k in range(km, nb):
                for j in range(j0, j0 + 8):
                    a[j, k] = x[b0 + k, j]
        for j in range(jm, n_in):
            for k in range(nb):
                a[j, k] = x[b0 + k, j]

    @numba.njit(cache=True, nogil=True)
    def spmv(indptr, indices, data, bias, x, out):
        # out[i] = W[i] . x + b[i], W in CSR; x and out 1-D.
        for i in range(indptr.size - 1):
            out[i] = csr_row(indptr, indices, data, 0, 0, i, x) + bias[i]

    @numba.njit(parallel=True, fastmath=fast, cache=True, nogil=True)
    def spmm_t(indptr, indices, data, bias, xt, out):
        # out = W xt + b[:, None] with xt (in, B) and out (rows, B) row-major: each non-zero
        # W[i, j] adds W[i, j] * xt[j, :] to out[i, :]; rows spread over the threads.
        nb = xt.shape[1]
        for i in numba.prange(indptr.size - 1):
            acc = out[i]
            b = bias[i]
            for k in range(nb):
                acc[k] = b
            start = indptr[i]
            n = indptr[i + 1] - start
            axpy_rows(acc, data[start : start + n], indices[start : start + n], xt, nb)

    @numba.njit(fastmath=fast, cache=True, nogil=True)
    def vec_rows(meta, layer, lo, hi, indptr, indices, data, dense, bias, a, c):
        # Rows lo..hi of one layer for one sample: c[i] = act(W[i] . a + b[i]). meta[layer] =
        # (rows, cols, indptr offset, non-zero offset, dense offset, bias offset, is_dense,
        # relu, split).
        cols = meta[layer, 1]
        bo = meta[layer, 5]
        for i in range(lo, hi):
            if meta[layer, 6]:
                s = dense_row(dense, meta[layer, 4] + i * cols, a, cols)
            else:
                s = csr_row(indptr, indices, data, meta[layer, 2], meta[layer, 3], i, a)
            s += bias[bo + i]
            if meta[layer, 7] and s < 0:
                s = np.float32(0.0)
            c[i] = s

    @numba.njit(fastmath=fast, cache=True, nogil=True)
    def chain_vec(x, meta, indptr, indices, data, dense, bias, maxdim, out):
        # The whole chain, one sample at a time (small batches), on one thread.
        n_layers = meta.shape[0]
        a = np.empty(maxdim, np.float32)
        c = np.empty(maxdim, np.float32)
        for b in range(x.shape[0]):
            a[: x.shape[1]] = x[b]
            for layer in range(n_layers):
                vec_rows(meta, layer, 0, meta[layer, 0], indptr, indices, data, dense, bias, a, c)
                a, c = c, a
            out[b] = a[: out.shape[1]]

    @numba.njit(parallel=True, fastmath=fast, cache=True, nogil=True)
    def chain_vec_par(x, meta, indptr, indices, data, dense, bias, maxdim, chunks, out):
        # As chain_vec, but the rows of the layers flagged split (meta[:, 8]) are cut into
        # ``chunks`` parts run by the threads (one parallel region per such layer).
        n_layers = meta.shape[0]
        a = np.empty(maxdim, np.float32)
        c = np.empty(maxdim, np.float32)
        for b in range(x.shape[0]):
            a[: x.shape[1]] = x[b]
            for layer in range(n_layers):
                rows = meta[layer, 0]
                if meta[layer, 8]:
                    step = (rows + chunks - 1) // chunks
                    for t in numba.prange(chunks):
                        lo = t * step
                        hi = min(rows, lo + step)
                        vec_rows(meta, layer, lo, hi, indptr, indices, data, dense, bias, a, c)
                else:
                    vec_rows(meta, layer, 0, rows, indptr, indices, data, dense, bias, a, c)
                a, c = c, a
            out[b] = a[: out.shape[1]]

    @numba.njit(parallel=True, fastmath=fast, cache=True, nogil=True)
    def chain_tiles(x, meta, indptr, indices, data, dense, bias, maxdim, tile, out):
        # The whole chain on tiles of ``tile`` samples, one tile per thread: the tile is
        # transposed into a (features, tile) buffer once, every layer then runs as in spmm_t
        # (dense layers as axpys over all inputs), and the last one is transposed back.
        batch = x.shape[0]
        n_layers = meta.shape[0]
        n_tiles = (batch + tile - 1) // tile
        for t in numba.prange(n_tiles):
            b0 = t * tile
            nb = min(tile, batch - b0)
            a = np.empty((maxdim, tile), np.float32)
            c = np.empty((maxdim, tile), np.float32)
            transpose_into(x, b0, nb, a)
            for layer in range(n_layers):
                rows = meta[layer, 0]
                cols = meta[layer, 1]
                po = meta[layer, 2]
                no = meta[layer, 3]
                do = meta[layer, 4]
                bo = meta[layer, 5]
                for i in range(rows):
                    acc = c[i]
                    bv = bias[bo + i]
                    for k in range(nb):
                        acc[k] = bv
                    if meta[layer, 6]:
                        dense_axpy_rows(acc, dense[do + i * cols : do + (i + 1) * cols], a, nb)
                    else:
                        start = no + indptr[po + i]
                        n = no + indptr[po + i + 1] - start
                        d = data[start : start + n]
                        axpy_rows(acc, d, indices[start : start + n], a, nb)
                    if meta[layer, 7]:
                        for k in range(nb):
                            acc[k] = max(acc[k], np.float32(0.0))
                a, c = c, a
            rows = meta[n_layers - 1, 0]
            for k in range(nb):
                for i in range(rows):
                    out[b0 + k, i] = a[i, k]

    _NUMBA = {
        "spmv": spmv,
        "spmm_t": spmm_t,
        "chain_vec": chain_vec,
        "chain_vec_par": chain_vec_par,
        "chain_tiles": chain_tiles,
        "set_num_threads": numba.set_num_threads,
        "get_num_threads": numba.get_num_threads,
        "max_threads": numba.config.NUMBA_NUM_THREADS,
        "version": numba.__version__,
    }
    return _NUMBA


def _unsigned(index: torch.Tensor):
    """A non-negative int32 index tensor as a uint32 numpy view (no copy): numba then
    indexes with it without the negative-index check. (int64 stays signed: numba's uint64
    arithmetic with int64 gives floats.)"""
    import numpy as np

    array = index.numpy()
    return array.view(np.uint32) if array.dtype == np.int32 else array


def _index_array(index: torch.Tensor, bound: int):
    """Column indices for the numba kernels: a uint16 copy when every index is below
    ``bound <= 65536`` (AVX-512 gathers then take 16 dword indices at a time, twice as many
    as with 64-bit ones, and the index stream is half as big), else :func:`_unsigned`."""
    import numpy as np

    if bound <= 1 << 16:
        return index.numpy().astype(np.uint16)
    return _unsigned(index)


def _run_parallel(kernels: Mapping[str, Any], name: str, *args: Any) -> None:
    """Run numba's parallel kernel ``name`` with torch's intra-op thread count, and leave
    torch's count as it was: the start of numba's OpenMP pool (first parallel call in the
    process) resets the OpenMP thread count that torch reads back."""
    threads = torch.get_num_threads()
    want = max(1, min(threads, int(kernels["max_threads"])))
    if kernels["get_num_threads"]() != want:
        kernels["set_num_threads"](want)
    kernels[name](*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def block_size(mask: torch.Tensor) -> tuple[int, int] | None:
    """The largest block size of :data:`BLOCK_SIZES` in which the 2-D ``mask`` (or weight,
    non-zero = kept) is block-constant, or ``None``."""
    if mask.dim() != 2:
        return None
    kept = mask != 0
    rows, cols = kept.shape
    for br, bc in BLOCK_SIZES:
        if rows % br or cols % bc or (br == 1 and bc == 1):
            continue
        blocks = kept.reshape(rows // br, br, cols // bc, bc)
        anyk = blocks.any(dim=(1, 3))
        if bool((blocks.all(dim=(1, 3)) == anyk).all()):
            return br, bc
    return None


def _quiet_sparse(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR/BSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support.*")
        return fn()


class SparseLinear(nn.Module):
    """``y = x W^T + b`` for a masked Linear layer, run by one kernel of :data:`KERNELS`
    (inference only; ``torch_csr`` by default, the behaviour before kernels were chosen).

    The CSR arrays of the weight are buffers (so ``.to()``, ``deepcopy`` and ``state_dict``
    work; :meth:`weight_csr` re-assembles the tensor without checks, about 2 microseconds).
    Other kernels keep what they need (a dense, BSR or SciPy copy) in a cache rebuilt after
    ``.to()``. :meth:`forward_t` computes ``W x^T + b`` on a feature-major input ``x^T``
    (``in_features x batch``, contiguous) and returns ``out_features x batch``: the layout
    every kernel wants, kept between the layers of a :class:`SparseChain`.
    """

    def __init__(
        self,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        kernel: str = "torch_csr",
        blocksize: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ConfigError(f"unknown sparse kernel {kernel!r}; one of {', '.join(KERNELS)}")
        with torch.no_grad():
            weight = linear.weight.detach()
            if mask is not None:
                weight = weight * mask.to(device=weight.device, dtype=weight.dtype)
            csr = _quiet_sparse(weight.to_sparse_csr)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.kernel = kernel
        if kernel.endswith("_bsr"):
            blocksize = blocksize or block_size(weight)
            if blocksize is None:
                raise ConfigError(f"kernel {kernel!r} needs a block-structured mask")
        self.blocksize = tuple(blocksize) if blocksize else None
        # int32 indices (as in the CSR size count) when they fit: a little faster than int64.
        index_dtype = torch.int32 if csr.values().numel() < 2**31 - 1 else torch.int64
        self.register_buffer("crow_indices", csr.crow_indices().to(index_dtype))
        self.register_buffer("col_indices", csr.col_indices().to(index_dtype))
        self.register_buffer("values", csr.values().clone())
        bias = None if linear.bias is None else linear.bias.detach().clone()[:, None]
        self.register_buffer("bias_col", bias)
        self._run: Callable[[torch.Tensor], torch.Tensor] | None = None

    def weight_csr(self) -> torch.Tensor:
        """The weight as a CSR tensor of shape ``(out_features, in_features)``."""
        return torch.sparse_csr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .float(): rebuild the kernel cache
        self._run = None
        return super()._apply(fn, recurse)

    def _bias_col(self) -> torch.Tensor:
        if self.bias_col is not None:
            return self.bias_col
        return torch.zeros(self.out_features, 1, device=self.values.device, dtype=self.values.dtype)

    def _make_runner(self) -> Callable[[torch.Tensor], torch.Tensor]:
        kernel, bias = self.kernel, self._bias_col()
        if kernel == "torch_csr":
            if self.bias_col is None:
                return lambda xt: torch.mm(self.weight_csr(), xt)
            return lambda xt: torch.addmm(self.bias_col, self.weight_csr(), xt)
        if kernel == "torch_csr_sum":
            return lambda xt: torch.sparse.mm(self.weight_csr(), xt, "sum").add_(bias)
        dense = _quiet_sparse(lambda: self.weight_csr().to_dense())
        if kernel == "dense":
            return lambda xt: torch.addmm(bias, dense, xt)
        if kernel == "torch_bsr":
            bsr = _quiet_sparse(lambda: dense.to_sparse_bsr(self.blocksize))
            return lambda xt: torch.addmm(bias, bsr, xt)
        if self.values.device.type != "cpu" or self.values.dtype != torch.float32:
            raise ConfigError(f"kernel {kernel!r} runs on CPU float32 weights only")
        if kernel in ("scipy_csr", "scipy_bsr"):
            import scipy.sparse as sp

            w = dense.numpy()
            if kernel == "scipy_csr":
                mat = sp.csr_matrix(w)
            else:
                mat = sp.bsr_matrix(w, blocksize=self.blocksize)
            b = bias.numpy()

            def run_scipy(xt: torch.Tensor) -> torch.Tensor:
                y = mat @ xt.numpy()
                y += b
                return torch.from_numpy(y)

            return run_scipy
        kernels = _numba_kernels()
        if kernels is None:
            raise ConfigError("kernel 'numba_csr' needs numba (pip install numba)")
        spmv = kernels["spmv"]
        arrays = (
            _unsigned(self.crow_indices),
            _index_array(self.col_indices, self.in_features),
            self.values.numpy(),
            bias[:, 0].contiguous().numpy(),
        )

        def run_numba(xt: torch.Tensor) -> torch.Tensor:
            out = torch.empty(self.out_features, xt.shape[1])
            if xt.shape[1] == 1:
                spmv(*arrays, xt.numpy().reshape(-1), out.numpy().reshape(-1))
            else:
                _run_parallel(kernels, "spmm_t", *arrays, xt.numpy(), out.numpy())
            return out

        return run_numba

    def forward_t(self, xt: torch.Tensor) -> torch.Tensor:
        """``W xt + b`` for a contiguous feature-major ``xt`` (``in_features x batch``)."""
        if self._run is None:
            self._run = self._make_runner()
        return self._run(xt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # The kernels want the dense operand x^T contiguous (the CSR kernel is ~2x slower on
        # a strided, transposed one): copy once. Inside a SparseChain the feature-major
        # layout is kept from layer to layer, so only the chain's input is transposed.
        xt = x.reshape(-1, self.in_features).t().contiguous()
        return self.forward_t(xt).t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.values.numel()
        block = f", block={self.blocksize[0]}x{self.blocksize[1]}" if self.blocksize else ""
        return (
            f"in={self.in_features}, out={self.out_features}, nnz={nnz}, "
            f"kernel={self.kernel}{block}"
        )


class SparseChain(nn.Module):
    """A chain of Linear layers (each a :class:`SparseLinear` with its own kernel) and
    element-wise activations, run feature-major: the input is flattened (``flatten``, as by
    ``nn.Flatten``; else the Linear layers act on the last dimension), its kept features
    (``keep``: the input columns some weight uses; all when ``None``) selected and transposed
    once, every layer computes ``W h + b`` on ``h`` (``features x batch``), and the output is
    transposed back. Same function as the masked chain it was built from."""

    def __init__(
        self,
        layers: Sequence[SparseLinear],
        acts: Sequence[Sequence[nn.Module]],
        keep: torch.Tensor | None = None,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.acts = nn.ModuleList(nn.Sequential(*a) for a in acts)
        self.flatten = bool(flatten)
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            lead, h = x.shape[:1], x.reshape(x.shape[0], -1)
        else:
            lead, h = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.keep is not None:
            h = h.index_select(1, self.keep)
        h = h.t().contiguous()
        for layer, act in zip(self.layers, self.acts, strict=True):
            h = act(layer.forward_t(h))
        return h.t().reshape(*lead, h.shape[0])


class FusedLinearChain(nn.Module):
    """A chain of Linear layers with ReLU between them, the whole forward in one compiled
    (numba) call: CSR layers (or dense ones, ``formats``) with the bias and the ReLU fused,
    on tiles of ``tile`` samples, one per thread, in a transposed layout (module
    docstring); small batches go sample by sample (with ``split_small`` the rows of the big
    layers split over the threads). CPU, float32. Same function as the
    masked chain.

    ``weights``/``biases``: the (compacted) layers; ``relu[k]``: a ReLU follows layer ``k``;
    ``keep``: the input features (of ``in_features``) the first layer's columns are, when
    unused inputs were dropped (the first weight is then laid back at full width: a CSR
    layer never reads the dropped inputs, and transposing whole input rows is faster than
    gathering the kept ones); ``flatten``: as in :class:`SparseChain`.
    """

    #: Batches smaller than this run sample by sample (no transposes).
    small_batch = 8
    #: With ``split_small``, the layers of at least this many multiply-adds per sample have
    #: their rows split over the threads at small batches.
    split_min_work = 16384

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor | None],
        relu: Sequence[bool],
        formats: Sequence[str] | None = None,
        tile: int = 64,
        keep: torch.Tensor | None = None,
        flatten: bool = True,
        split_small: bool = False,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        formats = list(formats or ["csr"] * len(weights))
        if not (len(weights) == len(biases) == len(relu) == len(formats)) or not weights:
            raise ConfigError("FusedLinearChain needs one bias, relu flag and format per layer")
        weights = [w.detach().float().cpu() for w in weights]
        if keep is not None:
            width = int(in_features if in_features is not None else int(keep.max()) + 1)
            full = torch.zeros(weights[0].shape[0], width)
            full[:, keep.cpu()] = weights[0]
            weights[0] = full
        meta, indptr, indices, data, dense, bias = [], [], [], [], [], []
        offsets = [0, 0, 0, 0]  # indptr, non-zeros, dense, bias
        for w, b, r, f in zip(weights, biases, relu, formats, strict=True):
            rows, cols = w.shape
            csr = _quiet_sparse(w.to_sparse_csr)
            crow = csr.crow_indices().to(torch.int32)
            is_dense = f == "dense"
            work = rows * cols if is_dense else csr.values().numel()
            split = int(work >= self.split_min_work)
            meta.append([rows, cols, *offsets, int(is_dense), int(bool(r)), split])
            indptr.append(crow)
            indices.append(csr.col_indices().to(torch.int32))
            data.append(csr.values())
            if is_dense:
                dense.append(w.reshape(-1))
            bias.append(torch.zeros(rows) if b is None else b.detach().float().cpu())
            offsets[0] += crow.numel()
            offsets[1] += csr.values().numel()
            offsets[2] += rows * cols if is_dense else 0
            offsets[3] += rows
        self.in_features = int(weights[0].shape[1])
        self.flatten = bool(flatten)
        self.out_features = int(weights[-1].shape[0])
        self.formats = formats
        self.tile = int(tile)
        self.split_small = bool(split_small)
        self.maxdim = max(max(int(w.shape[0]), int(w.shape[1])) for w in weights)
        self.register_buffer("meta", torch.tensor(meta, dtype=torch.int64))
        self.register_buffer("indptr", torch.cat(indptr))
        self.register_buffer("indices", torch.cat(indices))
        self.register_buffer("data", torch.cat(data).contiguous())
        self.register_buffer("dense", torch.cat(dense) if dense else torch.zeros(1))
        self.register_buffer("bias", torch.cat(bias))
        self._arrays: tuple | None = None

    def _apply(self, fn, recurse=True):
        self._arrays = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = _numba_kernels()
        if kernels is None:
            raise ConfigError("FusedLinearChain needs numba (pip install numba)")
        if self._arrays is None:
            if self.data.device.type != "cpu":
                raise ConfigError("FusedLinearChain runs on the CPU only")
            self._arrays = (
                self.meta.numpy(),
                _unsigned(self.indptr),
                _index_array(self.indices, self.maxdim),
                self.data.numpy(),
                self.dense.numpy(),
                self.bias.numpy(),
                self.maxdim,
            )
        if self.flatten:
            lead, x2 = x.shape[:1], x.detach().reshape(x.shape[0], -1)
        else:
            lead, x2 = x.shape[:-1], x.detach().reshape(-1, x.shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.contiguous().float()
        if x2.shape[1] != self.in_features:
            raise ConfigError(
                f"FusedLinearChain takes {self.in_features} features, got {x2.shape[1]}"
            )
        batch = x2.shape[0]
        out = torch.empty(batch, self.out_features)
        if batch < self.small_batch and self.split_small:
            chunks = max(1, min(torch.get_num_threads(), int(kernels["max_threads"])))
            _run_parallel(kernels, "chain_vec_par", x2.numpy(), *self._arrays, chunks, out.numpy())
        elif batch < self.small_batch:
            kernels["chain_vec"](x2.numpy(), *self._arrays, out.numpy())
        else:
            _run_parallel(kernels, "chain_tiles", x2.numpy(), *self._arrays, self.tile, out.numpy())
        return out if len(lead) == 1 else out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{r}x{c}" for r, c in self.meta[:, :2].tolist())
        split = ", split_small" if self.split_small else ""
        return f"layers=[{shapes}], formats={self.formats}, tile={self.tile}{split}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _masked_copy(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose masked weights are zero."""
    out = copy.deepcopy(model).eval()
    if masks:
        params = dict(out.named_parameters())
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise ConfigError(f"masks name parameters the model does not have: {unknown[:3]}")
        with torch.no_grad():
            for name, mask in masks.items():
                params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))
    return out


def _refill_scale(weight: torch.Tensor, support: torch.Tensor) -> float:
    """The RMS of a weight's surviving entries; ``1 / sqrt(fan_in)`` when none survive."""
    if bool(support.any()):
        rms = float(weight[support].float().pow(2).mean().sqrt())
        if rms > 0:
            return rms
    fan_in = weight[0].numel() if weight.dim() > 1 else weight.numel()
    return 1.0 / math.sqrt(max(fan_in, 1))


def dense_copy(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, seed: int = 0
) -> nn.Module:
    """A deep copy of ``model`` in eval mode with dense weights, standing for the dense model
    of the same architecture (the ``dense`` latency variant).

    In every prunable weight (the layers named by ``masks``, or
    :func:`prunelab.models.prunable_parameters` without masks), each entry that is pruned
    (mask False) or zero is refilled with a normal value of standard deviation the RMS of the
    layer's surviving entries (``1 / sqrt(fan_in)`` when none survive), drawn from a
    generator seeded by ``seed``; surviving entries are kept. The copy computes a different
    function from ``model``: it is for timing, not for accuracy.
    """
    from prunelab.models import prunable_parameters

    out = copy.deepcopy(model).eval()
    params = dict(out.named_parameters())
    names = list(masks) if masks is not None else list(prunable_parameters(out))
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ConfigError(f"masks name parameters the model does not have: {unknown[:3]}")
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name in names:
            weight = params[name]
            support = weight != 0
            if masks is not None:
                support &= masks[name].to(device=weight.device, dtype=torch.bool)
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
            noise = noise.to(device=weight.device, dtype=weight.dtype)
            noise *= _refill_scale(weight, support)
            weight.copy_(torch.where(support, weight, noise))
    return out


# -- compaction of Linear chains ------------------------------------------------------------


def _linear_chain(model: nn.Module) -> list[nn.Module] | None:
    """The modules of ``model`` as a list applied in order, if it is a plain Linear chain:
    an ``nn.Sequential`` of Flatten/Linear/element-wise modules, or a prunelab
    :class:`~prunelab.models.mlp.MLP` without skip connections. Otherwise ``None``."""
    from prunelab.models.mlp import MLP

    if isinstance(model, MLP):
        if any(model.skip) or not isinstance(model.act, ELEMENTWISE):
            return None
        chain: list[nn.Module] = [nn.Flatten()]
        for layer in model.layers:
            chain += [layer, model.act]
        return [*chain, model.head]
    if type(model) is nn.Sequential:
        chain = list(model)
        allowed = (nn.Linear, nn.Flatten, *ELEMENTWISE)
        if not chain or not all(isinstance(m, allowed) for m in chain):
            return None
        if any(isinstance(m, nn.Flatten) for m in chain[1:]):
            return None
        if not any(isinstance(m, nn.Linear) for m in chain):
            return None
        return chain
    return None


@torch.no_grad()
def compact_linear_chain(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
) -> nn.Sequential | None:
    """A smaller dense ``nn.Sequential`` computing the same function, or ``None`` when
    ``model`` is not a chain of Linear layers and element-wise activations (see
    :func:`_linear_chain`).

    A hidden neuron ``j`` of layer ``l`` is removed (row ``j`` of ``W_l``, ``b_l[j]``, column
    ``j`` of ``W_{l+1}``) when column ``j`` of ``W_{l+1}`` is all zero (its output is unused),
    or when row ``j`` of ``W_l`` is all zero: its output is then the constant ``g(b_l[j])``
    (``g`` = the activations between the layers), which is folded into ``b_{l+1}``. Repeated
    until nothing changes. Input features and output classes are kept.
    """
    masked = _masked_copy(model, masks)
    chain = _linear_chain(masked)
    if chain is None:
        return None
    positions = [i for i, m in enumerate(chain) if isinstance(m, nn.Linear)]
    weights = [chain[i].weight.detach().clone() for i in positions]
    biases = [
        chain[i].bias.detach().clone()
        if chain[i].bias is not None
        else torch.zeros(chain[i].out_features, device=weights[k].device)
        for k, i in enumerate(positions)
    ]
    has_bias = [chain[i].bias is not None for i in positions]
    acts = [chain[a + 1 : b] for a, b in zip(positions, positions[1:], strict=False)]
    changed = True
    while changed:
        changed = False
        for k in range(len(weights) - 1):
            w, w_next = weights[k], weights[k + 1]
            unused = (w_next != 0).sum(0) == 0
            constant = ((w != 0).sum(1) == 0) & ~unused
            drop = unused | constant
            if not bool(drop.any()):
                continue
            if bool(constant.any()):
                value = biases[k][constant][None, :]
                for act in acts[k]:
                    value = act(value)
                biases[k + 1] = biases[k + 1] + w_next[:, constant] @ value[0]
                has_bias[k + 1] = True
            keep = ~drop
            weights[k], biases[k] = w[keep], biases[k][keep]
            weights[k + 1] = w_next[:, keep]
            changed = True
    out: list[nn.Module] = []
    k = 0
    for module in chain:
        if isinstance(module, nn.Linear):
            w = weights[k]
            layer = nn.Linear(w.shape[1], w.shape[0], bias=has_bias[k])
            layer = layer.to(device=w.device, dtype=w.dtype)
            layer.weight.copy_(w)
            if has_bias[k]:
                layer.bias.copy_(biases[k])
            out.append(layer)
            k += 1
        else:
            out.append(module)
    return nn.Sequential(*out).eval()


# -- measurement ----------------------------------------------------------------------------


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int = 15,
    warmup: int = 3,
    min_block_s: float = 0.01,
) -> dict[str, float]:
    """Median and IQR (milliseconds per call) of ``fn`` over ``repeats`` timed blocks."""
    for _ in range(max(warmup, 1)):
        fn()
    _sync(device)
    number = 1
    while True:  # calibrate the block size
        start = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_block_s or number >= 1 << 16:
            break
        number *= 2 if elapsed <= 0 else max(2, min(10, math.ceil(min_block_s / elapsed)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / number * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"latency_ms": statistics.median(times), "latency_ms_iqr": q[2] - q[0], "runs": number}


class _TensorAllocTracker(TorchDispatchMode):
    """Bytes of tensor storages created by the ops run under it, alive at once: current and
    peak. Outputs sharing storage with an argument (views, in-place ops) are not new; a
    storage counts until it is freed (a weakref finaliser)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> tuple[str, float]:
    """``(field name, MB)``: memory one call of ``fn`` allocates at its peak (module doc)."""
    if device.type == "cuda":
        # Free unreachable tensors first, so the baseline is what is really live. (The CPU
        # tracker counts only the call's own allocations and needs no collection, which costs
        # most of a second in a process holding a trained run's objects.)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return "peak_cuda_alloc_mb", (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _TensorAllocTracker() as tracker:
        fn()
    return "peak_tensor_alloc_mb", tracker.peak / 2**20


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 15,
    warmup: int = 3,
    min_block_s: float = 0.01,
) -> dict[str, dict[str, float | None]]:
    """Forward latency of ``model`` (eval mode, no grad) on random inputs, per batch size.

    Returns ``{"b<batch>": {"latency_ms", "latency_ms_iqr", "runs", <memory field>}}`` with
    the memory field ``peak_cuda_alloc_mb`` on CUDA or ``peak_tensor_alloc_mb`` on CPU (see
    the module docstring). The device is the one the model's tensors live on.
    """
    shape = tuple(int(s) for s in input_shape)
    sizes = [int(b) for b in batch_sizes]
    if not shape or any(s <= 0 for s in shape) or not sizes or any(b <= 0 for b in sizes):
        raise ConfigError(
            f"measure_latency needs positive input_shape and batch_sizes, got {input_shape!r} "
            f"and {batch_sizes!r}"
        )
    if int(repeats) < 1:
        raise ConfigError(f"repeats={repeats!r} must be at least 1")
    device, dtype = _device_dtype(model)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float | None]] = {}
    try:
        with torch.inference_mode():
            for batch in sizes:
                x = torch.randn(batch, *shape, device=device, dtype=dtype)

                def call(x=x) -> object:
                    return model(x)

                stats: dict[str, float | None] = dict(
                    time_call(call, device, int(repeats), int(warmup), float(min_block_s))
                )
                field, value = peak_memory_mb(call, device)
                stats[field] = value
                results[f"b{batch}"] = stats
    finally:
        model.train(was_training)
    return results


# -- choosing kernels: autotune and its cache --------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def default_kernel_cache() -> Path:
    """Where the kernel choices are cached by default: ``$XDG_CACHE_HOME/prunelab`` (else
    ``~/.cache/prunelab``) / :data:`prunelab.files.SPARSE_KERNEL_CACHE`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prunelab" / files.SPARSE_KERNEL_CACHE


class KernelCache:
    """Kernel choices of earlier autotunes, a JSON file ``{"version", "entries": {key: ...}}``.

    A key names everything the timing depends on (:func:`_environment_key`); an unreadable
    file reads as empty, and a write merges with what is on disk, then replaces the file in
    one rename (so parallel runs can lose an entry, never corrupt the file).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            blob = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(blob, dict) or blob.get("version") != _CACHE_VERSION:
            return {}
        entries = blob.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> dict[str, Any] | None:
        value = self.entries.get(key)
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.entries = {**self._read(), **self.entries, key: value}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            blob = {"version": _CACHE_VERSION, "entries": self.entries}
            tmp.write_text(json.dumps(blob, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as err:  # a read-only home: tune again next time
            warnings.warn(f"sparse-kernel cache {self.path} not written: {err}", stacklevel=2)


def _open_cache(cache: str | Path | bool | None) -> KernelCache | None:
    if cache is False:
        return None
    if cache is None or cache is True:
        return KernelCache(default_kernel_cache())
    return KernelCache(cache)


def _environment_key(batch: int) -> str:
    """The part of a cache key that is not the layer: batch size, thread count, library
    versions and CPU model."""
    kernels = _numba_kernels()
    try:
        import scipy

        scipy_version = scipy.__version__
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        scipy_version = "-"
    return (
        f"b{int(batch)}|t{torch.get_num_threads()}|torch{torch.__version__}"
        f"|numba{kernels['version'] if kernels else '-'}|scipy{scipy_version}|{cpu_model()}"
    )


def _layer_key(weight: torch.Tensor, block: tuple[int, int] | None, layout: str, kinds) -> str:
    density = float((weight != 0).sum()) / max(weight.numel(), 1)
    blk = f"{block[0]}x{block[1]}" if block else "-"
    return (
        f"linear|{weight.shape[0]}x{weight.shape[1]}|d{density:.2f}|blk{blk}|{layout}"
        f"|{weight.device.type}|{str(weight.dtype).removeprefix('torch.')}|{','.join(kinds)}"
    )


def _race(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    min_block_s: float,
) -> dict[str, float]:
    """Latency (ms) of each function: the best, over ``rounds`` alternating rounds, of the
    median of 5 timed blocks. The best rather than the median of the rounds: load from other
    jobs only ever adds time, and a choice made in a noisy moment is cached."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(max(int(rounds), 1)):
            for name, fn in fns.items():
                stats = time_call(fn, device, repeats=5, warmup=2, min_block_s=min_block_s)
                times[name].append(stats["latency_ms"])
    return {name: min(t) for name, t in times.items()}


def _agrees(out: torch.Tensor, ref: torch.Tensor) -> bool:
    tol = 1e-4 * max(1.0, float(ref.abs().max()))
    return out.shape == ref.shape and float((out - ref).abs().max()) <= tol


def _check(fns: Mapping[str, Callable[[], torch.Tensor]], ref: torch.Tensor) -> dict:
    """The functions whose output agrees with ``ref`` (those that fail or raise are
    dropped: a kernel this torch build lacks, a block size MKL refuses)."""
    ok = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            try:
                if _agrees(fn(), ref):
                    ok[name] = fn
            except (RuntimeError, ValueError, NotImplementedError, ConfigError):
                continue
    return ok


def _candidates(
    weight: torch.Tensor, block: tuple[int, int] | None, kinds: Sequence[str] | None
) -> list[str]:
    """The kernels of ``kinds`` (all of :data:`KERNELS` by default) that can run the
    layer: BSR kernels need a block mask (square blocks for torch's CPU BSR, which MKL
    runs), SciPy and numba need CPU float32 weights (and numba installed)."""
    cpu32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    out = []
    for kind in kinds or KERNELS:
        if kind not in KERNELS:
            raise ConfigError(f"unknown sparse kernel {kind!r}; one of {', '.join(KERNELS)}")
        if kind.endswith("_bsr") and block is None:
            continue
        if kind == "torch_bsr" and weight.device.type == "cpu" and block[0] != block[1]:
            continue
        if kind.startswith(("scipy", "numba")) and not cpu32:
            continue
        if kind == "numba_csr" and _numba_kernels() is None:
            continue
        out.append(kind)
    return out


def tune_linear(
    linear: nn.Linear,
    batch: int,
    cache: KernelCache | None = None,
    kinds: Sequence[str] | None = None,
    layout: str = "feature",
    rounds: int = 3,
    min_block_s: float = 0.002,
) -> tuple[str, dict[str, Any]]:
    """The fastest kernel for the (masked) ``linear`` at ``batch`` rows on this machine, and
    the cache entry (``{"kernel", "ms": {kernel: latency}}``).

    ``layout="feature"`` times :meth:`SparseLinear.forward_t` on a feature-major input (as
    inside a :class:`SparseChain`; ``dense`` is the dense GEMM on the masked weight);
    ``layout="row"`` times the layer as a drop-in module on ``batch x in_features`` (there
    ``dense`` is the ``nn.Linear`` itself). Each candidate's output is checked against the
    dense layer first.
    """
    weight = linear.weight.detach()
    block = block_size(weight)
    kinds = _candidates(weight, block, kinds)
    key = f"{_layer_key(weight, block, layout, kinds)}|{_environment_key(batch)}"
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit.get("kernel") in kinds:
        return str(hit["kernel"]), hit
    device, dtype = weight.device, weight.dtype
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, linear.in_features, generator=generator, dtype=torch.float32)
    x = x.to(device=device, dtype=dtype)
    xt = x.t().contiguous()
    with torch.inference_mode():
        ref = linear(x)
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    for kind in kinds:
        try:
            module = SparseLinear(linear, kernel=kind, blocksize=block)
        except ConfigError:
            continue
        if layout == "row":
            fns[kind] = (lambda: linear(x)) if kind == "dense" else (lambda m=module: m(x))
        else:
            fns[kind] = lambda m=module: m.forward_t(xt).t()
    fns = _check(fns, ref)
    if not fns:
        raise ConfigError(f"no sparse kernel reproduces the {tuple(weight.shape)} layer")
    times = _race(fns, device, rounds, min_block_s)
    best = min(times, key=times.__getitem__)
    entry = {"kernel": best, "ms": {k: round(v, 6) for k, v in times.items()}}
    if cache is not None:
        cache.put(key, entry)
    return best, entry


def _linear_names(model: nn.Module, chain: Sequence[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names.get(id(m), str(k)) for k, m in enumerate(chain) if isinstance(m, nn.Linear)]


def _chain_parts(masked: nn.Module):
    """``(names, linears, acts, flatten, keep, in_features)`` of a masked Linear chain after compaction
    (:func:`compact_linear_chain`, then the first layer's unused input columns dropped:
    ``keep`` lists the inputs it reads, ``None`` when all), or ``None`` when ``masked`` is not
    such a chain. ``acts[k]``: the element-wise modules after layer ``k``."""
    chain = _linear_chain(masked)
    compact = compact_linear_chain(masked) if chain is not None else None
    if compact is None:
        return None
    modules = list(compact)
    flatten = isinstance(modules[0], nn.Flatten)
    if flatten:
        if modules[0].start_dim != 1 or modules[0].end_dim != -1:
            return None
        modules = modules[1:]
    if not modules or not isinstance(modules[0], nn.Linear):
        return None
    linears: list[nn.Linear] = []
    acts: list[list[nn.Module]] = []
    for module in modules:
        if isinstance(module, nn.Linear):
            linears.append(module)
            acts.append([])
        else:
            acts[-1].append(module)
    first = linears[0]
    used = (first.weight != 0).any(dim=0)
    keep = None
    if not bool(used.all()):
        keep = torch.nonzero(used).flatten()
        if keep.numel() == 0:  # no input read at all: keep one column, all zeros
            keep = torch.zeros(1, dtype=torch.int64, device=used.device)
        smaller = nn.Linear(keep.numel(), first.out_features, bias=first.bias is not None)
        smaller = smaller.to(device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            smaller.weight.copy_(first.weight[:, keep])
            if first.bias is not None:
                smaller.bias.copy_(first.bias)
        linears[0] = smaller.eval()
    return _linear_names(masked, chain), linears, acts, flatten, keep, first.in_features


def _fusable(acts: Sequence[Sequence[nn.Module]]) -> list[bool] | None:
    """ReLU flags of a fused chain, or ``None`` when an activation is not a ReLU/identity."""
    flags = []
    for group in acts:
        if not all(isinstance(m, _FUSABLE_ACTS) for m in group):
            return None
        flags.append(any(isinstance(m, nn.ReLU) for m in group))
    return flags


def _chain_key(linears: Sequence[nn.Linear], keep, kinds: Sequence[str], batch: int) -> str:
    layers = []
    for m in linears:
        weight = m.weight.detach()
        layers.append(_layer_key(weight, block_size(weight), "chain", kinds).split("|", 1)[1])
    layers = ";".join(layers)
    return f"chain|in{'all' if keep is None else keep.numel()}|{layers}|{_environment_key(batch)}"


def _density(weight: torch.Tensor) -> float:
    return float((weight != 0).sum()) / max(weight.numel(), 1)


def _tune_chain(
    masked: nn.Module,
    batch: int,
    cache: KernelCache | None,
    kinds: Sequence[str] | None,
    max_density: float,
    rounds: int,
    min_block_s: float,
) -> nn.Module | None:
    """The fastest runner of a masked Linear chain at ``batch``: a :class:`SparseChain` of
    per-layer winners (:func:`tune_linear`), or a :class:`FusedLinearChain` (tile size and
    per-layer CSR/dense format tuned) when numba is there and the activations are ReLUs.
    ``None`` when ``masked`` is not a chain."""
    parts = _chain_parts(masked)
    if parts is None:
        return None
    names, linears, acts, flatten, keep, in_features = parts
    device, dtype = _device_dtype(masked)
    relu = _fusable(acts)
    fused_ok = (
        relu is not None
        and device.type == "cpu"
        and dtype == torch.float32
        and _numba_kernels() is not None
        and (kinds is None or "numba_csr" in kinds)
    )
    all_kinds = _candidates(linears[0].weight, None, kinds)
    key = _chain_key(linears, keep, all_kinds, batch) + f"|maxd{max_density:g}"
    hit = cache.get(key) if cache is not None else None

    def layered(kernels: Sequence[str]) -> SparseChain:
        layers = [
            SparseLinear(m, kernel=k, blocksize=block_size(m.weight.detach()))
            for m, k in zip(linears, kernels, strict=True)
        ]
        return SparseChain(layers, acts, keep, flatten).eval()

    def fused(formats: Sequence[str], tile: int, split: bool = False) -> FusedLinearChain:
        return FusedLinearChain(
            [m.weight for m in linears],
            [m.bias for m in linears],
            relu or [],
            formats,
            tile,
            keep,
            flatten,
            split,
            in_features,
        ).eval()

    def fastest(variants: Mapping[str, nn.Module]) -> str | None:
        fns = _check({n: (lambda m=m: m(x)) for n, m in variants.items()}, ref)
        if not fns:
            return None
        tried = _race(fns, device, rounds, min_block_s)
        return min(tried, key=tried.__getitem__)

    def label(net: nn.Module) -> dict[str, str]:
        if isinstance(net, FusedLinearChain):
            tag = "fused_split" if net.split_small else "fused"
            return {n: f"{tag}_{f}" for n, f in zip(names, net.formats, strict=True)}
        return {n: m.kernel for n, m in zip(names, net.layers, strict=True)}

    if hit is not None:
        try:
            if hit.get("runner") == "fused" and fused_ok:
                net = fused(hit["formats"], int(hit["tile"]), bool(hit.get("split")))
            elif hit.get("runner") == "layers":
                net = layered(hit["layer_kernels"])
            else:
                net = None
            if net is not None:
                net.kernels = label(net)
                net.kernel_times = hit.get("ms", {})
                return net
        except (KeyError, TypeError, ValueError, ConfigError):
            pass
    layer_kernels = [
        tune_linear(
            m,
            batch,
            cache,
            kinds if _density(m.weight) <= max_density else ("dense",),
            "feature",
            rounds,
            min_block_s,
        )[0]
        for m in linears
    ]
    nets: dict[str, nn.Module] = {"layers": layered(layer_kernels)}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_features, generator=generator).to(device=device, dtype=dtype)
    with torch.inference_mode():
        h = x if keep is None else x.index_select(1, keep)
        for m, group in zip(linears, acts, strict=True):
            h = m(h)
            for act in group:
                h = act(h)
        ref = h
    info: dict[str, Any] = {"layer_kernels": layer_kernels}
    if fused_ok:
        # Coordinate search: the tile size (with the per-layer winners' formats), then each
        # layer's format flipped in turn, then (small batches) rows split over the threads.
        formats = ["dense" if k == "dense" else "csr" for k in layer_kernels]
        tile, split = 64, False
        if batch >= FusedLinearChain.small_batch:
            tiles = [t for t in (32, 64, 128, 256) if t < 2 * batch] or [64]
            best = fastest({str(t): fused(formats, t) for t in tiles})
            tile = int(best) if best is not None else tile
        variants = {"as layers": fused(formats, tile)}
        for k in range(len(linears)):
            flipped = list(formats)
            flipped[k] = "dense" if formats[k] == "csr" else "csr"
            variants[f"flip{k}"] = fused(flipped, tile)
        best = fastest(variants)
        if best is not None:
            formats = variants[best].formats
            if batch < FusedLinearChain.small_batch and torch.get_num_threads() > 1:
                split = (
                    fastest({"": variants[best], "split": fused(formats, tile, True)}) == "split"
                )
            nets["fused"] = fused(formats, tile, split)
    fns = _check({n: (lambda m=m: m(x)) for n, m in nets.items()}, ref)
    if not fns:
        raise ConfigError("no sparse runner reproduces the masked chain")
    times = _race(fns, device, rounds, min_block_s)
    best = min(times, key=times.__getitem__)
    net = nets[best]
    info["runner"] = best
    info["ms"] = {k: round(v, 6) for k, v in times.items()}
    if isinstance(net, FusedLinearChain):
        info["formats"], info["tile"], info["split"] = net.formats, net.tile, net.split_small
    if cache is not None:
        cache.put(key, info)
    net.kernels = label(net)
    net.kernel_times = info["ms"]
    return net


def build_sparse_model(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    max_density: float = 0.5,
    *,
    autotune: bool = False,
    batch_size: int = 256,
    cache: str | Path | bool | None = None,
    kernels: Sequence[str] | None = None,
    tune_rounds: int = 3,
    tune_min_block_s: float = 0.002,
) -> nn.Module:
    """A copy of ``model`` (eval mode, masks applied) that runs its sparse ``nn.Linear``
    layers on sparse kernels; convolutions and other layers stay dense. The result gives
    the same outputs as the masked dense model up to float rounding; its ``kernels``
    attribute maps each Linear layer's name to the kernel that runs it.

    ``autotune=False`` (default): every Linear layer whose weight density is at most
    ``max_density`` becomes a :class:`SparseLinear` on the ``torch_csr`` kernel; the
    default 0.5 is where CSR (4-byte value + 4-byte index per non-zero) stops being smaller
    than the dense matrix.

    ``autotune=True``: kernels are timed on this machine at ``batch_size`` rows with
    torch's current thread count, and the fastest kept (module docstring), each choice
    cached in ``cache`` (a JSON path; ``None``: :func:`default_kernel_cache`; ``False``:
    none). Each Linear layer of density at most ``max_density`` gets the fastest of
    ``kernels`` (default :data:`KERNELS`); denser ones stay dense. A chain of Linear layers
    and element-wise activations (an MLP, a plain ``nn.Sequential``) is first compacted
    (dead neurons and unused inputs dropped) and then runs as a whole: a
    :class:`SparseChain` of per-layer winners or, with ReLUs and numba, a
    :class:`FusedLinearChain`, whichever is faster; the result is then that runner, not a
    copy of ``model``'s modules. In any other model the chosen layers replace the
    ``nn.Linear`` modules (``dense`` keeps the ``nn.Linear``). ``tune_rounds`` and
    ``tune_min_block_s`` size the timing of each candidate. Every candidate's output is
    checked against the dense layer (or chain) before it is timed.
    """
    if not 0.0 <= float(max_density) <= 1.0:
        raise ConfigError(f"max_density={max_density!r} must lie in [0, 1]")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be at least 1")
    out = _masked_copy(model, masks)
    if autotune:
        store = _open_cache(cache)
        net = _tune_chain(
            out, int(batch_size), store, kernels, float(max_density), tune_rounds, tune_min_block_s
        )
        if net is not None:
            return _verified(net, out)
    chosen: dict[str, str] = {}
    linears = [(n, m) for n, m in out.named_modules() if isinstance(m, nn.Linear) and n]
    for name, module in linears:
        if _density(module.weight) > max_density:
            chosen[name] = "dense"
            continue
        kernel = "torch_csr"
        if autotune:
            kernel, _ = tune_linear(
                module, int(batch_size), store, kernels, "row", tune_rounds, tune_min_block_s
            )
        if kernel == "dense":
            chosen[name] = "dense"
            continue
        block = block_size(module.weight.detach()) if kernel.endswith("_bsr") else None
        _set_submodule(out, name, SparseLinear(module, kernel=kernel, blocksize=block))
        chosen[name] = kernel
    out.kernels = chosen
    return out


def _verified(net: nn.Module, masked: nn.Module) -> nn.Module:
    """``net`` if it computes what the masked model does on a random input (it should: every
    candidate was checked; this guards the assembly); else an error."""
    try:
        example = _example_input(masked, batch=3)
    except ConfigError:
        return net
    with torch.inference_mode():
        ref, got = masked(example), net(example)
    if not _agrees(got, ref):
        raise ConfigError("the tuned sparse model does not reproduce the masked model")
    return net


def _example_input(model: nn.Module, batch: int) -> torch.Tensor:
    """A random input for a Linear chain: ``batch x in_features`` of the first Linear, shaped
    by the chain's Flatten when there is one (flattened inputs are accepted as they are)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ConfigError("no Linear layer")
    device, dtype = _device_dtype(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, first.in_features, generator=generator)
    return x.to(device=device, dtype=dtype)


def latency_report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 15,
    min_block_s: float = 0.01,
    compacted: nn.Module | None = None,
    autotune: bool = True,
    kernel_cache: str | Path | bool | None = None,
) -> dict[str, Any]:
    """Latency (ms) and peak memory of the dense, masked, sparse and compact variants
    (``compacted`` when given, a structurally compacted copy of the model; else, for Linear
    chains, :func:`compact_linear_chain`; else none), flat: ``latency_ms/<variant>/b<batch>``
    and ``<memory field>/<variant>/b<batch>``, plus ``latency_threads``
    (``torch.get_num_threads()`` during the timing) and ``latency_kernels``
    (``{"b<batch>": {layer: kernel}}``, the sparse variant's kernels).

    ``dense`` times :func:`dense_copy` (the architecture with dense, non-zero weights), not
    the pruned model; ``masked`` times the pruned weights, zeros in place, on the same dense
    kernels. ``sparse`` is :func:`build_sparse_model`, with ``autotune`` (default) tuned at
    each batch size for that batch (choices cached in ``kernel_cache``, see
    :func:`build_sparse_model`). The variants are timed in turn, in one process, with all
    of torch's intra-op threads.
    """
    sizes = [int(b) for b in batch_sizes]
    variants: dict[str, nn.Module | dict[int, nn.Module]] = {
        "dense": dense_copy(model, masks),
        "masked": _masked_copy(model, masks),
    }
    if autotune:
        variants["sparse"] = {
            b: build_sparse_model(model, masks, autotune=True, batch_size=b, cache=kernel_cache)
            for b in sizes
        }
    else:
        variants["sparse"] = build_sparse_model(model, masks)
    compact = compacted if compacted is not None else compact_linear_chain(model, masks)
    if compact is not None:
        variants["compact"] = compact
    out: dict[str, Any] = {"latency_threads": torch.get_num_threads()}
    kernels: dict[str, dict[str, str]] = {}
    for variant, nets in variants.items():
        per_batch = nets if isinstance(nets, dict) else {b: nets for b in sizes}
        for b in sizes:
            net = per_batch[b]
            if variant == "sparse":
                kernels[f"b{b}"] = dict(getattr(net, "kernels", {}))
            res = measure_latency(net, input_shape, [b], repeats, min_block_s=min_block_s)
            for batch, stats in res.items():
                for key, value in stats.items():
                    if key == "latency_ms":
                        out[f"latency_ms/{variant}/{batch}"] = value
                    elif key.startswith("peak_"):
                        out[f"{key}/{variant}/{batch}"] = value
    out["latency_kernels"] = kernels
    return out
