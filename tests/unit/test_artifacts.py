"""W&B artifacts without W&B: names, files, what is logged and declared, and failures, with a
stand-in run that records its log_artifact / use_artifact calls."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.sparsity.masks import Masks
from prunelab.tracking import artifacts
from prunelab.tracking.artifacts import Ref


class FakeRun:
    """Records what a W&B run is asked to log (outputs) and use (inputs)."""

    def __init__(self, folder: Path, offline: bool = False) -> None:
        self.offline = offline
        self.dir = str(folder / "wandb" / "offline-run-20000101_000000-fake" / "files")
        Path(self.dir).mkdir(parents=True)
        self.logged: list = []
        self.used: list = []
        self.offline_used: list = []

    def log_artifact(self, artifact, aliases=None):
        self.logged.append(artifact)
        return artifact

    def use_artifact(self, artifact):
        self.used.append(artifact)
        return artifact

    def _log_artifact(self, artifact, **kwargs):
        self.offline_used.append((artifact, kwargs))
        return artifact


class FakeLogger:
    """A Lightning WandbLogger stand-in: the run is its ``experiment``."""

    def __init__(self, run: FakeRun, enabled: bool = True) -> None:
        self.experiment = run
        setattr(self, artifacts.ENABLED_ATTR, enabled)


@pytest.fixture(autouse=True)
def _wandb_data_dir(tmp_path, monkeypatch):
    """W&B copies added files into its staging area until upload: keep it in tmp_path."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def _masks() -> Masks:
    return Masks({"fc1.weight": torch.tensor([[True, False], [False, True]])})


def _finished_run(run_dir: Path, cell: str = "abc123", seed: int = 1, best: bool = True) -> dict:
    """A run folder as a completed run leaves it: checkpoints and a results record."""
    ckpts = files.checkpoint_dir(run_dir)
    ckpts.mkdir(parents=True)
    (ckpts / files.LAST_CHECKPOINT).write_bytes(b"last weights")
    if best:
        (ckpts / files.BEST_CHECKPOINT).write_bytes(b"best weights")
    record = {
        "status": "completed",
        "run_dir": str(run_dir),
        "config_hash": cell,
        "seed": seed,
        "code": {"commit": "0123abc", "dirty": False},
        "metrics": {"test/acc": 0.5, "train/loss": 1.0},
        "sparsity": {"global": 0.5},
    }
    files.results_path(run_dir).write_text(json.dumps(record))
    return record


def _entries(artifact) -> dict[str, str]:
    return {name: entry.digest for name, entry in artifact.manifest.entries.items()}


def test_names_follow_the_cell_and_seed():
    assert artifacts.artifact_name("model", "abc123", 2) == "model-abc123-seed2"
    assert artifacts.artifact_name("masks", "a/b c", 0) == "masks-a_b_c-seed0"


def test_run_files_lists_what_the_folder_holds(tmp_path):
    _finished_run(tmp_path, best=False)
    assert list(artifacts.run_files(tmp_path, "model")) == [files.LAST_CHECKPOINT]
    assert artifacts.run_files(tmp_path, "masks") == {}
    assert artifacts.run_files(tmp_path, "results") == {files.RESULTS: files.results_path(tmp_path)}
    with pytest.raises(ValueError, match="kinds"):
        artifacts.run_files(tmp_path, "weights")


def test_a_run_logs_model_masks_and_results(tmp_path):
    record = _finished_run(tmp_path / "run")
    run = FakeRun(tmp_path / "run")
    names = artifacts.log_run_artifacts(FakeLogger(run), tmp_path / "run", record, masks=_masks())
    assert names == ["model-abc123-seed1", "masks-abc123-seed1", "results-abc123-seed1"]
    model, masks, results = run.logged
    assert (model.type, masks.type, results.type) == ("model", "masks", "results")
    assert sorted(_entries(model)) == [files.BEST_CHECKPOINT, files.LAST_CHECKPOINT]
    assert list(_entries(masks)) == [files.MASKS] and list(_entries(results)) == [files.RESULTS]
    assert model.metadata["config_hash"] == "abc123" and model.metadata["seed"] == 1
    assert model.metadata["test/acc"] == 0.5 and "train/loss" not in model.metadata
    assert model.metadata["code_commit"] == "0123abc"
    # The masks file holds the engine's masks, next to the checkpoints.
    saved = Masks.from_state_dict(torch.load(files.masks_path(tmp_path / "run")))
    assert saved.equal(_masks())
    assert run.used == [] and run.offline_used == []


def test_switched_off_nothing_is_logged_or_written(tmp_path):
    record = _finished_run(tmp_path / "run")
    run = FakeRun(tmp_path / "run")
    off = FakeLogger(run, enabled=False)
    assert artifacts.log_run_artifacts(off, tmp_path / "run", record, masks=_masks()) == []
    assert artifacts.use_input(off, tmp_path / "run", "model") is None
    assert artifacts.log_run_artifacts(None, tmp_path / "run", record, masks=_masks()) == []
    assert run.logged == [] and run.used == []
    assert not files.masks_path(tmp_path / "run").exists()


def test_an_input_is_built_as_its_producer_logged_it(tmp_path):
    """Same name, files and digest: W&B matches the input to the producer's version."""
    record = _finished_run(tmp_path / "a")
    producer = FakeRun(tmp_path / "a")
    artifacts.log_run_artifacts(FakeLogger(producer), tmp_path / "a", record, masks=_masks())
    consumer = FakeRun(tmp_path / "b")
    used = artifacts.use_inputs(
        FakeLogger(consumer), [Ref(tmp_path / "a", "model"), Ref(tmp_path / "a", "masks")]
    )
    assert used == ["model-abc123-seed1", "masks-abc123-seed1"]
    for logged, input_ in zip(producer.logged[:2], consumer.used, strict=True):
        assert (input_.name, input_.type) == (logged.name, logged.type)
        assert input_.digest == logged.digest
    assert consumer.logged == []


def test_a_checkpoint_belongs_to_its_runs_model_artifact(tmp_path):
    _finished_run(tmp_path / "a")
    ckpt = files.last_checkpoint(tmp_path / "a")
    assert artifacts.checkpoint_ref(ckpt) == Ref(tmp_path / "a", "model")
    loose = tmp_path / "elsewhere" / "weights.ckpt"
    loose.parent.mkdir()
    loose.write_bytes(b"weights from somewhere")
    assert artifacts.checkpoint_ref(loose) == Ref(loose, "model")
    run = FakeRun(tmp_path / "b")
    name = artifacts.use_input(FakeLogger(run), loose, "model")
    assert name is not None and name.startswith("model-file-")
    assert list(_entries(run.used[0])) == ["weights.ckpt"]
    # A different file is a different artifact; the same bytes are the same one.
    other = loose.with_name("other.ckpt")
    other.write_bytes(b"other weights")
    assert artifacts.use_input(FakeLogger(run), other, "model") != name


def test_offline_outputs_keep_their_files_in_the_runs_wandb_folder(tmp_path):
    record = _finished_run(tmp_path / "a")
    run = FakeRun(tmp_path / "a", offline=True)
    artifacts.log_run_artifacts(FakeLogger(run), tmp_path / "a", record, masks=_masks())
    kept = Path(run.dir).parent / artifacts.OFFLINE_FILES_DIR
    for artifact in run.logged:
        sources = artifacts.run_files(tmp_path / "a", artifact.type)
        for name, entry in artifact.manifest.entries.items():
            local = Path(entry.local_path)
            content = sources[name].read_bytes()
            assert local == kept / hashlib.md5(content).hexdigest()  # named by content
            assert local.read_bytes() == content
    # Later changes to the run's files do not reach what sync will upload.
    files.last_checkpoint(tmp_path / "a").write_bytes(b"overwritten")
    last = run.logged[0].manifest.entries[files.LAST_CHECKPOINT].local_path
    assert Path(last).read_bytes() == b"last weights"
    # No copy looks like a run's own file to a search for records or checkpoints.
    assert [p.name for p in tmp_path.rglob(files.RESULTS)] == [files.RESULTS]
    assert len(list(tmp_path.rglob("*.ckpt"))) == 2


def test_offline_inputs_are_written_for_sync_and_reuse_the_producers_copy(tmp_path):
    record = _finished_run(tmp_path / "a")
    producer = FakeRun(tmp_path / "a", offline=True)
    artifacts.log_run_artifacts(FakeLogger(producer), tmp_path / "a", record, masks=_masks())
    consumer = FakeRun(tmp_path / "b", offline=True)
    assert artifacts.use_input(FakeLogger(consumer), tmp_path / "a", "model") == (
        "model-abc123-seed1"
    )
    ((artifact, kwargs),) = consumer.offline_used
    assert kwargs == {"is_user_created": True, "use_after_commit": True}
    assert consumer.used == [] and artifact.digest == producer.logged[0].digest
    producer_copy = Path(producer.dir).parent / artifacts.OFFLINE_FILES_DIR
    for entry in artifact.manifest.entries.values():
        assert Path(entry.local_path).is_relative_to(producer_copy)
    # Changed since the producer logged it: the input gets its own copy (and a new digest).
    files.last_checkpoint(tmp_path / "a").write_bytes(b"trained further")
    artifacts.use_input(FakeLogger(consumer), tmp_path / "a", "model")
    artifact, _ = consumer.offline_used[1]
    entry = artifact.manifest.entries[files.LAST_CHECKPOINT]
    assert Path(entry.local_path).is_relative_to(Path(consumer.dir).parent)
    assert artifact.digest != producer.logged[0].digest


def test_missing_files_declare_nothing(tmp_path):
    run = FakeRun(tmp_path)
    assert artifacts.use_input(FakeLogger(run), tmp_path / "nothing.pt", "rewind", "r") is None
    assert artifacts.use_input(FakeLogger(run), tmp_path, "masks", "m") is None
    assert run.used == []


def test_a_failure_is_one_warning_line_and_the_rest_goes_on(tmp_path, caplog):
    record = _finished_run(tmp_path / "a")

    class Failing(FakeRun):
        def log_artifact(self, artifact, aliases=None):
            if artifact.type == "masks":
                raise RuntimeError("disk full\nsecond line")
            return super().log_artifact(artifact, aliases)

    run = Failing(tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger=artifacts.__name__):
        names = artifacts.log_run_artifacts(FakeLogger(run), tmp_path / "a", record, _masks())
    assert names == ["model-abc123-seed1", "results-abc123-seed1"]
    (warning,) = caplog.records
    assert warning.getMessage() == ("W&B artifacts: could not log masks-abc123-seed1: disk full")

    class Broken:
        @property
        def experiment(self):
            raise RuntimeError("no run")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=artifacts.__name__):
        assert artifacts.use_input(Broken(), tmp_path / "a", "model") is None
    assert len(caplog.records) == 1 and "no run" in caplog.records[0].getMessage()


def test_the_switch_must_be_a_boolean(compose_cfg):
    from prunelab.config import validate

    validate(compose_cfg("logger.wandb.artifacts=false"))
    assert compose_cfg().logger.wandb.artifacts is True
    with pytest.raises(ConfigError, match="logger.wandb.artifacts must be true or false"):
        validate(compose_cfg("logger.wandb.artifacts=maybe"))


def test_make_wandb_logger_carries_the_switch(tmp_path, monkeypatch):
    from prunelab.tracking import wandb_setup

    monkeypatch.setenv("WANDB_MODE", "offline")
    on = wandb_setup.make_wandb_logger({}, tmp_path / "a", "n", [], {})
    off = wandb_setup.make_wandb_logger({"artifacts": False}, tmp_path / "b", "n", [], {})
    assert artifacts.enabled(on) and not artifacts.enabled(off)
    assert not artifacts.enabled(None)
