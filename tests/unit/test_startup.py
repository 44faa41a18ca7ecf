"""Start-up: what a run imports before its first training step, the start-up marks, the
MNIST-1D cache and the W&B logger that starts in the background."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from prunelab.tracking import startup

ROOT = Path(__file__).resolve().parents[2]
# Packages that the default run does not use; prunelab imports them only where it uses them.
HEAVY = ("torchvision", "onnx", "onnxruntime", "matplotlib", "pandas", "torch_pruning")
# Module-level imports of those packages that are allowed: {module: packages}. Torch-Pruning
# costs about 5 ms once torch is loaded (it does not import torchvision).
KNOWN_EAGER = {
    "prunelab.structured.groups": {"torch_pruning"},
}

# Runs train.py to its first training step and writes, as JSON, the modules loaded then.
_TO_FIRST_STEP = """
import json, os, runpy, sys
out = sys.argv.pop(1)
real_exit = os._exit
def _exit(code):
    with open(out, "w") as fh:
        json.dump(sorted(sys.modules), fh)
    real_exit(code)
os._exit = _exit
sys.argv[0] = os.path.join(os.environ["PROJECT_ROOT"], "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _loaded_after(code: str) -> set[str]:
    proc = _python(f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


def _to_first_step(tmp_path: Path, *overrides: str) -> tuple[set[str], dict[str, float]]:
    """Modules loaded at the first training step of ``train.py <overrides>``, and its marks."""
    out, marks = tmp_path / "modules.json", tmp_path / "marks.txt"
    proc = _python(
        _TO_FIRST_STEP,
        str(out),
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
        env={
            "PROJECT_ROOT": str(ROOT),
            "WANDB_MODE": "offline",
            startup.MARK_ENV: str(marks),
            startup.EXIT_ENV: "1",
        },
    )
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    return set(json.loads(out.read_text())), startup.read_marks(marks)


def _top_level_imports(module: str) -> set[str]:
    """Top-level packages a module imports when it is imported (not inside functions)."""
    spec_path = ROOT / "src" / (module.replace(".", "/") + ".py")
    if not spec_path.exists():
        spec_path = spec_path.with_suffix("") / "__init__.py"
    found: set[str] = set()
    pending = list(ast.parse(spec_path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):  # still run at import time
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    pending.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
    return found


def test_import_prunelab_is_light():
    loaded = _loaded_after("import prunelab")
    assert not loaded & {"torch", "pytorch_lightning", "wandb", "hydra", *HEAVY}


def test_the_entry_point_imports_neither_torch_nor_wandb():
    """What ``train.py`` imports before Hydra starts: no torch, Lightning or W&B yet."""
    loaded = _loaded_after("import prunelab.train")
    assert not loaded & {"torch", "pytorch_lightning", "wandb", *HEAVY}


def test_the_default_run_imports_nothing_heavy_of_its_own(tmp_path):
    """Up to its first step, the default run (W&B offline) loads no prunelab module that
    imports an unused heavy package at module level, and no ONNX or pandas at all.
    (torchmetrics, imported by Lightning, still imports torchvision and matplotlib itself.)"""
    loaded, marks = _to_first_step(tmp_path)
    assert not loaded & {"onnx", "onnxruntime", "pandas", "optuna", "torch_pruning"}
    # Only the method the run builds (pruning=dense), and the base every method shares.
    methods = {m for m in loaded if m.startswith("prunelab.methods.")}
    assert methods == {"prunelab.methods.base", "prunelab.methods.dense"}
    eager = {}
    for module in sorted(m for m in loaded if m.startswith("prunelab")):
        heavy = (_top_level_imports(module) & set(HEAVY)) - KNOWN_EAGER.get(module, set())
        if heavy:
            eager[module] = sorted(heavy)
    assert not eager, f"import these lazily, where they are used: {eager}"
    assert set(marks) == set(startup.PHASES)
    assert [marks[p] for p in startup.PHASES] == sorted(marks.values())


def test_no_wandb_import_when_wandb_is_off(tmp_path):
    loaded, marks = _to_first_step(tmp_path, "logger.wandb.enabled=false")
    assert "first_step" in marks
    assert "wandb" not in loaded
    assert not (tmp_path / "run" / "wandb").exists()


def test_framework_import_runs_without_the_collector_and_freezes_what_it_imported():
    code = (
        "import gc, sys; sys.path.insert(0, sys.argv[1]);"
        "from prunelab.tracking import startup;"
        "frozen = gc.get_freeze_count();"
        "ctx = startup.framework_import();"
        "ctx.__enter__(); off = not gc.isenabled();"
        "import pytorch_lightning;"
        "ctx.__exit__(None, None, None);"
        "print(off, gc.isenabled(), frozen, gc.get_freeze_count())"
    )
    proc = _python(code, str(ROOT / "src"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    off, on_after, frozen_before, frozen_after = proc.stdout.split()
    assert off == "True" and on_after == "True"
    assert int(frozen_after) > int(frozen_before) + 100_000  # the framework's objects


_IMPORT_GARBAGE = """
import gc, sys, weakref
sys.path.insert(0, sys.argv[1])
from prunelab.tracking import startup

class RunData:
    pass

def run():  # a run's frame: it imports the framework, then holds the run's data
    with startup.framework_import():
        import pytorch_lightning
    data = RunData()
    return weakref.ref(data)

alive = run()
gc.collect()
print(alive() is not None)
startup.release_import_garbage()
print(alive() is not None, gc.get_freeze_count() > 100_000)
"""


def test_import_garbage_frozen_with_the_framework_is_released():
    """The import's cyclic garbage is frozen with the framework; its frames reach the frame
    that imported (a sweep job's first run, with its data). Releasing it once frees that
    run; the framework stays frozen."""
    proc = _python(_IMPORT_GARBAGE, str(ROOT / "src"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    pinned, still_pinned, refrozen = proc.stdout.split()
    assert pinned == "True", "the import left no frozen garbage holding its caller's frame"
    assert still_pinned == "False" and refrozen == "True"


def test_framework_import_changes_nothing_once_the_framework_is_imported():
    import gc

    import pytorch_lightning  # noqa: F401

    frozen = gc.get_freeze_count()
    with startup.framework_import():
        assert gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    with pytest.raises(RuntimeError), startup.framework_import():
        raise RuntimeError
    assert gc.isenabled()


def test_marks_are_off_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(startup.MARK_ENV, raising=False)
    startup.mark("imports")  # no file named: nothing happens
    assert not startup.enabled()
    monkeypatch.setenv(startup.MARK_ENV, str(tmp_path / "m.txt"))
    startup.mark("imports")
    startup.mark("imports")
    assert list(startup.read_marks(tmp_path / "m.txt")) == ["imports"]


# -- MNIST-1D cache ---------------------------------------------------------------------------


def test_mnist1d_cache_holds_the_generated_arrays(tmp_path):
    from prunelab.data import memory

    memory._mnist1d_arrays.cache_clear()
    random.seed(7)
    np.random.seed(7)
    expected_draws = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    generated = memory._mnist1d_arrays(str(tmp_path))  # generated, then written
    assert (random.random(), np.random.rand()) == expected_draws
    (cached,) = (tmp_path / "mnist1d").glob("mnist1d-*.npz")
    assert cached.name == f"mnist1d-{memory._mnist1d_cache_key()}.npz"
    assert not list((tmp_path / "mnist1d").glob(".*"))  # no temporary file left
    memory._mnist1d_arrays.cache_clear()
    read = memory._mnist1d_arrays(str(tmp_path))  # read back
    assert read is not generated
    for a, b in zip(generated, read, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b) and not b.flags.writeable
    assert [a.shape for a in read] == [(4000, 40), (4000,), (1000, 40), (1000,)]
    memory._mnist1d_arrays.cache_clear()


def test_mnist1d_unreadable_cache_is_regenerated(tmp_path):
    from prunelab.data import memory

    memory._mnist1d_arrays.cache_clear()
    path = tmp_path / "mnist1d" / f"mnist1d-{memory._mnist1d_cache_key()}.npz"
    path.parent.mkdir()
    path.write_bytes(b"not an npz file")
    x = memory._mnist1d_arrays(str(tmp_path))[0]
    assert x.shape == (4000, 40)
    memory._mnist1d_arrays.cache_clear()
    assert np.array_equal(memory._mnist1d_arrays(str(tmp_path))[0], x)  # rewritten
    memory._mnist1d_arrays.cache_clear()


# -- W&B started in the background --------------------------------------------------------------


def _logger(tmp_path, **kwargs):
    from prunelab.tracking.wandb_logger import BackgroundWandbLogger

    return BackgroundWandbLogger(
        project="prunelab-test",
        save_dir=str(tmp_path),
        mode="offline",
        settings={"console": "off", "x_disable_stats": True},
        **kwargs,
    )


def test_calls_made_while_wandb_starts_reach_the_run_in_order(tmp_path, monkeypatch):
    from prunelab.tracking import artifacts, wandb_setup
    from prunelab.tracking.wandb_logger import BackgroundWandbLogger

    release = threading.Event()
    init_run = BackgroundWandbLogger._init_run

    def slow_init(self):
        release.wait(30)
        return init_run(self)

    monkeypatch.setattr(BackgroundWandbLogger, "_init_run", slow_init)
    logger = _logger(tmp_path, config={"a": 1})
    view = wandb_setup.for_trainer(logger)
    assert not hasattr(view, "experiment")  # Lightning does not wait for it before the data
    logger.start()
    assert logger.starting
    view.log_hyperparams({"b": 2})
    metrics = {"m": 0.0}
    for step in range(3):
        metrics["m"] = float(step)
        view.log_metrics(metrics, step=step)  # kept: a copy of each call
    assert logger.starting and len(logger._kept) == 4
    release.set()
    run = logger.experiment  # waits for the start, hands over the kept calls
    assert run is logger.experiment and not logger._kept
    logger.log_metrics({"m": 3.0}, step=3)
    offline_dir = Path(run.dir).parent
    wandb_setup.finish()
    deadline = time.monotonic() + 20
    while True:  # the W&B service writes the log's last records after finish() returns
        records = list(artifacts.offline_records(offline_dir))
        if "exit" in {r.WhichOneof("record_type") for r in records}:
            break
        assert time.monotonic() < deadline, "the offline W&B log has no exit record"
        time.sleep(0.2)
    history, config = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            history.append((json.loads(items["trainer/global_step"]), json.loads(items["m"])))
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert history == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert config.get("b") == 2


def test_a_failed_wandb_start_fails_the_next_log_call(tmp_path, monkeypatch):
    from prunelab.tracking import wandb_setup
    from prunelab.tracking.wandb_logger import BackgroundWandbLogger

    def broken(self):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(BackgroundWandbLogger, "_init_run", broken)
    logger = _logger(tmp_path)
    logger.start()
    logger._thread.join()
    with pytest.raises(RuntimeError, match="no W&B today"):
        logger.log_metrics({"m": 1.0}, step=0)
    with pytest.raises(RuntimeError, match="no W&B today"):
        _ = logger.experiment
    logger.finalize("failed")  # a failing run is not failed again by its logger
    with pytest.raises(RuntimeError, match="no W&B today"):
        logger.finalize("success")
    wandb_setup.finish()  # safe after a failed start


def _hydra_mode(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from prunelab.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    return cfg.hydra.mode


def test_hydra_mode_is_unset_unless_the_command_line_can_set_it():
    """The start-up skips Hydra's composition that only reads hydra.mode when the command
    line cannot set it: the defaults leave it unset, the groups found to set it do, and the
    other configs with a hydra block do not."""
    from prunelab.config import CONF_DIR
    from prunelab.train import groups_setting_mode, may_set_mode

    assert _hydra_mode([]) is None
    setting = groups_setting_mode()
    assert setting == {"experiment", "hparams_search"}
    assert str(_hydra_mode(["experiment=fmnist_peer_recipe"])) == "RunMode.MULTIRUN"
    assert str(_hydra_mode(["hparams_search=rigl_optuna"])) == "RunMode.MULTIRUN"
    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        group = path.parent.name
        if group not in setting and group != "hydra" and "\nhydra:" in "\n" + path.read_text():
            assert _hydra_mode([f"{group}={path.stem}"]) is None, path.name
    assert not may_set_mode(["pruning=rigl", "sparsity=0.9", "-m", "seed=0,1", "launcher=joblib"])
    assert not may_set_mode(["hydra.run.dir=out", "hydra.sweep.dir=out", "hydra.job.chdir=false"])
    for args in (
        ["experiment=fmnist_peer_recipe"],
        ["+experiment=x"],
        ["sparsity=0.9", "hparams_search=rigl_optuna"],
        ["hydra.mode=MULTIRUN"],
        ["++hydra.searchpath=[pkg://x]"],
        ["hydra/launcher=joblib"],
        ["--config-dir=elsewhere"],
        ["-cd", "elsewhere"],
    ):
        assert may_set_mode(args), args
