"""Hardware cost in the results record, and eval.py's exports, on real tiny runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prunelab import files
from prunelab.evaluate import evaluate_and_export
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
# The default MLP on MNIST-1D: 40-100-100-10; the residual add costs no counted FLOPs.
LAYER_MACS = {"layers.0.weight": 40 * 100, "layers.1.weight": 100 * 100, "head.weight": 100 * 10}
RIGL = (
    "pruning=rigl",
    "sparsity=0.9",
    "schedule.update_every=4",
    "epochs=2",
    "trainer.limit_train_batches=10",
    "cost.latency_repeats=2",
)


def test_rigl_training_flops_match_appendix_h(compose_cfg):
    record = train(compose_cfg(*RIGL))
    cost, sparsity = record["cost"], record["sparsity"]
    steps, updates, batch = record["global_step"], sparsity["n_updates"], 100
    assert steps == 20 and updates == 3  # updates at steps 4, 8, 12 (T_end = 0.75 * 20)
    f_dense = 2 * sum(LAYER_MACS.values())
    f_sparse = 2 * sum(m * (1 - sparsity["layers"][n]) for n, m in LAYER_MACS.items())
    # Evci et al. 2020, appendix H: (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1) per step on average,
    # i.e. 3 f_S on ordinary steps and 2 f_S + f_D on each update step.
    by_hand = batch * ((steps - updates) * 3 * f_sparse + updates * (2 * f_sparse + f_dense))
    assert cost["flops_train"] == pytest.approx(by_hand, rel=1e-9)
    assert cost["flops_train_x_dense"] == pytest.approx(by_hand / (3 * f_dense * batch * steps))
    assert cost["macs_infer_dense"] == sum(LAYER_MACS.values())
    assert cost["theoretical_speedup"] == pytest.approx(f_dense / f_sparse, rel=1e-9)
    assert cost["compression_ratio"] > 5
    for key in (
        "latency_ms/dense/b1",
        "latency_ms/sparse/b256",
        "bytes_csr",
        "energy_uj_estimate_sparse",
    ):
        assert cost[key] > 0, key


def test_dense_training_flops_are_three_forward_passes(compose_cfg):
    record = train(compose_cfg("pruning=dense", "cost.latency=false"))
    cost = record["cost"]
    f_dense = 2 * sum(LAYER_MACS.values())
    assert cost["flops_train"] == pytest.approx(3 * f_dense * 100 * record["global_step"])
    assert cost["flops_train_x_dense"] == pytest.approx(1.0)
    assert "latency_ms/dense/b1" not in cost


def test_exports_reload_to_the_same_accuracy(compose_cfg, tmp_path):
    train(compose_cfg(*RIGL, "cost.latency=false"))
    report = evaluate_and_export(tmp_path / "run")
    accs = report["test_acc"]
    for name in ("state_dict", "sparse", "onnx"):
        assert abs(accs[name] - accs["checkpoint"]) <= 1e-6, name
    assert report["sparse_vs_state_dict"] >= 5.0
    export = files.export_dir(tmp_path / "run")
    for name in (
        files.EXPORT_STATE_DICT,
        files.EXPORT_SPARSE,
        files.EXPORT_ONNX,
        files.EXPORT_REPORT,
    ):
        assert (export / name).stat().st_size > 0


def test_eval_cli_rejects_a_folder_without_a_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_structured_run_exports_a_smaller_compacted_model(compose_cfg, tmp_path):
    train(compose_cfg("pruning=structured_l1", "sparsity=0.5", "cost.latency=false"))
    report = evaluate_and_export(tmp_path / "run")
    accs, compact = report["test_acc"], report["compact"]
    for name in ("compact", "compact_onnx"):
        assert abs(accs[name] - accs["checkpoint"]) <= 1e-6, name
    assert compact["params"] < compact["params_before"]
    assert 0 < compact["macs"] < compact["macs_before"]
    export = files.export_dir(tmp_path / "run")
    for name in (files.EXPORT_COMPACT, files.EXPORT_COMPACT_ONNX):
        assert (export / name).stat().st_size > 0
    assert report["bytes"]["compact"] < report["bytes"]["state_dict"]
