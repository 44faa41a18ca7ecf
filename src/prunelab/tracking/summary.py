"""The short table printed at the end of every run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _target_text(method: str, config: dict, sparsity: dict) -> str:
    if method == "dense":
        return "-"
    threshold = sparsity.get("threshold")
    if threshold:
        return f"none (threshold {threshold['value']:g}, {threshold['mode']})"
    return f"{config.get('sparsity')}"


def _fmt_pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


def _count(value: float) -> str:
    """Counts below a million in full (3,000), larger ones in scientific notation (1.99e+09)."""
    return f"{value:,.0f}" if abs(value) < 1e6 else f"{value:.3g}"


def _cost_rows(cost: dict[str, Any]) -> list[tuple[str, str]]:
    if not cost:
        return []
    rows = [
        (
            "inference FLOPs",
            f"{_count(cost['flops_infer_sparse'])} / sample "
            f"({cost.get('theoretical_speedup', 1.0):.2f}x fewer than dense)",
        ),
        (
            "size",
            f"{cost['bytes_csr'] / 1024:.1f} KiB sparse (CSR) vs "
            f"{cost['bytes_dense_fp32'] / 1024:.1f} KiB dense",
        ),
    ]
    if "flops_train_x_dense" in cost:
        rows.append(
            (
                "training FLOPs",
                f"{cost['flops_train']:.3g} ({cost['flops_train_x_dense']:.2f}x dense)",
            )
        )
    if "macs_dynamic_mean" in cost:  # input-adaptive (fbs): what inputs really spend
        text = (
            f"{_count(cost['macs_dynamic_mean'])} MACs / input on average "
            f"({cost['macs_dynamic_x_dense']:.2f}x fewer than dense; p50 "
            f"{_count(cost['macs_dynamic_p50'])}, p99 {_count(cost['macs_dynamic_p99'])})"
        )
        rows.append(("dynamic execution", text))
        if cost.get("dynamic_speedup_b1") is not None:
            rows.append(
                (
                    "dynamic latency b1",
                    f"{cost['latency_ms/dynamic/b1']:.3f} ms vs "
                    f"{cost['latency_ms/dense_plain/b1']:.3f} ms dense "
                    f"({cost['dynamic_speedup_b1']:.2f}x)",
                )
            )
    dense, sparse = cost.get("latency_ms/dense/b256"), cost.get("latency_ms/sparse/b256")
    if dense is not None and sparse is not None:
        value = f"{sparse:.3f} ms sparse vs {dense:.3f} ms dense{_latency_note(cost)}"
        rows.append(("latency b256", value))
    return rows + _quantize_rows(cost)


def _quantize_rows(cost: dict[str, Any]) -> list[tuple[str, str]]:
    """The quantization step's figures (conf/quantize), when the run has them."""
    rows = []
    if "quant_accuracy_int8" in cost:
        text = f"{_fmt_pct(cost['quant_accuracy_int8'])} test accuracy, "
        text += f"{cost['bytes_onnx_int8'] / 1024:.1f} KiB ONNX"
        speedup = cost.get("int8_speedup/b256")
        if speedup is not None:
            text += f", {speedup:.2f}x fp32 speed at b256 (onnxruntime)"
        rows.append(("int8", text))
    if "deep_compression_ratio" in cost:
        rows.append(
            (
                "deep compression",
                f"{_fmt_pct(cost['quant_accuracy_shared'])} test accuracy, "
                f"{cost['bytes_deep_compression'] / 1024:.1f} KiB file, "
                f"{cost['deep_compression_ratio']:.1f}x smaller than the dense fp32 file",
            )
        )
    return rows


def _latency_note(cost: dict[str, Any]) -> str:
    """How the latency was measured: `` (2 threads, under load: parallel sweep)``, or ``''``
    for records that do not say."""
    parts = []
    threads = cost.get("latency_threads")
    if threads is not None:
        parts.append(f"{threads} thread{'' if threads == 1 else 's'}")
    if cost.get("latency_under_load"):
        parts.append("under load: parallel sweep")
    return f" ({', '.join(parts)})" if parts else ""


def summary_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The (label, value) rows of a run's summary, read from its results record."""
    choices = record.get("choices", {})
    config = record.get("config", {})
    metrics = record.get("metrics", {})
    sparsity = record.get("sparsity", {})
    method = config.get("pruning", {}).get("name", choices.get("pruning", "?"))
    n_params, n_prunable = record.get("n_params"), record.get("n_prunable")
    return [
        ("dataset", str(choices.get("dataset", "?"))),
        ("model", str(choices.get("model", "?"))),
        ("method", str(method)),
        ("target sparsity", _target_text(method, config, sparsity)),
        ("final sparsity", f"{sparsity.get('global', 0.0):.4f}"),
        ("test accuracy", _fmt_pct(metrics.get("test/acc"))),
        ("best val accuracy", _fmt_pct(metrics.get("val/acc_best"))),
        ("parameters", f"{n_params:,} ({n_prunable:,} prunable)" if n_params else "?"),
        *_cost_rows(record.get("cost") or {}),
        ("wall time", f"{record.get('wall_time_s', 0.0):.1f} s"),
        ("output dir", str(record.get("run_dir", "?"))),
    ]


def print_summary(record: dict[str, Any], console: Console | None = None) -> None:
    """Print the end-of-run summary table to the terminal."""
    table = Table(title=f"prunelab run: {record.get('status', '?')}", show_header=False)
    table.add_column(style="bold cyan")
    table.add_column()
    for label, value in summary_rows(record):
        table.add_row(label, value)
    (console or Console()).print(table)
