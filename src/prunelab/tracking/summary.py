"""The short table printed at the end of every run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt_pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


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
        ("target sparsity", "-" if method == "dense" else f"{config.get('sparsity')}"),
        ("final sparsity", f"{sparsity.get('global', 0.0):.4f}"),
        ("test accuracy", _fmt_pct(metrics.get("test/acc"))),
        ("best val accuracy", _fmt_pct(metrics.get("val/acc_best"))),
        ("parameters", f"{n_params:,} ({n_prunable:,} prunable)" if n_params else "?"),
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
