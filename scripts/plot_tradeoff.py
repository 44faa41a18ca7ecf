"""Draw the trade-off figures of many runs as PNG files.

    python scripts/plot_tradeoff.py outputs/multiruns/train/<time> --out-dir outputs/plots
    python scripts/plot_tradeoff.py 'outputs/multiruns/train/*' --metric val/acc_best \\
        --wandb-run outputs/plots          # also log the PNGs to a W&B run kept there

Writes accuracy_vs_sparsity.png (error bars: std over seeds), accuracy_vs_flops.png (only
when the records have cost.flops_train) and sparsity_curves.png (global sparsity, mask
turnover, ITOP rate per run). The drawing lives in prunelab.report.plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunelab.report.plots import FLOPS_TRAIN, log_to_wandb, plot_all  # noqa: E402
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
    return parser.parse_args(argv)


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
