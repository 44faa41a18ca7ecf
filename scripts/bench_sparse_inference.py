"""Real sparse-kernel inference speed of LeNet-300-100 on the CPU, against dense, in one run.

    python scripts/bench_sparse_inference.py                 # sparsities 0.98 and 0.9, 1 thread
    python scripts/bench_sparse_inference.py --threads 0     # torch's default thread count

Random weights; masks keep the largest magnitudes of each layer at a uniform sparsity (98% and
90%). The sparse model (:func:`prunelab.cost.build_sparse_model`) runs every Linear layer as a
CSR x dense product. Batch 256. Dense and sparse forwards are timed in alternating rounds, each
round the median of ``--repeats`` blocks (of at least ``--min-block-ms`` each), and the reported
latency is the median over rounds, so background load hits both alike. The FLOP-ideal speedup
at 90% is 10x. The last line is ``speedup_90: <dense / sparse latency at 90%>``.

Threads: one intra-op thread by default, for both models. On the project's shared 2-core
machine two threads make timings erratic (OpenMP workers compete with other jobs), and they
help the dense kernel more than the sparse path, whose fixed cost of transposing the input
to the CSR kernel's layout (about 0.09 ms of the 0.4 ms at 90%) does not shrink: measured
there (torch 2.14.1), 90% sparsity gave about 2.45x with one thread and about 1.9x with two.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from prunelab.cost.latency import build_sparse_model, time_call  # noqa: E402
from prunelab.models import LeNet300_100, prunable_parameters  # noqa: E402

INPUT_SHAPE = (1, 28, 28)


def magnitude_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, keep the ``round((1 - sparsity) * numel)`` largest |w|."""
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = round((1.0 - sparsity) * p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.topk(p.detach().abs().flatten(), keep).indices] = True
        masks[name] = flat.view_as(p)
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.98, 0.9])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--min-block-ms", type=float, default=20.0)
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads; 0 = torch's default"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = LeNet300_100(INPUT_SHAPE, 10).eval()
    x = torch.randn(args.batch, *INPUT_SHAPE)
    device = torch.device("cpu")
    print(
        f"LeNet-300-100, batch {args.batch}, CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.repeats} blocks"
    )
    speedups = {}
    for sparsity in args.sparsities:
        masks = magnitude_masks(model, sparsity)
        sparse = build_sparse_model(model, masks, max_density=1.0)
        with torch.inference_mode():
            ref = copy.deepcopy(model)  # the masked dense model, for the output check
            for name, p in ref.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
            err = (sparse(x) - ref(x)).abs().max().item()
            times: dict[str, list[float]] = {"dense": [], "sparse": []}
            for _ in range(args.rounds):
                for kind, net in (("dense", model), ("sparse", sparse)):
                    stats = time_call(
                        lambda net=net: net(x),
                        device,
                        repeats=args.repeats,
                        warmup=2,
                        min_block_s=args.min_block_ms / 1e3,
                    )
                    times[kind].append(stats["latency_ms"])
        dense_ms = statistics.median(times["dense"])
        sparse_ms = statistics.median(times["sparse"])
        speedups[sparsity] = dense_ms / sparse_ms
        print(
            f"sparsity {sparsity:.2f}: dense {dense_ms:.3f} ms  real-sparse (CSR) "
            f"{sparse_ms:.3f} ms  dense/real-sparse {speedups[sparsity]:.2f}x  "
            f"(FLOP ideal {1 / (1 - sparsity):.0f}x, max |diff| vs masked {err:.1e})"
        )
    if 0.9 in speedups:
        print(f"speedup_90: {speedups[0.9]:.2f}")
    else:
        print("speedup_90: nan")


if __name__ == "__main__":
    main()
