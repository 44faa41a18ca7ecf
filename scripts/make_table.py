"""Turn many results records into the table a paper prints.

    python scripts/make_table.py outputs/multiruns/train/<time>
    python scripts/make_table.py 'outputs/multiruns/train/*' --rows pruning --cols sparsity \\
        --metric test/acc --extra cost.flops_train --format latex --out table.tex
    python scripts/make_table.py outputs/multiruns/train/<time> --published lenet300_mnist
    python scripts/make_table.py --wandb my-entity/prunelab

PATHs are multirun folders, run folders, results.json files or glob patterns (searched
recursively). Cells are mean ± sample std over seeds; see prunelab.report.table for the
cell statuses (n=k/m, failed, —) and for how the dense baseline fills every sparsity column.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunelab.report import published as published_refs  # noqa: E402
from prunelab.report.records import filter_records, find_records, load_wandb_runs  # noqa: E402
from prunelab.report.table import aggregate, to_csv, to_latex, to_markdown  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Aggregate results records over seeds into a Markdown, LaTeX or CSV table."
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="runs, multiruns or globs")
    parser.add_argument(
        "--rows", action="append", help="row key(s): --rows pruning,distribution (pruning)"
    )
    parser.add_argument("--cols", action="append", help="column key(s) (sparsity)")
    parser.add_argument("--metric", default="test/acc", help="metric in the cells (test/acc)")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="extra column(s), repeatable or comma-separated: --extra cost.flops_train",
    )
    parser.add_argument(
        "--extra-format",
        choices=("auto", "relative", "sci"),
        default="auto",
        help="extra columns as multiples of dense (auto: when there is a dense run) or 1.2e+09",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="keep only runs whose KEY is one of the values (KEY!=V: none of them), "
        "repeatable: --where sparsity=0.9,0.95 --where imp.level!=0",
    )
    parser.add_argument("--format", choices=("markdown", "latex", "csv"), default="markdown")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply values (default: 100 for accuracies, else 1; csv: 1)",
    )
    parser.add_argument("--digits", type=int, default=2, help="decimals (markdown, latex)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--published",
        metavar="NAME",
        help=f"add published numbers from conf/published/NAME.yaml ({', '.join(published_refs.available())})",
    )
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs from W&B")
    parser.add_argument("--wandb-filters", metavar="JSON", help='W&B filters, e.g. {"group": "x"}')
    return parser.parse_args(argv)


def _keys(values: list[str]) -> list[str]:
    """``['pruning,distribution']`` or ``['pruning', 'distribution']`` (repeated flag) -> keys."""
    return [key for value in values for key in value.split(",") if key]


def fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if not args.paths and not args.wandb:
        fail("give at least one PATH (a run or multirun folder, or a glob) or --wandb", 2)
    published = None
    if args.published:
        try:
            published = published_refs.load_published(args.published)
        except (FileNotFoundError, ValueError) as err:
            fail(str(err), 2)

    records = find_records(args.paths) if args.paths else []
    if args.wandb:
        import wandb

        filters = json.loads(args.wandb_filters) if args.wandb_filters else None
        records += load_wandb_runs(wandb.Api(), args.wandb, filters=filters)
    try:
        records = filter_records(records, args.where) if args.where else records
    except ValueError as err:
        fail(str(err), 2)
    if not records:
        where = " ".join(args.paths + ([f"wandb:{args.wandb}"] if args.wandb else []))
        where += "".join(f" --where {w}" for w in args.where)
        fail(f"no results found in {where} (looked for results.json and .hydra/overrides.yaml)")

    rows, cols = _keys(args.rows or ["pruning"]), _keys(args.cols or ["sparsity"])
    table = aggregate(records, rows, cols, args.metric, extra_metrics=_keys(args.extra))
    if args.format == "csv":
        text = to_csv(table, scale=1 if args.scale is None else args.scale, published=published)
    else:
        render = to_latex if args.format == "latex" else to_markdown
        percent = "acc" in args.metric.rsplit("/", 1)[-1]  # accuracies are fractions
        text = render(
            table,
            scale=args.scale if args.scale is not None else (100 if percent else 1),
            digits=args.digits,
            published=published,
            extra_format=args.extra_format,
        )
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out} ({len(records)} runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
