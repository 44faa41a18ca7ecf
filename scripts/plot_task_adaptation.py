"""Per-layer sparsity of the same model pruned on several tasks, side by side.

    python scripts/plot_task_adaptation.py RUN_A RUN_B [RUN ...]
    python scripts/plot_task_adaptation.py outputs/task_adaptation/fashion_mnist/adaptive \\
        outputs/task_adaptation/mnist1d/adaptive --at 0.9 --out outputs/task_adaptation/plot.png

Each RUN is a run folder (or its ``results.json``), typically a ``pruning=adaptive
distribution=sensitivity`` run whose curves were measured on its own task. From each
record it reads:

- the per-layer sparsity of the final masks, ``sparsity.layers`` (for an adaptive run the
  summary record holds the chosen sub-run's: ``adaptive.chosen`` names the point);
- the layer shapes, from the mask diagnostics (``sparsity.diagnostics.layers[*].shape``);
- when the run used ``distribution=sensitivity``, what the allocation chose at the run's
  sparsity (``sparsity.distribution.rates``) and its predicted accuracy drop, and the curves
  file it read (``sparsity.distribution.curves.path``).

It prints a Markdown table of the per-layer rates (one column per task), writes it beside
the plot (``.md``), and draws grouped bars: per-layer sparsity for each task, on a
``-log10(density)`` axis labelled in sparsity (0.9 and 0.99 as far apart as 0 and 0.9).
With ``--at S`` it also allocates each task's own curves at the common global sparsity
``S`` (the chosen sparsities usually differ between tasks, which alone changes every
layer's rate; at a common ``S`` only the curves differ) and adds those rates as a second
panel and as table columns. The PNG goes to ``--out`` or to ``task_adaptation.png`` in the
runs' common parent folder. Mistakes are one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = "results.json"
DEFAULT_NAME = "task_adaptation.png"


class UsageError(Exception):
    """A bad argument or an unreadable record: reported as one ``error:`` line."""


@dataclass
class TaskRates:
    """What one run's record says about its per-layer sparsity."""

    label: str
    run_dir: Path
    rates: dict[str, float]
    shapes: dict[str, list[int]]
    global_sparsity: float
    chosen: float | None = None
    val_drop: float | None = None
    dense_val_acc: float | None = None
    test_acc: float | None = None
    allocation: dict[str, float] = field(default_factory=dict)
    predicted_drop: float | None = None
    curves_path: str | None = None
    curves_reference: float | None = None
    at: dict[str, float] = field(default_factory=dict)

    def numel(self, layer: str) -> int | None:
        shape = self.shapes.get(layer)
        return math.prod(shape) if shape else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Plot and tabulate the per-layer sparsity of several runs (one per task)."
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders or results.json")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the dataset)")
    parser.add_argument(
        "--at",
        type=float,
        metavar="S",
        help="also allocate each run's sensitivity curves at this common global sparsity",
    )
    parser.add_argument(
        "--out", type=Path, help=f"PNG path (default: <common parent>/{DEFAULT_NAME})"
    )
    parser.add_argument("--title", help="figure title")
    return parser.parse_args(argv)


def read_record(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(run folder, record)`` of a run folder or a ``results.json``."""
    path = Path(path)
    file = path if path.suffix == ".json" else path / RESULTS
    try:
        record = json.loads(file.read_text())
    except OSError as err:
        raise UsageError(f"cannot read {file} ({err.strerror or err}); give a run folder") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{file} is not JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{file} is not a results record")
    return file.parent, record


def _dataset_label(record: Mapping[str, Any]) -> str:
    choice = (record.get("choices") or {}).get("dataset")
    if choice:
        return str(choice)
    target = (((record.get("config") or {}).get("dataset")) or {}).get("_target_", "")
    return target.rsplit(".", 1)[-1].removesuffix("DataModule") or "run"


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def task_rates(run_dir: Path, record: Mapping[str, Any], label: str | None = None) -> TaskRates:
    """The per-layer sparsity and what the allocation chose, from one record."""
    status = record.get("status")
    sparsity = record.get("sparsity") or {}
    layers = sparsity.get("layers")
    if status != "completed" or not layers:
        raise UsageError(
            f"{run_dir} is not a completed run with per-layer sparsity (status {status!r})"
        )
    diag = (sparsity.get("diagnostics") or {}).get("layers") or {}
    adaptive = record.get("adaptive") or {}
    chosen = adaptive.get("chosen") or {}
    distribution = sparsity.get("distribution") or {}
    curves = distribution.get("curves") or {}
    metrics = record.get("metrics") or {}
    return TaskRates(
        label=label or _dataset_label(record),
        run_dir=run_dir,
        rates={str(n): float(v) for n, v in layers.items()},
        shapes={str(n): list(d["shape"]) for n, d in diag.items() if d.get("shape")},
        global_sparsity=float(sparsity.get("global", 0.0)),
        chosen=_float(chosen.get("sparsity", sparsity.get("target"))),
        val_drop=_float(chosen.get("drop")),
        dense_val_acc=_float(adaptive.get("dense_val_acc")),
        test_acc=_float(metrics.get("test/acc")),
        allocation={str(n): float(v) for n, v in (distribution.get("rates") or {}).items()},
        predicted_drop=_float(distribution.get("predicted_drop")),
        curves_path=curves.get("path"),
        curves_reference=_float(curves.get("reference")),
    )


def allocate_at(task: TaskRates, target: float) -> dict[str, float]:
    """Per-layer sparsities the task's own sensitivity curves give at ``target``."""
    from prunelab.analysis.sensitivity import load_curves
    from prunelab.errors import ConfigError

    if not task.curves_path:
        raise UsageError(
            f"--at needs sensitivity curves, but {task.run_dir} did not use "
            "distribution=sensitivity"
        )
    sizes = {n: task.numel(n) or 0 for n in task.rates}
    try:
        curves, _ = load_curves(task.curves_path)
        return curves.allocate(target, sizes if all(sizes.values()) else None)
    except ConfigError as err:
        raise UsageError(f"{task.run_dir}: {err}") from None


def _unique_labels(tasks: list[TaskRates]) -> None:
    seen: dict[str, int] = {}
    for task in tasks:
        seen[task.label] = seen.get(task.label, 0) + 1
    count: dict[str, int] = {}
    for task in tasks:
        if seen[task.label] > 1:
            count[task.label] = count.get(task.label, 0) + 1
            task.label = f"{task.label} ({count[task.label]})"


def layer_order(tasks: Sequence[TaskRates]) -> list[str]:
    """Every layer of every run, in the order the runs list them."""
    order: list[str] = []
    for task in tasks:
        order += [n for n in task.rates if n not in order]
    return order


def _shape_text(shape: list[int] | None) -> str:
    if not shape:
        return "-"
    out, rest = shape[0], shape[1:]
    return f"{'x'.join(str(d) for d in rest)}→{out}" if rest else str(out)


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def rates_table(tasks: Sequence[TaskRates], at: float | None = None) -> str:
    """Markdown: one row per layer; per task its shape, mask sparsity and (with ``at``) the
    allocation at the common sparsity; then the runs' global figures."""
    head = ["layer"]
    for t in tasks:
        head += [f"{t.label} shape", f"{t.label} sparsity"]
        if at is not None:
            head.append(f"{t.label} at {at:g}")
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]

    def row(name: str, cells: list[str]) -> None:
        lines.append("| " + " | ".join([name, *cells]) + " |")

    for layer in layer_order(tasks):
        cells: list[str] = []
        for t in tasks:
            rate = t.rates.get(layer)
            cells += [_shape_text(t.shapes.get(layer)), "-" if rate is None else f"{rate:.4f}"]
            if at is not None:
                value = t.at.get(layer)
                cells.append("-" if value is None else f"{value:.4f}")
        row(layer, cells)

    def summary(name: str, values: list[str], at_values: list[str] | None = None) -> None:
        cells: list[str] = []
        for i, value in enumerate(values):
            cells += ["", value]
            if at is not None:
                cells.append(at_values[i] if at_values else "")
        row(f"*{name}*", cells)

    summary(
        "global",
        [f"{t.global_sparsity:.4f}" for t in tasks],
        [f"{at:.4f}" for _ in tasks] if at is not None else None,
    )
    if any(t.predicted_drop is not None for t in tasks):
        summary("predicted drop (sum of layers, points)", [_pct(t.predicted_drop) for t in tasks])
    if any(t.dense_val_acc is not None for t in tasks):
        summary("dense val acc (%)", [_pct(t.dense_val_acc) for t in tasks])
        summary("val drop at the chosen point (points)", [_pct(t.val_drop) for t in tasks])
    summary("test acc (%)", [_pct(t.test_acc) for t in tasks])
    return "\n".join(lines) + "\n"


def _y(sparsity: float) -> float:
    return -math.log10(max(1.0 - float(sparsity), 1e-4))


def plot(
    tasks: Sequence[TaskRates], out: Path, at: float | None = None, title: str | None = None
) -> Path:
    """Grouped bars of per-layer sparsity, one colour per task (and a panel at ``at``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = layer_order(tasks)
    panels = [("final masks", lambda t: t.rates)]
    if at is not None:
        panels.append(
            (f"allocation of each task's curves at global sparsity {at:g}", lambda t: t.at)
        )
    fig = Figure(figsize=(max(6.0, 1.6 * len(layers) * len(tasks) / 2 + 3), 4.2 * len(panels)))
    FigureCanvasAgg(fig)
    width = 0.8 / len(tasks)
    top = max([_y(v) for t in tasks for rates in (t.rates, t.at) for v in rates.values()] + [1.0])
    ticks = [s for s in (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999) if _y(s) <= top + 0.3]
    for p, (name, pick) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, p + 1)
        for i, task in enumerate(tasks):
            rates = pick(task)
            xs = [
                j + (i - (len(tasks) - 1) / 2) * width for j, n in enumerate(layers) if n in rates
            ]
            vals = [rates[n] for n in layers if n in rates]
            glob = task.global_sparsity if p == 0 else at
            bars = ax.bar(
                xs, [_y(v) for v in vals], width, label=f"{task.label} (global {glob:.4g})"
            )
            for bar, value in zip(bars, vals, strict=True):
                ax.annotate(
                    f"{value:.3f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        labels = []
        for layer in layers:
            shapes = dict.fromkeys(_shape_text(t.shapes.get(layer)) for t in tasks)
            labels.append(f"{layer}\n{' / '.join(shapes)}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_yticks([_y(s) for s in ticks])
        ax.set_yticklabels([f"{s:g}" for s in ticks], fontsize=8)
        ax.set_ylim(0, top * 1.12 + 0.05)
        ax.set_ylabel("layer sparsity")
        ax.set_title(name, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title or "Per-layer sparsity by task", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def default_out(run_dirs: Sequence[Path]) -> Path:
    """``task_adaptation.png`` in the runs' common parent folder."""
    parents = [str(Path(d).resolve().parent) for d in run_dirs]
    try:
        common = Path(os.path.commonpath(parents))
    except ValueError:  # different drives
        common = Path(parents[0])
    return common / DEFAULT_NAME


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.labels and len(args.labels) != len(args.runs):
            raise UsageError(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
        if args.at is not None and not 0.0 <= args.at < 1.0:
            raise UsageError(f"--at must be a sparsity in [0, 1), got {args.at}")
        tasks = []
        for i, run in enumerate(args.runs):
            run_dir, record = read_record(run)
            tasks.append(task_rates(run_dir, record, args.labels[i] if args.labels else None))
        _unique_labels(tasks)
        if args.at is not None:
            for task in tasks:
                task.at = allocate_at(task, args.at)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = rates_table(tasks, args.at)
    out = args.out or default_out([t.run_dir for t in tasks])
    plot(tasks, out, args.at, args.title)
    out.with_suffix(".md").write_text(table)
    print(table, end="")
    for task in tasks:
        if (
            task.curves_path
            and task.dense_val_acc is not None
            and task.curves_reference is not None
        ):
            same = abs(task.curves_reference - task.dense_val_acc) < 1e-6
            print(
                f"{task.label}: curves {task.curves_path} measured at val acc "
                f"{100 * task.curves_reference:.2f}, the search's dense stage reached "
                f"{100 * task.dense_val_acc:.2f}" + (" (equal)" if same else " (they differ)")
            )
    print(f"wrote {out.with_suffix('.md')}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
