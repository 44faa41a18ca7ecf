"""The run's quantization step: after pruning and fine-tuning, quantize the model with its
masks kept and measure what that gives (the ``quantize`` config group).

- ``none`` (default): nothing.
- ``int8_ptq``: post-training static int8 quantization through onnxruntime
  (:func:`prunelab.quantize.quantize_int8`: symmetric per-channel int8 weights, so the masked
  weights are the integer 0; activations calibrated on ``quantize.calibration_batches``
  training batches).
- ``qat``: quantization-aware fine-tuning for ``quantize.epochs`` passes over the training
  batches (:func:`prunelab.quantize.qat_finetune`: fake quantization matching the int8
  scheme, Adam at ``quantize.lr``, the masked weights set to zero after every step), then the
  same int8 conversion.
- ``deep_compression``: Han et al. 2016 (:mod:`prunelab.quantize.deep_compression`): k-means
  weight sharing per layer at ``quantize.bits`` (linear initialisation), centroid fine-tuning
  for ``quantize.epochs``, then the sparse model stored with relative indices and Huffman
  coding; the file's size is measured against the dense fp32 file.

Everything is measured on the run's test split and on this machine: accuracy through the
runtime that runs the quantized model (onnxruntime for int8, torch for the shared weights),
the sizes of the files written under ``<run>/quantize/``, and the onnxruntime latency of the
fp32 and int8 models at the cost report's batch sizes. The figures go to the record's
``cost`` (so to W&B under ``cost/`` and to the summary) and the details to its ``quantize``
block. This module is the glue between the pure-torch :mod:`prunelab.quantize` and a run; it
does not import Lightning.
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from prunelab import files
from prunelab.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("none", "int8_ptq", "qat", "deep_compression")


def check_quantize(settings: Mapping[str, Any] | None) -> str:
    """Validate the ``quantize`` group before training; return the method name.

    One-line ConfigError for an unknown method, ``qat`` with ``epochs`` < 1, ``bits``
    outside 2..8, or ``calibration_batches`` < 1.
    """
    settings = dict(settings or {})
    name = str(settings.get("name", "none"))
    if name not in METHODS:
        raise ConfigError(f"unknown quantize={name!r}; choose one of {', '.join(METHODS)}")
    if name == "none":
        return name

    def positive_int(key: str, minimum: int, hint: str) -> int:
        value = settings.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"quantize.{key}={value!r} with quantize={name}: {hint}")
        return value

    if name in ("int8_ptq", "qat"):
        positive_int(
            "calibration_batches", 1, "needs at least 1 batch to calibrate the activation ranges"
        )
    if name == "qat":
        positive_int(
            "epochs",
            1,
            "quantization-aware fine-tuning needs at least 1 epoch "
            "(quantize=int8_ptq quantizes without fine-tuning)",
        )
    if name == "deep_compression":
        bits = settings.get("bits")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ConfigError(
                f"quantize.bits={bits!r}: k-means weight sharing takes 2..8 bits per weight "
                "(Deep Compression used 5 for fully connected layers, 8 for convolutions)"
            )
        positive_int("epochs", 0, "centroid fine-tuning epochs must be an int >= 0")
    lr = settings.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
        raise ConfigError(f"quantize.lr={lr!r} must be a positive number")
    return name


def _ort_latencies(
    runners: Mapping[str, Any],
    input_shape: tuple[int, ...],
    batch_sizes: Iterable[int],
    rounds: int = 5,
    repeats: int = 7,
) -> dict[str, float]:
    """Median latency (ms) of each runner per batch size, timed in alternating rounds so
    background load hits all of them alike: ``{"latency_ms/<name>/b<batch>": ms}``."""
    from prunelab.cost.latency import time_call

    out: dict[str, float] = {}
    device = torch.device("cpu")
    for batch in batch_sizes:
        x = torch.randn(int(batch), *input_shape)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                stats = time_call(lambda run=run, x=x: run(x), device, repeats=repeats, warmup=2)
                times[name].append(stats["latency_ms"])
        for name, values in times.items():
            out[f"latency_ms/{name}/b{batch}"] = statistics.median(values)
    return out


def _accuracy(predict: Any, batches: list) -> float:
    from prunelab.evaluate import accuracy

    return accuracy(predict, batches)


def _int8_figures(
    model: torch.nn.Module,
    masks: Mapping[str, torch.Tensor],
    calibration: list,
    test: list,
    input_shape: tuple[int, ...],
    out_dir: Path,
    settings: Mapping[str, Any],
    batch_sizes: Iterable[int],
    measure_latency: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize ``model`` to int8 (onnxruntime), test and time it against its fp32 export."""
    from prunelab.quantize import OnnxModel, quantize_int8

    fp32_path = out_dir / files.QUANT_FP32_ONNX
    int8 = quantize_int8(
        model,
        masks,
        calibration,
        input_shape,
        out_dir / files.QUANT_INT8_ONNX,
        num_batches=int(settings.get("calibration_batches", 16)),
        fp32_path=fp32_path,
        threads=torch.get_num_threads(),
    )
    fp32 = OnnxModel(fp32_path, threads=torch.get_num_threads())
    acc_fp32 = _accuracy(fp32, test)
    acc_int8 = _accuracy(int8, test)
    cost: dict[str, Any] = {
        "quant_accuracy_fp32_onnx": acc_fp32,
        "quant_accuracy_int8": acc_int8,
        "quant_accuracy_drop_int8": acc_fp32 - acc_int8,
        "bytes_onnx_fp32": fp32_path.stat().st_size,
        "bytes_onnx_int8": int8.report.size_bytes,
        "quant_masked_nonzero_int8": 0,  # quantize_int8 raises otherwise
        "quant_layers_fp32": len(int8.report.fp32),
    }
    if measure_latency:
        lat = _ort_latencies({"onnx_fp32": fp32, "onnx_int8": int8}, input_shape, batch_sizes)
        cost.update(lat)
        for batch in batch_sizes:
            f, i = lat[f"latency_ms/onnx_fp32/b{batch}"], lat[f"latency_ms/onnx_int8/b{batch}"]
            cost[f"int8_speedup/b{batch}"] = f / i if i else None
        cost["latency_threads_onnx"] = torch.get_num_threads()
    detail = {"int8": int8.report.as_dict(), "files": {"fp32_onnx": str(fp32_path)}}
    detail["files"]["int8_onnx"] = int8.report.path
    return cost, detail


def run_quantization(
    settings: Mapping[str, Any],
    model: torch.nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    datamodule: Any,
    run_dir: Path,
    *,
    test_accuracy: float | None = None,
    lr: float | None = None,
    measure_latency: bool = True,
    batch_sizes: Iterable[int] = (1, 256),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize the run's final ``model`` as ``settings`` (the ``quantize`` group) says.

    Returns ``(cost, detail)``: scalar figures for the record's ``cost`` (and W&B ``cost/``)
    and the record's ``quantize`` block (what was done, per-layer reports, file paths).
    ``model`` is not changed (QAT and weight sharing work on a copy). ``test_accuracy`` is
    the fp32 sparse model's test accuracy (torch), for the drops; ``lr`` the run's learning
    rate (the fine-tuning default is a tenth of it, Adam: ``quantize.lr`` overrides).
    """
    name = check_quantize(settings)
    if name == "none":
        return {}, {}
    out_dir = files.quantize_dir(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).cpu().eval()
    masks = {k: v.detach().cpu().bool() for k, v in (masks or {}).items()}
    input_shape = tuple(datamodule.input_shape)
    calibration = list(datamodule.train_dataloader())
    test = list(datamodule.test_dataloader())
    ft_lr = float(settings.get("lr") or (0.1 * lr if lr else 1e-4))
    detail: dict[str, Any] = {"method": name}
    cost: dict[str, Any] = {}
    if test_accuracy is not None:
        cost["quant_accuracy_fp32"] = test_accuracy
    if name == "qat":
        from prunelab.quantize import qat_finetune

        epochs = int(settings["epochs"])
        optimizer = lambda params: torch.optim.Adam(params, lr=ft_lr)  # noqa: E731
        result = qat_finetune(model, masks, calibration, epochs, optimizer_factory=optimizer)
        model = result.model
        cost["quant_accuracy_fp32_after_qat"] = _accuracy(model, test)
        detail["qat"] = {"epochs": epochs, "lr": ft_lr, "optimizer": "adam"}
    if name in ("int8_ptq", "qat"):
        figures, more = _int8_figures(
            model,
            masks,
            calibration,
            test,
            input_shape,
            out_dir,
            settings,
            batch_sizes,
            measure_latency,
        )
        cost.update(figures)
        detail.update(more)
        if test_accuracy is not None:
            cost["quant_accuracy_drop"] = test_accuracy - figures["quant_accuracy_int8"]
    if name == "deep_compression":
        cost_dc, more = _deep_compression(model, masks, calibration, test, out_dir, settings, ft_lr)
        cost.update(cost_dc)
        detail.update(more)
        if test_accuracy is not None:
            cost["quant_accuracy_drop"] = test_accuracy - cost_dc["quant_accuracy_shared"]
    log.info("quantize=%s: %s", name, _summary_line(cost))
    return cost, detail


def _deep_compression(
    model: torch.nn.Module,
    masks: Mapping[str, torch.Tensor],
    batches: list,
    test: list,
    out_dir: Path,
    settings: Mapping[str, Any],
    lr: float,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Weight sharing, centroid fine-tuning, the compressed file written, read back, tested."""
    from prunelab.quantize.deep_compression import (
        finetune_centroids,
        load_compressed,
        save_compressed,
        share_weights,
    )

    bits = int(settings["bits"])
    epochs = int(settings.get("epochs", 1))
    shared = share_weights(model, masks, bits)
    cost: dict[str, Any] = {"quant_accuracy_shared_before_finetune": _accuracy(model, test)}
    if epochs:
        finetune_centroids(model, shared, batches, epochs=epochs, lr=lr)
    path = out_dir / files.DEEP_COMPRESSION
    index_bits = settings.get("index_bits")
    report = save_compressed(
        model, masks, shared, path, index_bits=dict(index_bits) if index_bits else None
    )
    reloaded = load_compressed(path, copy.deepcopy(model)).eval()
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )
    if not same:
        raise RuntimeError(f"{path} did not read back to the weights it was written from")
    cost.update(
        {
            "quant_accuracy_shared": _accuracy(reloaded, test),
            "bytes_deep_compression": report.bytes_total,
            "bytes_dense_file": report.dense_file_bytes,
            "deep_compression_ratio": report.ratio_vs_dense_file,
            "deep_compression_ratio_fp32": report.ratio_vs_fp32,
        }
    )
    detail = {
        "deep_compression": {
            "bits": bits,
            "centroid_epochs": epochs,
            "lr": lr,
            "parts": report.parts,
            "fillers": report.n_fillers,
            "coding": report.coding,
        },
        "files": {"deep_compression": str(path)},
    }
    return cost, detail


def _summary_line(cost: Mapping[str, Any]) -> str:
    keys = (
        "quant_accuracy_int8",
        "quant_accuracy_shared",
        "bytes_onnx_int8",
        "deep_compression_ratio",
        "int8_speedup/b256",
    )
    return ", ".join(f"{k} {cost[k]:.4g}" for k in keys if cost.get(k) is not None)
