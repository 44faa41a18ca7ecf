"""The real Hydra config, composed and fitted for a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]


def _test_accuracy_of_last_checkpoint(cfg, run_dir: Path) -> float:
    """Top-1 accuracy of ``last.ckpt`` on the batches of the test split the run evaluated,
    computed here from the weights alone (a fresh model, no Lightning, no torchmetrics)."""
    import torch

    from prunelab.train import build

    built = build(cfg)
    state = torch.load(files.last_checkpoint(run_dir), weights_only=False)["state_dict"]
    model = built["model"]
    model.load_state_dict(
        {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    )
    model.eval()
    datamodule = built["datamodule"]
    datamodule.setup("test")
    limit = cfg.trainer.limit_test_batches
    correct = total = 0
    with torch.no_grad():
        for i, (x, y) in enumerate(datamodule.test_dataloader()):
            if limit is not None and i >= limit:
                break
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total


def test_default_run_writes_completed_record(compose_cfg, tmp_path):
    cfg = compose_cfg()
    record = train(cfg)
    on_disk = json.loads(files.results_path(tmp_path / "run").read_text())
    assert on_disk["status"] == "completed" == record["status"]
    for key in ("test/acc", "test/loss", "val/acc_best", "val/acc", "train/loss"):
        assert key in on_disk["metrics"], key
    recomputed = _test_accuracy_of_last_checkpoint(cfg, tmp_path / "run")
    assert on_disk["metrics"]["test/acc"] == pytest.approx(recomputed, abs=1e-5)
    assert on_disk["sparsity"]["global"] == 0.0
    assert set(on_disk["sparsity"]["layers"]) == {
        "layers.0.weight",
        "layers.1.weight",
        "head.weight",
    }
    assert on_disk["choices"]["dataset"] == "mnist1d" and on_disk["choices"]["model"] == "mlp"
    assert len(on_disk["config_hash"]) == 12 and on_disk["seed"] == 0
    assert on_disk["config"]["optimizer"]["lr"] > 0
    assert files.csv_metrics(tmp_path / "run").exists()
    assert files.last_checkpoint(tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ("model=mnist1d_cnn",),
        ("dataset=digits", "model=conv6"),
        ("dataset=digits", "model=conv4", "optimizer=sgd", "lr=0.05", "lr_scheduler=cosine"),
        ("dataset=digits", "model=resnet20", "optimizer=adamw", "lr_scheduler=multistep"),
    ],
)
def test_models_and_datasets_fit(compose_cfg, tmp_path, overrides):
    cfg = compose_cfg(*overrides)
    record = train(cfg)
    assert record["status"] == "completed"
    # The reported metric is the accuracy of the weights the run saved, on the test data.
    recomputed = _test_accuracy_of_last_checkpoint(cfg, tmp_path / "run")
    assert record["metrics"]["test/acc"] == pytest.approx(recomputed, abs=1e-5)


def test_default_recipe_learns_in_two_epochs(compose_cfg):
    """Two full epochs of the default (MNIST-1D MLP, 10 classes) beat chance (0.1) by far on
    the whole test split: the run trains and tests the model it reports on."""
    record = train(compose_cfg("epochs=2", "cost.enabled=false", fast=False))
    assert record["global_step"] == 72
    assert record["metrics"]["test/acc"] > 0.3


def test_config_hash_shared_across_seeds(compose_cfg, tmp_path):
    a = train(compose_cfg("seed=1", run_dir=tmp_path / "a"))
    b = train(compose_cfg("seed=2", run_dir=tmp_path / "b"))
    c = train(compose_cfg("seed=1", "lr=0.002", run_dir=tmp_path / "c"))
    assert a["config_hash"] == b["config_hash"] != c["config_hash"]


def test_model_dataset_mismatch_is_a_config_error(compose_cfg, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(compose_cfg("model=resnet20"))
    assert "\n" not in str(err.value)
    record = json.loads(files.results_path(tmp_path / "run").read_text())
    assert record["status"] == "failed"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("model=resnet99",), "unknown model 'resnet99'"),
        (("sparsit=0.9",), "unknown config key 'sparsit'"),
        (("optimizer.lr=-0.1",), "optimizer.lr must be > 0"),
        (("epochs=abc",), "epochs must be a positive integer"),
        (("model=resnet20",), "needs image inputs"),
        (
            ("dataset=fashion_mnist", "dataset.system_dir=/nonexistent", "dataset.download=false"),
            "dataset-fashion-mnist",
        ),
    ],
)
def test_cli_bad_input_exits_nonzero_with_one_line(tmp_path, args, needle):
    proc = _cli(*args, f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}")
    assert proc.returncode != 0
    assert needle in _error_line(proc)
    for path in tmp_path.rglob(files.RESULTS):
        assert json.loads(path.read_text())["status"] != "completed"


def test_cli_unknown_top_level_key_exits_2_before_training(tmp_path):
    # debug=fast keeps the run short should the key ever be let through.
    proc = _cli("+unknown_key=1", "debug=fast", "cost.enabled=false", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _error_line(proc)
    assert "unknown config key 'unknown_key'" in line and "nothing reads it" in line
    assert not list(tmp_path.rglob(files.RESULTS))  # stopped before the run began
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cli_help_lists_groups():
    proc = _cli("--help")
    assert proc.returncode == 0
    for group in ("dataset", "model", "pruning", "optimizer", "lr_scheduler", "trainer"):
        assert f"{group}:" in proc.stdout


def test_cli_debug_run_completes_with_offline_wandb(tmp_path):
    proc = _cli("debug=fast", "logger.wandb.enabled=true", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record_path,) = list(tmp_path.rglob(files.RESULTS))
    record = json.loads(record_path.read_text())
    assert record["status"] == "completed"
    assert list(record_path.parent.rglob("offline-run-*")), "W&B did not log offline"
    assert "test accuracy" in proc.stdout


def test_last_checkpoint_follows_every_epoch_best_only_improvements(compose_cfg, tmp_path):
    """last.ckpt is the end of the latest epoch (what a resume needs) even when the monitored
    metric does not improve; best.ckpt stays at the best epoch."""
    import torch

    # An lr this small leaves val/acc unchanged after epoch 0: no later epoch improves on it.
    record = train(compose_cfg("epochs=3", "lr=1e-12"))
    last = torch.load(files.last_checkpoint(tmp_path / "run"), weights_only=False)
    best = torch.load(
        files.checkpoint_dir(tmp_path / "run") / files.BEST_CHECKPOINT, weights_only=False
    )
    assert last["epoch"] == 2 and last["global_step"] == record["global_step"] == 12
    assert best["epoch"] == 0 and best["global_step"] == 4
    assert sorted(p.name for p in files.checkpoint_dir(tmp_path / "run").iterdir()) == sorted(
        [files.BEST_CHECKPOINT, files.LAST_CHECKPOINT]
    )


def test_profiler_is_free_by_default_and_configurable(compose_cfg, monkeypatch):
    import pytorch_lightning as pl

    from prunelab.tracking.profiler import NullProfiler

    seen = []
    original = pl.Trainer.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(type(self.profiler).__name__)

    monkeypatch.setattr(pl.Trainer, "__init__", spy)
    assert train(compose_cfg())["status"] == "completed"
    assert train(compose_cfg("+trainer.profiler=simple"))["status"] == "completed"
    assert seen[0] == NullProfiler.__name__ and seen[-1] == "SimpleProfiler"
    with NullProfiler().profile("a"), NullProfiler().profile("b"):  # nests, reusable
        pass


def test_a_job_releases_its_run_before_the_next(compose_cfg, monkeypatch):
    """A sweep worker runs job after job. A run's Trainer, module, callbacks and data hold
    one another in reference cycles; each job collects them when it returns, rather than
    leaving them (and the run's data) to some later full collection."""
    import gc

    import pytorch_lightning as pl

    import prunelab.train as train_module

    class Settle(pl.Callback):
        """Moves the run's objects to the oldest generation, as a long run's get there."""

        def on_train_end(self, trainer, pl_module):
            gc.collect(1)
            gc.collect(1)

    run = train_module.train
    monkeypatch.setattr(train_module, "train", lambda cfg: run(cfg, callbacks=[Settle()]))
    gc.collect()
    threshold = gc.get_threshold()
    gc.set_threshold(threshold[0], threshold[1], 1_000_000)  # no full collection by chance
    try:
        record = train_module._train_and_release(compose_cfg("pruning=rigl", "sparsity=0.9"))
        assert record["status"] == "completed"
        left = gc.collect()
    finally:
        gc.set_threshold(*threshold)
    assert left < 200, f"{left} objects of the finished run were left for a later collection"
