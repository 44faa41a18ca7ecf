"""Exports of a pruned model: a dense state dict, a compact sparse checkpoint and ONNX.

- ``state_dict.pt``: ``model.state_dict()`` with the masks applied (pruned weights are
  zeros in place), loadable with ``model.load_state_dict(torch.load(path))``.
- ``sparse.pt``: for each masked weight its shape, its mask packed 8 weights per byte
  (:func:`numpy.packbits`, row-major) and only the values at kept positions; every other
  state-dict entry (biases, BatchNorm parameters and buffers) dense. Reload with
  :func:`load_sparse_checkpoint`. At 90% sparsity this is ``1/8 + 0.1 x 4 = 0.525`` byte
  per prunable weight instead of 4.
- ``sparse_int8.pt``: the same with the kept values as symmetric int8 and one fp32 scale per
  output row (``save_sparse_checkpoint(..., values="int8")``): ``1/8 + 0.1 x 1`` byte per
  prunable weight at 90%; zeros stay exactly zero.
- ``model.onnx``: :func:`torch.onnx.export` of the masked model in eval mode with a dynamic
  batch dimension (input ``input``, output ``output``), ONNX opset of the exporter's default.
  The TorchScript-based exporter (``dynamo=False``: fast, one self-contained file) is tried
  first and the ``torch.export``-based one (needs ``onnxscript``) second. The file stores the
  zeros densely: ONNX has no standard sparse-weight execution.
- ``compact.pt`` and ``model_compact.onnx`` (only when the masks prune whole channels,
  neurons or residual branches): the physically smaller dense model of
  :func:`prunelab.structured.compact_with_blocks` (residual blocks whose branch the masks
  prune whole replaced by their shortcut plus the branch's constant, then the channels
  removed). ``compact.pt`` holds the compacted model's state dict, the input shape it was
  compacted for, the removed channels and the removed blocks, not a pickled module (fragile
  across code changes). Reload with :func:`load_compact_checkpoint`: it re-runs the
  compaction on the masked model (same architecture and masks) to rebuild the smaller
  architecture, then loads the saved state dict into it strictly, so every tensor's shape
  is checked (a file without the removed blocks, written before blocks were removed, is
  rebuilt by channel compaction alone). The ONNX file is :func:`export_onnx` of the
  compacted model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.models import prunable_parameters

FORMAT = "prunelab-sparse/1"
COMPACT_FORMAT = "prunelab-compact/1"


def _resolve_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """``masks`` as CPU bool tensors, checked against ``model``; without masks, the non-zero
    entries of the prunable weights."""
    params = dict(model.named_parameters())
    if masks is None:
        return {n: (p.detach() != 0).cpu() for n, p in prunable_parameters(model).items()}
    out = {}
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(f"mask '{name}' names no parameter of the model")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"mask '{name}' has shape {tuple(mask.shape)}, the weight "
                f"{tuple(params[name].shape)}"
            )
        out[name] = mask.detach().to(device="cpu", dtype=torch.bool)
    return out


def masked_state_dict(
    model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` on the CPU with the masked weights zeroed (a copy)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, mask in _resolve_masks(model, masks).items():
        state[name].mul_(mask.to(state[name].dtype))
    return state


def _int8_rows(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 of the kept values of ``weight``: ``(q, scale)`` with
    ``q`` the kept values in row-major order and ``scale[r] = max|w_r| / 127`` (1 for a row
    with nothing kept), so a value is ``q * scale[row]`` and zero stays exactly zero."""
    rows = weight.reshape(weight.shape[0], -1).float() if weight.dim() else weight.reshape(1, 1)
    keep = mask.reshape(rows.shape)
    amax = (rows.abs() * keep).amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q[keep], scale


def save_sparse_checkpoint(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    path: str | Path,
    values: str = "fp32",
) -> Path:
    """Write the compact sparse checkpoint (module docstring) to ``path``.

    ``values="int8"`` stores the kept values of every masked weight as symmetric int8 with
    one fp32 scale per output row (``sparse_int8.pt``): 1 byte per kept weight instead of 4;
    :func:`read_sparse_checkpoint` dequantizes them (``q * scale``)."""
    if values not in ("fp32", "int8"):
        raise ConfigError(f"values={values!r}: choose fp32 or int8")
    resolved = _resolve_masks(model, masks)
    state = masked_state_dict(model, resolved)
    sparse: dict[str, dict[str, Any]] = {}
    for name, mask in resolved.items():
        flat_mask = mask.flatten()
        entry: dict[str, Any] = {
            "shape": list(mask.shape),
            "bits": torch.from_numpy(np.packbits(flat_mask.numpy())),
        }
        if values == "int8" and state[name].is_floating_point():
            entry["q"], entry["scale"] = _int8_rows(state[name], mask)
            entry["dtype"] = str(state[name].dtype).removeprefix("torch.")
        else:
            entry["values"] = state[name].flatten()[flat_mask].clone()
        sparse[name] = entry
    dense = {k: v for k, v in state.items() if k not in resolved}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "sparse": sparse, "dense": dense}, path)
    return path


def _load_blob(path: Path, kind: str, fmt: str) -> dict:
    """The dict a prunelab ``kind`` checkpoint of format ``fmt`` holds (on the CPU), or a
    one-line ConfigError for a missing, unreadable or foreign file."""
    if not path.is_file():
        raise ConfigError(f"no {kind} checkpoint at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user error
        raise ConfigError(f"{path} is not a readable torch file: {type(err).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ConfigError(f"{path} is not a prunelab {kind} checkpoint (format {fmt})")
    return blob


def read_sparse_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(full state dict, {name: bool mask})`` from a checkpoint of
    :func:`save_sparse_checkpoint`, on the CPU."""
    path = Path(path)
    blob = _load_blob(path, "sparse", FORMAT)
    state = dict(blob["dense"])
    masks = {}
    for name, entry in blob["sparse"].items():
        shape = tuple(int(s) for s in entry["shape"])
        numel = int(np.prod(shape)) if shape else 1
        bits = np.unpackbits(entry["bits"].numpy(), count=numel).astype(bool)
        mask = torch.from_numpy(bits)
        if "q" in entry:  # int8 values, one scale per output row
            rows = torch.arange(shape[0] if shape else 1).repeat_interleave(
                numel // max(shape[0] if shape else 1, 1)
            )
            scale = entry["scale"][rows[mask]]
            values = (entry["q"].float() * scale).to(getattr(torch, entry["dtype"]))
        else:
            values = entry["values"]
        if int(mask.sum()) != values.numel():
            raise ConfigError(f"{path}: '{name}' has {values.numel()} values for its mask")
        weight = torch.zeros(numel, dtype=values.dtype)
        weight[mask] = values
        state[name] = weight.view(shape)
        masks[name] = mask.view(shape)
    return state, masks


def load_sparse_checkpoint(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a checkpoint of :func:`save_sparse_checkpoint` into ``model`` (same architecture;
    strict) and return it."""
    state, _ = read_sparse_checkpoint(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])
        raise ConfigError(f"{path} does not fit this model: {detail[:300]}") from None
    return model


def export_onnx(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    input_shape: Sequence[int],
    path: str | Path,
) -> Path:
    """Export the masked model in eval mode to ONNX at ``path`` (module docstring)."""
    try:
        import onnx  # noqa: F401  (the exporters need it; fail clearly here)
    except ImportError:
        raise ConfigError(
            "ONNX export needs the 'onnx' package: pip install onnx onnxscript "
            "(pinned in requirements.txt)"
        ) from None
    shape = tuple(int(s) for s in input_shape)
    net = copy.deepcopy(model).eval()
    net.load_state_dict(masked_state_dict(model, masks))
    floats = [t for t in (*net.parameters(), *net.buffers()) if t.is_floating_point()]
    device = floats[0].device if floats else torch.device("cpu")
    dtype = floats[0].dtype if floats else torch.float32
    x = torch.randn(1, *shape, device=device, dtype=dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                net,
                (x,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
            return path
        except Exception as err:  # fall back to the other exporter
            errors.append(f"legacy: {_first_line(err)}")
        try:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                net,
                (x,),
                str(path),
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: batch},),
            )
            return path
        except Exception as err:
            errors.append(f"dynamo: {_first_line(err)}")
    raise ConfigError(f"ONNX export failed with both exporters: {'; '.join(errors)}")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def export_all(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    input_shape: Sequence[int],
    out_dir: str | Path,
) -> dict[str, Path]:
    """Write ``state_dict.pt``, ``sparse.pt`` and ``model.onnx`` to ``out_dir``.

    Returns ``{"state_dict": path, "sparse": path, "onnx": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense_path = out / files.EXPORT_STATE_DICT
    torch.save(masked_state_dict(model, masks), dense_path)
    return {
        "state_dict": dense_path,
        "sparse": save_sparse_checkpoint(model, masks, out / files.EXPORT_SPARSE),
        "onnx": export_onnx(model, masks, input_shape, out / files.EXPORT_ONNX),
    }


def _removed(report: Any) -> dict[str, list[int]]:
    return {root: [int(c) for c in chans] for root, chans in report.removed.items()}


def save_compact_checkpoint(
    compacted: nn.Module, report: Any, input_shape: Sequence[int], path: str | Path
) -> Path:
    """Write ``compact.pt`` (module docstring) for ``compacted`` and its
    :class:`~prunelab.structured.CompactionReport` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in compacted.state_dict().items()}
    blob = {
        "format": COMPACT_FORMAT,
        "state_dict": state,
        "input_shape": [int(s) for s in input_shape],
        "removed": _removed(report),
        "blocks_removed": [str(b) for b in getattr(report, "blocks_removed", [])],
    }
    torch.save(blob, path)
    return path


def load_compact_checkpoint(
    path: str | Path, model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> nn.Module:
    """The compacted model of ``compact.pt``: :func:`prunelab.structured.compact_with_blocks`
    of ``model`` under ``masks`` (the run's architecture and final masks; ``model`` is
    untouched) with the saved state dict loaded strictly, in eval mode. Raises ConfigError
    when the file is not a compact checkpoint or does not fit (other channels or blocks
    removed, or any tensor of another shape)."""
    from prunelab.structured import compact_with_blocks, compact_with_report

    path = Path(path)
    blob = _load_blob(path, "compact", COMPACT_FORMAT)
    rebuild = compact_with_blocks if "blocks_removed" in blob else compact_with_report
    net, report = rebuild(model, masks, blob["input_shape"], check=False)
    if list(report.blocks_removed) != list(blob.get("blocks_removed", [])):
        raise ConfigError(f"{path} removed other residual blocks than these masks do")
    if _removed(report) != blob["removed"]:
        raise ConfigError(f"{path} removed other channels than these masks do")
    state = blob["state_dict"]
    own = net.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong or set(own) != set(state):
        detail = wrong[:3] or sorted(set(own) ^ set(state))[:3]
        raise ConfigError(f"{path} does not fit the compacted model: {', '.join(detail)}")
    net.load_state_dict(state, strict=True)
    return net.eval()


def export_compact(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    input_shape: Sequence[int],
    out_dir: str | Path,
) -> tuple[dict[str, Path], nn.Module, Any] | str:
    """Compact the masked model and write ``compact.pt`` and ``model_compact.onnx`` to
    ``out_dir``; returns ``({"compact": path, "compact_onnx": path}, compacted model,
    CompactionReport)``, or, writing nothing, the reason no compaction applies (no channel,
    neuron or residual branch pruned whole, or a model
    :func:`~prunelab.structured.compact_with_blocks` cannot handle).
    """
    from prunelab.structured import compact_with_blocks

    shape = tuple(int(s) for s in input_shape)
    try:
        net, report = compact_with_blocks(model, masks, shape)
    except ConfigError as err:
        return f"compaction failed: {_first_line(err)}"
    if not report.changed:
        return "the masks prune no channel, neuron or residual branch whole"
    out = Path(out_dir)
    paths = {
        "compact": save_compact_checkpoint(net, report, shape, out / files.EXPORT_COMPACT),
        "compact_onnx": export_onnx(net, {}, shape, out / files.EXPORT_COMPACT_ONNX),
    }
    return paths, net, report
