"""Draw the trade-off figures of many runs as PNG files.

    python scripts/plot_tradeoff.py outputs/multiruns/train/<time> --out-dir outputs/plots
    python scripts/plot_tradeoff.py 'outputs/multiruns/train/*' --metric val/acc_best \\
        --wandb-run outputs/plots          # also log the PNGs to a W&B run kept there

Writes accuracy_vs_sparsity.png (error bars: std over seeds), accuracy_vs_flops.png (only
when the records have cost.flops_train) and sparsity_curves.png (global sparsity, mask
turnover, ITOP rate per run). The drawing lives in prunelab.report.plots.

With --pareto COST_KEY it draws instead the Pareto front of the metric (maximised) against
that cost (minimised) over every completed run, pareto_<cost>.png, and lists the front:

    python scripts/plot_tradeoff.py outputs/multiruns/<sweep> --metric val/acc_best \\
        --pareto cost.flops_train      # or cost.macs_infer_sparse, cost.latency_ms/sparse/b1

The front is computed from the records, so any sweep works (a grid, seeds, an Optuna
search); for a multi-objective Optuna sweep, whose optimization_results.yaml lists Optuna's
own Pareto solutions, the count of those solutions is printed alongside.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunelab.report.plots import (  # noqa: E402
    FLOPS_TRAIN,
    log_to_wandb,
    pareto_filename,
    pareto_front,
    pareto_points,
    plot_all,
    plot_pareto,
)
from prunelab.report.records import find_records, load_wandb_runs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Plot accuracy / sparsity / FLOPs trade-offs.")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="runs, multiruns or globs")
    parser.add_argument("--metric", default="test/acc", help="metric on the y axis (test/acc)")
    parser.add_argument("--group", default="pruning", help="one line per value of (pruning)")
    parser.add_argument("--flops-key", default=FLOPS_TRAIN, help=f"x of plot (b) ({FLOPS_TRAIN})")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/plots"))
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs from W&B")
    parser.add_argument("--wandb-filters", metavar="JSON", help='W&B filters, e.g. {"group": "x"}')
    parser.add_argument(
        "--wandb-run", type=Path, metavar="RUN_DIR", help="log the PNGs to a W&B run kept here"
    )
    parser.add_argument("--wandb-project", default="prunelab", help="project of --wandb-run")
    parser.add_argument(
        "--pareto",
        metavar="COST_KEY",
        help="draw only the Pareto front of --metric against this cost, e.g. cost.flops_train",
    )
    return parser.parse_args(argv)


def _optuna_solutions(paths: list[str]) -> int | None:
    """How many Pareto solutions the Optuna sweeps among ``paths`` report (their
    optimization_results.yaml ``solutions``), or None when there is no such file."""
    import yaml

    counts = []
    for raw in paths:
        found = Path(raw) / "optimization_results.yaml"
        if found.is_file():
            solutions = (yaml.safe_load(found.read_text()) or {}).get("solutions")
            if isinstance(solutions, list):
                counts.append(len(solutions))
    return sum(counts) if counts else None


def pareto(args: argparse.Namespace, records: list) -> dict[str, Path]:
    """Write the Pareto figure of ``args.metric`` against ``args.pareto``; print the front."""
    path = plot_pareto(
        records, args.out_dir / pareto_filename(args.pareto), args.metric, args.pareto, args.group
    )
    if path is None:
        print(
            f"note: skipped the Pareto front: no completed run has both {args.metric} and "
            f"{args.pareto}",
            file=sys.stderr,
        )
        return {}
    points = pareto_points(records, args.metric, args.pareto)
    front = pareto_front(points)
    print(path)
    print(f"Pareto front of {args.metric} vs {args.pareto}: {len(front)} of {len(points)} runs")
    for x, y, record in front:
        where = record.get("run_dir") or record.source
        print(f"  {args.pareto}={x:.4g}  {args.metric}={y:.4g}  {record.get(args.group)}  {where}")
    optuna = _optuna_solutions(args.paths)
    if optuna is not None:
        print(
            f"Optuna's own front (optimization_results.yaml, over the sweep's optimized_metric): "
            f"{optuna} solutions"
        )
    return {path.stem: path}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    records = find_records(args.paths) if args.paths else []
    if args.wandb:
        import wandb

        filters = json.loads(args.wandb_filters) if args.wandb_filters else None
        records += load_wandb_runs(wandb.Api(), args.wandb, filters=filters)
    if not records:
        where = " ".join(args.paths) or f"wandb:{args.wandb}"
        print(f"error: no results found in {where}", file=sys.stderr)
        return 1
    if args.pareto:
        written = pareto(args, records)
    else:
        written, notes = plot_all(records, args.out_dir, args.metric, args.group, args.flops_key)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        for path in written.values():
            print(path)
    if args.wandb_run and written:
        run_id = log_to_wandb(written, args.wandb_run, project=args.wandb_project)
        print(f"logged {len(written)} figures to W&B run {run_id} in {args.wandb_run}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
