"""The results record: one JSON file per run, written atomically.

Tables and sweeps read these files. The record is written with status ``running`` when a
run starts, and rewritten with ``completed`` or ``failed`` at the end, always through a
temporary file and a rename so that a reader never sees half a file. It names the code that
made it (:func:`code_version`): the git commit, whether the checkout had changes, and a
digest of those changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from prunelab import files

# Keys that do not change what is being measured: left out of the config hash so that
# seeds of one experiment cell, and runs on other machines, share a hash.
HASH_EXCLUDED_KEYS = (
    "seed",
    "paths",
    "logger",
    "hydra",
    "task_name",
    "tags",
    "skip_completed",
    "ckpt_path",
    "optimized_metric",
    "n_jobs",
    "cost",
)
# git is asked with this timeout (seconds); a slow or missing git gives unknown provenance.
GIT_TIMEOUT_S = 5.0
TRACKED_PACKAGES = (
    "torch",
    "torchvision",
    "pytorch-lightning",
    "torchmetrics",
    "hydra-core",
    "wandb",
    "numpy",
    "prunelab",
)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def config_hash(config: dict[str, Any]) -> str:
    """A stable 12-hex-digit hash of a resolved config, without seed, paths and logger.

    Two runs that differ only in seed (or where they were run) share a hash: it names an
    experiment cell. The hash is over canonical JSON (sorted keys), so key order does not
    matter.
    """
    kept = {k: v for k, v in config.items() if k not in HASH_EXCLUDED_KEYS}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


_hash = config_hash


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git(args: list[str], cwd: str | Path) -> bytes | None:
    """The stdout of ``git <args>`` run in ``cwd``, or None when git fails, is missing or slow."""
    try:
        proc = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=cwd,
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _is_run_output(path: str) -> bool:
    return path.strip('"').startswith(f"{files.OUTPUTS_DIR}/")


def _changes(top: Path) -> list[str] | None:
    """``git status --porcelain`` lines of the checkout at ``top``, without untracked files
    under the outputs folder (runs write there); None when git cannot tell."""
    out = _git(["status", "--porcelain"], top)
    if out is None:
        return None
    lines = out.decode(errors="replace").splitlines()
    return [ln for ln in lines if not (ln.startswith("?? ") and _is_run_output(ln[3:]))]


def _diff_sha(top: Path) -> str | None:
    """A 12-hex-digit digest of the uncommitted changes: ``git diff HEAD`` plus the names and
    contents of untracked files outside the outputs folder (those git does not ignore)."""
    diff = _git(["diff", "HEAD", "--binary"], top)
    untracked = _git(["ls-files", "--others", "--exclude-standard", "-z"], top)
    if diff is None or untracked is None:
        return None
    digest = hashlib.sha256(diff)
    for name in sorted(untracked.decode(errors="replace").split("\0")):
        if not name or _is_run_output(name):
            continue
        digest.update(b"\0" + name.encode() + b"\0")
        try:
            digest.update((top / name).read_bytes())
        except OSError:
            continue
    return digest.hexdigest()[:12]


def code_version(where: str | Path | None = None) -> dict[str, Any]:
    """The code that runs: ``{"commit", "dirty", "diff_sha"}`` of the git checkout holding
    ``where`` (default: this package's folder).

    ``commit`` is ``HEAD``; ``dirty`` is whether ``git status --porcelain`` lists changes
    (untracked files under ``outputs/``, where runs write, do not count); ``diff_sha``
    digests those changes when dirty (:func:`_diff_sha`), so that two dirty checkouts with
    the same changes are known to run the same code. Outside a git checkout, or without git,
    every value is None; this never raises.
    """
    unknown: dict[str, Any] = {"commit": None, "dirty": None, "diff_sha": None}
    start = Path(where) if where is not None else Path(__file__).resolve().parent
    # One git call for both: the checkout's top folder and its HEAD commit.
    out = _git(["rev-parse", "--show-toplevel", "HEAD"], start)
    lines = out.decode(errors="replace").splitlines() if out is not None else []
    if len(lines) != 2:
        return unknown
    top, head = Path(lines[0].strip()), lines[1].strip()
    changes = _changes(top)
    dirty = None if changes is None else bool(changes)
    diff_sha = _diff_sha(top) if dirty else None
    return {"commit": head, "dirty": dirty, "diff_sha": diff_sha}


def same_code(made_by: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Whether the code that made a record (``made_by``, its ``code``) is known to be the
    code in ``current``: the same commit, and both clean, or both dirty with the same
    changes (same ``diff_sha``). Unknown code (no commit, a record without ``code``) is
    never the same."""
    if not made_by or not current or not made_by.get("commit"):
        return False
    if made_by.get("dirty") not in (True, False):
        return False
    if made_by.get("dirty") and not made_by.get("diff_sha"):
        return False
    return all(made_by.get(k) == current.get(k) for k in ("commit", "dirty", "diff_sha"))


def describe_code(code: dict[str, Any] | None) -> str:
    """``'commit 1a2b3c4d5e6f'``, ``'commit 1a2b3c4d5e6f (dirty)'`` or ``'unknown code'``."""
    if not code or not code.get("commit"):
        return "unknown code"
    return f"commit {code['commit'][:12]}{' (dirty)' if code.get('dirty') else ''}"


def is_main_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which must not write."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def read_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The results record of a run, or None when there is none (or it is unreadable)."""
    path = files.results_path(run_dir)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class RunRecord:
    """The results record of one run, kept in memory and flushed atomically to disk."""

    def __init__(
        self,
        run_dir: str | Path,
        config: dict[str, Any],
        seed: int,
        config_hash: str | None = None,
        code: dict[str, Any] | None = None,
    ) -> None:
        """``code`` is the code version (:func:`code_version`, asked when not given)."""
        self.path = files.results_path(run_dir)
        self._start = time.time()
        self.data: dict[str, Any] = {
            "status": "running",
            "run_dir": str(Path(run_dir)),
            "config_hash": config_hash or _hash(config),
            "seed": seed,
            "code": code if code is not None else code_version(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self._start)),
            "config": config,
            "metrics": {},
            "sparsity": {},
            "wall_time_s": 0.0,
            "versions": package_versions(),
        }

    def update(self, **fields: Any) -> None:
        """Merge fields into the record and write it (status unchanged)."""
        self.data.update(fields)
        self.flush()

    def flush(self) -> None:
        """Write the record as it stands now (on the main process only, under DDP)."""
        self.data["wall_time_s"] = round(time.time() - self._start, 3)
        if is_main_process():
            write_json_atomic(self.path, self.data)

    def complete(self, **fields: Any) -> None:
        """Mark the run completed with its final fields."""
        self.data.update(fields)
        self.data["status"] = "completed"
        self.flush()

    def fail(self, error: BaseException) -> None:
        """Mark the run failed with a one-line description of the error."""
        self.data["status"] = "failed"
        self.data["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
        self.flush()
