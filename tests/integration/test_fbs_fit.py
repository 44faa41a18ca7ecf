"""pruning=fbs through the real config and Lightning: a tiny fit of gated Conv-4 on
Fashion-MNIST and of the MNIST-1D CNN, the record's dynamic-cost fields, and bad input
refused before training."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.train import build, train

ROOT = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
COST = (
    "cost.latency_batch_sizes=[1]",
    "pruning.mac_samples=300",
    "pruning.latency_samples=4",
)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST (dataset-fashion-mnist) absent")
@pytest.mark.parametrize("gating", ["topk", "threshold"])
def test_fbs_conv4_fit_records_dynamic_cost(compose_cfg, gating):
    cfg = compose_cfg(
        "dataset=fashion_mnist",
        "model=conv4",
        "pruning=fbs",
        "sparsity=0.5",
        f"pruning.gating={gating}",
        "trainer.limit_train_batches=3",
        "trainer.limit_test_batches=1",
        *COST,
    )
    record = train(cfg)
    assert record["status"] == "completed"
    cost, sparsity = record["cost"], record["sparsity"]
    assert 0.0 <= record["metrics"]["test/acc"] <= 1.0
    assert sparsity["target"] == 0.5 and sparsity["global"] == 0.0  # no weight is pruned
    method = sparsity["method"]
    assert method["gating"] == gating and method["density"] == 0.5
    assert len(method["gated_convs"]) == 4
    assert cost["dynamic_samples"] == 300
    dense = cost["macs_dynamic_dense"]
    assert dense == cost["macs_infer_dense"]  # the FLOP counter's count of the plain model
    for key in ("mean", "p50", "p90", "p99"):
        assert 0 < cost[f"macs_dynamic_{key}"] < dense
    assert cost["macs_dynamic_p50"] <= cost["macs_dynamic_p90"] <= cost["macs_dynamic_p99"]
    # middle layers skip inputs and outputs: well under half the dense MACs at density 0.5
    assert cost["macs_dynamic_mean"] < 0.4 * dense
    for variant in ("dense_plain", "gated_masked", "dynamic"):
        assert cost[f"latency_ms/{variant}/b1"] > 0
    assert cost["dynamic_max_abs_diff"] <= 1e-4 and cost["dynamic_agreement"] == 1.0
    if gating == "topk":
        assert cost["dynamic_density_mean"] <= 0.5 + 1e-9
    else:
        assert method["thresholds"] and all(t > 0 for t in method["thresholds"])
    # the checkpoint holds the predictors (and the thresholds)
    state = torch.load(files.last_checkpoint(record["run_dir"]), weights_only=False)["state_dict"]
    assert any(k.startswith("pruning_state.predictors.") for k in state)
    assert "pruning_state.thresholds" in state
    # the table script reads the record, and re-times from the checkpoint (gates restored)
    table = _fbs_table()
    [row] = table.rows([record["run_dir"]], samples=2, rounds=1)
    assert row["method"] == ("fbs" if gating == "topk" else "fbs-threshold")
    assert row["MACs mean"] == pytest.approx(cost["macs_dynamic_mean"])
    assert row["ms dense"] > 0 and row["ms pruned"] > 0 and row["speedup"] > 0
    plot = Path(record["run_dir"]) / "plot.png"
    table.plot([row], plot)
    assert plot.stat().st_size > 0
    assert "| conv4 |" in table.markdown([row])


def _fbs_table():
    spec = importlib.util.spec_from_file_location("fbs_table", ROOT / "scripts" / "fbs_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fbs_mnist1d_cnn_fit_and_penalty(compose_cfg):
    cfg = compose_cfg(
        "model=mnist1d_cnn", "pruning=fbs", "sparsity=0.6", "pruning.l1_lambda=0.01", *COST
    )
    built = build(cfg)
    module, engine = built["module"], built["engine"]
    module.setup("fit")
    assert len(module.pruning_state.predictors) == 3
    datamodule = built["datamodule"]
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    module.train()
    loss = module.training_loss((x, y))
    penalty = engine.penalty(0)
    assert penalty is not None and penalty.item() > 0
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(module.model(x), y) + penalty)
    record = train(compose_cfg("model=mnist1d_cnn", "pruning=fbs", "sparsity=0.6", *COST))
    assert record["status"] == "completed"
    assert record["cost"]["macs_dynamic_mean"] < record["cost"]["macs_dynamic_dense"]
    # eval.py exports fixed models: it refuses an input-adaptive run in one line.
    from prunelab.evaluate import resolve_checkpoint

    with pytest.raises(ConfigError, match="input-adaptive"):
        resolve_checkpoint(run_dir=record["run_dir"])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("model=lenet300_100", "dataset=digits"), "has no convolution"),
        (("model=mnist1d_cnn", "pruning.density=1.5"), "pruning.density must be a number"),
        (("model=mnist1d_cnn", "pruning.gating=sometimes"), "pruning.gating must be one of"),
        (("model=mnist1d_cnn", "pruning.density=0.3"), "sparsity = 1 - density"),
    ],
)
def test_bad_input_is_refused_before_training(compose_cfg, tmp_path, overrides, needle):
    with pytest.raises(ConfigError) as err:
        train(compose_cfg("pruning=fbs", "sparsity=0.5", *overrides))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cli_fbs_on_a_model_without_convolutions_exits_2(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "pruning=fbs",
            "model=mlp",
            "sparsity=0.5",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "pruning=fbs gates convolution channels" in lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))
    for path in tmp_path.rglob(files.RESULTS):
        assert json.loads(path.read_text())["status"] == "failed"


def test_density_one_is_boosting_without_suppression(compose_cfg):
    from prunelab.config import pruning_method

    method = pruning_method(compose_cfg("model=mnist1d_cnn", "pruning=fbs", "sparsity=0"))
    assert method.density == 1.0
    with pytest.raises(ConfigError, match="needs sparsity > 0"):
        pruning_method(compose_cfg("pruning=static", "sparsity=0"))


def _calibrate_on_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a two-process gloo group: calibrate threshold gates on this rank's own
    random batches, then save the thresholds."""
    import torch.distributed as dist

    from prunelab.dynamic import FBSGates, gate_points
    from prunelab.models import Conv4

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)  # the same model and gates on every rank
        model = Conv4((1, 28, 28), 10)
        gates = FBSGates(gate_points(model), dict(model.named_modules()), 0.5, "threshold")
        torch.manual_seed(100 + rank)  # each rank its own data
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 1, 28, 28))
        torch.save(gates.thresholds.clone(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_threshold_calibration_agrees_across_ddp_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_calibrate_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(a, b) and bool((a != 0).all())
