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
- **sparse** (:func:`build_sparse_model`): every ``nn.Linear`` whose weight density is at
  most ``max_density`` computes ``W x + b`` with ``W`` in CSR layout and
  ``torch.addmm(b, W_csr, x^T)^T`` (a sparse-dense matrix product: MKL/native kernels on CPU,
  cuSPARSE on CUDA). Convolutions stay dense with zeros: PyTorch has no unstructured-sparse
  convolution kernel (an im2col + CSR product would be possible; it is not implemented here,
  as im2col materialises ``k x k`` copies of every input activation);
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

Choice of kernel: on this project's 2-core CPU (torch 2.14.1), ``torch.sparse.mm``,
``torch.mm``, ``torch.sparse.addmm`` and ``torch.addmm`` with a CSR left operand dispatch to
the same kernel and measured the same within noise for LeNet-300-100 layers at batch 256;
``torch.addmm`` is used because it fuses the bias. ``dense @ CSR^T`` (sparse right operand)
and COO were 5-20x slower. The kernel wants the dense operand ``x^T`` contiguous: on the
transposed view of a row-major input it ran as slow as, or slower than, an explicit copy
(about 0.09 ms for 256 x 784) plus the contiguous product, so the first layer copies (inner
layers receive ``x^T`` contiguous already); int32 indices were slightly faster than int64.
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in CSR layout (inference only).

    The CSR arrays are buffers (so ``.to()``, ``deepcopy`` and ``state_dict`` work); the CSR
    tensor is re-assembled on each call without checks (about 2 microseconds).
    """

    def __init__(self, linear: nn.Linear, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        with torch.no_grad():
            weight = linear.weight.detach()
            if mask is not None:
                weight = weight * mask.to(device=weight.device, dtype=weight.dtype)
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support.*")
                csr = weight.to_sparse_csr()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # int32 indices (as in the CSR size count) when they fit: a little faster than int64.
        index_dtype = torch.int32 if csr.values().numel() < 2**31 - 1 else torch.int64
        self.register_buffer("crow_indices", csr.crow_indices().to(index_dtype))
        self.register_buffer("col_indices", csr.col_indices().to(index_dtype))
        self.register_buffer("values", csr.values().clone())
        bias = None if linear.bias is None else linear.bias.detach().clone()[:, None]
        self.register_buffer("bias_col", bias)

    def weight_csr(self) -> torch.Tensor:
        """The weight as a CSR tensor of shape ``(out_features, in_features)``."""
        return torch.sparse_csr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # The CSR kernel is ~2x slower on a strided (transposed) dense operand than on a
        # contiguous one: copy once. Inside a chain of SparseLinear layers the input arrives
        # as the transpose of the previous output, so .t() is already contiguous (no copy).
        xt = x.reshape(-1, self.in_features).t().contiguous()
        w = self.weight_csr()
        y = torch.mm(w, xt) if self.bias_col is None else torch.addmm(self.bias_col, w, xt)
        return y.t().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.values.numel()
        return f"in={self.in_features}, out={self.out_features}, nnz={nnz}"


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


def build_sparse_model(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    max_density: float = 0.5,
) -> nn.Module:
    """A copy of ``model`` (eval mode, masks applied) whose sparse ``nn.Linear`` layers are
    :class:`SparseLinear` (CSR kernels); convolutions and other layers stay dense.

    A Linear layer is converted when the density of its (masked) weight is at most
    ``max_density``; the default 0.5 is where CSR (4-byte value + 4-byte index per non-zero)
    stops being smaller than the dense matrix. The result gives the same outputs as the
    masked dense model up to float rounding.
    """
    if not 0.0 <= float(max_density) <= 1.0:
        raise ConfigError(f"max_density={max_density!r} must lie in [0, 1]")
    out = _masked_copy(model, masks)
    linears = [(n, m) for n, m in out.named_modules() if isinstance(m, nn.Linear) and n]
    for name, module in linears:
        density = float((module.weight != 0).sum()) / max(module.weight.numel(), 1)
        if density <= max_density:
            _set_submodule(out, name, SparseLinear(module))
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


def latency_report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 15,
    min_block_s: float = 0.01,
    compacted: nn.Module | None = None,
) -> dict[str, float | None]:
    """Latency (ms) and peak memory of the dense, masked, sparse and compact variants
    (``compacted`` when given, a structurally compacted copy of the model; else, for Linear
    chains, :func:`compact_linear_chain`; else none), flat: ``latency_ms/<variant>/b<batch>`` and ``<memory field>/<variant>/
    b<batch>``, plus ``latency_threads`` (``torch.get_num_threads()`` during the timing).

    ``dense`` times :func:`dense_copy` (the architecture with dense, non-zero weights), not
    the pruned model; ``masked`` times the pruned weights, zeros in place, on the same dense
    kernels. The variants are timed in turn, in one process.
    """
    variants: dict[str, nn.Module] = {
        "dense": dense_copy(model, masks),
        "masked": _masked_copy(model, masks),
        "sparse": build_sparse_model(model, masks),
    }
    compact = compacted if compacted is not None else compact_linear_chain(model, masks)
    if compact is not None:
        variants["compact"] = compact
    out: dict[str, float | None] = {"latency_threads": torch.get_num_threads()}
    for variant, net in variants.items():
        res = measure_latency(net, input_shape, batch_sizes, repeats, min_block_s=min_block_s)
        for batch, stats in res.items():
            for key, value in stats.items():
                if key == "latency_ms":
                    out[f"latency_ms/{variant}/{batch}"] = value
                elif key.startswith("peak_"):
                    out[f"{key}/{variant}/{batch}"] = value
    return out
