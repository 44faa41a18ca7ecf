import json

import pytest

from prunelab import files
from prunelab.tracking.results import RunRecord, config_hash, read_record, write_json_atomic


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a" / "r.json"
    write_json_atomic(path, {"x": 1})
    write_json_atomic(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_json_atomic_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"ok": True})

    class Boom:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"bad": Boom()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert len(list(tmp_path.iterdir())) == 1


def test_config_hash_ignores_seed_paths_logger_and_key_order():
    a = {"seed": 0, "sparsity": 0.9, "model": {"a": 1, "b": 2}, "paths": {"x": "/a"}}
    b = {"model": {"b": 2, "a": 1}, "sparsity": 0.9, "seed": 7, "paths": {"x": "/b"}}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12
    assert config_hash(a) != config_hash({**a, "sparsity": 0.95})


def test_config_hash_is_frozen():
    # Old results stay findable only while the hash of a config never changes.
    assert config_hash({"sparsity": 0.9, "model": {"hidden": [100, 100]}}) == "77a4eb7073fe"


def test_run_record_lifecycle(tmp_path):
    rec = RunRecord(tmp_path, {"seed": 3, "sparsity": 0.5}, seed=3)
    rec.flush()
    assert read_record(tmp_path)["status"] == "running"
    rec.complete(metrics={"test/acc": 0.5})
    data = read_record(tmp_path)
    assert data["status"] == "completed" and data["metrics"]["test/acc"] == 0.5
    assert data["seed"] == 3 and "torch" in data["versions"]
    rec.fail(ValueError("bad\nsecond line"))
    data = read_record(tmp_path)
    assert data["status"] == "failed" and data["error"] == "ValueError: bad"
    assert files.results_path(tmp_path).name == "results.json"


def test_read_record_of_missing_or_corrupt(tmp_path):
    assert read_record(tmp_path) is None
    files.results_path(tmp_path).write_text("{half")
    assert read_record(tmp_path) is None
