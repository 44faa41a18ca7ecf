"""Evaluate and export a finished run: ``python eval.py <run dir>``.

Rebuilds the run's datamodule and model from its results record, loads the checkpoint
with the engine's masks, measures test accuracy, writes the three exports of
:func:`prunelab.cost.export.export_all` (plain state dict with zeros in place, compact
sparse checkpoint, ONNX), reloads each one and measures its test accuracy again (ONNX
through onnxruntime), and writes ``export/export.json`` with accuracies and file sizes.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.tracking.results import read_record, write_json_atomic

log = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(predict: Any, batches: Any) -> float:
    """Top-1 accuracy of ``predict(x) -> logits`` over (x, y) batches."""
    correct = total = 0
    for x, y in batches:
        logits = torch.as_tensor(predict(x))
        correct += int((logits.argmax(dim=1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def load_run(run_dir: Path, which: str = "last") -> dict[str, Any]:
    """The run's config, datamodule (set up for test), model with checkpoint weights, masks."""
    from prunelab.train import build

    record = read_record(run_dir)
    if record is None or record.get("status") != "completed":
        raise ConfigError(f"{run_dir} has no completed {files.RESULTS}; pass a finished run")
    name = files.LAST_CHECKPOINT if which == "last" else files.BEST_CHECKPOINT
    ckpt_path = files.checkpoint_dir(run_dir) / name
    if not ckpt_path.is_file():
        raise ConfigError(f"no checkpoint {ckpt_path}; use --checkpoint last or best")
    cfg = OmegaConf.create(record["config"])
    built = build(cfg)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    built["module"].load_state_dict(checkpoint["state_dict"])
    engine = built["engine"]
    engine.load_state_dict(checkpoint["sparsity_engine"])
    datamodule = built["datamodule"]
    datamodule.setup("test")
    model = built["model"].eval()
    return {"record": record, "model": model, "masks": engine.masks, "datamodule": datamodule}


def evaluate_and_export(run_dir: str | Path, which: str = "last") -> dict[str, Any]:
    """Export the run's model three ways and check each reload's test accuracy."""
    import onnxruntime

    from prunelab.cost.export import export_all, load_sparse_checkpoint

    run_dir = Path(run_dir)
    run = load_run(run_dir, which)
    model, masks, dm = run["model"], run["masks"], run["datamodule"]
    shape = tuple(dm.input_shape)
    test = list(dm.test_dataloader())
    paths = export_all(model, masks, shape, files.export_dir(run_dir))
    reference = accuracy(model, test)

    plain = copy.deepcopy(model)
    plain.load_state_dict(torch.load(paths["state_dict"], map_location="cpu", weights_only=True))
    sparse = load_sparse_checkpoint(paths["sparse"], copy.deepcopy(model)).eval()
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])

    def onnx_predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    report = {
        "run_dir": str(run_dir),
        "checkpoint": which,
        "test_acc": {
            "checkpoint": reference,
            "state_dict": accuracy(plain.eval(), test),
            "sparse": accuracy(sparse, test),
            "onnx": accuracy(onnx_predict, test),
        },
        "bytes": {name: path.stat().st_size for name, path in paths.items()},
        "files": {name: str(path) for name, path in paths.items()},
    }
    report["sparse_vs_state_dict"] = report["bytes"]["state_dict"] / report["bytes"]["sparse"]
    write_json_atomic(files.export_dir(run_dir) / files.EXPORT_REPORT, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate and export a finished prunelab run.")
    parser.add_argument("run_dir", help="a run folder (holds results.json and checkpoints/)")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        report = evaluate_and_export(args.run_dir, args.checkpoint)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, acc in report["test_acc"].items():
        size = report["bytes"].get(name)
        print(f"{name:>11}: test/acc {acc:.6f}" + (f"  {size:,} bytes" if size else ""))
    print(f"sparse checkpoint is {report['sparse_vs_state_dict']:.2f}x smaller than the state dict")
    return 0
