"""Training-time overhead of prunelab, measured against a reference in the same run.

    python scripts/bench_overhead.py                          # dense prunelab vs a hand-written loop
    python scripts/bench_overhead.py pruning=rigl sparsity=0.9  # pruned vs dense, both via prunelab

Task: LeNet-300-100 on Fashion-MNIST (MNIST-1D MLP when Fashion-MNIST is not installed),
batch 100, Adam (fused, as configured), data in memory. Time per epoch is the median over
the timed epochs of the training loop alone (validation off), after one warm-up epoch; the
reference and the measured run alternate for ``--rounds`` rounds and each side's median
is used. The last line is ``overhead: <ratio>``.
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


def prunelab_epoch_time(overrides: list[str], epochs: int) -> float:
    """Median training-epoch time of a run through prunelab's own pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(
            [*common_overrides(epochs), *task_overrides(), "cost.enabled=false", *overrides], tmp
        )
        timer = EpochTimer()
        train(cfg, callbacks=[timer])
    return statistics.median(timer.times[1:])


def hand_loop_epoch_time(epochs: int) -> float:
    """Median epoch time of a plain PyTorch loop: same model, batch, optimizer (built from the
    same config, so fused where prunelab's is) and data."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*common_overrides(epochs), *task_overrides()], tmp)
        pl.seed_everything(0, verbose=False)
        built = build(cfg)
    dm, model = built["datamodule"], built["model"]
    dm.setup("fit")
    loader = dm.train_dataloader()
    optimizer = hydra.utils.instantiate(cfg.optimizer)(params=model.parameters())
    times = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the measured run")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (first is warm-up)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating reference/measured rounds"
    )
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    task = " ".join(task_overrides())
    references, measured = [], []
    # Alternate the two so that drift of the machine's speed hits both alike.
    for _ in range(args.rounds):
        if args.overrides:
            # The same run with the pruning method swapped for the dense baseline.
            shared = [
                o for o in args.overrides if o.split("=")[0].split(".")[0] not in PRUNING_KEYS
            ]
            references.append(prunelab_epoch_time([*shared, "pruning=dense"], args.epochs))
            measured.append(prunelab_epoch_time(args.overrides, args.epochs))
        else:
            references.append(hand_loop_epoch_time(args.epochs))
            measured.append(prunelab_epoch_time([], args.epochs))
    if args.overrides:
        label = f"prunelab {' '.join(args.overrides)} vs prunelab dense"
    else:
        label = "prunelab dense vs hand-written PyTorch loop"
    reference, value = statistics.median(references), statistics.median(measured)
    print(f"task: {task}")
    print("reference s/epoch per round: " + " ".join(f"{t:.3f}" for t in references))
    print("measured  s/epoch per round: " + " ".join(f"{t:.3f}" for t in measured))
    print(f"{label}: {value:.3f} s/epoch vs {reference:.3f} s/epoch (median of {args.rounds})")
    print(f"overhead: {value / reference:.3f}")


if __name__ == "__main__":
    main()
