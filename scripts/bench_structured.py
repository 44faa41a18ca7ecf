"""CPU latency of dense vs structurally compacted ResNet-20 and VGG-16, in one run.

    python scripts/bench_structured.py            # batches 1 and 64, 5 alternating rounds
    python scripts/bench_structured.py --quick    # one round of one block: a smoke test

For each model (CIFAR shape 3x32x32, 10 classes, random weights; BatchNorm given random
affine parameters and running statistics from a few train-mode passes, as a trained network
has), half of the channels of every channel group are pruned: the ``floor(size / 2)`` with
the smallest L1 norm over the group's producer filters (Li et al. 2017, "Pruning filters for
efficient convnets", with coupled residual producers summed). The compacted model is
:func:`prunelab.structured.compact` of those masks (Torch-Pruning, Fang et al. 2023,
"DepGraph", CVPR), checked against the masked model. MACs are counted on both models by
:func:`prunelab.cost.flops.layer_flops` (torch's FLOP counter, MACs = FLOPs / 2).

Timing follows :mod:`prunelab.cost.latency`: eval mode, inference mode, torch's default
number of intra-op threads (all cores; ``--threads`` sets another) for both models; dense and compacted forwards alternate in
``--rounds`` rounds, each the median of ``--repeats`` blocks (warm-up first), and the
reported latency is the median over rounds, so background load hits both alike. The load
average is printed before and after. The issue's target is a speedup of at least 0.8x the
MAC reduction. The last line is ``speedup_structured: <dense / compacted latency of VGG-16 at
batch 64>``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from prunelab.cost.flops import layer_flops  # noqa: E402
from prunelab.cost.latency import time_call  # noqa: E402
from prunelab.models import VGG16, ResNet20  # noqa: E402
from prunelab.structured import (  # noqa: E402
    channel_groups,
    channel_norms,
    compact_with_report,
    structured_masks,
)

INPUT_SHAPE = (3, 32, 32)
MODELS = {"ResNet-20": ResNet20, "VGG-16": VGG16}
TARGET = 0.8  # speedup >= TARGET x MAC reduction


def calibrate(model: nn.Module, seed: int, passes: int = 3, batch: int = 16) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics (train-mode passes on random
    data), so the BN shifts of pruned channels are not zero; eval mode after."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
        model.train()
        for _ in range(passes):
            model(torch.randn(batch, *INPUT_SHAPE, generator=gen))
    return model.eval()


def l1_structured_masks(model: nn.Module, fraction: float):
    """Per channel group, prune the ``floor(fraction * size)`` channels of smallest L1 norm."""
    groups = channel_groups(model, INPUT_SHAPE)
    pruned = {}
    for group in groups:
        k = int(fraction * group.size)
        if k:
            pruned[group.root] = torch.topk(channel_norms(model, group), k, largest=False).indices
    return structured_masks(model, groups, pruned)


def masked_copy(model: nn.Module, masks) -> nn.Module:
    out = copy.deepcopy(model).eval()
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--fraction", type=float, default=0.5, help="channels pruned per group")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-block-ms", type=float, default=50.0)
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads; 0 = torch's default (all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="one round of one block, lighter BN calibration"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats, args.warmup, args.min_block_ms = 1, 1, 1, 0.0
    if args.threads:
        torch.set_num_threads(args.threads)
    if 64 not in args.batches:
        args.batches.append(64)  # the headline's batch
    device = torch.device("cpu")
    load = os.getloadavg()
    print(
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{args.rounds} rounds x {args.repeats} blocks; {args.fraction:.0%} of the channels "
        "of every group pruned (L1-smallest)"
    )
    rows = []
    for label, cls in MODELS.items():
        torch.manual_seed(args.seed)
        passes, batch = (1, 4) if args.quick else (3, 16)
        dense = calibrate(cls(INPUT_SHAPE, 10), args.seed, passes, batch)
        masks = l1_structured_masks(dense, args.fraction)
        compacted, report = compact_with_report(dense, masks, INPUT_SHAPE)
        x = torch.randn(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(args.seed + 1))
        with torch.inference_mode():
            err = float((compacted(x) - masked_copy(dense, masks)(x)).abs().max())
        macs_dense = layer_flops(dense, INPUT_SHAPE).total / 2
        macs_compact = layer_flops(compacted, INPUT_SHAPE).total / 2
        print(
            f"{label}: {report.channels_removed} channels removed, params "
            f"{report.params_before:,} -> {report.params_after:,}, MACs/sample "
            f"{macs_dense / 1e6:.2f}M -> {macs_compact / 1e6:.2f}M, "
            f"{len(report.bias_maps)} bias maps, max |compacted - masked| {err:.1e}"
        )
        for batch in args.batches:
            xb = torch.randn(batch, *INPUT_SHAPE)
            times: dict[str, list[float]] = {"dense": [], "compact": []}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for kind, net in (("dense", dense), ("compact", compacted)):
                        stats = time_call(
                            lambda net=net, xb=xb: net(xb),
                            device,
                            repeats=args.repeats,
                            warmup=args.warmup,
                            min_block_s=args.min_block_ms / 1e3,
                        )
                        times[kind].append(stats["latency_ms"])
            dense_ms = statistics.median(times["dense"])
            compact_ms = statistics.median(times["compact"])
            rows.append((label, batch, dense_ms, compact_ms, macs_dense / macs_compact))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(
        f"{'model':<10} {'batch':>5} {'dense ms':>10} {'compact ms':>11} {'speedup':>8} "
        f"{'MAC red.':>9} {'speedup/MAC':>12} {'target':>7}"
    )
    headline = float("nan")
    for label, batch, dense_ms, compact_ms, reduction in rows:
        speedup = dense_ms / compact_ms
        ok = "met" if speedup >= TARGET * reduction else "missed"
        print(
            f"{label:<10} {batch:>5} {dense_ms:>10.3f} {compact_ms:>11.3f} {speedup:>7.2f}x "
            f"{reduction:>8.2f}x {speedup / reduction:>12.2f} {ok:>7}"
        )
        if label == "VGG-16" and batch == 64:
            headline = speedup
    print(f"speedup_structured: {headline:.2f}")


if __name__ == "__main__":
    main()
