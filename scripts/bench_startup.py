"""Start-up time of the default run, measured against ``python -c "import torch"`` in the same run.

    python scripts/bench_startup.py                    # the default run (`make train`), 5 rounds
    python scripts/bench_startup.py --rounds 9 pruning=dynamic sparsity=0.9

Each round starts ``python train.py [overrides]`` (with ``WANDB_MODE=offline`` unless the
environment sets it, as ``make train`` does, and a temporary ``hydra.run.dir``) and, right
before or after it (the order alternates), ``python -c "import torch"``: the same interpreter,
so both pay the same process start and ``torch`` import. The run records when it reaches each
start-up phase (``PRUNELAB_STARTUP_MARK``, see :mod:`prunelab.tracking.startup`) and, with
``PRUNELAB_STARTUP_EXIT=1``, ends at its first training step. A phase's time is counted from
the moment the process was started.

Printed: each round; the median time at which each phase is reached and the median time
spent in it; the median CPU time (user + system, all threads) of both commands, which the
machine's other load disturbs less than their wall time; then, as the last two lines, the
median wall time of ``import torch`` (``import_torch_s``) and the headline, the median wall
time from the command to the first training step (``startup_s``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunelab.tracking.startup import EXIT_ENV, MARK_ENV, PHASES, read_marks  # noqa: E402

PYTHON = sys.executable


def _run(command: list[str], **kwargs) -> tuple[int, float, float, float, str]:
    """Run ``command``: its exit status, the wall-clock time it started at, its wall time,
    its CPU time (user + system, all its threads) and its output (stdout and stderr)."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.time()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - start
        out.seek(0)
        output = out.read()
    return os.waitstatus_to_exitcode(status), start, wall, usage.ru_utime + usage.ru_stime, output


def _time_import_torch() -> tuple[float, float]:
    """Wall and CPU seconds of ``python -c "import torch"``."""
    code, _, wall, cpu, output = _run([PYTHON, "-c", "import torch"])
    if code != 0:
        sys.stderr.write(output[-4000:])
        raise SystemExit("bench_startup: python -c 'import torch' failed")
    return wall, cpu


def _time_run(overrides: list[str], scratch: Path, index: int) -> dict[str, float]:
    """One run up to its first training step: {phase: seconds since the process started},
    plus ``cpu`` (its CPU seconds)."""
    mark_file = scratch / f"marks-{index}.txt"
    env = {
        **os.environ,
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        MARK_ENV: str(mark_file),
        EXIT_ENV: "1",
    }
    run_dir = scratch / f"run-{index}"
    command = [PYTHON, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    code, start, _, cpu, output = _run(command, env=env, cwd=ROOT)
    marks = read_marks(mark_file) if mark_file.exists() else {}
    if code != 0 or "first_step" not in marks:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"bench_startup: the run did not reach its first step (exit {code})")
    times = {phase: marks[phase] - start for phase in PHASES if phase in marks}
    times["cpu"] = cpu
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: none)")
    args = parser.parse_args()

    torch_runs: list[tuple[float, float]] = []
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench_startup-") as tmp:
        scratch = Path(tmp)
        _time_import_torch()  # warm the file cache for both
        for i in range(args.rounds):
            if i % 2:
                runs.append(_time_run(args.overrides, scratch, i))
                torch_runs.append(_time_import_torch())
            else:
                torch_runs.append(_time_import_torch())
                runs.append(_time_run(args.overrides, scratch, i))
            print(
                f"round {i + 1}/{args.rounds}: first step {runs[-1]['first_step']:.2f} s "
                f"(cpu {runs[-1]['cpu']:.2f} s), import torch {torch_runs[-1][0]:.2f} s "
                f"(cpu {torch_runs[-1][1]:.2f} s)",
                flush=True,
            )

    print(f"\n{'phase':<12} {'reached_s':>9} {'in_phase_s':>10}")
    for n, phase in enumerate(PHASES):
        if not all(phase in r for r in runs):
            continue
        reached = statistics.median(r[phase] for r in runs)
        spent = statistics.median(
            r[phase] - max([0.0] + [r[p] for p in PHASES[:n] if p in r]) for r in runs
        )
        print(f"{phase:<12} {reached:>9.2f} {spent:>10.2f}")
    print(f"\nstartup_cpu_s: {statistics.median(r['cpu'] for r in runs):.2f}")
    print(f"import_torch_cpu_s: {statistics.median(c for _, c in torch_runs):.2f}")
    print(f"import_torch_s: {statistics.median(w for w, _ in torch_runs):.2f}")
    print(f"startup_s: {statistics.median(r['first_step'] for r in runs):.2f}")


if __name__ == "__main__":
    main()
