"""Aggregate records over seeds into a rows x columns table, and format it.

:func:`aggregate` groups records by the values of the ``rows`` and ``cols`` keys (anything
:meth:`Record.get` resolves) and summarises ``metric`` over seeds in each cell:

- ``mean`` and ``std`` (sample standard deviation, ddof=1; 0 when n=1) over seeds;
- ``n``: seeds with a completed run that reports the metric; ``n_jobs``: seeds tried.
  Several completed runs of one seed in a cell (a re-run, or the dense baseline run at
  several sparsities) are averaged first, so they count once;
- ``status``, the convention every formatter follows:

  ==========  =========================================  ===========================
  status      meaning                                    shown as
  ==========  =========================================  ===========================
  ``ok``      every seed tried has a completed run       ``98.52 ± 0.10 (n=3)``
  ``partial`` some seeds completed, others failed or     ``98.52 ± 0.10 (n=2/3)``
              still running (mean over completed ones)
  ``failed``  runs exist, none completed, one failed     ``failed``
  ``running`` runs exist, none finished yet              ``running``
  ``missing`` no run for this row and column             ``—``
  ==========  =========================================  ===========================

**The dense baseline** (``pruning=dense``) does not depend on ``sparsity``: when
``sparsity`` is one of the row or column keys, its runs are placed in every sparsity
column (or row) of the table, so the same number appears in each, once per column.

The formatters (:func:`to_markdown`, :func:`to_latex`, :func:`to_csv`) multiply values by
``scale`` (100: accuracies in percent), can add columns for extra metrics (``--extra
cost.flops_train``: shown as multiples of the dense baseline when there is one, else in
scientific notation) and, with ``published=``, the published value and the difference
(ours − published) in each matching cell.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prunelab.report.published import Published, PublishedEntry, load_published, same
from prunelab.report.records import DENSE, Record
from prunelab.tracking.results import HASH_EXCLUDED_KEYS

log = logging.getLogger(__name__)

OK, PARTIAL, FAILED, RUNNING, MISSING = "ok", "partial", "failed", "running", "missing"
MISSING_MARK = "—"
# Row order of methods in a table: baseline, static, dynamic (the taxonomy of the configs).
METHOD_ORDER = (
    "dense",
    "static",
    "random",
    "snip",
    "grasp",
    "synflow",
    "imp",
    "gmp",
    "set",
    "rigl",
    "dynamic",
    "snfs",
    "dns",
)

Key = tuple[Any, ...]


@dataclass
class Cell:
    """One table cell: ``metric`` summarised over the seeds of one (row, column)."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    n_jobs: int = 0
    status: str = MISSING
    values: list[float] = field(default_factory=list)  # one per completed seed
    seeds: list[Any] = field(default_factory=list)  # the completed seeds, same order
    records: list[Record] = field(default_factory=list)
    extras: dict[str, float | None] = field(default_factory=dict)  # mean over seeds
    dense_ref: dict[str, float | None] = field(default_factory=dict)  # dense baseline's mean
    errors: list[str] = field(default_factory=list)
    incomplete: dict[Any, str] = field(default_factory=dict)  # seed -> why it has no value
    shared: bool = False  # a dense-baseline cell repeated in every sparsity column
    dense: bool = False  # every run in the cell is the dense baseline


@dataclass
class Table:
    """The result of :func:`aggregate`; ``cells`` maps (row key, column key) to a Cell."""

    rows: list[str]
    cols: list[str]
    metric: str
    extra_metrics: tuple[str, ...]
    row_keys: list[Key]
    col_keys: list[Key]
    cells: dict[tuple[Key, Key], Cell]
    notes: list[str] = field(default_factory=list)

    def cell(self, row: Key | Any, col: Key | Any) -> Cell:
        """The cell at ``row``, ``col`` (single values or tuples); an empty one if none."""
        row = row if isinstance(row, tuple) else (row,)
        col = col if isinstance(col, tuple) else (col,)
        return self.cells.get((_norm_key(row), _norm_key(col)), Cell())

    def __iter__(self):
        for row in self.row_keys:
            for col in self.col_keys:
                yield row, col, self.cells.get((row, col), Cell())


# -- grouping ------------------------------------------------------------------------------
def _norm(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, (list, dict)):
        return str(value)
    return value


def _norm_key(key: Key) -> Key:
    return tuple(_norm(v) for v in key)


def sort_key(dim: str, value: Any) -> tuple:
    """Order of values in rows/columns: methods by taxonomy, numbers, strings, None."""
    if value is None:
        return (3, "")
    if dim == "pruning" and str(value) in METHOD_ORDER:
        return (0, METHOD_ORDER.index(str(value)))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value)
    return (2, str(value))


def _sorted_keys(keys: set[Key], dims: list[str]) -> list[Key]:
    return sorted(keys, key=lambda k: tuple(sort_key(d, v) for d, v in zip(dims, k, strict=True)))


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _seed_key(record: Record) -> Any:
    seed = record.get("seed")
    return ("record", id(record)) if seed is None else _norm(seed)


def _summarise(records: list[Record], metric: str, extras: tuple[str, ...]) -> Cell:
    by_seed: dict[Any, list[Record]] = {}
    for record in records:
        by_seed.setdefault(_seed_key(record), []).append(record)
    cell = Cell(records=records, n_jobs=len(by_seed))
    extra_values: dict[str, list[float]] = {e: [] for e in extras}
    any_failed = False
    for seed, runs in by_seed.items():
        done = [r for r in runs if r.completed and r.number(metric) is not None]
        any_failed |= not done and any(r.status == FAILED for r in runs)
        for run in runs:
            if run.status == FAILED and run.error and run.error not in cell.errors:
                cell.errors.append(run.error)
        if not done:
            cell.incomplete[seed] = _why_incomplete(runs, metric)
            continue
        cell.values.append(statistics.fmean(r.number(metric) for r in done))
        cell.seeds.append(seed)
        for extra in extras:
            found = [v for v in (r.number(extra) for r in done) if v is not None]
            if found:
                extra_values[extra].append(statistics.fmean(found))
    cell.n = len(cell.values)
    cell.mean = _mean(cell.values)
    cell.std = statistics.stdev(cell.values) if cell.n > 1 else (0.0 if cell.n else None)
    cell.extras = {e: _mean(v) for e, v in extra_values.items()}
    if cell.n and cell.n == cell.n_jobs:
        cell.status = OK
    elif cell.n:
        cell.status = PARTIAL
    elif any_failed or not any(r.status == RUNNING for r in records):
        cell.status = FAILED
    else:
        cell.status = RUNNING
    cell.dense = all(r.is_dense for r in records)
    return cell


def _why_incomplete(runs: list[Record], metric: str) -> str:
    for run in runs:
        if run.status == FAILED:
            return f"failed ({run.error or 'no error recorded'})"
    if any(r.status == RUNNING for r in runs):
        return "running"
    return f"completed without {metric}"


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    if not isinstance(obj, dict):
        return {prefix: repr(obj)}
    out: dict[str, str] = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out if out else {prefix: "{}"}


def _differing_keys(records: list[Record], dense: bool) -> dict[str, list[str]]:
    """Config keys whose values differ between the completed runs of one cell.

    Seeds, paths, loggers (what the config hash leaves out) and folders (``*_dir``) are
    ignored, and ``sparsity`` for the dense baseline, which does not use it.
    """
    skip = set(HASH_EXCLUDED_KEYS) | ({"sparsity"} if dense else set())
    flats = []
    for record in records:
        if record.completed and record.config:
            config = {k: v for k, v in record.config.items() if k not in skip}
            flats.append(_flatten(config))
    if len(flats) < 2:
        return {}
    differing = {}
    for key in sorted(set().union(*flats)):
        if key.rstrip(".").endswith(("seed", "_dir")):  # per-seed or per-machine values
            continue
        values = sorted({f.get(key, "<absent>") for f in flats})
        if len(values) > 1:
            differing[key.rstrip(".")] = values
    return differing


def aggregate(
    records: list[Record],
    rows: list[str],
    cols: list[str],
    metric: str,
    extra_metrics: tuple[str, ...] | list[str] = (),
) -> Table:
    """Group ``records`` by the ``rows`` x ``cols`` keys and summarise ``metric`` over seeds.

    See the module docstring for the cell statuses. The dense baseline's runs are placed in
    every sparsity column (or row) when ``sparsity`` is a key: its one value appears in each.
    Cells that mix runs whose configs differ in more than the seed get a note that names
    the keys that differ (add one of them to ``rows`` or ``cols`` to separate them).
    """
    rows, cols, extras = list(rows), list(cols), tuple(extra_metrics)
    dims = rows + cols
    sparsity_at = dims.index("sparsity") if "sparsity" in dims else None
    keyed = [(_norm_key(tuple(r.get(d) for d in dims)), r) for r in records]
    sparsities = sorted(
        {k[sparsity_at] for k, r in keyed if not r.is_dense and k[sparsity_at] is not None}
        if sparsity_at is not None
        else set()
    )
    groups: dict[Key, list[Record]] = {}
    shared: set[Key] = set()
    for key, record in keyed:
        if sparsity_at is not None and record.is_dense and sparsities:
            for s in sparsities:
                spread = key[:sparsity_at] + (s,) + key[sparsity_at + 1 :]
                groups.setdefault(spread, []).append(record)
                shared.add(spread)
        else:
            groups.setdefault(key, []).append(record)

    cells: dict[tuple[Key, Key], Cell] = {}
    for key, group in groups.items():
        cell = _summarise(group, metric, extras)
        cell.shared = key in shared
        cells[(key[: len(rows)], key[len(rows) :])] = cell

    # Dense reference for the extra columns: the dense cell that agrees on every key but
    # pruning and sparsity, else the only dense baseline there is.
    free = [i for i, d in enumerate(dims) if d not in ("pruning", "sparsity")]
    dense_means: dict[Key, dict[str, float | None]] = {}
    for (row, col), cell in cells.items():
        if cell.dense:
            dense_means.setdefault(tuple((row + col)[i] for i in free), cell.extras)
    only = next(iter(dense_means.values())) if len(dense_means) == 1 else {}
    for (row, col), cell in cells.items():
        cell.dense_ref = dense_means.get(tuple((row + col)[i] for i in free), only)

    table = Table(
        rows=rows,
        cols=cols,
        metric=metric,
        extra_metrics=extras,
        row_keys=_sorted_keys({r for r, _ in cells}, rows),
        col_keys=_sorted_keys({c for _, c in cells}, cols),
        cells=cells,
    )
    _add_notes(table, records)
    return table


def _add_notes(table: Table, records: list[Record]) -> None:
    completed = [r for r in records if r.completed]
    lacking = [r for r in completed if r.number(table.metric) is None]
    if lacking:
        table.notes.append(
            f"{len(lacking)} completed run(s) do not report {table.metric}: counted as not "
            f"completed (e.g. {lacking[0].source})"
        )
    for extra in table.extra_metrics:
        if completed and all(r.number(extra) is None for r in completed):
            table.notes.append(f"{extra}: absent from every completed run")
    seen = set()
    for row, col, cell in table:
        differing = _differing_keys(cell.records, cell.dense)
        if not differing:
            continue
        label = _cell_label(table, row, col if not cell.shared else None)
        if label in seen:
            continue
        seen.add(label)
        shown = "; ".join(f"{k} ({', '.join(v[:3])})" for k, v in list(differing.items())[:3])
        table.notes.append(
            f"cell {label} mixes runs whose configs differ in {shown}: "
            "add the key to --rows or --cols to separate them"
        )


# -- published numbers ---------------------------------------------------------------------
def match_published(
    table: Table, published: Published | str | None
) -> dict[tuple[Key, Key], PublishedEntry]:
    """The published entry (of ``table.metric``) for each cell it matches."""
    if published is None:
        return {}
    if isinstance(published, str):
        published = load_published(published)
    dims = table.rows + table.cols
    entries = [e for e in published.entries if same(e.metric, table.metric)]
    found: dict[tuple[Key, Key], PublishedEntry] = {}
    for row, col, cell in table:
        key = row + col
        runs = [r for r in cell.records if r.completed] or cell.records
        hits = []
        for entry in entries:
            ok = True
            for cond, wanted in entry.conditions.items():
                if cond in dims:
                    ok = same(wanted, key[dims.index(cond)])
                else:
                    ok = bool(runs) and all(same(wanted, r.get(cond)) for r in runs)
                if not ok:
                    break
            if ok:
                hits.append(entry)
        if hits:
            found[(row, col)] = hits[0]
            if len(hits) > 1:
                log.warning(
                    "%d published entries match %s; using the first",
                    len(hits),
                    _cell_label(table, row, col),
                )
    return found


# -- formatting ----------------------------------------------------------------------------
def _fmt_key_value(dim: str, value: Any) -> str:
    if value is None:
        return "?"
    if dim == "sparsity" and isinstance(value, (int, float)):
        return f"{100 * value:g}%"
    return str(value)


def _cell_label(table: Table, row: Key, col: Key | None) -> str:
    parts = [_fmt_key_value(d, v) for d, v in zip(table.rows, row, strict=True)]
    if col is not None:
        parts += [_fmt_key_value(d, v) for d, v in zip(table.cols, col, strict=True)]
    return "/".join(parts)


def _col_label(table: Table, col: Key) -> str:
    return " · ".join(_fmt_key_value(d, v) for d, v in zip(table.cols, col, strict=True))


def _short(metric: str) -> str:
    return metric.rsplit(".", 1)[-1].rsplit("/", 1)[-1]


def _modal_n(table: Table) -> int | None:
    counts = Counter(c.n for _, _, c in table if c.n)
    return counts.most_common(1)[0][0] if counts else None


_LATEX_SPECIAL = {"&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#", "$": "\\$", "\\": "/"}


class _Style:
    """What differs between Markdown and LaTeX cells."""

    def __init__(self, latex: bool) -> None:
        self.latex = latex
        self.pm = " $\\pm$ " if latex else " ± "
        self.times = "$\\times$" if latex else "×"
        self.missing = "---" if latex else MISSING_MARK
        self.delta = "$\\Delta$" if latex else "Δ"

    def esc(self, text: str) -> str:
        """Plain text (labels, keys) made safe for the output format."""
        if not self.latex:
            return text
        return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _value_text(cell: Cell, scale: float, digits: int, style: _Style, modal_n: int | None) -> str:
    if cell.status == MISSING:
        return style.missing
    if cell.status in (FAILED, RUNNING):
        return cell.status
    text = f"{cell.mean * scale:.{digits}f}"
    if cell.n > 1:
        text += f"{style.pm}{cell.std * scale:.{digits}f}"
    n = f"n={cell.n}" if cell.status == OK else f"n={cell.n}/{cell.n_jobs}"
    if not style.latex:
        return f"{text} ({n})"
    if cell.status != OK or cell.n != modal_n:
        text += f" {{\\scriptsize ({n})}}"
    return text


def _published_text(
    cell: Cell, entry: PublishedEntry | None, scale: float, digits: int, style: _Style
) -> str:
    if entry is None:
        return ""
    text = f"{entry.value * scale:.{digits}f}"
    if cell.mean is not None:
        text += f" ({cell.mean * scale - entry.value * scale:+.{digits}f})"
    return text


def _extra_text(cell: Cell, extra: str, relative: bool, style: _Style) -> str:
    value = cell.extras.get(extra)
    if value is None:
        return style.missing
    ref = cell.dense_ref.get(extra)
    if relative and ref:
        return f"{value / ref:.2f}{style.times}"
    text = f"{value:.2e}"
    if style.latex:
        mantissa, _, exponent = text.partition("e")
        return f"${mantissa} \\times 10^{{{int(exponent)}}}$"
    return text


def _grid(
    table: Table,
    scale: float,
    digits: int,
    published: Published | str | None,
    extra_format: str,
    style: _Style,
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body rows (strings) and notes shared by Markdown and LaTeX."""
    if isinstance(published, str):
        published = load_published(published)
    matches = match_published(table, published)
    relative = extra_format in ("auto", "relative") and any(
        c.dense_ref.get(e) for _, _, c in table for e in table.extra_metrics
    )
    modal_n = _modal_n(table)
    pub_cols = {col for _, col in matches}
    header = [style.esc(r) for r in table.rows]
    for col in table.col_keys:
        label = style.esc(_col_label(table, col))
        header.append(label)
        if col in pub_cols:
            header.append(f"{label} pub. ({style.delta})")
        header += [f"{label} {style.esc(_short(e))}" for e in table.extra_metrics]
    body = []
    for row in table.row_keys:
        line = [style.esc(_fmt_key_value(d, v)) for d, v in zip(table.rows, row, strict=True)]
        for col in table.col_keys:
            cell = table.cells.get((row, col), Cell())
            line.append(_value_text(cell, scale, digits, style, modal_n))
            if col in pub_cols:
                entry = matches.get((row, col))
                line.append(_published_text(cell, entry, scale, digits, style))
            line += [_extra_text(cell, e, relative, style) for e in table.extra_metrics]
        body.append(line)
    return header, body, _notes(table, scale, published, matches, relative, modal_n, style)


def _notes(
    table: Table,
    scale: float,
    published: Published | None,
    matches: dict,
    relative: bool,
    modal_n: int | None,
    style: _Style,
) -> list[str]:
    unit = " (%)" if scale == 100 else ("" if scale == 1 else f" (×{scale:g})")
    spread = "mean ± sample std (ddof=1) over seeds"
    n_text = (
        f"n = seeds completed (n={modal_n} unless shown)" if style.latex else "n = seeds completed"
    )
    notes = [
        f"{table.metric}{unit}: {spread}; {n_text}; n=k/m: k of m seeds completed "
        f"(the others failed or are running); failed: no seed completed; "
        f"{style.missing}: no run."
    ]
    if any(c.shared for _, _, c in table):
        notes.append(
            "dense: does not depend on sparsity; its one value is repeated in every "
            "sparsity column."
        )
    if table.extra_metrics:
        how = "multiples of the dense baseline (×)" if relative else "scientific notation"
        notes.append(f"{', '.join(table.extra_metrics)}: mean over seeds, in {how}.")
    if published is not None:
        n_matched = len({id(e) for e in matches.values()})
        notes.append(
            f"pub. ({style.delta}): published value from conf/published/{published.name}.yaml "
            f"and ours − published; {n_matched} of {len(published.entries)} entries matched "
            f"a cell. Source: {published.source}. {published.note}".strip()
        )
    seen: set[str] = set()
    for row, col, cell in table:
        if cell.incomplete and cell.status in (FAILED, PARTIAL, RUNNING):
            label = _cell_label(table, row, None if cell.shared else col)
            if label in seen:
                continue
            seen.add(label)
            why = [f"seed {seed}: {text}" for seed, text in cell.incomplete.items()]
            more = f" (+{len(why) - 2} more)" if len(why) > 2 else ""
            notes.append(f"{label} {cell.status}: {'; '.join(why[:2])}{more}")
    notes += table.notes
    return notes


def to_markdown(
    table: Table,
    scale: float = 100,
    digits: int = 2,
    published: Published | str | None = None,
    extra_format: str = "auto",
) -> str:
    """A Markdown (GitHub) table: ``mean ± std (n=3)`` cells, then notes.

    ``extra_format``: ``auto``/``relative`` (multiples of the dense baseline when there is
    one) or ``sci`` (scientific notation).
    """
    header, body, notes = _grid(table, scale, digits, published, extra_format, _Style(False))
    title = f"**{table.metric}** by {' × '.join(table.rows)} (rows) and {' × '.join(table.cols)} (columns)"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    aligns = ["---"] * len(table.rows) + ["---:"] * (len(header) - len(table.rows))
    out = [title, "", line(header), "| " + " | ".join(aligns) + " |"]
    out += [line(r) for r in body]
    out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def to_latex(
    table: Table,
    scale: float = 100,
    digits: int = 2,
    published: Published | str | None = None,
    extra_format: str = "auto",
) -> str:
    """A booktabs ``tabular``: ``mean $\\pm$ std`` cells; notes as comment lines above it.

    ``n`` is printed in a cell only where it differs from the table's usual n (which the
    notes give).
    """
    header, body, notes = _grid(table, scale, digits, published, extra_format, _Style(True))
    spec = "l" * len(table.rows) + "r" * (len(header) - len(table.rows))
    out = [f"% {_tex_comment(n)}" for n in notes]
    out += [f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    out.append(" & ".join(header) + " \\\\")
    out.append("\\midrule")
    out += [" & ".join(r) + " \\\\" for r in body]
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def _tex_comment(text: str) -> str:
    return text.replace("\n", " ")


def to_csv(
    table: Table,
    scale: float = 1,
    digits: int | None = None,
    published: Published | str | None = None,
) -> str:
    """One line per cell: the row and column keys, metric, mean, std, n, n_jobs, status.

    Machine readable: unrounded values (unless ``digits``), in the metric's units times
    ``scale`` (1: fractions), empty where there is no value. With ``published``, adds
    ``published``, ``diff`` (ours − published) and ``published_source``; with extra
    metrics, ``<extra>`` (mean) and ``<extra>/dense`` (multiple of the dense baseline).
    """
    if isinstance(published, str):
        published = load_published(published)
    matches = match_published(table, published)

    def num(value: float | None, factor: float = scale) -> str:
        if value is None:
            return ""
        value = value * factor
        return f"{round(value, digits) if digits is not None else value:.12g}"

    header = [*table.rows, *table.cols, "metric", "mean", "std", "n", "n_jobs", "status"]
    if published is not None:
        header += ["published", "diff", "published_source"]
    for extra in table.extra_metrics:
        header += [extra, f"{extra}/dense"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row, col, cell in table:
        line = [*row, *col, table.metric, num(cell.mean), num(cell.std)]
        line += [cell.n, cell.n_jobs, cell.status]
        if published is not None:
            entry = matches.get((row, col))
            pub = entry.value if entry else None
            diff = cell.mean - pub if pub is not None and cell.mean is not None else None
            line += [num(pub), num(diff), entry.source if entry else ""]
        for extra in table.extra_metrics:
            value, ref = cell.extras.get(extra), cell.dense_ref.get(extra)
            line += [num(value, 1), num(value / ref if value is not None and ref else None, 1)]
        writer.writerow(["" if v is None else v for v in line])
    return buffer.getvalue()


__all__ = [
    "DENSE",
    "FAILED",
    "MISSING",
    "OK",
    "PARTIAL",
    "RUNNING",
    "Cell",
    "Table",
    "aggregate",
    "match_published",
    "to_csv",
    "to_latex",
    "to_markdown",
]
