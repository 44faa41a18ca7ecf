"""Real sparse-kernel inference speed of a trained LeNet-300-100 on the CPU, against dense, in one run.

    python scripts/bench_sparse_inference.py                # all threads torch gives
    python scripts/bench_sparse_inference.py --threads 1    # one intra-op thread, both models
    python scripts/bench_sparse_inference.py --ckpt outputs/<run>/checkpoints/last.ckpt

Weights: LeNet-300-100 trained on Fashion-MNIST (the IDX files of ``make data``) with plain
SGD, seeded: ``--epochs`` dense epochs, then per-layer magnitude pruning to ``--sparsity``
and ``--finetune-epochs`` of fine-tuning with the mask applied. Block-sparse variants (masks
of 1x4 and 4x4 blocks at the same sparsity, keeping the blocks of largest L2 norm, also
fine-tuned) are reported too (``--blocks``). Trained weights are cached under
``outputs/bench_cache/`` (delete it to retrain); ``--ckpt`` takes the weights of a run
instead (its zeros are the mask).

Sparse model: :func:`prunelab.cost.build_sparse_model` with ``autotune=True`` at each batch
size: the chain is compacted (dead neurons, unused inputs dropped), every layer's kernel is
the fastest of dense, torch CSR/BSR, SciPy CSR/BSR and a numba CSR kernel timed on this
machine, and the whole chain runs either layer by layer (feature-major, one transpose in
and out) or as one fused numba call, whichever is faster (choices cached in
``outputs/bench_cache/sparse_kernels.json``). Its output is checked against the masked dense
model (max |diff| printed). ``torch_csr`` is the untuned path (``autotune=False``: every
layer on torch's CSR kernel), for comparison.

Reference: the trained dense model (before pruning) run the normal way: eval mode,
``torch.inference_mode``, warm, the same intra-op thread count as the sparse model. Inputs
are the first ``batch`` Fashion-MNIST test images. Timing: dense, sparse and torch_csr
forwards in alternating rounds, each round the median of ``--repeats`` blocks of at least
``--min-block-ms``; the latency is the median over ``--rounds`` rounds, so background load
hits all alike. On a shared machine two-thread timings are wrecked by other jobs (a thread
descheduled at a barrier costs a whole time slice), so each round (and each autotune) first
waits, up to ``--quiet-wait`` seconds, until the CPUs are mostly idle; rounds that found no
quiet moment are counted in the output, with the max/min spread of the rounds.

Output: accuracy of each model, per batch size (256 and 1) and mask the chosen kernels and
the latencies; then ``speedup_90_batch1: <dense / sparse at batch 1>`` and, last,
``speedup_90: <dense / sparse at batch 256>`` (unstructured mask at ``--sparsity``, 0.9).

Measured on the project's 2-core AMD EPYC (AVX-512), torch 2.14.1, numba 0.68.1, in quiet
moments (90%, trained weights; dense accuracy 85.6%, pruned 86.9%):

- batch 256: dense 0.80 ms, sparse 0.20 ms: 3.96x with 2 threads (1 thread: 1.34 ms vs
  0.29 ms, 4.66x); the whole chain fused, CSR layers, tiles of 128 samples per thread.
  torch's CSR kernel alone (the untuned path): 1.29x (2.36x with 1 thread).
- batch 1: dense 32.5 us, sparse 13.3 us: 2.45x (1 thread 2.40x); fused chain, CSR first
  layer. Where the time goes: the dense model's first GEMV is about 10 us, the rest is
  per-op overhead (six torch ops through nn.Module calls); the fused runner is one numba
  call (about 2 us of glue) whose first-layer CSR product (23.5k non-zeros, AVX-512
  gathers on uint16 indices) takes about 8 us. With that layer in dense format the fused
  runner takes about 16 us: at batch 1 most of the gain is less overhead (one call instead
  of six ops, and compaction), the CSR kernel itself adds about 1.2x.
- block masks at 90% (1x4 / 4x4 blocks; accuracy 86.5% / 75.4%): about 4.2x / 5.2x at
  batch 256 and 2.5x / 2.9x at batch 1 (the 4x4 mask leaves many dead inputs and neurons,
  so compaction does much of the work; torch's CPU BSR kernel, MKL's, never won).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from prunelab import files  # noqa: E402
from prunelab.cost.latency import build_sparse_model, cpu_model, time_call  # noqa: E402
from prunelab.errors import ConfigError  # noqa: E402
from prunelab.models import LeNet300_100, prunable_parameters  # noqa: E402

INPUT_SHAPE = (1, 28, 28)
CACHE_DIR = ROOT / files.OUTPUTS_DIR / "bench_cache"


def load_fashion_mnist(seed: int) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` of Fashion-MNIST, normalised, in memory."""
    from prunelab.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(data_dir=str(ROOT / "data"), val_fraction=0.0, seed=seed)
    try:
        dm.check_available()
        dm.setup()
    except ConfigError as err:
        sys.exit(f"Fashion-MNIST is needed for trained weights: {err}\nRun `make data`.")
    x_train, y_train = dm._tensors("train")
    x_test, y_test = dm._tensors("test")
    return x_train, y_train, x_test, y_test


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])


def train(model, data, epochs: int, seed: int, masks=None, lr: float = 0.05) -> None:
    """Plain SGD (momentum 0.9, batch 128) for ``epochs``, the mask re-applied each step."""
    x, y = data[0], data[1]
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 128):
            idx = order[start : start + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks:
                apply_masks(model, masks)
    model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, keep the ``round((1 - sparsity) * numel)`` largest |w|."""
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = round((1.0 - sparsity) * p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.topk(p.detach().abs().flatten(), keep).indices] = True
        masks[name] = flat.view_as(p)
    return masks


def block_masks(model: nn.Module, sparsity: float, block: tuple[int, int]) -> dict:
    """Per layer, keep the ``round((1 - sparsity) * n_blocks)`` blocks of largest L2 norm
    (a layer whose shape is not a multiple of the block is zero-padded first)."""
    br, bc = block
    masks = {}
    for name, p in prunable_parameters(model).items():
        w = p.detach()
        rows, cols = w.shape
        pr, pc = -rows % br, -cols % bc
        padded = F.pad(w, (0, pc, 0, pr))
        nr, nc = padded.shape[0] // br, padded.shape[1] // bc
        norms = padded.reshape(nr, br, nc, bc).pow(2).sum(dim=(1, 3)).flatten()
        keep = max(1, round((1.0 - sparsity) * norms.numel()))
        kept = torch.zeros(norms.numel(), dtype=torch.bool)
        kept[torch.topk(norms, keep).indices] = True
        full = kept.view(nr, 1, nc, 1).expand(nr, br, nc, bc).reshape(nr * br, nc * bc)
        masks[name] = full[:rows, :cols].contiguous()
    return masks


def trained_models(args, data) -> tuple[nn.Module, dict[str, tuple[nn.Module, dict]]]:
    """The dense model and ``{label: (pruned model, masks)}``, trained or from the cache."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"lenet300_100_fmnist_seed{args.seed}_e{args.epochs}"
    dense_path = CACHE_DIR / f"{stem}_dense.pt"
    torch.manual_seed(args.seed)
    dense = LeNet300_100(INPUT_SHAPE, 10)
    if dense_path.is_file():
        dense.load_state_dict(torch.load(dense_path, weights_only=True))
    else:
        start = time.perf_counter()
        train(dense, data, args.epochs, args.seed)
        torch.save(dense.state_dict(), dense_path)
        print(f"trained dense ({args.epochs} epochs) in {time.perf_counter() - start:.1f} s")
    dense.eval()
    patterns: list[tuple[str, tuple[int, int] | None]] = [("unstructured", None)]
    patterns += [(f"{r}x{c} blocks", (r, c)) for r, c in args.blocks]
    pruned = {}
    for label, block in patterns:
        tag = "unstr" if block is None else f"blk{block[0]}x{block[1]}"
        path = CACHE_DIR / f"{stem}_s{args.sparsity:g}_{tag}_ft{args.finetune_epochs}.pt"
        model = LeNet300_100(INPUT_SHAPE, 10)
        if path.is_file():
            blob = torch.load(path, weights_only=True)
            model.load_state_dict(blob["state"])
            masks = blob["masks"]
        else:
            model.load_state_dict(dense.state_dict())
            masks = (
                magnitude_masks(model, args.sparsity)
                if block is None
                else block_masks(model, args.sparsity, block)
            )
            apply_masks(model, masks)
            train(model, data, args.finetune_epochs, args.seed + 1, masks, lr=0.02)
            torch.save({"state": model.state_dict(), "masks": masks}, path)
        pruned[label] = (model.eval(), masks)
    return dense, pruned


def from_checkpoint(path: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A pruned LeNet-300-100 from a run's checkpoint (Lightning's, or a plain state dict);
    the mask is where its prunable weights are non-zero."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = blob.get("state_dict", blob.get("state", blob)) if isinstance(blob, dict) else blob
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model = LeNet300_100(INPUT_SHAPE, 10)
    model.load_state_dict(state)
    masks = {n: p.detach() != 0 for n, p in prunable_parameters(model).items()}
    return model.eval(), masks


def cpu_idle(window_s: float = 0.5) -> float | None:
    """The share of the machine's CPU time that was idle over ``window_s`` (``/proc/stat``;
    ``None`` where there is none)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields[:8]), fields[3] + fields[4]

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait_s: float, min_idle: float = 0.8) -> bool:
    """Wait (at most ``max_wait_s``) until other jobs leave the CPUs mostly idle; True when
    they did (or when this cannot be known)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        idle = cpu_idle()
        if idle is None or idle >= min_idle:
            return True
        if time.monotonic() >= deadline:
            return False


def race(models: dict[str, nn.Module], x: torch.Tensor, args) -> tuple[dict, dict, int]:
    """Median and spread (max/min) of each model's latency (ms) over alternating rounds, and
    the number of rounds that started while other jobs kept the CPUs busy."""
    times: dict[str, list[float]] = {name: [] for name in models}
    device = torch.device("cpu")
    loaded = 0
    with torch.inference_mode():
        for _ in range(args.rounds):
            loaded += not wait_for_quiet(args.quiet_wait)
            for name, net in models.items():
                stats = time_call(
                    lambda net=net: net(x),
                    device,
                    repeats=args.repeats,
                    warmup=3,
                    min_block_s=args.min_block_ms / 1e3,
                )
                times[name].append(stats["latency_ms"])
    median = {name: statistics.median(t) for name, t in times.items()}
    spread = {name: max(t) / min(t) for name, t in times.items()}
    return median, spread, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument(
        "--blocks",
        type=lambda s: tuple(int(v) for v in s.lower().split("x")),
        nargs="*",
        default=[(1, 4), (4, 4)],
        help="block masks to report too, e.g. 1x4 4x4 (none: --blocks)",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--min-block-ms", type=float, default=20.0)
    parser.add_argument(
        "--threads", type=int, default=0, help="intra-op threads; 0 (default) = all torch gives"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt", help="a run's checkpoint of a pruned LeNet-300-100 instead")
    parser.add_argument(
        "--retune", action="store_true", help="forget the cached kernel choices, time again"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each round (and each autotune) wait up to this many seconds for other "
        "jobs to leave the CPUs >= 80%% idle (0: do not wait)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    data = load_fashion_mnist(args.seed)
    x_test, y_test = data[2], data[3]
    dense, pruned = trained_models(args, data)
    if args.ckpt:
        pruned = {"checkpoint": from_checkpoint(args.ckpt)}
    try:
        import numba

        numba_note = f"numba {numba.__version__}"
    except ImportError:
        numba_note = "numba not installed (its kernels skipped)"
    print(
        f"LeNet-300-100 on Fashion-MNIST, CPU {cpu_model()}, torch {torch.__version__}, "
        f"{threads} intra-op thread{'s' if threads > 1 else ''}"
        f"{' (all)' if not args.threads else ''}, {numba_note}; "
        f"{args.rounds} rounds x {args.repeats} blocks of >= {args.min_block_ms:g} ms"
    )
    print(
        "reference: the trained dense model, eval, inference_mode, warm, same threads; "
        "inputs: the first <batch> test images"
    )
    print(f"accuracy: dense {accuracy(dense, x_test, y_test):.2%}", end="")
    for label, (model, masks) in pruned.items():
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        print(f", {label} ({1 - kept / total:.0%}) {accuracy(model, x_test, y_test):.2%}", end="")
    print()
    cache = CACHE_DIR / files.SPARSE_KERNEL_CACHE
    if args.retune:
        cache.unlink(missing_ok=True)
    speedups: dict[tuple[str, int], float] = {}
    for label, (model, masks) in pruned.items():
        reference = copy.deepcopy(model).eval()  # the masked dense model, for the check
        apply_masks(reference, masks)
        csr = build_sparse_model(model, masks, max_density=1.0)
        for batch in args.batches:
            x = x_test[:batch].contiguous()
            wait_for_quiet(args.quiet_wait)
            start = time.perf_counter()
            sparse = build_sparse_model(model, masks, autotune=True, batch_size=batch, cache=cache)
            tune_s = time.perf_counter() - start
            with torch.inference_mode():
                err = float((sparse(x) - reference(x)).abs().max())
            times, spread, loaded = race(
                {"dense": dense, "sparse": sparse, "torch_csr": csr}, x, args
            )
            ratio = times["dense"] / times["sparse"]
            speedups[(label, batch)] = ratio
            kernels = ", ".join(f"{n}={k}" for n, k in sparse.kernels.items())
            load_note = f"; {loaded}/{args.rounds} rounds under load" if loaded else ""
            print(
                f"[{label}] batch {batch}: {type(sparse).__name__} ({kernels}; chosen in "
                f"{tune_s:.1f} s)\n"
                f"    dense {times['dense']:.4f} ms  sparse {times['sparse']:.4f} ms  "
                f"dense/sparse {ratio:.2f}x  (torch_csr {times['torch_csr']:.4f} ms, "
                f"{times['dense'] / times['torch_csr']:.2f}x; max |diff| vs masked {err:.1e}; "
                f"max/min over rounds: dense {spread['dense']:.2f}, sparse "
                f"{spread['sparse']:.2f}{load_note})"
            )
    main_label = "checkpoint" if args.ckpt else "unstructured"
    batch1 = speedups.get((main_label, 1), float("nan"))
    batch256 = speedups.get((main_label, 256), float("nan"))
    print(f"speedup_90_batch1: {batch1:.2f}")
    print(f"speedup_90: {batch256:.2f}")


if __name__ == "__main__":
    main()
