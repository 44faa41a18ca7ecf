"""The results record: one JSON file per run, written atomically.

Tables and sweeps read these files. The record is written with status ``running`` when a
run starts, and rewritten with ``completed`` or ``failed`` at the end, always through a
temporary file and a rename so that a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
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
        self, run_dir: str | Path, config: dict[str, Any], seed: int, config_hash: str | None = None
    ) -> None:
        self.path = files.results_path(run_dir)
        self._start = time.time()
        self.data: dict[str, Any] = {
            "status": "running",
            "run_dir": str(Path(run_dir)),
            "config_hash": config_hash or _hash(config),
            "seed": seed,
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
