"""scripts/plot_task_adaptation.py on two real (tiny) runs of the same model on two tasks.

LeNet-300-100 is pruned by ``pruning=adaptive distribution=sensitivity`` on MNIST-1D (40
inputs) and on the scikit-learn digits (64 inputs), each with its own sensitivity curves (made
up here, opposite in which hidden layer is sensitive), a few steps per stage. The script must
read the per-layer rates the records hold, allocate each task's curves at a common sparsity
with ``--at``, and write the plot and the table.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from prunelab import files
from prunelab.analysis.sensitivity import SensitivityCurves
from prunelab.train import train

ROOT = Path(__file__).resolve().parents[2]
GRID = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
# Per task: input size and which layer's curve drops fast (accuracy at each grid point).
SENSITIVE = [0.9, 0.85, 0.8, 0.6, 0.4, 0.2, 0.1]
ROBUST = [0.9, 0.9, 0.9, 0.89, 0.88, 0.86, 0.8]
TASKS = {
    "mnist1d": (40, {"layers.0.weight": SENSITIVE, "layers.1.weight": ROBUST}),
    "digits": (64, {"layers.0.weight": ROBUST, "layers.1.weight": SENSITIVE}),
}
ADAPTIVE = (
    "model=lenet300_100",
    "pruning=adaptive",
    "max_accuracy_drop=0.5",
    "pruning.search_steps=2",
    "distribution=sensitivity",
    "cost.enabled=false",
)


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "plot_task_adaptation", ROOT / "scripts" / "plot_task_adaptation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _curves(path: Path, inputs: int, accuracy: dict[str, list[float]]) -> Path:
    numel = {"layers.0.weight": 300 * inputs, "layers.1.weight": 30000, "head.weight": 1000}
    SensitivityCurves(
        sparsities=GRID,
        reference=0.9,
        accuracy={**accuracy, "head.weight": SENSITIVE},
        numel=numel,
    ).to_json(path)
    return path


def _curves_of(run: Path) -> Path:
    """The curves file the fixture wrote for the task of ``run``."""
    return run.parent / "sensitivity.json"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture
def runs(runs_dir, compose_cfg) -> dict[str, Path]:
    """One adaptive run per task, trained once per module."""
    out = {task: runs_dir / task / "adaptive" for task in TASKS}
    if not (runs_dir / "done").exists():
        for task, (inputs, accuracy) in TASKS.items():
            curves = _curves(_curves_of(out[task]), inputs, accuracy)
            cfg = compose_cfg(
                *ADAPTIVE, f"dataset={task}", f"distribution.curves={curves}", run_dir=out[task]
            )
            assert train(cfg)["status"] == "completed"
        (runs_dir / "done").touch()
    return out


def test_plot_and_table_of_two_tasks(runs, tmp_path, capsys):
    script = _script()
    out = tmp_path / "plots" / "tasks.png"
    paths = [str(runs["mnist1d"]), str(runs["digits"] / "results.json")]
    assert script.main([*paths, "--at", "0.9", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and out.stat().st_size > 0
    table = out.with_suffix(".md").read_text()
    assert table in printed
    head = table.splitlines()[0]
    assert "mnist1d sparsity" in head and "digits at 0.9" in head
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    allocations = {}
    for task, run in runs.items():
        record = json.loads(files.results_path(run).read_text())
        layers = record["sparsity"]["layers"]
        chosen = record["adaptive"]["chosen"]["sparsity"]
        assert record["sparsity"]["distribution"]["name"] == "sensitivity"
        for name, rate in layers.items():
            assert f"{rate:.4f}" in rows[name]
        assert f"{record['sparsity']['global']:.4f}" in rows["*global*"]
        assert record["sparsity"]["global"] == pytest.approx(chosen, abs=1e-3)
        # --at allocates the task's own curves at the common sparsity.
        inputs, _ = TASKS[task]
        curves = SensitivityCurves.from_json(_curves_of(run))
        sizes = {"layers.0.weight": 300 * inputs, "layers.1.weight": 30000, "head.weight": 1000}
        allocations[task] = curves.allocate(0.9, sizes)
        for name, rate in allocations[task].items():
            assert f"{rate:.4f}" in rows[name]
    # The curves differ, so the tasks' rates at the same global sparsity differ.
    assert allocations["mnist1d"]["layers.1.weight"] > allocations["digits"]["layers.1.weight"]
    assert "784" not in table and "40→300" in table and "64→300" in table


def test_default_out_and_mistakes(runs, capsys):
    script = _script()
    assert script.main([str(runs["mnist1d"]), str(runs["digits"])]) == 0
    parent = runs["mnist1d"].parent.parent
    assert (parent / "task_adaptation.png").is_file()
    assert (parent / "task_adaptation.md").is_file()
    capsys.readouterr()
    assert script.main([str(runs["mnist1d"]), str(parent / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read")
    assert script.main([str(runs["mnist1d"]), "--labels", "a", "b"]) == 2
    assert "--labels gives 2 labels for 1 runs" in capsys.readouterr().err
    assert script.main([str(runs["mnist1d"]), "--at", "1.5"]) == 2
    assert "--at must be" in capsys.readouterr().err
