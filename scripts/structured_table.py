"""The structured-pruning table: accuracy, size and speed of pruned models, as stored and as
compacted, one row per model x method x sparsity (mean over seeds).

    python scripts/structured_table.py outputs/multiruns/fmnist_structured [--format csv]

Columns, all read from the runs' records (``cost`` of results.json):

- ``acc`` — test accuracy (%);
- ``params`` — non-zero parameters of the pruned model; ``params compact`` — parameters of the
  physically compacted model (channels, neurons and residual blocks the masks prune whole are
  removed: :func:`prunelab.cost.structured_compaction`); "-" when nothing compacts;
- ``MACs`` — multiply-accumulates per sample the masks leave (``macs_infer_sparse``, the
  FLOP counter's per-layer counts times each layer's density); ``MACs compact`` — counted on
  the compacted model;
- ``size`` — the stored size: CSR arrays of the masked weights plus the dense rest
  (``bytes_csr``) for a masked model, the dense fp32 state dict (``bytes_dense_fp32``) for the
  dense one; ``size compact`` — the compacted model's fp32 state dict;
- ``ms dense`` / ``ms compact`` — measured CPU latency at ``--batch`` (default 256) of the
  dense architecture and of the compacted model, as each run's cost report timed them; with
  ``--retime`` they are timed again here from the runs' checkpoints, the dense architecture
  (:func:`prunelab.cost.latency.dense_copy`), the masked model and the compacted one in
  alternating rounds, medians over ``--rounds`` (all torch threads unless ``--threads``): the
  robust choice on a machine where other jobs ran during the sweep.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunelab.report.records import find_records  # noqa: E402

COLUMNS = (
    "model",
    "method",
    "sparsity",
    "seeds",
    "acc",
    "params",
    "params compact",
    "MACs",
    "MACs compact",
    "size KiB",
    "size compact KiB",
    "ms dense",
    "ms compact",
)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def rows(paths: list[str], batch: int, rounds: int = 0) -> list[dict]:
    """One dict per model x method x sparsity with the COLUMNS (means over seeds); with
    ``rounds`` > 0 the latencies are timed again (:func:`retime`)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in find_records(paths):
        if not record.completed:
            continue
        data = record.data
        method = data["choices"].get("pruning", "?")
        sparsity = 0.0 if method == "dense" else float(data["config"]["sparsity"])
        groups[(data["choices"].get("model", "?"), method, sparsity)].append(data)
    out = []
    for (model, method, sparsity), runs in sorted(groups.items(), key=lambda kv: kv[0]):
        costs = [dict(r.get("cost") or {}) for r in runs]
        if rounds:
            for run, cost in zip(runs, costs, strict=True):
                cost.pop(f"latency_ms/compact/b{batch}", None)  # only what is timed here
                for name, ms in retime(Path(run["run_dir"]), batch, rounds).items():
                    cost[f"latency_ms/{name}/b{batch}"] = ms
        size = [
            c.get("bytes_dense_fp32") if method == "dense" else c.get("bytes_csr") for c in costs
        ]
        compact_size = _mean([c.get("bytes_compact_fp32") for c in costs])
        out.append(
            {
                "model": model,
                "method": method,
                "sparsity": sparsity,
                "seeds": len(runs),
                "acc": _mean([100 * r["metrics"].get("test/acc", float("nan")) for r in runs]),
                "params": _mean([c.get("params_nonzero") for c in costs]),
                "params compact": _mean([c.get("params_compact") for c in costs]),
                "MACs": _mean([c.get("macs_infer_sparse") for c in costs]),
                "MACs compact": _mean([c.get("macs_infer_compact") for c in costs]),
                "size KiB": None if _mean(size) is None else _mean(size) / 1024,
                "size compact KiB": None if compact_size is None else compact_size / 1024,
                "ms dense": _mean([c.get(f"latency_ms/dense/b{batch}") for c in costs]),
                "ms compact": _mean([c.get(f"latency_ms/compact/b{batch}") for c in costs]),
            }
        )
    return out


def retime(run_dir: Path, batch: int, rounds: int) -> dict[str, float]:
    """Dense / masked / compacted latency (ms) of a finished run at ``batch``, timed in
    alternating rounds (each the median of a few blocks), medians over rounds."""
    import torch

    from prunelab.cost import structured_compaction
    from prunelab.cost.latency import _masked_copy, dense_copy, time_call
    from prunelab.evaluate import load_run

    run = load_run(run_dir)
    model, masks = run["model"], run["masks"]
    shape = tuple(run["datamodule"].input_shape)
    nets = {"dense": dense_copy(model, masks), "masked": _masked_copy(model, masks)}
    compacted = structured_compaction(model, masks, shape)
    if compacted is not None:
        nets["compact"] = compacted[0].eval()
    x = torch.randn(batch, *shape)
    times: dict[str, list[float]] = {name: [] for name in nets}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, net in nets.items():
                stats = time_call(lambda net=net: net(x), torch.device("cpu"), repeats=5)
                times[name].append(stats["latency_ms"])
    return {name: statistics.median(values) for name, values in times.items()}


def _fmt(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key in ("params", "params compact", "MACs", "MACs compact"):
        return f"{value:,.0f}" if value < 1e6 else f"{value / 1e6:.2f}M"
    if key in ("acc",):
        return f"{value:.2f}"
    if key in ("size KiB", "size compact KiB"):
        return f"{value:.1f}"
    if key.startswith("ms"):
        return f"{value:.3f}"
    if key == "sparsity":
        return f"{value:g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--batch", type=int, default=256, help="latency batch size")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    parser.add_argument("--out", type=Path, help="also write the table here")
    parser.add_argument("--retime", action="store_true", help="time the latencies again here")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (--retime)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    table = rows(args.paths, args.batch, args.rounds if args.retime else 0)
    if not table:
        raise SystemExit(f"no completed runs under {' '.join(args.paths)}")
    cols = [c if not c.startswith("ms") else f"{c} b{args.batch}" for c in COLUMNS]
    if args.format == "csv":
        lines = [",".join(cols)]
        lines += [",".join("" if r[c] is None else str(r[c]) for c in COLUMNS) for r in table]
    else:
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(c, r[c]) for c in COLUMNS) + " |" for r in table]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
