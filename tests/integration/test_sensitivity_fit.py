"""Sensitivity analysis of a real (tiny) run, and runs whose layer rates come from it.

The default run (MLP on MNIST-1D, dense) is trained once per module; scripts/sensitivity.py
measures its curves; static and RigL runs with ``distribution=sensitivity`` then start
from them and must end at the target with the chosen per-layer rates in their records.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from prunelab import files
from prunelab.config import validate
from prunelab.errors import ConfigError
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
QUICK = ("cost.latency=false", "epochs=2")


def _script():
    spec = importlib.util.spec_from_file_location(
        "sensitivity_script", ROOT / "scripts" / "sensitivity.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sensitivity")


@pytest.fixture
def dense_run(base_dir, compose_cfg) -> Path:
    """The default run, trained once per module, and its curves (the script's function)."""
    run = base_dir / "dense"
    if not files.sensitivity_json(run).is_file():
        record = train(compose_cfg(*QUICK, run_dir=run))
        assert record["status"] == "completed"
        _script().sensitivity_of_run(run, wandb=False, note=lambda line: None)
    return run


def test_script_writes_the_curves_of_the_run(dense_run, tmp_path, capsys):
    record = json.loads(files.results_path(dense_run).read_text())
    curves = json.loads(files.sensitivity_json(dense_run).read_text())
    assert list(curves["layers"]) == list(record["sparsity"]["layers"])
    assert curves["sparsities"] == [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
    assert curves["meta"]["split"] == "val" and curves["meta"]["run"] == str(dense_run)
    for layer in curves["layers"].values():
        assert layer["start"] == 0.0 and len(layer["accuracy"]) == 7
    folder = files.sensitivity_dir(dense_run)
    assert (folder / files.SENSITIVITY_PLOT).read_bytes()[:4] == b"\x89PNG"
    assert "layers.0.weight" in (folder / files.SENSITIVITY_TABLE).read_text()
    # The command line: a checkpoint, other sparsities, the test split, another folder.
    out = tmp_path / "out"
    ckpt = files.last_checkpoint(dense_run)
    code = _script().main(
        [
            str(ckpt),
            "--sparsities",
            "0.5",
            "0.9",
            "--split",
            "test",
            "--out",
            str(out),
            "--no-wandb",
        ]
    )
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert printed[-1] == f"sensitivity: {out / files.SENSITIVITY_JSON}"
    again = json.loads((out / files.SENSITIVITY_JSON).read_text())
    assert again["sparsities"] == [0.5, 0.9] and again["meta"]["split"] == "test"
    assert _script().main([str(tmp_path / "no-run"), "--no-wandb"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("method", ["static", "rigl"])
def test_runs_start_from_the_curves_and_record_the_rates(method, dense_run, compose_cfg):
    source = files.sensitivity_json(dense_run)
    cfg = compose_cfg(
        *QUICK,
        f"pruning={method}",
        "distribution=sensitivity",
        f"distribution.curves={source}",
        "sparsity=0.9",
        run_dir=dense_run.parent / method,
    )
    record = train(cfg)
    assert record["status"] == "completed"
    sparsity = record["sparsity"]
    numel = {n: 0 for n in sparsity["layers"]}
    for name in numel:  # the layers' weight counts, from the curves
        numel[name] = json.loads(source.read_text())["layers"][name]["numel"]
    total = sum(numel.values())
    assert abs(sparsity["global"] - 0.9) <= len(numel) / total
    chosen = sparsity["distribution"]
    assert chosen["name"] == "sensitivity"
    for name, rate in chosen["rates"].items():
        assert abs(sparsity["layers"][name] - rate) <= 1 / numel[name] + 1e-12
    # The allocation is not uniform: the layers' curves differ.
    assert max(chosen["rates"].values()) - min(chosen["rates"].values()) > 0.01
    assert chosen["curves"]["path"] == str(source.resolve())
    assert chosen["curves"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["config"]["distribution"]["curves"] == str(source)


def test_missing_or_foreign_curves_stop_before_training(dense_run, compose_cfg, tmp_path):
    cfg = compose_cfg("distribution=sensitivity", "pruning=rigl")
    with pytest.raises(ConfigError, match="distribution.curves") as err:
        validate(cfg)
    assert "\n" not in str(err.value) and "scripts/sensitivity.py" in str(err.value)
    cfg = compose_cfg("distribution=sensitivity", "pruning=rigl", f"distribution.curves={tmp_path}")
    with pytest.raises(ConfigError, match="no sensitivity curves"):
        validate(cfg)
    # Curves of another model (hidden width 50): the layer sizes differ.
    cfg = compose_cfg(
        *QUICK,
        "distribution=sensitivity",
        "pruning=rigl",
        f"distribution.curves={dense_run}",
        "model.hidden=[50,50]",
        run_dir=tmp_path / "foreign",
    )
    with pytest.raises(ConfigError, match="weights but the model's") as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not files.last_checkpoint(tmp_path / "foreign").exists()


def test_wandb_logs_offline_into_the_runs_group(dense_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    script = _script()
    # The run itself had W&B off: nothing logged unless asked.
    quiet = script.sensitivity_of_run(dense_run, (0.9,), out=tmp_path / "q", note=print)
    assert quiet["wandb"] is None and not (dense_run / files.WANDB_DIR).exists()
    result = script.sensitivity_of_run(
        dense_run, (0.9,), out=tmp_path / "w", wandb=True, note=lambda line: None
    )
    assert result["wandb"]
    runs = list((dense_run / files.WANDB_DIR).glob(f"offline-run-*-{result['wandb']}"))
    assert runs, "no offline W&B run written in the run folder"
    # A second analysis goes into the same W&B run (resumed offline).
    again = script.sensitivity_of_run(
        dense_run, (0.9,), out=tmp_path / "w2", wandb=True, note=lambda line: None
    )
    assert again["wandb"] == result["wandb"]
