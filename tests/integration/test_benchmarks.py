"""The benchmark scripts: their headline is computed from their own measurements, in the
direction they claim, and printed as the ``name: value`` last line."""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> list[str]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def _headline(lines: list[str], name: str) -> float:
    match = re.fullmatch(rf"{name}: (\d+\.\d+)", lines[-1])
    assert match, lines[-1]
    return float(match.group(1))


def _numbers_after(lines: list[str], prefix: str) -> list[float]:
    line = next(line for line in lines if line.startswith(prefix))
    return [float(v) for v in line[len(prefix) :].split()]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- bench_overhead: the arithmetic, with made-up epoch times ------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_overhead_pairs_each_epoch_with_the_next_hand_loop_epoch(monkeypatch):
    """paired_ratios divides each prunelab epoch by the hand-loop epoch run right after it,
    and leaves out the first (warm-up) pair."""
    bench = _load_script("bench_overhead")
    clock, events = _Clock(), []
    ours, theirs = [9.0, 3.0, 5.0, 8.0], [1.0, 2.0, 4.0, 2.0]

    class FakeHandLoop:
        def __init__(self, epochs: int) -> None:
            assert epochs == len(ours)

        def epoch(self) -> float:
            events.append("hand")
            return theirs[events.count("hand") - 1]

    def fake_train(cfg, callbacks):
        (timer,) = callbacks
        for seconds in ours:
            timer.on_train_epoch_start(None, None)
            clock.now += seconds
            events.append("prunelab")
            timer.on_train_epoch_end(None, None)
        return {"status": "completed"}

    monkeypatch.setattr(bench, "HandLoop", FakeHandLoop)
    monkeypatch.setattr(bench, "train", fake_train)
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    ratios = bench.paired_ratios([], epochs=len(ours))
    assert ratios == [3.0 / 2.0, 5.0 / 4.0, 8.0 / 2.0]
    assert events == ["prunelab", "hand"] * len(ours)  # back to back


def _main(bench, monkeypatch, capsys, fake_ratios, *argv: str) -> tuple[list[str], list[str]]:
    """Run the script's main() with paired_ratios replaced; its output and the runs asked for."""
    calls: list[str] = []

    def fake_paired_ratios(overrides: list[str], epochs: int) -> list[float]:
        kind = "dense" if not overrides or "pruning=dense" in overrides else "pruned"
        calls.append(kind)
        return list(fake_ratios[kind])

    monkeypatch.setattr(bench, "paired_ratios", fake_paired_ratios)
    monkeypatch.setattr(sys, "argv", ["bench_overhead.py", *argv, "--rounds", "2"])
    bench.main()
    return capsys.readouterr().out.strip().splitlines(), calls


def test_overhead_headline_is_the_median_pair_ratio(monkeypatch, capsys):
    bench = _load_script("bench_overhead")
    lines, calls = _main(bench, monkeypatch, capsys, {"dense": [1.0, 4.0, 2.5]})
    assert calls == ["dense", "dense"]
    assert _numbers_after(lines, "pair ratios: ") == [1.0, 4.0, 2.5] * 2
    assert _headline(lines, "overhead") == 2.5


def test_overhead_headline_of_a_pruned_run_is_its_median_over_dense(monkeypatch, capsys):
    bench = _load_script("bench_overhead")
    ratios = {"dense": [1.0, 2.0], "pruned": [3.0, 2.5, 9.0]}
    lines, calls = _main(bench, monkeypatch, capsys, ratios, "pruning=rigl", "sparsity=0.9")
    assert calls == ["dense", "pruned", "pruned", "dense"]  # ABBA rounds
    assert _numbers_after(lines, "dense  / hand loop, per pair: ") == [1.0, 2.0] * 2
    assert _numbers_after(lines, "pruned / hand loop, per pair: ") == [3.0, 2.5, 9.0] * 2
    # medians: pruned 3.0 over [2.5, 2.5, 3, 3, 9, 9], dense 1.5 over [1, 1, 2, 2]
    assert _headline(lines, "overhead") == 2.0


# -- bench_overhead: real runs -------------------------------------------------------------------
def test_overhead_benchmark_pairs_epochs_with_the_hand_loop():
    lines = _run("scripts/bench_overhead.py", "--epochs", "2", "--rounds", "1")
    pairs = _numbers_after(lines, "pair ratios: ")
    assert len(pairs) == 1  # two epochs, the first one is warm-up
    # The headline is the median of the pair ratios the run printed, not a constant.
    assert _headline(lines, "overhead") == pytest.approx(statistics.median(pairs), abs=1e-3)


@pytest.mark.slow
def test_overhead_benchmark_compares_a_pruned_run_with_dense():
    lines = _run(
        "scripts/bench_overhead.py",
        "pruning=rigl",
        "sparsity=0.9",
        "--epochs",
        "2",
        "--rounds",
        "1",
    )
    assert any("vs prunelab dense" in line for line in lines)
    dense = _numbers_after(lines, "dense  / hand loop, per pair: ")
    pruned = _numbers_after(lines, "pruned / hand loop, per pair: ")
    assert len(dense) == len(pruned) == 1
    ratio = statistics.median(pruned) / statistics.median(dense)
    assert _headline(lines, "overhead") == pytest.approx(ratio, rel=2e-3, abs=1e-3)


# -- bench_sparse_inference ----------------------------------------------------------------------
def test_sparse_inference_headlines_are_dense_over_sparse_latency_at_90():
    lines = _run(
        "scripts/bench_sparse_inference.py",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--min-block-ms",
        "1",
        "--quiet-wait",
        "0",
        "--blocks",
        "1x4",
    )
    rows = {}
    for line in lines:
        m = re.match(
            r"\s*dense (\d+\.\d+) ms +sparse (\d+\.\d+) ms +dense/sparse (\d+\.\d+)x", line
        )
        if m:
            rows[len(rows)] = [float(v) for v in m.groups()]
            # the timed sparse model computes what the masked dense one does
            assert float(re.search(r"max \|diff\| vs masked (\S+?);", line).group(1)) < 1e-4
    heads = [line for line in lines if line.startswith("[")]
    assert [h.split(":")[0] for h in heads] == [
        "[unstructured] batch 256",
        "[unstructured] batch 1",
        "[1x4 blocks] batch 256",
        "[1x4 blocks] batch 1",
    ]
    assert "(" in heads[0] and "=" in heads[0]  # the per-layer kernel choice is printed
    assert lines[-1].startswith("speedup_90: ") and lines[-2].startswith("speedup_90_batch1: ")
    for index, name in ((0, "speedup_90"), (1, "speedup_90_batch1")):
        dense_ms, sparse_ms, printed = rows[index]
        speedup = _headline(lines if index == 0 else lines[:-1], name)
        assert speedup == printed
        assert speedup == pytest.approx(dense_ms / sparse_ms, rel=0.02, abs=0.02)


# -- bench_structured ----------------------------------------------------------------------------
def test_structured_headline_is_vgg16_dense_over_compacted_latency_at_batch_64():
    lines = _run("scripts/bench_structured.py", "--quick", "--threads", "1")
    rows = {}
    for line in lines:
        m = re.match(
            r"(ResNet-20|VGG-16) +(\d+) +(\d+\.\d+) +(\d+\.\d+) +(\d+\.\d+)x +(\d+\.\d+)x", line
        )
        if m:
            rows[(m.group(1), int(m.group(2)))] = [float(v) for v in m.groups()[2:]]
    assert set(rows) == {("ResNet-20", 1), ("ResNet-20", 64), ("VGG-16", 1), ("VGG-16", 64)}
    for label in ("ResNet-20", "VGG-16"):
        info = next(line for line in lines if line.startswith(f"{label}: "))
        # the timed compacted model computes what the masked model does
        assert float(re.search(r"max \|compacted - masked\| (\S+)$", info).group(1)) < 1e-4
        assert rows[(label, 64)][3] > 2.0  # MAC reduction, counted on both models
    dense_ms, compact_ms, printed, _ = rows[("VGG-16", 64)]
    speedup = _headline(lines, "speedup_structured")
    assert speedup == printed
    assert speedup == pytest.approx(dense_ms / compact_ms, rel=0.01, abs=0.01)
