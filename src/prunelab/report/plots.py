"""Trade-off figures from many records: accuracy vs sparsity, accuracy vs training FLOPs,
the sparsity curves (global sparsity, mask turnover, ITOP rate) of every run, and the Pareto
front of accuracy against a cost (any sweep, e.g. a multi-objective Optuna search).

Each function writes one PNG and returns its path, or None when the records hold nothing
to draw (no completed run, no FLOPs field, no sparsity curve). Error bars are the sample
standard deviation over seeds, as in the tables. Figures are drawn with matplotlib's
object API on its Agg canvas (``Figure.savefig``), so no display and no pyplot state is
involved, whatever backend the caller uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from prunelab.report.records import DENSE, Record
from prunelab.report.table import FAILED, MISSING, RUNNING, Table, aggregate, sort_key

FLOPS_TRAIN = "cost.flops_train"
CURVE_KEYS = (
    ("sparsity/global", "global sparsity"),
    ("mask/turnover", "mask turnover"),
    ("mask/itop_rate", "ITOP rate (ever active)"),
)
_LINESTYLES = ("-", "--", ":", "-.")


def _label(value: Any) -> str:
    return "?" if value is None else str(value)


def _colours(names: list[str], group: str) -> dict[str, str]:
    """One colour per method, the same in every figure: black for dense, then C0, C1, ..."""
    ordered = sorted(set(names), key=lambda name: sort_key(group, name))
    others = [n for n in ordered if n != DENSE]
    return {DENSE: "black", **{n: f"C{i % 10}" for i, n in enumerate(others)}}


# Beyond this many sparsities the x axis becomes log(density), labelled at these values.
MAX_SPARSITY_TICKS = 10
SPARSITY_TICKS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


def _log_density(x: Any) -> Any:
    """Sparsity -> -log10(density): 0% -> 0, 90% -> 1, 99% -> 2."""
    return -np.log10(np.clip(1.0 - np.asarray(x, dtype=float), 1e-12, None))


def _from_log_density(y: Any) -> Any:
    return 1.0 - np.power(10.0, -np.asarray(y, dtype=float))


def _series(table: Table, extra: str | None = None) -> dict[str, dict[str, Any]]:
    """Per row (method): x (sparsity or the extra), y = mean, yerr = std, dense flag."""
    out: dict[str, dict[str, Any]] = {}
    for row in table.row_keys:
        points = []
        dense = False
        for col in table.col_keys:
            cell = table.cells.get((row, col))
            if cell is None or cell.status in (MISSING, FAILED, RUNNING):
                continue
            x = cell.extras.get(extra) if extra else col[0]
            if x is None:
                continue
            dense = dense or cell.shared or cell.dense
            points.append((float(x), cell.mean, cell.std or 0.0))
        if dense:  # one value repeated over the sparsity columns: keep one point
            points = points[:1]
        if points:
            points.sort()
            out[_label(row[0])] = {
                "x": [p[0] for p in points],
                "y": [p[1] for p in points],
                "yerr": [p[2] for p in points],
                "dense": dense,
            }
    return out


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy_vs_sparsity(
    records: list[Record],
    path: str | Path,
    metric: str = "test/acc",
    group: str = "pruning",
    scale: float = 100,
) -> Path | None:
    """``metric`` (mean ± std over seeds) against sparsity, one line per ``group`` value.

    The dense baseline is a horizontal line with a band of ± one std.
    """
    series = _series(aggregate(records, [group], ["sparsity"], metric))
    if not series:
        return None
    fig, ax = _figure(6, 4)
    xs = sorted({x for s in series.values() if not s["dense"] for x in s["x"]})
    colours = _colours(list(series), group)
    for name, s in series.items():
        y = [v * scale for v in s["y"]]
        err = [v * scale for v in s["yerr"]]
        colour = colours.get(name, "black")
        if s["dense"] and xs:
            ax.axhline(y[0], color=colour, linestyle="--", linewidth=1, label=name)
            ax.axhspan(y[0] - err[0], y[0] + err[0], color=colour, alpha=0.1)
        else:
            ax.errorbar(s["x"], y, yerr=err, color=colour, marker="o", capsize=3, label=name)
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{metric}" + (" (%)" if scale == 100 else ""))
    if len(xs) > MAX_SPARSITY_TICKS:
        # Many levels (an IMP run): a density axis on a log scale, as lottery-ticket plots
        # draw it, labelled at round sparsities.
        ax.set_xscale("function", functions=(_log_density, _from_log_density))
        xs = [x for x in SPARSITY_TICKS if min(xs) - 1e-9 <= x <= max(xs) + 1e-9]
    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{100 * x:g}%" for x in xs])
    ax.grid(alpha=0.3)
    ax.legend(title=group)
    ax.set_title(f"{metric} vs sparsity (mean ± std over seeds)")
    return _save(fig, path)


def plot_accuracy_vs_flops(
    records: list[Record],
    path: str | Path,
    metric: str = "test/acc",
    flops_key: str = FLOPS_TRAIN,
    group: str = "pruning",
    scale: float = 100,
) -> Path | None:
    """``metric`` against ``flops_key`` (log scale), one line per method over sparsities.

    Returns None (draws nothing) when no completed run has the FLOPs field.
    """
    table = aggregate(records, [group], ["sparsity"], metric, extra_metrics=(flops_key,))
    series = _series(table, extra=flops_key)
    if not series:
        return None
    fig, ax = _figure(6, 4)
    colours = _colours(list(series), group)
    for name, s in series.items():
        y = [v * scale for v in s["y"]]
        err = [v * scale for v in s["yerr"]]
        marker = "*" if s["dense"] else "o"
        colour = colours.get(name, "black")
        ax.errorbar(
            s["x"], y, yerr=err, color=colour, marker=marker, markersize=8, capsize=3, label=name
        )
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(flops_key)
    ax.set_ylabel(f"{metric}" + (" (%)" if scale == 100 else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(title=group)
    ax.set_title(f"{metric} vs {flops_key.rsplit('.', 1)[-1]}")
    return _save(fig, path)


def plot_sparsity_curves(
    records: list[Record], path: str | Path, group: str = "pruning"
) -> Path | None:
    """Every run's sparsity curve overlaid: global sparsity, mask turnover and ITOP rate
    against the optimizer step; one colour per ``group`` value, one line style per target
    sparsity. Returns None when no run has a curve.
    """
    runs = [r for r in records if r.completed and r.data.get("sparsity_curve")]
    if not runs:
        return None
    colours = _colours([_label(r.get(group)) for r in runs], group)
    levels = sorted({float(r.get("sparsity") or 0.0) for r in runs})
    styles = {s: _LINESTYLES[i % len(_LINESTYLES)] for i, s in enumerate(levels)}
    fig, axes = _figure(5 * len(CURVE_KEYS), 3.6, ncols=len(CURVE_KEYS))
    axes = list(axes.flat)
    labelled: set[str] = set()
    for record in runs:
        name = _label(record.get(group))
        level = float(record.get("sparsity") or 0.0)
        label = f"{name} {100 * level:g}%"
        points = [p for p in record.data["sparsity_curve"] if isinstance(p, dict)]
        steps = [p.get("step", i) for i, p in enumerate(points)]
        for ax, (key, _) in zip(axes, CURVE_KEYS, strict=True):
            ys = [p.get(key) for p in points]
            if all(y is None for y in ys):
                continue
            ax.plot(
                steps,
                [float("nan") if y is None else y for y in ys],
                color=colours[name],
                linestyle=styles[level],
                marker=".",
                alpha=0.7,
                label=None if label in labelled else label,
            )
        labelled.add(label)
    for ax, (_, title) in zip(axes, CURVE_KEYS, strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return _save(fig, path)


def pareto_front(points: Sequence[Sequence[Any]]) -> list[Sequence[Any]]:
    """The points no other point dominates, for minimising x and maximising y.

    Each point is a sequence whose first two items are x (a cost) and y (a score); further
    items ride along (a record, a label). A point is dominated when another has x <= and
    y >= with at least one strict. The front comes sorted by x (so y increases along it);
    points with equal x and y are all kept, in their input order; a point whose x or y is
    None or NaN is left out. Pure: the points are returned, not copied.
    """

    def usable(value: Any) -> bool:
        return value is not None and not isinstance(value, bool) and float(value) == float(value)

    valid = [p for p in points if usable(p[0]) and usable(p[1])]
    ordered = sorted(valid, key=lambda p: (float(p[0]), -float(p[1])))  # stable: ties keep order
    front: list[Sequence[Any]] = []
    for point in ordered:
        x, y = float(point[0]), float(point[1])
        if not front:
            front.append(point)
            continue
        last_x, last_y = float(front[-1][0]), float(front[-1][1])
        if y > last_y or (y == last_y and x == last_x):
            front.append(point)
    return front


def _cost_name(cost_key: str) -> str:
    """'cost.flops_train' or 'cost/flops_train' -> 'flops_train'."""
    for prefix in ("cost.", "cost/"):
        if cost_key.startswith(prefix):
            return cost_key[len(prefix) :]
    return cost_key


def pareto_points(
    records: list[Record], metric: str, cost_key: str
) -> list[tuple[float, float, Record]]:
    """(cost, metric, record) of every completed record that has both numbers."""
    points = []
    for record in records:
        if not record.completed:
            continue
        x, y = record.number(cost_key), record.number(metric)
        if x is not None and y is not None and not (math.isnan(x) or math.isnan(y)):
            points.append((x, y, record))
    return points


def _trial_label(record: Record, group: str) -> str:
    sparsity = record.number("sparsity")
    level = "" if sparsity is None or record.is_dense else f" {100 * sparsity:.3g}%"
    return f"{_label(record.get(group))}{level}"


def plot_pareto(
    records: list[Record],
    path: str | Path,
    metric: str = "test/acc",
    cost_key: str = FLOPS_TRAIN,
    group: str = "pruning",
    scale: float = 100,
) -> Path | None:
    """``metric`` against ``cost_key`` for every completed run (dots, one colour per
    ``group`` value) and their Pareto front (maximise the metric, minimise the cost) as a
    step line through the front's runs, each labelled with its method and sparsity. The x
    axis is logarithmic when the costs span more than a decade. Returns None when no
    completed run has both values.
    """
    points = pareto_points(records, metric, cost_key)
    if not points:
        return None
    front = pareto_front(points)
    fig, ax = _figure(7, 4.5)
    names = [_label(r.get(group)) for _, _, r in points]
    colours = _colours(names, group)
    for name in sorted(set(names), key=lambda n: sort_key(group, n)):
        mine = [(x, y) for (x, y, _), n in zip(points, names, strict=True) if n == name]
        ax.scatter(
            [x for x, _ in mine],
            [y * scale for _, y in mine],
            color=colours.get(name, "black"),
            alpha=0.6,
            s=25,
            label=name,
        )
    fx = [p[0] for p in front]
    fy = [p[1] * scale for p in front]
    ax.step(fx, fy, where="post", color="black", linewidth=1.2, label="Pareto front")
    ax.scatter(fx, fy, facecolors="none", edgecolors="black", s=80, linewidths=1.2)
    for x, y, record in front:
        ax.annotate(
            _trial_label(record, group),
            (x, y * scale),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize="x-small",
        )
    xs = [p[0] for p in points]
    if min(xs) > 0 and max(xs) > 10 * min(xs):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{cost_key} (lower is better)")
    ax.set_ylabel(f"{metric}" + (" (%)" if scale == 100 else "") + " (higher is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title=group, fontsize="small")
    ax.set_title(
        f"Pareto front: {metric} vs {_cost_name(cost_key)} ({len(front)} of {len(points)} runs)"
    )
    return _save(fig, path)


def pareto_filename(cost_key: str) -> str:
    """The PNG name of the Pareto figure for ``cost_key``: 'pareto_flops_train.png'."""
    return "pareto_" + "".join(c if c.isalnum() else "_" for c in _cost_name(cost_key)) + ".png"


def plot_all(
    records: list[Record],
    out_dir: str | Path,
    metric: str = "test/acc",
    group: str = "pruning",
    flops_key: str = FLOPS_TRAIN,
) -> tuple[dict[str, Path], list[str]]:
    """Write every figure to ``out_dir``; return {name: path} and notes on what was skipped."""
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    notes: list[str] = []
    jobs = {
        "accuracy_vs_sparsity": lambda p: plot_accuracy_vs_sparsity(records, p, metric, group),
        "accuracy_vs_flops": lambda p: plot_accuracy_vs_flops(records, p, metric, flops_key, group),
        "sparsity_curves": lambda p: plot_sparsity_curves(records, p, group),
    }
    why = {
        "accuracy_vs_sparsity": f"no completed run reports {metric}",
        "accuracy_vs_flops": f"no completed run has {flops_key}",
        "sparsity_curves": "no completed run has a sparsity_curve",
    }
    for name, draw in jobs.items():
        path = draw(out_dir / f"{name}.png")
        if path is None:
            notes.append(f"skipped {name}: {why[name]}")
        else:
            written[name] = path
    return written, notes


def log_to_wandb(
    images: dict[str, Path],
    run_dir: str | Path,
    project: str = "prunelab",
    mode: str | None = None,
) -> str:
    """Log the PNGs as images of a new W&B run (job type ``report``) kept in ``run_dir``.

    ``mode`` defaults to the environment's ``WANDB_MODE`` or prunelab's auto-detection
    (offline without an API key or network). Returns the W&B run's id.
    """
    import wandb

    from prunelab.tracking.wandb_setup import resolve_mode

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project,
        dir=str(run_dir),
        mode=mode or resolve_mode("auto"),
        job_type="report",
        name="report",
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )
    try:
        run.log({f"report/{name}": wandb.Image(str(path)) for name, path in images.items()})
        return run.id
    finally:
        run.finish()
