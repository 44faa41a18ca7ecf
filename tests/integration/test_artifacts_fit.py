"""W&B artifacts of real offline runs, read back from their transaction logs: what each run
leaves for ``wandb sync`` to upload, and the lineage of resumed runs and IMP levels."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from prunelab import files
from prunelab.sparsity.masks import Masks
from prunelab.tracking import artifacts
from prunelab.train import train

WANDB = ("logger.wandb.enabled=true", "cost.latency=false")
IMP = ("pruning=imp", "sparsity=0.5", "pruning.level_sparsities=[0.3,0.5]", "epochs=1")
OURS = ("model-", "masks-", "results-", "rewind-")


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def _finished(offline_dir: Path, timeout_s: float = 20.0) -> None:
    """Wait until W&B has written the whole transaction log (it ends with the exit record)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kinds = [r.WhichOneof("record_type") for r in artifacts.offline_records(offline_dir)]
        if kinds and kinds[-1] == "exit":
            return
        time.sleep(0.05)
    raise AssertionError(f"the W&B log of {offline_dir.name} has no exit record")


def _offline(run_dir: Path) -> tuple[Path, dict[str, dict]]:
    """The one offline W&B run of a run folder and its artifacts (ours), by name and role."""
    (offline_dir,) = artifacts.offline_run_dirs(run_dir)
    _finished(offline_dir)
    found = {}
    for art in artifacts.offline_artifacts(offline_dir):
        if art["name"].startswith(OURS):
            found[("use" if art["used"] else "log", art["name"])] = art
    return offline_dir, found


def _b64md5(path: str | Path) -> str:
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


def test_an_offline_run_leaves_its_artifacts_for_sync(compose_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger=artifacts.__name__):
        record = train(compose_cfg(*WANDB, "pruning=static", "sparsity=0.5", run_dir=run_dir))
    assert not caplog.records
    cell = record["config_hash"]
    offline_dir, found = _offline(run_dir)
    assert sorted(found) == [
        ("log", f"masks-{cell}-seed0"),
        ("log", f"model-{cell}-seed0"),
        ("log", f"results-{cell}-seed0"),
    ]
    model = found[("log", f"model-{cell}-seed0")]
    masks = found[("log", f"masks-{cell}-seed0")]
    results = found[("log", f"results-{cell}-seed0")]
    assert (model["type"], masks["type"], results["type"]) == ("model", "masks", "results")
    assert sorted(model["files"]) == [files.BEST_CHECKPOINT, files.LAST_CHECKPOINT]
    assert model["metadata"]["config_hash"] == cell and model["metadata"]["seed"] == 0
    assert model["metadata"]["test/acc"] == record["metrics"]["test/acc"]
    # Every file sync uploads is kept in the offline run's folder, with the digest logged.
    for art in found.values():
        for name, entry in art["files"].items():
            local = Path(entry["local_path"])
            assert local.parent == offline_dir / artifacts.OFFLINE_FILES_DIR, name
            assert local.name == hashlib.md5(local.read_bytes()).hexdigest()
            assert entry["digest"] == _b64md5(local)
            assert entry["size"] == local.stat().st_size
    # ... identical to the run's own files: checkpoints, masks, the completed record.
    last = model["files"][files.LAST_CHECKPOINT]["local_path"]
    assert Path(last).read_bytes() == files.last_checkpoint(run_dir).read_bytes()
    kept = json.loads(Path(results["files"][files.RESULTS]["local_path"]).read_text())
    assert kept["status"] == "completed" and kept["config_hash"] == cell
    saved = Masks.from_state_dict(torch.load(masks["files"][files.MASKS]["local_path"]))
    assert saved.sparsity() == pytest.approx(record["sparsity"]["global"], abs=1e-6)
    assert saved.equal(Masks.from_state_dict(torch.load(files.masks_path(run_dir))))
    # The copies do not look like run files to searches for records and checkpoints.
    assert list(run_dir.rglob(files.RESULTS)) == [files.results_path(run_dir)]
    assert all(p.parent == files.checkpoint_dir(run_dir) for p in run_dir.rglob("*.ckpt"))


def test_switched_off_an_offline_run_logs_no_artifacts(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg(*WANDB, "logger.wandb.artifacts=false", run_dir=run_dir))
    assert [p.name for p in run_dir.rglob(files.RESULTS)] == [files.RESULTS]
    offline_dir, found = _offline(run_dir)
    assert found == {}
    assert not (offline_dir / artifacts.OFFLINE_FILES_DIR).exists()
    assert not files.masks_path(run_dir).exists()


def test_a_resumed_run_uses_the_checkpoints_artifact(compose_cfg, tmp_path):
    first = train(compose_cfg(*WANDB, run_dir=tmp_path / "a"))
    ckpt = files.last_checkpoint(tmp_path / "a")
    second = train(compose_cfg(*WANDB, "epochs=2", f"ckpt_path={ckpt}", run_dir=tmp_path / "b"))
    assert second["global_step"] > first["global_step"]
    _, produced = _offline(tmp_path / "a")
    _, found = _offline(tmp_path / "b")
    name = f"model-{first['config_hash']}-seed0"
    used = found[("use", name)]
    assert used["digest"] == produced[("log", name)]["digest"]
    # It points at the copy the first run keeps for sync: no second copy.
    for entry, info in used["files"].items():
        assert info["local_path"] == produced[("log", name)]["files"][entry]["local_path"]
    assert ("log", f"model-{second['config_hash']}-seed0") in found


def test_imp_levels_use_the_rewind_weights_and_the_previous_level(compose_cfg, tmp_path):
    run_dir = tmp_path / "imp"
    record = train(compose_cfg(*WANDB, *IMP, "pruning.branch=[reinit]", run_dir=run_dir))
    assert record["status"] == "completed"
    levels = [files.imp_level_dir(run_dir, i) for i in range(3)]
    cells = [json.loads(files.results_path(d).read_text())["config_hash"] for d in levels]
    offline = [_offline(d)[1] for d in levels]
    rewind = f"rewind-{record['config_hash']}-seed0"
    # Level 0 logs the rewind weights once, besides its own files, and uses nothing.
    assert sorted(offline[0]) == sorted(
        [("log", f"{kind}-{cells[0]}-seed0") for kind in ("model", "masks", "results")]
        + [("log", rewind)]
    )
    assert list(offline[0][("log", rewind)]["files"]) == [files.IMP_REWIND_WEIGHTS]
    assert offline[0][("log", rewind)]["metadata"]["rewind_step"] == 0
    for level in (1, 2):
        now = offline[level]
        uses = {name for role, name in now if role == "use"}
        assert uses == {
            rewind,
            f"model-{cells[level - 1]}-seed0",
            f"masks-{cells[level - 1]}-seed0",
        }
        for name in uses:  # the same version its producer logged (same content digest)
            producer = offline[0 if name == rewind else level - 1][("log", name)]
            assert now[("use", name)]["digest"] == producer["digest"]
            assert now[("use", name)]["files"] == producer["files"]  # its copy, not a new one
        assert ("log", f"model-{cells[level]}-seed0") in now
        assert ("log", rewind) not in now
    # A re-initialised control branch starts from the previous level, not the rewind weights.
    _, reinit = _offline(files.imp_level_dir(run_dir, 2, "reinit"))
    assert {name for role, name in reinit if role == "use"} == {
        f"model-{cells[1]}-seed0",
        f"masks-{cells[1]}-seed0",
    }
    # Each level's masks file holds its own mask (the next level is pruned from it).
    for level, sparsity in ((0, 0.0), (1, 0.3), (2, 0.5)):
        masks = Masks.from_state_dict(torch.load(files.masks_path(levels[level])))
        assert masks.sparsity() == pytest.approx(sparsity, abs=1e-3)


def test_the_log_reader_follows_records_across_blocks(tmp_path):
    """A transaction log longer than one 32 KiB block, records split across blocks."""
    import wandb

    run = wandb.init(
        project="prunelab",
        dir=str(tmp_path),
        mode="offline",
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
    for step in range(300):
        run.log({"text": "x" * 500, "step": step})
    data = tmp_path / "masks.pt"
    data.write_bytes(b"\x01" * 100)
    art = wandb.Artifact("masks-big-seed0", type="masks", metadata={"blob": "y" * 40_000})
    art.add_file(str(data), policy="immutable")
    run.log_artifact(art)
    offline_dir = Path(run.dir).parent
    run.finish()
    _finished(offline_dir)
    (log_file,) = offline_dir.glob("*.wandb")
    assert log_file.stat().st_size > 4 * 32 * 1024
    (found,) = artifacts.offline_artifacts(log_file)
    assert found["name"] == "masks-big-seed0" and found["metadata"]["blob"] == "y" * 40_000
    assert found["files"]["masks.pt"]["digest"] == _b64md5(data)
