"""Find results records (run folders, multiruns, globs, W&B) and read values out of them.

A :class:`Record` wraps one run's ``results.json`` (see :mod:`prunelab.tracking.results`).
A Hydra job folder that has ``.hydra/overrides.yaml`` but no record (a bad config stops
a job before the record is written) becomes a ``failed`` record placed in its cell by its
overrides and by the config Hydra saved next to them.

:meth:`Record.get` resolves, in this order:

1. aliases: ``pruning``, ``sparsity`` (0.0 for the dense method), ``seed``, ``dataset``,
   ``model``, ``distribution``, ``status``;
2. metric names: ``test/acc`` (or ``metrics/test/acc``, ``metrics.test/acc``);
3. dotted paths into the record: ``cost.flops_train``, ``sparsity.global``,
   ``config.optimizer.lr``, ``wall_time_s`` (``cost/flops_train`` works too);
4. Hydra group choices: ``optimizer``, ``schedule``, ``lr_scheduler``, ...;
5. dotted paths into the config: ``lr``, ``optimizer.lr``, ``dataset.batch_size``;
6. the job's command-line overrides.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from prunelab import files
from prunelab.tracking.results import read_record

log = logging.getLogger(__name__)

# Files Hydra writes in <job>/.hydra/ when a job starts (before any results record).

# Sub-folders of a run that never hold another run: not searched (W&B folders are large).
_SKIP_DIRS = {files.WANDB_DIR, files.CHECKPOINT_DIR, files.CSV_DIR, "__pycache__", ".git"}
_MISSING = object()
DENSE = "dense"

# W&B run states -> results-record statuses.
_WANDB_STATUS = {
    "finished": "completed",
    "running": "running",
    "pending": "running",
    "failed": "failed",
    "crashed": "failed",
    "killed": "failed",
}


def _walk(obj: Any, parts: list[str]) -> Any:
    """Follow dotted ``parts`` into nested dicts; keys may themselves contain dots."""
    if not parts:
        return obj
    if not isinstance(obj, dict):
        return _MISSING
    for i in range(len(parts), 0, -1):  # longest key first: 'layers.0.weight' is one key
        key = ".".join(parts[:i])
        if key in obj:
            found = _walk(obj[key], parts[i:])
            if found is not _MISSING:
                return found
    return _MISSING


def lookup(obj: Any, dotted: str) -> Any:
    """The value at a dotted path in nested dicts, or None."""
    found = _walk(obj, dotted.split("."))
    return None if found is _MISSING else found


def _short_target(node: Any) -> str | None:
    """'prunelab.models.MLP' -> 'MLP' (the name to show when no group choice is known)."""
    if isinstance(node, dict) and isinstance(node.get("_target_"), str):
        return node["_target_"].rsplit(".", 1)[-1]
    return None


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(lines: list[Any]) -> dict[str, Any]:
    """``['pruning=rigl', 'sparsity=0.9', '+x=1']`` -> ``{'pruning': 'rigl', 'sparsity': 0.9, 'x': 1}``."""
    out: dict[str, Any] = {}
    for line in lines:
        key, sep, value = str(line).strip().partition("=")
        if not sep:
            continue
        out[key.lstrip("+~")] = _parse_value(value)
    return out


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


@dataclass
class Record:
    """One run: its results record (``data``) plus what Hydra left in its job folder.

    ``data`` is the ``results.json`` dict (empty for a job that left none); ``source`` is the
    run folder or ``wandb:<entity/project>/<id>``; ``overrides`` are the job's command-line
    overrides (``.hydra/overrides.yaml``).
    """

    data: dict[str, Any]
    source: str
    overrides: dict[str, Any] = field(default_factory=dict)
    hydra_dir: Path | None = None

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_dir(cls, run_dir: str | Path) -> Record:
        """The record of a run or Hydra job folder (a ``failed`` one when it has no results)."""
        run_dir = Path(run_dir)
        hydra_dir = run_dir / files.HYDRA_DIR
        overrides = _read_yaml(hydra_dir / files.HYDRA_OVERRIDES)
        data = read_record(run_dir)
        if data is None:
            exists = files.results_path(run_dir).exists()
            data = {
                "status": "failed",
                "error": f"{files.RESULTS} unreadable"
                if exists
                else f"no {files.RESULTS}: the job stopped before training; see its log",
                "run_dir": str(run_dir),
            }
            config = _read_yaml(hydra_dir / files.HYDRA_CONFIG)
            if isinstance(config, dict):
                data["config"] = config
        return cls(
            data=data,
            source=str(run_dir),
            overrides=parse_overrides(overrides) if isinstance(overrides, list) else {},
            hydra_dir=hydra_dir if hydra_dir.is_dir() else None,
        )

    # -- status ------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """``completed``, ``failed`` or ``running``."""
        return str(self.data.get("status") or "failed")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def error(self) -> str | None:
        return self.data.get("error")

    @property
    def config(self) -> dict[str, Any]:
        config = self.data.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def is_dense(self) -> bool:
        """True for the dense baseline, which does not depend on ``sparsity``."""
        return DENSE in (self.get("pruning"), lookup(self.config, "pruning.name"))

    @cached_property
    def choices(self) -> dict[str, Any]:
        """Hydra group choices: from the record, else from ``.hydra/hydra.yaml``."""
        choices = self.data.get("choices")
        if isinstance(choices, dict) and choices:
            return choices
        if self.hydra_dir is not None:
            hydra = _read_yaml(self.hydra_dir / files.HYDRA_HYDRA)
            found = lookup(hydra, "hydra.runtime.choices")
            if isinstance(found, dict):
                return {k: str(v) for k, v in found.items()}
        return {}

    # -- values ------------------------------------------------------------------------
    def _group(self, name: str, from_config: Any) -> Any:
        for value in (self.choices.get(name), self.overrides.get(name), from_config):
            if value is not None:
                return value
        return None

    def _alias(self, key: str) -> Any:
        config = self.config
        if key == "pruning":
            return self._group("pruning", lookup(config, "pruning.name"))
        if key == "sparsity":
            if self.is_dense:
                return 0.0
            for value in (
                config.get("sparsity"),
                self.overrides.get("sparsity"),
                lookup(self.data, "sparsity.target"),
            ):
                if value is not None:
                    return value
            return None
        if key == "seed":
            for value in (self.data.get("seed"), config.get("seed"), self.overrides.get("seed")):
                if value is not None:
                    return value
            return None
        if key in ("dataset", "model"):
            return self._group(key, _short_target(config.get(key)))
        if key == "distribution":
            return self._group("distribution", lookup(config, "distribution.name"))
        if key == "status":
            return self.status
        return _MISSING

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` in this record (see the module docstring), or ``default``."""
        value = self._alias(key)
        if value is not _MISSING:
            return default if value is None else value
        metrics = self.data.get("metrics") or {}
        for prefix in ("metrics/", "metrics."):
            if key.startswith(prefix) and key[len(prefix) :] in metrics:
                return metrics[key[len(prefix) :]]
        if key in metrics:
            return metrics[key]
        found = _walk(self.data, key.split("."))
        if found is _MISSING and "/" in key:  # cost/flops_train -> cost.flops_train
            found = _walk(self.data, key.replace("/", ".", 1).split("."))
        if found is _MISSING and key in self.choices:
            found = self.choices[key]
        if found is _MISSING:
            found = _walk(self.config, key.split("."))
        if found is _MISSING and key in self.overrides:
            found = self.overrides[key]
        return default if found is _MISSING or found is None else found

    def number(self, key: str) -> float | None:
        """``get(key)`` as a float, or None when absent or not a number."""
        value = self.get(key)
        if isinstance(value, bool):
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    def __repr__(self) -> str:  # short: records are printed in warnings and test failures
        return (
            f"Record({self.status}, pruning={self.get('pruning')}, "
            f"sparsity={self.get('sparsity')}, seed={self.get('seed')}, {self.source})"
        )


# -- local folders ---------------------------------------------------------------------
def _natural_key(path: str) -> list[Any]:
    """Sort 'multirun/10' after 'multirun/9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def _run_dirs_under(top: Path) -> set[Path]:
    found: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        if files.RESULTS in filenames:
            found.add(here)
        if here.name == files.HYDRA_DIR and files.HYDRA_OVERRIDES in filenames:
            found.add(here.parent)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    return found


def _glob_depth(pattern: str) -> int:
    """How many leading parts of ``pattern`` are plain folder names (no wildcards)."""
    parts = Path(pattern).parts
    return next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))


def find_records(paths: list[str | Path]) -> list[Record]:
    """Every run under ``paths``: multirun folders, run folders, results files or globs.

    Folders are searched recursively for ``results.json`` and for Hydra job folders
    (``.hydra/overrides.yaml``); a job folder without a record is a ``failed`` record.
    Paths that match nothing are logged and skipped. Records come sorted by folder
    (job 10 after job 9).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    run_dirs: set[Path] = set()
    for raw in paths:
        text = str(raw)
        matches = sorted(glob.glob(text, recursive=True)) if glob.has_magic(text) else [text]
        if not matches or not Path(matches[0]).exists():
            log.warning("no such path: %s", text)
            continue
        for match in matches:
            path = Path(match)
            if _SKIP_DIRS & set(path.parts[_glob_depth(text) :]):
                continue  # a glob that reached into a run's wandb/ or checkpoints/ folder
            if path.is_dir():
                run_dirs |= _run_dirs_under(path)
            elif path.name == files.RESULTS:
                run_dirs.add(path.parent)
            elif path.name == files.HYDRA_OVERRIDES and path.parent.name == files.HYDRA_DIR:
                run_dirs.add(path.parent.parent)
    ordered = sorted({d.resolve() for d in run_dirs}, key=lambda d: _natural_key(str(d)))
    records = [Record.from_dir(d) for d in ordered]
    # A completed run made of sub-runs (IMP: one per level) is their summary: the table
    # reads the sub-runs. A failed one stays, so its cell shows the failure.
    return [r for r in records if not (r.completed and r.data.get("sub_runs"))]


def filter_records(records: list[Record], where: list[str]) -> list[Record]:
    """The records that meet every condition of ``where``: ``KEY=V1,V2,...`` (the value is
    one of those listed) or ``KEY!=V1,...`` (it is none of them; a record without the key
    passes). Values compare as YAML scalars: ``sparsity=0.9,0.95``, ``imp.level!=0``.
    Raises ValueError for a condition without ``=``."""
    from prunelab.report.published import same

    conditions = []
    for text in where:
        key, sep, values = str(text).partition("=")
        negate = key.endswith("!")
        key = key.rstrip("!").strip()
        if not sep or not key:
            raise ValueError(f"--where takes KEY=VALUE[,VALUE...] or KEY!=VALUE, got {text!r}")
        conditions.append((key, negate, [_parse_value(v) for v in values.split(",")]))

    def keep(record: Record) -> bool:
        for key, negate, values in conditions:
            value = record.get(key)
            if any(same(value, v) for v in values) == negate:
                return False
        return True

    return [r for r in records if keep(r)]


# -- Weights & Biases ------------------------------------------------------------------
def _unwrap(value: Any) -> Any:
    """W&B raw configs wrap values as {'value': x, 'desc': ...}."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return _unwrap(value["value"])
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Undo flattening ('optimizer/lr' or 'optimizer.lr' keys) of a W&B config."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key.startswith("_"):  # W&B's own entries (_wandb)
            continue
        parts = re.split(r"[./]", key)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out


def _number_or_none(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def record_from_wandb_run(run: Any, project: str = "") -> Record:
    """A :class:`Record` from a W&B public-API run (``.config``, ``.summary``, ``.state``)."""
    config = _nest(_unwrap(dict(run.config or {})))
    summary_obj = run.summary or {}
    summary = dict(summary_obj.items()) if hasattr(summary_obj, "items") else {}
    metrics: dict[str, Any] = {}
    sparsity: dict[str, Any] = {}
    cost: dict[str, Any] = {}
    for key, value in summary.items():
        number = _number_or_none(value)
        if key.startswith("_") or number is None:
            continue
        metrics[key] = number
        head, _, tail = key.partition("/")
        if head == "sparsity" and tail:
            sparsity[tail] = number
        elif head == "cost" and tail:
            cost[tail] = number
    status = _WANDB_STATUS.get(str(getattr(run, "state", "")).lower(), "failed")
    data: dict[str, Any] = {
        "status": status,
        "run_dir": None,
        "config_hash": summary.get("config_hash"),
        "seed": config.get("seed"),
        "config": config,
        "metrics": metrics,
        "sparsity": {"target": config.get("sparsity"), **sparsity},
        "wandb": {
            "id": getattr(run, "id", None),
            "name": getattr(run, "name", None),
            "group": getattr(run, "group", None),
            "state": getattr(run, "state", None),
            "project": project,
        },
    }
    if cost:
        data["cost"] = cost
    if status == "failed":
        data["error"] = f"W&B state: {getattr(run, 'state', '?')}"
    return Record(data=data, source=f"wandb:{project}/{getattr(run, 'id', '?')}")


def load_wandb_runs(api: Any, project: str, filters: dict | None = None) -> list[Record]:
    """Records for the runs of a W&B project (``entity/project``), e.g. ``wandb.Api()``.

    Reads each run's config (the resolved Hydra config), summary (final metrics) and state
    (``finished`` -> completed, ``running`` -> running, ``failed``/``crashed``/``killed`` ->
    failed). W&B keeps no Hydra group choices, so ``dataset`` and ``model`` fall back to
    the class name of the config's ``_target_``; the sparsity curve is not fetched.
    """
    runs = api.runs(project, filters=filters) if filters else api.runs(project)
    return [record_from_wandb_run(run, project) for run in runs]
