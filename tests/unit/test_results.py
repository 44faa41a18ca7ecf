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


# -- code provenance -------------------------------------------------------------------------


def _git(cwd, *args):
    import subprocess

    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A tiny git checkout with one committed source file and an ignored outputs/ folder."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "a.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "src/a.py")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


def test_code_version_of_a_clean_and_a_dirty_checkout(checkout):
    from prunelab.tracking import results

    head = _git(checkout, "rev-parse", "HEAD")
    clean = results.code_version(checkout / "src")
    assert clean["commit"] == head and clean["dirty"] is False
    (checkout / "outputs" / "runs").mkdir(parents=True)
    (checkout / "outputs" / "runs" / "results.json").write_text("{}")
    assert results.code_version(checkout)["dirty"] is False  # run outputs do not count
    (checkout / "src" / "a.py").write_text("x = 2\n")
    dirty = results.code_version(checkout)
    assert dirty["commit"] == head and dirty["dirty"] is True
    (checkout / "src" / "a.py").write_text("x = 1\n")
    (checkout / "src" / "new.py").write_text("y = 1\n")
    assert results.code_version(checkout)["dirty"] is True  # an untracked source file does


def test_code_version_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    from prunelab.tracking import results

    nulls = {"commit": None, "dirty": None, "diff_sha": None}
    assert results.code_version(tmp_path) == nulls
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert results.code_version() == nulls


def test_run_record_stores_the_code_version(tmp_path):
    from prunelab.tracking import results

    code = {"commit": "a" * 40, "dirty": False, "diff_sha": None}
    rec = results.RunRecord(tmp_path, {"seed": 0}, seed=0, code=code)
    rec.flush()
    assert read_record(tmp_path)["code"] == code
    default = results.RunRecord(tmp_path, {"seed": 0}, seed=0).data["code"]
    assert set(default) == {"commit", "dirty", "diff_sha"}


def test_same_code_needs_a_known_commit_and_the_same_changes():
    from prunelab.tracking.results import describe_code, same_code

    clean = {"commit": "c" * 40, "dirty": False, "diff_sha": None}
    dirty = {"commit": "c" * 40, "dirty": True, "diff_sha": "d" * 12}
    assert same_code(clean, dict(clean)) and same_code(dirty, dict(dirty))
    assert not same_code(clean, {**clean, "commit": "e" * 40})
    assert not same_code(clean, dirty) and not same_code(dirty, clean)
    assert not same_code(dirty, {**dirty, "diff_sha": "f" * 12})
    assert not same_code({**dirty, "diff_sha": None}, {**dirty, "diff_sha": None})
    unknown = {"commit": None, "dirty": None, "diff_sha": None}
    assert not same_code(unknown, unknown) and not same_code(None, clean)
    assert describe_code(clean) == "commit cccccccccccc"
    assert describe_code(dirty) == "commit cccccccccccc (dirty)"
    assert describe_code(None) == describe_code(unknown) == "unknown code"
