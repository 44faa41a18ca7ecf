"""Sweep throughput and worker memory: the peer-recipe sweep's wall time on this machine.

    python scripts/bench_sweep.py                        # 54 runs: 6 methods x 3 sparsities x 3 seeds
    python scripts/bench_sweep.py --quick                # 8 runs of 2 epochs (a smoke test)
    python scripts/bench_sweep.py --compare outputs/multiruns/fmnist_peer_recipe/methods

The sweep is the trust issue's peer recipe (conf/experiment/fmnist_peer_recipe.yaml:
LeNet-300-100 on Fashion-MNIST, 20 epochs, batch 128, SGD with a cosine decay) over
static, gmp, set, rigl, snfs and random at 90/95/98% and seeds 0, 1, 2, run as the README
runs it: ``launcher=joblib n_jobs=2``, W&B off, no latency timing, into a fresh temporary
folder (nothing is skipped). It measures the wall time from the command to its end.

The reference measured in the same run is the sum of the runs' own wall times
(``wall_time_s`` in each record, from the job's start to its record) divided by the number of
jobs: what the sweep would take if nothing but the runs cost time. The difference is the
launcher's cost (worker start-up, imports, Hydra per job).

Memory: the default run (``python train.py``, as ``make train``) is run once and its peak
resident memory printed. Each record holds its process's resident memory at the end of the run and its peak
(``memory`` in results.json, with the pid). Per worker process the script prints the first
and the last run's resident memory and their ratio (no growth across runs means a ratio
near 1), and the peak over all workers.

``--compare DIR`` matches the new records to the completed ones in DIR by method, sparsity
and seed and prints the largest |difference| of test accuracy (0 when a change keeps the
numbers; CPU runs are deterministic for a fixed seed and code path).

Last line: ``sweep_minutes: <wall minutes>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = "static,gmp,set,rigl,snfs,random"


def records(folder: Path) -> list[dict]:
    """Completed results records under ``folder``."""
    out = []
    for path in sorted(folder.rglob("results.json")):
        data = json.loads(path.read_text())
        if data.get("status") == "completed" and "sub_runs" not in data:
            out.append(data)
    return out


def key(record: dict) -> tuple:
    return (record["choices"]["pruning"], record["config"]["sparsity"], record["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 runs of 2 epochs")
    parser.add_argument("--compare", type=Path, help="a sweep folder with the same runs")
    parser.add_argument("--keep", type=Path, help="write the sweep here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    grid = (
        ["pruning=static,rigl", "sparsity=0.9,0.98", "seed=0,1", "epochs=2"]
        if args.quick
        else [f"pruning={METHODS}", "sparsity=0.9,0.95,0.98", "seed=0,1,2"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = args.keep or Path(tmp) / "sweep"
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=fmnist_peer_recipe",
            "launcher=joblib",
            f"n_jobs={args.n_jobs}",
            "logger.wandb.enabled=false",
            "skip_completed=false",
            *grid,
            *args.overrides,
            f"hydra.sweep.dir={sweep_dir}",
        ]
        env = {**os.environ, "WANDB_MODE": "offline"}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise SystemExit(f"the sweep failed (exit {done.returncode}):\n{tail}")
        runs = records(sweep_dir)
    ideal = sum(r["wall_time_s"] for r in runs) / args.n_jobs
    fit = statistics.median(r["fit_time_s"] for r in runs)
    print(
        f"{len(runs)} runs, n_jobs={args.n_jobs}: wall {wall / 60:.2f} min; the runs' own "
        f"wall times / n_jobs {ideal / 60:.2f} min (launcher cost {(wall - ideal) / 60:.2f} "
        f"min); median fit {fit:.1f} s, median run {statistics.median(r['wall_time_s'] for r in runs):.1f} s"
    )
    by_pid: dict[int, list[dict]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: r["started_at"]):
        if r.get("memory"):
            by_pid[r["memory"]["pid"]].append(r["memory"])
    for pid, mems in by_pid.items():
        first, last = mems[0]["rss_mb"], mems[-1]["rss_mb"]
        print(
            f"worker {pid}: {len(mems)} runs, resident {first:.0f} MiB after the first, "
            f"{last:.0f} MiB after the last ({last / first:.3f}x), peak {mems[-1]['peak_rss_mb']:.0f} MiB"
        )
    if by_pid:
        growth = max(m[-1]["rss_mb"] / m[0]["rss_mb"] for m in by_pid.values())
        peak = max(m["peak_rss_mb"] for mems in by_pid.values() for m in mems)
        print(f"worker_growth: {growth:.3f}  peak_rss_mb: {peak:.0f}")
    with tempfile.TemporaryDirectory() as tmp:  # the default run of `make train`
        default = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp}/run"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        memory = (records(Path(tmp)) or [{}])[0].get("memory") if default.returncode == 0 else None
    if memory:
        print(f"default run (python train.py): peak resident {memory['peak_rss_mb']:.0f} MiB")
    if args.compare:
        old = {key(r): r for r in records(args.compare)}
        diffs = [
            abs(r["metrics"]["test/acc"] - old[key(r)]["metrics"]["test/acc"])
            for r in runs
            if key(r) in old
        ]
        if diffs:
            print(
                f"compared {len(diffs)} runs with {args.compare}: max |Δ test/acc| {max(diffs):.6f}"
            )
        else:
            print(f"no run of {args.compare} matches these cells")
    print(f"sweep_minutes: {wall / 60:.2f}")


if __name__ == "__main__":
    main()
