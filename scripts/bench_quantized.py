"""int8 quantization of a 90%-sparse LeNet-300-100 on Fashion-MNIST: accuracy, size, speed.

    python scripts/bench_quantized.py             # trains once (cached), then measures
    python scripts/bench_quantized.py --retrain   # ignore the cache

The sparse model: LeNet-300-100 trained with Adam, magnitude-pruned to ``--sparsity`` in
every layer, fine-tuned with the masks (re-applied after every step); cached in
``outputs/bench_cache/quantized_lenet300_fmnist.pt``. Then, all on the official test set:

- fp32 sparse accuracy in torch and through onnxruntime (the ONNX export);
- int8 PTQ (:func:`prunelab.quantize.quantize_int8`: onnxruntime static quantization,
  symmetric per-channel int8 weights, uint8 activations calibrated on ``--calib-batches``
  training batches), its accuracy through onnxruntime, and again after reloading the file;
- QAT (:func:`prunelab.quantize.qat_finetune`, ``--qat-epochs`` epochs) converted the same
  way, its accuracy; the masks are checked after every QAT step;
- the pruned positions of every int8 weight (must be the integer 0), the file sizes;
- latency through onnxruntime of the fp32 export and of the int8 model (QDQ and QOperator
  formats), batch 1 and 256, same session options and threads (all cores by default);
  alternating rounds, each the median of timed blocks, the median over rounds reported.

The last line is ``int8_speedup: <fp32 / int8 (QDQ) latency at batch 256>``; the one before
says whether the checks passed (pruned int8 weights all 0, reloaded accuracy within 1e-6,
PTQ loss <= 0.5 point, QAT loss <= 0.2 point, int8 >= 1.5x faster at batch 256); the exit
status is 1 when one failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prunelab.cost.export import export_onnx  # noqa: E402
from prunelab.cost.latency import time_call  # noqa: E402
from prunelab.data import FashionMNISTDataModule  # noqa: E402
from prunelab.evaluate import accuracy  # noqa: E402
from prunelab.models import LeNet300_100, prunable_parameters  # noqa: E402
from prunelab.quantize import (  # noqa: E402
    OnnxModel,
    apply_masks,
    int8_weights,
    load_int8,
    qat_finetune,
    quantize_int8,
)

INPUT_SHAPE = (1, 28, 28)
CACHE = ROOT / "outputs" / "bench_cache" / "quantized_lenet300_fmnist.pt"


def magnitude_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, keep the ``round((1 - sparsity) * numel)`` largest |w|."""
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = round((1.0 - sparsity) * p.numel())
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.topk(p.detach().abs().flatten(), keep).indices] = True
        masks[name] = flat.view_as(p)
    return masks


def train(model, loader, epochs: int, lr: float, masks=None) -> None:
    """Adam on cross-entropy; with ``masks``, the masked weights are zeroed after each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if masks is not None:
                apply_masks(model, masks)
    model.eval()


def sparse_model(dm, args) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The pruned, fine-tuned model and its masks (from the cache when the recipe matches)."""
    recipe = {
        "seed": args.seed,
        "sparsity": args.sparsity,
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "batch_size": args.batch_size,
    }
    model = LeNet300_100(INPUT_SHAPE, 10)
    if CACHE.is_file() and not args.retrain:
        blob = torch.load(CACHE, map_location="cpu", weights_only=True)
        if blob.get("recipe") == recipe:
            model.load_state_dict(blob["state_dict"])
            print(f"sparse model: cached {CACHE.relative_to(ROOT)}")
            return model.eval(), blob["masks"]
    torch.manual_seed(args.seed)
    model = LeNet300_100(INPUT_SHAPE, 10)
    start = time.perf_counter()
    train(model, dm.train_dataloader(), args.epochs, 1e-3)
    dense = accuracy(model, dm.test_dataloader())
    masks = magnitude_masks(model, args.sparsity)
    apply_masks(model, masks)
    train(model, dm.train_dataloader(), args.finetune_epochs, 5e-4, masks)
    print(
        f"sparse model: trained in {time.perf_counter() - start:.0f} s "
        f"(dense test accuracy {dense:.4f})"
    )
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"recipe": recipe, "state_dict": model.state_dict(), "masks": masks}, CACHE)
    return model.eval(), masks


def masked_nonzeros(path: Path, masks: dict[str, torch.Tensor]) -> int:
    """Pruned positions whose dequantized int8 weight is not exactly 0.0, over all layers."""
    weights = int8_weights(path)
    return sum(
        int((torch.from_numpy(weights[name].dequantize())[~mask] != 0).sum())
        for name, mask in masks.items()
    )


def latencies(runners: dict, batch: int, rounds: int, repeats: int, min_block_ms: float) -> dict:
    """Median over alternating rounds of each runner's median block latency (ms)."""
    x = torch.randn(batch, *INPUT_SHAPE).numpy()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for kind, runner in runners.items():
            stats = time_call(
                lambda runner=runner: runner.run(x),
                torch.device("cpu"),
                repeats=repeats,
                warmup=3,
                min_block_s=min_block_ms / 1e3,
            )
            times[kind].append(stats["latency_ms"])
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads; 0 = all")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-block-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    threads = args.threads or None

    dm = FashionMNISTDataModule(
        data_dir=str(ROOT / "data"), batch_size=args.batch_size, num_workers=0, seed=args.seed
    )
    dm.setup()
    test = list(dm.test_dataloader())
    model, masks = sparse_model(dm, args)
    calib = dm.train_dataloader()  # the first --calib-batches training batches
    sparsity = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    figures: dict = {"sparsity": sparsity}

    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as tmp:
        out = Path(tmp)
        fp32_path = export_onnx(model, masks, INPUT_SHAPE, out / "fp32.onnx")
        fp32 = OnnxModel(fp32_path, threads)
        figures["acc_fp32_torch"] = accuracy(model, test)
        figures["acc_fp32_ort"] = accuracy(fp32, test)

        start = time.perf_counter()
        ptq = quantize_int8(
            model, masks, calib, INPUT_SHAPE, out / "int8.onnx", num_batches=args.calib_batches
        )
        figures["ptq_seconds"] = time.perf_counter() - start
        figures["acc_int8_ptq"] = accuracy(ptq, test)
        figures["acc_int8_ptq_reloaded"] = accuracy(load_int8(ptq.path, threads), test)
        qop = quantize_int8(
            model,
            masks,
            calib,
            INPUT_SHAPE,
            out / "int8_qoperator.onnx",
            num_batches=args.calib_batches,
            quant_format="qoperator",
        )
        figures["acc_int8_ptq_qoperator"] = accuracy(qop, test)

        qat_model = copy.deepcopy(model)
        bad_steps = []

        def check(net: torch.nn.Module, step: int) -> None:
            params = dict(net.named_parameters())
            if any(bool((params[n].detach()[~m] != 0).any()) for n, m in masks.items()):
                bad_steps.append(step)

        start = time.perf_counter()
        result = qat_finetune(
            qat_model, masks, dm.train_dataloader(), args.qat_epochs, lr=args.qat_lr, on_step=check
        )
        qat = quantize_int8(
            qat_model,
            masks,
            calib,
            INPUT_SHAPE,
            out / "int8_qat.onnx",
            num_batches=args.calib_batches,
        )
        figures["qat_seconds"] = time.perf_counter() - start
        figures["qat_steps"] = result.steps
        figures["qat_steps_with_unmasked_weights"] = len(bad_steps)
        figures["acc_fp32_qat_torch"] = accuracy(qat_model, test)
        figures["acc_int8_qat"] = accuracy(qat, test)
        figures["acc_int8_qat_reloaded"] = accuracy(load_int8(qat.path, threads), test)
        figures["masked_nonzero_int8"] = {
            "ptq": masked_nonzeros(ptq.path, masks),
            "ptq_qoperator": masked_nonzeros(qop.path, masks),
            "qat": masked_nonzeros(qat.path, masks),
        }
        figures["size_bytes"] = {
            "fp32_onnx": fp32.size_bytes,
            "int8_qdq_onnx": ptq.size_bytes,
            "int8_qoperator_onnx": qop.size_bytes,
            "int8_qat_onnx": qat.size_bytes,
        }
        figures["report"] = ptq.report.as_dict()

        runners = {"fp32": fp32, "int8_qdq": ptq, "int8_qoperator": qop}
        figures["threads"] = fp32.session.get_session_options().intra_op_num_threads
        figures["latency_ms"] = {
            str(batch): latencies(runners, batch, args.rounds, args.repeats, args.min_block_ms)
            for batch in (1, 256)
        }

    import onnxruntime

    f = figures
    print(
        f"LeNet-300-100 / Fashion-MNIST, sparsity {sparsity:.3f}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, {f['threads']} threads"
    )
    print(f"int8: {ptq.report.note}; calibration {ptq.report.calibration_samples} train samples")
    print(
        f"accuracy  fp32 torch {f['acc_fp32_torch']:.4f}  fp32 ORT {f['acc_fp32_ort']:.4f}  "
        f"int8 PTQ {f['acc_int8_ptq']:.4f} (QOperator {f['acc_int8_ptq_qoperator']:.4f})  "
        f"int8 QAT {f['acc_int8_qat']:.4f} (fp32 after QAT {f['acc_fp32_qat_torch']:.4f})"
    )
    print(
        f"loss vs fp32 ORT (points)  PTQ {100 * (f['acc_fp32_ort'] - f['acc_int8_ptq']):+.2f}  "
        f"QAT {100 * (f['acc_fp32_ort'] - f['acc_int8_qat']):+.2f}"
    )
    print(
        "reloaded int8 accuracy diff  PTQ "
        f"{abs(f['acc_int8_ptq_reloaded'] - f['acc_int8_ptq']):.1e}  QAT "
        f"{abs(f['acc_int8_qat_reloaded'] - f['acc_int8_qat']):.1e}"
    )
    print(
        f"masks: non-zero int8 weights at pruned positions {f['masked_nonzero_int8']}; "
        f"QAT steps with a pruned weight non-zero {len(bad_steps)} of {result.steps}"
    )
    size = f["size_bytes"]
    print(
        "size on disk  "
        + "  ".join(f"{k} {v / 1024:.1f} KiB" for k, v in size.items())
        + f"  (fp32/int8 {size['fp32_onnx'] / size['int8_qdq_onnx']:.2f}x)"
    )
    for batch, lat in f["latency_ms"].items():
        print(
            f"latency batch {batch:>3}  "
            + "  ".join(f"{k} {v:.4f} ms" for k, v in lat.items())
            + f"  speedup QDQ {lat['fp32'] / lat['int8_qdq']:.2f}x"
            + f"  QOperator {lat['fp32'] / lat['int8_qoperator']:.2f}x"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2))
    lat = f["latency_ms"]["256"]
    speedup = lat["fp32"] / lat["int8_qdq"]
    checks = {
        "pruned int8 weights all 0": not any(f["masked_nonzero_int8"].values()) and not bad_steps,
        "reload within 1e-6": max(
            abs(f["acc_int8_ptq_reloaded"] - f["acc_int8_ptq"]),
            abs(f["acc_int8_qat_reloaded"] - f["acc_int8_qat"]),
        )
        <= 1e-6,
        "PTQ loss <= 0.5 point": f["acc_fp32_ort"] - f["acc_int8_ptq"] <= 0.005,
        "QAT loss <= 0.2 point": f["acc_fp32_ort"] - f["acc_int8_qat"] <= 0.002,
        "int8 >= 1.5x at batch 256": speedup >= 1.5,
    }
    failed = [k for k, ok in checks.items() if not ok]
    print(f"checks: {'all passed' if not failed else 'FAILED ' + '; '.join(failed)}")
    print(f"int8_speedup: {speedup:.2f}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
