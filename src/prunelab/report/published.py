"""Published reference numbers (``conf/published/<name>.yaml``) and their match to table cells.

A file holds a ``source:`` and a ``note:`` line, optional defaults, and a list of entries::

    source: "Dettmers & Zettlemoyer 2019, official repo CSVs [V]"
    note: "LeNet-300-100 on MNIST; test accuracy in percent"
    metric: test/acc          # default metric of the entries
    unit: percent             # percent (value / 100 is compared) or fraction
    match: {dataset: mnist, model: lenet300_100}   # conditions added to every entry
    entries:
      - {pruning: set, sparsity: 0.9, value: 98.39}
      - {pruning: [rigl, dynamic], sparsity: 0.87, value: 98.52, source: "RigL app. B [V]"}

The ``match`` conditions (the dataset and model the numbers are for) are added to every
entry. Every key of an entry other than ``value``, ``metric``, ``source``, ``note``, ``label`` is a
match condition: a key the table groups by must equal the cell's value there (a list means
any of); any other key (``distribution: erk``) must hold for the cell's runs. An entry
without ``sparsity`` (a dense baseline) matches that row in every sparsity column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunelab.config import CONF_DIR

PUBLISHED_DIR = CONF_DIR / "published"
_NOT_CONDITIONS = {"value", "metric", "source", "note", "label", "unit"}
_FILE_KEYS = {"source", "note", "metric", "unit", "match", "entries"}
_UNITS = {"percent": 100.0, "fraction": 1.0}


@dataclass
class PublishedEntry:
    """One published number; ``value`` in the metric's own units (fractions for accuracy)."""

    conditions: dict[str, Any]
    value: float
    metric: str
    source: str
    label: str | None = None


@dataclass
class Published:
    """The entries of one ``conf/published/<name>.yaml`` file."""

    name: str
    source: str
    note: str
    entries: list[PublishedEntry] = field(default_factory=list)


def available() -> list[str]:
    """The names of the published reference files."""
    return sorted(p.stem for p in PUBLISHED_DIR.glob("*.yaml"))


def load_published(name: str | Path) -> Published:
    """Load ``conf/published/<name>.yaml`` (or a yaml file given by path).

    Raises FileNotFoundError (listing the names there are) or ValueError on a bad file.
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = PUBLISHED_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no published numbers '{name}'; choose one of: {', '.join(available()) or 'none'}"
        )
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise ValueError(f"{path}: expected a mapping with a list of 'entries'")
    unit = str(doc.get("unit", "percent"))
    if unit not in _UNITS:
        raise ValueError(f"{path}: unit must be one of {sorted(_UNITS)}, got {unit!r}")
    unknown = set(doc) - _FILE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(_FILE_KEYS)}")
    common = doc.get("match") or {}
    if not isinstance(common, dict):
        raise ValueError(f"{path}: 'match' must be a mapping, got {common!r}")
    source = str(doc.get("source", ""))
    entries = []
    for i, raw in enumerate(doc["entries"]):
        if not isinstance(raw, dict) or "value" not in raw:
            raise ValueError(f"{path}: entry {i} needs a 'value', got {raw!r}")
        entries.append(
            PublishedEntry(
                conditions={
                    **common,
                    **{k: v for k, v in raw.items() if k not in _NOT_CONDITIONS},
                },
                value=float(raw["value"]) / _UNITS[str(raw.get("unit", unit))],
                metric=str(raw.get("metric", doc.get("metric", "test/acc"))),
                source=str(raw.get("source", source)),
                label=raw.get("label"),
            )
        )
    return Published(name=path.stem, source=source, note=str(doc.get("note", "")), entries=entries)


def same(a: Any, b: Any) -> bool:
    """Equality for config values: numbers within 1e-6, strings case-insensitive."""
    if isinstance(a, (list, tuple)):
        return any(same(x, b) for x in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, abs_tol=1e-6)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b
