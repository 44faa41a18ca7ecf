"""What the end-of-run cost report adds to a run, per latency mode, measured in the same run.

    python scripts/bench_cost.py                       # the default run (python train.py)
    python scripts/bench_cost.py pruning=rigl sparsity=0.9 dataset=fashion_mnist model=lenet300_100

Runs the same short training (``epochs=1``, W&B off) with ``cost.latency=false`` (the
reference: FLOPs, sizes and energy only), ``true`` (quick timing, the default) and ``full``,
in alternating order for ``--rounds`` rounds, and reads each run's ``cost_time_s`` (the time
spent in the cost report, recorded in results.json). The headline is the median extra time of
the default mode over the reference; the last line is ``cost_latency_s: <seconds>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("false", "true", "full")


def cost_time(mode: str, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            "epochs=1",
            "logger.wandb.enabled=false",
            "trainer.enable_progress_bar=false",
            f"cost.latency={mode}",
            *overrides,
            f"hydra.run.dir={tmp}/run",
        ]
        env = {**os.environ, "WANDB_MODE": "offline"}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"run failed: {done.stderr.strip().splitlines()[-1:]}")
        return json.loads((Path(tmp) / "run" / "results.json").read_text())["cost_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            times[mode].append(cost_time(mode, args.overrides))
    for mode, values in times.items():
        print(
            f"cost.latency={mode}: cost report {statistics.median(values):.2f} s "
            f"({' '.join(f'{v:.2f}' for v in values)})"
        )
    extra = statistics.median(times["true"]) - statistics.median(times["false"])
    full = statistics.median(times["full"]) - statistics.median(times["false"])
    print(
        f"latency timing adds {extra:.2f} s by default (quick), {full:.2f} s with cost.latency=full"
    )
    print(f"cost_latency_s: {extra:.2f}")


if __name__ == "__main__":
    main()
