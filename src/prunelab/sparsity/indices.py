"""Index operations on flat tensors, as a mask update uses them: gather, fill, locate, merge.

On the CPU they go through numpy views of the tensors' memory (no copies in or out): its
fancy indexing, ``flatnonzero`` and stable merge measured 1.5-4x faster than torch's
``index``, ``index_put``, ``nonzero`` and ``sort`` on the sizes a mask update sees (1-D
tensors of 10^3-10^6 entries, indices in the thousands). Elsewhere (GPU, bfloat16, which
numpy lacks) they are torch's own operations. Either way the results are the same tensors.
Pure torch + numpy.
"""

from __future__ import annotations

import numpy as np
import torch


def numpy_backed(*tensors: torch.Tensor) -> bool:
    """Whether the operations here run through numpy for ``tensors``: all on the CPU, in a
    dtype numpy has (not bfloat16)."""
    return all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in tensors)


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for a 1-D ``values`` and 1-D integer ``index`` (a new tensor)."""
    if numpy_backed(values, index):
        return torch.from_numpy(values.detach().numpy()[index.numpy()])
    return values[index]


def select(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values[keep]`` for 1-D ``values`` and a bool ``keep`` of the same length."""
    if numpy_backed(values, keep):
        return torch.from_numpy(values.detach().numpy()[keep.numpy()])
    return values[keep]


def fill_(flat: torch.Tensor, index: torch.Tensor, value: float | bool) -> torch.Tensor:
    """``flat[index] = value`` in place, for a 1-D contiguous ``flat`` (returned). A
    parameter (or a view of one) is written by torch, which records the write in its
    version counter for autograd; numpy writes do not."""
    if not index.numel():
        return flat
    base = flat._base if flat._base is not None else flat
    if numpy_backed(flat, index) and flat.is_contiguous() and not base.requires_grad:
        flat.numpy()[index.numpy()] = value
    elif flat.dtype == torch.bool:
        flat[index.to(flat.device)] = bool(value)
    else:
        flat.index_fill_(0, index.to(flat.device), value)
    return flat


def flatnonzero(flags: torch.Tensor) -> torch.Tensor:
    """Flat indices (increasing) of the True entries of the bool ``flags``."""
    if numpy_backed(flags):
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return torch.nonzero(flags.reshape(-1), as_tuple=True)[0]


def count(flags: torch.Tensor) -> int:
    """Number of True entries of the bool ``flags``."""
    if numpy_backed(flags):
        return int(np.count_nonzero(flags.numpy()))
    return int(flags.count_nonzero())


def without(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The entries of the 1-D ``values`` at the positions ``positions`` does not list (in
    order)."""
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    return select(values, fill_(keep, positions, False))


def merge_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The increasing 1-D integer tensors ``a`` and ``b`` merged into one increasing tensor.
    On the CPU numpy's stable sort finds the two runs and merges them in one linear pass
    (about 10x faster than torch.sort, which sorts from scratch)."""
    if numpy_backed(a, b):
        return torch.from_numpy(np.sort(np.concatenate([a.numpy(), b.numpy()]), kind="stable"))
    return torch.cat([a, b]).sort().values
