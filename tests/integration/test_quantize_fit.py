"""The quantize group through the real Hydra config: a tiny pruned fit, then quantization."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.quantization import check_quantize
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
PRUNED = ("pruning=static", "sparsity=0.8", "cost.latency=false")


def _masks(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final masks: the non-zeros of the prunable weights in ``last.ckpt``."""
    state = torch.load(files.last_checkpoint(run_dir), weights_only=False)["state_dict"]
    return {
        k.removeprefix("model."): v != 0
        for k, v in state.items()
        if k.startswith("model.") and k.endswith("weight") and v.dim() > 1
    }


def test_int8_ptq_keeps_masks_and_reloads_to_recorded_accuracy(compose_cfg, tmp_path):
    from prunelab.quantize import int8_weights, load_int8
    from prunelab.train import build

    cfg = compose_cfg(*PRUNED, "quantize=int8_ptq", "quantize.calibration_batches=2")
    record = train(cfg)
    assert record["status"] == "completed"
    cost, detail = record["cost"], record["quantize"]
    assert detail["method"] == "int8_ptq"
    assert cost["quant_masked_nonzero_int8"] == 0 and cost["quant_layers_fp32"] == 0
    assert abs(cost["quant_accuracy_drop"]) < 0.05
    int8_path = Path(detail["files"]["int8_onnx"])
    assert int8_path.parent == files.quantize_dir(tmp_path / "run")
    assert cost["bytes_onnx_int8"] == int8_path.stat().st_size < cost["bytes_onnx_fp32"]
    # masked positions are the integer 0 (zero-point 0) in the written file
    weights = int8_weights(int8_path)
    for name, mask in _masks(tmp_path / "run").items():
        w = weights[name]
        assert (w.q.reshape(mask.shape)[~mask.numpy()] == 0).all()
        assert (w.zero_point == 0).all()
    # the file reloads to the recorded accuracy, on the same test batches, same runtime
    built = build(cfg)
    datamodule = built["datamodule"]
    datamodule.setup("test")
    from prunelab.evaluate import accuracy

    reloaded = accuracy(load_int8(int8_path), list(datamodule.test_dataloader()))
    assert reloaded == pytest.approx(cost["quant_accuracy_int8"], abs=1e-6)


def test_qat_fine_tunes_with_masks_kept(compose_cfg, tmp_path):
    from prunelab.quantize import int8_weights

    cfg = compose_cfg(*PRUNED, "quantize=qat", "quantize.epochs=1", "quantize.lr=1e-3")
    record = train(cfg)
    cost, detail = record["cost"], record["quantize"]
    assert detail["qat"] == {"epochs": 1, "lr": 1e-3, "optimizer": "adam"}
    assert "quant_accuracy_fp32_after_qat" in cost and "quant_accuracy_int8" in cost
    weights = int8_weights(detail["files"]["int8_onnx"])
    for name, mask in _masks(tmp_path / "run").items():
        assert (weights[name].q.reshape(mask.shape)[~mask.numpy()] == 0).all()


def test_deep_compression_writes_a_file_smaller_than_dense(compose_cfg, tmp_path):
    from prunelab.quantize import load_compressed
    from prunelab.train import build

    cfg = compose_cfg(*PRUNED, "quantize=deep_compression", "quantize.bits=4")
    record = train(cfg)
    cost, detail = record["cost"], record["quantize"]
    path = Path(detail["files"]["deep_compression"])
    assert cost["bytes_deep_compression"] == path.stat().st_size
    assert cost["deep_compression_ratio"] > 5  # 80% sparse, 4-bit indices, Huffman coded
    model = load_compressed(path, build(cfg)["model"])
    for name, mask in _masks(tmp_path / "run").items():
        weight = dict(model.named_parameters())[name]
        assert (weight[~mask] == 0).all()
        assert weight[mask].unique().numel() <= 2**4 - 1  # shared values (0 is reserved)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("quantize=qat", "quantize.epochs=0"), "at least 1 epoch"),
        (("quantize=deep_compression", "quantize.bits=9"), "2..8 bits"),
        (("quantize=deep_compression", "quantize.bits=1"), "2..8 bits"),
        (("quantize=int8_ptq", "quantize.calibration_batches=0"), "at least 1 batch"),
        (("quantize=qat", "quantize.lr=-1"), "positive"),
    ],
)
def test_bad_quantize_options_fail_before_training(compose_cfg, tmp_path, overrides, message):
    cfg = compose_cfg(*PRUNED, *overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not files.checkpoint_dir(tmp_path / "run").exists()


def test_unknown_method_and_imp_are_refused():
    with pytest.raises(ConfigError, match="unknown quantize"):
        check_quantize({"name": "int4"})
    assert check_quantize(None) == "none"


def test_quantize_after_imp_is_a_one_line_error_from_the_command_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "pruning=imp",
            "quantize=int8_ptq",
            "logger.wandb.enabled=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "quantize=int8_ptq" in line]
    assert lines and "pruning=imp" in lines[0]
    assert (
        not (tmp_path / "run" / files.RESULTS).exists()
        or '"completed"' not in (tmp_path / "run" / files.RESULTS).read_text()
    )


def test_eval_writes_and_reloads_every_quantized_artefact(compose_cfg, tmp_path):
    from prunelab.evaluate import evaluate_and_export

    train(compose_cfg(*PRUNED, "quantize=int8_ptq", "quantize.calibration_batches=2"))
    report = evaluate_and_export(tmp_path / "run")
    acc, size = report["test_acc"], report["bytes"]
    # the run's int8 file reloads to the accuracy its record holds (same runtime, same batches)
    check = report["run_quantized"]["int8"]
    assert check["reloaded"] == pytest.approx(check["recorded"], abs=1e-6)
    # every artefact is on disk and measured; the packed int8 file is the smallest checkpoint
    for name in ("state_dict", "sparse", "sparse_int8", "onnx", "onnx_int8", "deep_compression"):
        assert size[name] == Path(report["files"][name]).stat().st_size > 0, name
    assert size["sparse_int8"] < size["sparse"] < size["state_dict"]
    assert size["onnx_int8"] < size["onnx"]
    assert size["deep_compression"] < size["sparse_int8"]
    for name in ("sparse_int8", "onnx_int8", "deep_compression"):
        assert abs(acc[name] - acc["checkpoint"]) < 0.05, name
