"""The input-adaptive pruning table: accuracy against the MACs actually spent per input, for
Feature Boosting and Suppression (pruning=fbs, top-k and threshold gating) and static
structured pruning (structured_l1) on the same model, plus a plot of accuracy vs MACs.

    python scripts/fbs_table.py outputs/multiruns/fmnist_fbs [--retime] [--out table.md]
        [--plot accuracy_vs_macs.png]

One row per model x method x sparsity (mean over seeds), read from the runs' records:

- ``acc`` — test accuracy (%);
- ``MACs mean`` / ``p50`` / ``p90`` / ``p99`` — multiply-accumulates per input: for fbs the
  MACs its dynamic execution spends on each test input (predictors included; record
  ``cost.macs_dynamic_*``), for a structured method those of the compacted model (the same
  for every input), for the dense model its own;
- ``x dense`` — the dense model's MACs over the mean;
- ``ms dense`` / ``ms pruned`` — batch-1 CPU latency (ms per input) of the dense model and of
  the pruned one (fbs: dynamic execution, skipped channels not computed; structured: the
  compacted model), as each run's cost report measured them, or, with ``--retime``, timed
  again here from the checkpoints on the same test inputs in alternating rounds (medians
  over ``--rounds``), which is the fair comparison on a machine where other jobs ran during
  the sweep; ``speedup`` = dense / pruned.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunelab import files  # noqa: E402
from prunelab.report.records import find_records  # noqa: E402

COLUMNS = (
    "model",
    "method",
    "sparsity",
    "seeds",
    "acc",
    "MACs mean",
    "MACs p50",
    "MACs p90",
    "MACs p99",
    "x dense",
    "ms dense",
    "ms pruned",
    "speedup",
)


def method_label(data: dict[str, Any]) -> str:
    """``fbs`` (top-k), ``fbs-threshold`` or the method's name."""
    method = data["choices"].get("pruning", "?")
    if method == "fbs" and (data["config"].get("pruning") or {}).get("gating") == "threshold":
        return "fbs-threshold"
    return method


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def run_figures(data: dict[str, Any]) -> dict[str, float | None]:
    """The row's figures of one run's record (see the module docstring)."""
    cost = data.get("cost") or {}
    dense_macs = cost.get("macs_infer_dense")
    if "macs_dynamic_mean" in cost:
        macs = {q: cost.get(f"macs_dynamic_{q}") for q in ("mean", "p50", "p90", "p99")}
        ms_dense, ms_pruned = (
            cost.get("latency_ms/dense_plain/b1"),
            cost.get("latency_ms/dynamic/b1"),
        )
    else:
        static = cost.get("macs_infer_compact", dense_macs)
        macs = dict.fromkeys(("mean", "p50", "p90", "p99"), static)
        ms_dense = cost.get("latency_ms/dense/b1")
        ms_pruned = cost.get("latency_ms/compact/b1", ms_dense)
    return {
        "acc": 100 * data["metrics"]["test/acc"],
        **{f"MACs {q}": v for q, v in macs.items()},
        "MACs dense": dense_macs,
        "ms dense": ms_dense,
        "ms pruned": ms_pruned,
    }


def retime(run_dir: Path, samples: int, rounds: int) -> dict[str, float]:
    """Batch-1 latency (ms per input) of the dense and the pruned model of a finished run on
    ``samples`` test inputs, in alternating rounds; medians over the rounds."""
    import torch
    from omegaconf import OmegaConf

    from prunelab.cost import structured_compaction
    from prunelab.cost.latency import dense_copy, time_call
    from prunelab.dynamic import DynamicExecutor
    from prunelab.tracking.results import read_record
    from prunelab.train import build

    record = read_record(run_dir)
    built = build(OmegaConf.create(record["config"]))
    module, engine = built["module"], built["engine"]
    module.setup("test")  # attaches the gates of pruning=fbs, as in training
    checkpoint = torch.load(files.last_checkpoint(run_dir), map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    engine.load_state_dict(checkpoint["sparsity_engine"])
    datamodule = built["datamodule"]
    datamodule.setup("test")
    shape = tuple(datamodule.input_shape)
    xs = next(iter(datamodule.test_dataloader()))[0][:samples]
    inputs = [x.unsqueeze(0) for x in xs]
    model = built["model"].eval()
    gates = getattr(engine.method, "gates", None)
    if gates is not None and hasattr(engine.method, "dynamic_cost"):
        plain: Any = model
        pruned: Any = DynamicExecutor(model, gates, shape)
        context = gates.removed
    else:
        plain = dense_copy(model, engine.masks).eval()
        compacted = structured_compaction(model, engine.masks, shape)
        pruned = compacted[0].eval() if compacted is not None else model
        context = None
    times: dict[str, list[float]] = {"dense": [], "pruned": []}

    def run(net: Any) -> None:
        for x in inputs:
            net(x)

    with torch.inference_mode():
        for _ in range(rounds):
            if context is not None:
                with context():
                    stats = time_call(
                        lambda: run(plain), torch.device("cpu"), repeats=3, min_block_s=0
                    )
            else:
                stats = time_call(lambda: run(plain), torch.device("cpu"), repeats=3, min_block_s=0)
            times["dense"].append(stats["latency_ms"] / len(inputs))
            stats = time_call(lambda: run(pruned), torch.device("cpu"), repeats=3, min_block_s=0)
            times["pruned"].append(stats["latency_ms"] / len(inputs))
    return {f"ms {name}": statistics.median(values) for name, values in times.items()}


def rows(paths: list[str], samples: int = 0, rounds: int = 0) -> list[dict[str, Any]]:
    """One dict per model x method x sparsity with the COLUMNS (means over seeds); with
    ``rounds`` > 0 the latencies are timed again (:func:`retime`) on ``samples`` inputs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in find_records(paths):
        if not record.completed:
            continue
        data = record.data
        method = method_label(data)
        sparsity = 0.0 if method == "dense" else float(data["config"]["sparsity"])
        groups[(data["choices"].get("model", "?"), method, sparsity)].append(data)
    out = []
    for (model, method, sparsity), runs in sorted(groups.items()):
        figures = []
        for data in runs:
            fig = run_figures(data)
            if rounds:
                fig.update(retime(Path(data["run_dir"]), samples, rounds))
            figures.append(fig)
        row: dict[str, Any] = {
            "model": model,
            "method": method,
            "sparsity": sparsity,
            "seeds": len({d["seed"] for d in runs}),
        }
        for key in figures[0]:
            row[key] = _mean([f[key] for f in figures])
        dense = row.get("MACs dense")
        row["x dense"] = dense / row["MACs mean"] if dense and row.get("MACs mean") else None
        ms_dense, ms_pruned = row.get("ms dense"), row.get("ms pruned")
        row["speedup"] = ms_dense / ms_pruned if ms_dense and ms_pruned else None
        out.append(row)
    return out


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.startswith("MACs"):
        return f"{value / 1e6:.2f}M"
    if key == "acc":
        return f"{value:.2f}"
    if key in ("x dense", "speedup"):
        return f"{value:.2f}x"
    if key.startswith("ms"):
        return f"{value:.3f}"
    if key == "sparsity":
        return f"{value:g}"
    return str(value)


def markdown(table: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(c, row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs mean MACs per input, one line per model x method (dense as a star)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in table:
        series[(row["model"], row["method"])].append(row)
    for (model, method), points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["MACs mean"])
        macs = [r["MACs mean"] / 1e6 for r in points]
        acc = [r["acc"] for r in points]
        label = f"{model} {method}" if len({m for m, _ in series}) > 1 else method
        if method == "dense":
            ax.plot(macs, acc, "*", markersize=12, label=label)
        else:
            ax.plot(macs, acc, "o-", label=label)
    ax.set_xlabel("mean MACs per input (millions)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs MACs spent per input")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep or run folders holding results.json")
    parser.add_argument("--retime", action="store_true", help="time batch-1 latency again")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (--retime)")
    parser.add_argument("--samples", type=int, default=32, help="test inputs timed (--retime)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (--retime)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot (PNG) here")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    table = rows(args.paths, args.samples, args.rounds if args.retime else 0)
    if not table:
        print("no completed runs found", file=sys.stderr)
        return 1
    text = markdown(table)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.plot is not None:
        plot(table, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
