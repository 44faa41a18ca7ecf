"""Post-training static int8 quantization of a pruned model, with the masks kept exactly zero.

The quantization itself is onnxruntime's (``onnxruntime.quantization.quantize_static``, see
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html); this module
only exports the masked model, feeds it calibration batches, checks the masks and reports.

Scheme (Jacob et al. 2018, "Quantization and training of neural networks for efficient
integer-arithmetic-only inference", CVPR; Krishnamoorthi 2018, "Quantizing deep
convolutional networks for efficient inference: a whitepaper", arXiv:1806.08342):

- weights: int8, **symmetric** (zero-point 0, range [-127, 127]) and **per output channel**,
  scale ``max|w_c| / 127``. With zero-point 0 a pruned weight 0.0 quantizes to the integer 0
  and dequantizes to exactly 0.0, so the masks survive quantization bit for bit; a channel
  pruned whole has ``max|w_c| = 0`` and onnxruntime gives it scale 1.0 (its integers are 0).
  :func:`quantize_int8` verifies this on the written file and raises if it ever failed;
- activations: per tensor, affine, uint8 by default (onnxruntime's recommendation for x86
  CPUs with VNNI: u8 x s8 products), ranges from MinMax calibration over the first
  ``num_batches`` calibration batches; biases int32 with scale ``s_in * s_w`` (Jacob et al.);
- format: QDQ by default (QuantizeLinear/DequantizeLinear pairs around standard ops, the
  format onnxruntime recommends since 1.11); its CPU provider fuses them into the same
  integer ``QGemm``/``QLinearConv`` kernels that the QOperator format names directly, so both
  run at the same speed (``scripts/bench_quantized.py`` times both).

Layers onnxruntime cannot quantize (an op without an int8 form in its quantizer, e.g.
``Einsum`` or ``LSTM`` in static mode) stay in fp32: :attr:`Int8Report.fp32` lists every
weighted layer left in fp32 and why, :attr:`Int8Report.note` says it in one line, and
``strict=True`` turns it into a one-line :class:`~prunelab.errors.ConfigError`. The report is
also stored in the ONNX file's metadata (``prunelab.int8_report``), so :func:`load_int8`
gives it back.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunelab.errors import ConfigError

FORMATS = ("qdq", "qoperator")
ACTIVATION_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
METADATA_KEY = "prunelab.int8_report"
INPUT_NAME = "input"  # the name :func:`prunelab.cost.export.export_onnx` gives the input

# Quantized ONNX ops whose inputs hold (tensor, scale, zero-point) triples, with the axis a
# per-channel weight is quantized along when the op itself (not a DequantizeLinear) holds it.
_QOPS_WEIGHT_AXIS = {"QLinearConv": 0, "QLinearMatMul": 1, "QGemm": None, "QAttention": None}


@dataclass
class Int8Report:
    """What :func:`quantize_int8` did.

    ``quantized`` and ``fp32`` map every weighted layer of the ONNX graph (a node with a
    constant float weight of two or more dimensions, named by that weight: the model's
    parameter name, e.g. ``layers.0.weight``) to its ONNX op type, or to the reason it stayed
    in fp32. ``masks_checked`` maps each mask to the number of its pruned positions found to be
    the integer 0 (zero-point 0) in the int8 weight, or to -1 for a mask whose weight stayed
    in fp32 (zeros kept as fp32 0.0).
    """

    path: str
    format: str
    activation_type: str
    weight_type: str = "int8 symmetric per-channel"
    calibration_method: str = "minmax"
    calibration_batches: int = 0
    calibration_samples: int = 0
    quantized: dict[str, str] = field(default_factory=dict)
    fp32: dict[str, str] = field(default_factory=dict)
    masks_checked: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0

    @property
    def note(self) -> str:
        """One line: all weighted layers quantized, or which stayed in fp32 and why."""
        if not self.fp32:
            return f"all {len(self.quantized)} weighted layers quantized to int8"
        left = "; ".join(f"{name} ({why})" for name, why in self.fp32.items())
        return (
            f"{len(self.quantized)} weighted layers quantized to int8, "
            f"{len(self.fp32)} left in fp32: {left}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with :attr:`note`."""
        return {**asdict(self), "note": self.note}


@dataclass(frozen=True)
class Int8Weight:
    """One integer weight read back from a quantized ONNX file.

    ``q`` as stored (int8 or uint8), ``scale`` and ``zero_point`` (scalars, or one per channel
    along ``axis``); the real value is ``(q - zero_point) * scale``.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    def dequantize(self) -> np.ndarray:
        """``(q - zero_point) * scale`` in float32, per-channel parameters broadcast."""
        shape = [1] * self.q.ndim
        if self.axis is not None and self.scale.size > 1:
            shape[self.axis] = -1
        scale = self.scale.astype(np.float32).reshape(shape)
        zero = self.zero_point.astype(np.int32).reshape(shape)
        return ((self.q.astype(np.int32) - zero).astype(np.float32) * scale).astype(np.float32)


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` on ``path`` with full graph optimisation and
    ``threads`` intra-op threads (default: every core this process may run on). Use the same
    ``threads`` for the fp32 and int8 models when comparing them."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads) if threads else _cores()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxModel:
    """An ONNX model run by onnxruntime on the CPU: ``model(x) -> logits`` on torch tensors.

    The session is made on first use (:func:`ort_session`). Works for the fp32 export of
    :func:`prunelab.cost.export.export_onnx` and for the int8 files of this module alike.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"no ONNX file at {self.path}")
        self.threads = threads
        self._session: Any = None

    @property
    def session(self) -> Any:
        """The onnxruntime ``InferenceSession``."""
        if self._session is None:
            self._session = ort_session(self.path, self.threads)
        return self._session

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw onnxruntime call on a float32 array."""
        return self.session.run(None, {INPUT_NAME: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.run(array))

    @property
    def size_bytes(self) -> int:
        """Size of the file on disk."""
        return self.path.stat().st_size


class Int8Model(OnnxModel):
    """An int8 ONNX model of :func:`quantize_int8`, with its :class:`Int8Report`."""

    def __init__(
        self, path: str | Path, report: Int8Report | None = None, threads: int | None = None
    ) -> None:
        super().__init__(path, threads)
        self.report = report if report is not None else _read_report(self.path)

    def weights(self) -> dict[str, Int8Weight]:
        """:func:`int8_weights` of this file."""
        return int8_weights(self.path)


def load_int8(path: str | Path, threads: int | None = None) -> Int8Model:
    """Reload an int8 file written by :func:`quantize_int8` (report from its metadata)."""
    return Int8Model(path, threads=threads)


class _BatchReader:
    """onnxruntime ``CalibrationDataReader`` over already materialised float32 batches."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.arrays):
            return None
        self.position += 1
        return {INPUT_NAME: self.arrays[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def _inputs_of(batch: Any) -> torch.Tensor:
    """The input tensor of a batch: the batch itself, or the first item of an (x, y) pair."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ConfigError("a calibration batch is empty; pass tensors or (x, y) pairs")
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise ConfigError(
            f"a calibration batch is a {type(batch).__name__}; pass tensors or (x, y) pairs"
        )
    return batch


def calibration_arrays(
    batches: Iterable[Any], num_batches: int, input_shape: Sequence[int]
) -> list[np.ndarray]:
    """The first ``num_batches`` batches of ``batches`` (tensors or (x, y) pairs) as float32
    arrays of shape ``(n, *input_shape)``; ConfigError when there are none or one has another
    shape."""
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(
            f"num_batches (calibration batches) must be an int >= 1, got {num_batches!r}"
        )
    shape = tuple(int(s) for s in input_shape)
    arrays = []
    for batch in batches:
        x = _inputs_of(batch)
        if tuple(x.shape[1:]) != shape or x.shape[0] < 1:
            raise ConfigError(
                f"calibration batch of shape {tuple(x.shape)}; expected (n, {', '.join(map(str, shape))})"
            )
        arrays.append(x.detach().to("cpu", torch.float32).contiguous().numpy())
        if len(arrays) == num_batches:
            break
    if not arrays:
        raise ConfigError("no calibration batches: pass at least one batch of training inputs")
    return arrays


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    value = str(value).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _weighted_nodes(graph: Any) -> dict[str, tuple[str, str]]:
    """``{weight name: (node name, op type)}`` for the nodes of ``graph`` with a constant
    float initializer of >= 2 dimensions (the layers that carry weights), in graph order."""
    from onnx import TensorProto

    inits = {
        i.name: i
        for i in graph.initializer
        if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
        and len(i.dims) >= 2
    }
    out: dict[str, tuple[str, str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits and name not in out:
                out[name] = (node.name, node.op_type)
    return out


def _locate(
    fp32: Mapping[str, np.ndarray], masks: Mapping[str, torch.Tensor]
) -> dict[str, tuple[str, bool]]:
    """``{mask name: (initializer name, transposed)}``: the ONNX weight each mask belongs to.

    By name first (the TorchScript exporter keeps parameter names); otherwise the first
    unclaimed initializer of the same shape (or transposed, for matrices) that is zero
    wherever the mask is (a weight renamed by the exporter, e.g. a convolution with its
    BatchNorm folded in). Masks found nowhere are left out.
    """
    found: dict[str, tuple[str, bool]] = {}
    claimed: set[str] = set()
    for name, mask in masks.items():
        if name in fp32 and fp32[name].shape == tuple(mask.shape):
            found[name] = (name, False)
            claimed.add(name)
    for name, mask in masks.items():
        if name in found:
            continue
        pruned = ~mask.numpy()
        for onnx_name, array in fp32.items():
            if onnx_name in claimed:
                continue
            for transposed in (False, True):
                if transposed and pruned.ndim != 2:
                    continue
                view = array.T if transposed else array
                if view.shape == pruned.shape and not view[pruned].any():
                    found[name] = (onnx_name, transposed)
                    claimed.add(onnx_name)
                    break
            if name in found:
                break
    return found


def _fp32_reason(op_type: str, node: str, fmt: str, excluded: set[str]) -> str:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    if node in excluded:
        return "kept in fp32 on request"
    registry = QDQRegistry if fmt == "qdq" else QLinearOpsRegistry
    if op_type not in registry:
        return f"onnxruntime's static quantizer has no int8 {op_type}"
    return f"onnxruntime left this {op_type} in fp32"


def quantize_int8(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    calibration_batches: Iterable[Any],
    input_shape: Sequence[int],
    path: str | Path,
    *,
    num_batches: int = 16,
    quant_format: str = "qdq",
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    keep_fp32: Sequence[str] = (),
    strict: bool = False,
    fp32_path: str | Path | None = None,
    threads: int | None = None,
) -> Int8Model:
    """Post-training static int8 quantization of the masked ``model`` to the ONNX file ``path``.

    The masked model is exported by :func:`prunelab.cost.export.export_onnx` (to
    ``fp32_path``, or a temporary file), then quantized by onnxruntime's ``quantize_static``
    (module docstring: symmetric per-channel int8 weights, per-tensor ``activation_type``
    activations calibrated with ``calibrate_method`` on the first ``num_batches`` of
    ``calibration_batches``: tensors or (x, y) pairs, usually training batches).

    ``masks``: ``{parameter name: bool mask}`` (None: the zeros of the prunable weights).
    ``keep_fp32``: module or parameter names (``head`` or ``head.weight``) to leave in fp32.
    ``strict``: raise ConfigError if any weighted layer stays in fp32 (otherwise the report
    lists it). Returns the :class:`Int8Model` (its ``report`` says what was done); raises
    RuntimeError if a pruned weight did not quantize to exactly 0 (never expected: the weights
    are symmetric).
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from prunelab.cost.export import _resolve_masks, export_onnx

    fmt = _check_choice("quant_format", quant_format, FORMATS)
    act = _check_choice("activation_type", activation_type, ACTIVATION_TYPES)
    method = _check_choice("calibrate_method", calibrate_method, CALIBRATION_METHODS)
    arrays = calibration_arrays(calibration_batches, num_batches, input_shape)
    resolved = _resolve_masks(model, masks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prunelab-int8-") as scratch:
        source = Path(fp32_path) if fp32_path is not None else Path(scratch) / "fp32.onnx"
        export_onnx(model, resolved, input_shape, source)
        source = _pre_process(source, Path(scratch) / "pre_processed.onnx")
        fp32_model = onnx.load(str(source))
        fp32_weights = {
            i.name: numpy_helper.to_array(i)
            for i in fp32_model.graph.initializer
            if len(i.dims) >= 2
        }
        located = _locate(fp32_weights, resolved)
        # Layers are reported under the model's parameter names where the export renamed them.
        names = {onnx_name: name for name, (onnx_name, _) in located.items()}
        weighted = {
            names.get(weight, weight): (weight, node, op)
            for weight, (node, op) in _weighted_nodes(fp32_model.graph).items()
        }
        wanted = {keep_fp32} if isinstance(keep_fp32, str) else {str(k) for k in keep_fp32}
        modules = {layer.rsplit(".", 1)[0]: layer for layer in weighted}
        unknown = wanted - set(weighted) - set(modules)
        if unknown:
            raise ConfigError(
                f"keep_fp32 names no weighted layer of the export: {', '.join(sorted(unknown))}"
            )
        excluded = {weighted[modules.get(k, k)][1] for k in wanted}
        quantize_static(
            str(source),
            str(path),
            _BatchReader(arrays),
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8 if act == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(excluded),
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    int8 = int8_weights(path)
    report = Int8Report(
        path=str(path),
        format=fmt,
        activation_type=act,
        calibration_method=method,
        calibration_batches=len(arrays),
        calibration_samples=sum(len(a) for a in arrays),
    )
    for layer, (weight, node, op_type) in weighted.items():
        if weight in int8:
            report.quantized[layer] = op_type
        else:
            report.fp32[layer] = _fp32_reason(op_type, node, fmt, excluded)
    _check_zeros(fp32_weights, int8)
    for name, (onnx_name, transposed) in located.items():
        pruned = ~resolved[name].numpy()
        if onnx_name not in int8:
            report.masks_checked[name] = -1  # left in fp32, zeros stored as 0.0
            continue
        real = int8[onnx_name].dequantize()
        if (real.T if transposed else real)[pruned].any():
            raise RuntimeError(f"int8 weight {onnx_name}: pruned positions are not exactly 0")
        report.masks_checked[name] = int(pruned.sum())
    if strict and report.fp32:
        path.unlink()
        raise ConfigError(f"int8 quantization incomplete (strict=True): {report.note}")
    _write_report(path, report)
    report.size_bytes = path.stat().st_size
    return Int8Model(path, report, threads)


def _pre_process(source: Path, target: Path) -> Path:
    """onnxruntime's recommended preparation (shape inference, graph optimisation; it keeps
    the weights' names) of ``source`` written to ``target``; ``source`` itself when it fails
    (the quantizer then works on the plain export)."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(source), str(target))
    except Exception:  # an exotic graph: quantize the export as it is
        return source
    return target


def _check_zeros(fp32: Mapping[str, np.ndarray], int8: Mapping[str, Int8Weight]) -> None:
    """Every weight that was 0.0 in the fp32 export is the zero-point, and every weight
    zero-point is 0, in the int8 file (so it dequantizes to exactly 0.0)."""
    for name, weight in int8.items():
        if np.any(weight.zero_point != 0):
            raise RuntimeError(f"int8 weight {name} has a non-zero zero-point: not symmetric")
        if name in fp32 and fp32[name].shape == weight.q.shape and weight.q[fp32[name] == 0].any():
            raise RuntimeError(f"int8 weight {name}: a weight that was 0.0 is not the integer 0")


def _write_report(path: Path, report: Int8Report) -> None:
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps({k: v for k, v in asdict(report).items() if k != "size_bytes"})
    onnx.save(proto, str(path))


def _read_report(path: Path) -> Int8Report | None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            report = Int8Report(**json.loads(prop.value))
            report.size_bytes = path.stat().st_size
            return report
    return None


def int8_weights(path: str | Path) -> dict[str, Int8Weight]:
    """The integer weights of a quantized ONNX file: ``{weight name: Int8Weight}``.

    A weight is an int8/uint8 initializer of >= 2 dimensions consumed as a quantized tensor
    (by a DequantizeLinear node in the QDQ format, by QGemm/QLinearConv/QLinearMatMul in the
    QOperator format), followed by its scale and zero-point. It is named as in the fp32
    export (onnxruntime's ``_quantized`` suffix removed), i.e. by the model's parameter name.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no ONNX file at {path}")
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    out: dict[str, Int8Weight] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" and node.op_type not in _QOPS_WEIGHT_AXIS:
            continue
        inputs = list(node.input)
        for pos, name in enumerate(inputs):
            init = inits.get(name)
            if (
                init is None
                or init.data_type not in (TensorProto.INT8, TensorProto.UINT8)
                or len(init.dims) < 2
                or pos + 1 >= len(inputs)
            ):
                continue
            q = numpy_helper.to_array(init)
            scale = numpy_helper.to_array(inits[inputs[pos + 1]])
            if pos + 2 < len(inputs) and inputs[pos + 2] in inits:
                zero = numpy_helper.to_array(inits[inputs[pos + 2]])
            else:
                zero = np.zeros_like(scale, dtype=q.dtype)
            axis = _weight_axis(node, q, scale)
            key = name[: -len("_quantized")] if name.endswith("_quantized") else name
            out[key] = Int8Weight(q=q, scale=scale, zero_point=zero, axis=axis)
    return out


def _weight_axis(node: Any, q: np.ndarray, scale: np.ndarray) -> int | None:
    """The per-channel axis of weight ``q`` read by ``node`` (None: one scale)."""
    if scale.size <= 1:
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "DequantizeLinear":
        axis = attrs["axis"].i if "axis" in attrs else 1
        return axis % q.ndim
    if node.op_type == "QGemm":
        trans_b = attrs["transB"].i if "transB" in attrs else 0
        return 0 if trans_b else 1
    fixed = _QOPS_WEIGHT_AXIS.get(node.op_type)
    if fixed is not None:
        return fixed
    matches = [d for d, n in enumerate(q.shape) if n == scale.size]
    return matches[0] if matches else None
