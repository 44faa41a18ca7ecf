"""Training-time overhead of prunelab, measured against a reference in the same run.

    python scripts/bench_overhead.py                          # dense prunelab vs a hand-written loop
    python scripts/bench_overhead.py pruning=rigl sparsity=0.9  # pruned vs dense, both via prunelab

Task: LeNet-300-100 on Fashion-MNIST (MNIST-1D MLP when Fashion-MNIST is not installed),
batch 100, Adam (fused, as configured), data in memory, validation off; an epoch's time is
its training loop alone.

Dense vs the hand loop: within each prunelab run, one epoch of the hand-written loop runs
right after every prunelab epoch, and the headline is the median ratio of these
back-to-back pairs (the first pair of each run is warm-up). A pruned run vs dense: the two
runs are each paired epoch by epoch with the hand loop in the same way and alternate in
ABBA order for ``--rounds`` rounds; the headline is the ratio of their median pair ratios.
The last line is ``overhead: <ratio>``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prunelab.config import compose_config  # noqa: E402
from prunelab.train import build, train  # noqa: E402

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Overrides that describe the pruning (left out of the dense reference run).
PRUNING_KEYS = {"pruning", "sparsity", "schedule", "distribution"}


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (training batches only)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def task_overrides() -> list[str]:
    """LeNet-300-100 on Fashion-MNIST when its files are installed, else the MNIST-1D MLP."""
    if FMNIST_DIR.is_dir() or (ROOT / "data" / "FashionMNIST").is_dir():
        return ["dataset=fashion_mnist", "model=lenet300_100", "optimizer=adam", "lr=1e-3"]
    return ["dataset=mnist1d", "model=mlp", "optimizer=adam", "lr=1e-2"]


def common_overrides(epochs: int) -> list[str]:
    return [
        f"epochs={epochs}",
        "dataset.batch_size=100",
        "trainer.accelerator=cpu",
        "trainer.limit_val_batches=0",
        "trainer.limit_test_batches=1",
        "logger.wandb.enabled=false",
    ]


class HandLoop:
    """The reference: a plain PyTorch loop with its own copy of the model (same architecture,
    seed, batch, data and optimizer, built from the same config, so fused where prunelab's
    is)."""

    def __init__(self, epochs: int) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config([*common_overrides(epochs), *task_overrides()], tmp)
            pl.seed_everything(0, verbose=False)
            built = build(cfg)
        self.datamodule, self.model = built["datamodule"], built["model"]
        self.datamodule.setup("fit")
        self.loader = self.datamodule.train_dataloader()
        self.optimizer = hydra.utils.instantiate(cfg.optimizer)(params=self.model.parameters())

    def epoch(self) -> float:
        """Train one epoch; its wall time."""
        model, optimizer = self.model, self.optimizer
        model.train()
        start = time.perf_counter()
        for x, y in self.loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start


class PairedEpochs(EpochTimer):
    """Times each prunelab epoch, then runs one epoch of the hand loop right after it, so
    that each pair sees the same machine state (on a shared VM the speed drifts by 20-30%
    over tens of seconds, far more than the difference being measured)."""

    def __init__(self, reference: HandLoop) -> None:
        super().__init__()
        self.reference = reference
        self.reference_times: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.reference_times.append(self.reference.epoch())


def paired_ratios(overrides: list[str], epochs: int) -> list[float]:
    """One prunelab run with a hand-loop epoch right after each of its epochs: the ratio
    prunelab / hand loop of each back-to-back pair after the warm-up pair."""
    timer = PairedEpochs(HandLoop(epochs))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(
            [*common_overrides(epochs), *task_overrides(), "cost.enabled=false", *overrides], tmp
        )
        train(cfg, callbacks=[timer])
    pairs = zip(timer.reference_times[1:], timer.times[1:], strict=True)
    return [ours / reference for reference, ours in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the measured run")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (first is warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="prunelab runs per measured configuration"
    )
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    task = " ".join(task_overrides())
    print(f"task: {task}")
    if not args.overrides:
        ratios = [q for _ in range(args.rounds) for q in paired_ratios([], args.epochs)]
        print("pair ratios: " + " ".join(f"{q:.3f}" for q in ratios))
        print(
            "prunelab dense vs hand-written PyTorch loop: median ratio of "
            f"{len(ratios)} back-to-back epoch pairs"
        )
        print(f"overhead: {statistics.median(ratios):.3f}")
        return
    # The same run with the pruning method swapped for the dense baseline. Both are measured
    # against the hand loop epoch by epoch, so the machine's drift cancels out of each; the
    # runs alternate in ABBA order (dense first in even rounds, pruned first in odd ones).
    shared = [o for o in args.overrides if o.split("=")[0].split(".")[0] not in PRUNING_KEYS]
    runs = {"dense": [*shared, "pruning=dense"], "pruned": list(args.overrides)}
    ratios: dict[str, list[float]] = {"dense": [], "pruned": []}
    for round_ in range(args.rounds):
        for name in ("dense", "pruned") if round_ % 2 == 0 else ("pruned", "dense"):
            ratios[name] += paired_ratios(runs[name], args.epochs)
    dense, pruned = statistics.median(ratios["dense"]), statistics.median(ratios["pruned"])
    print("dense  / hand loop, per pair: " + " ".join(f"{q:.3f}" for q in ratios["dense"]))
    print("pruned / hand loop, per pair: " + " ".join(f"{q:.3f}" for q in ratios["pruned"]))
    print(
        f"prunelab {' '.join(args.overrides)} vs prunelab dense: {pruned:.3f}x vs {dense:.3f}x "
        f"the hand loop (medians of {len(ratios['dense'])} epoch pairs each)"
    )
    print(f"overhead: {pruned / dense:.3f}")


if __name__ == "__main__":
    main()
