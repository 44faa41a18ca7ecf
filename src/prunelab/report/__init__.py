"""Tables and plots built from many results records (local run folders or W&B runs).

- :mod:`~prunelab.report.records` finds and reads records (:func:`find_records`,
  :func:`load_wandb_runs`); :class:`Record.get` resolves keys such as ``pruning``,
  ``sparsity``, ``test/acc`` or ``config.optimizer.lr``.
- :mod:`~prunelab.report.table` aggregates them over seeds (:func:`aggregate`) and formats
  the result as Markdown, LaTeX or CSV, optionally next to published numbers.
- :mod:`~prunelab.report.plots` draws the accuracy / sparsity / FLOPs trade-off figures.

``scripts/make_table.py`` and ``scripts/plot_tradeoff.py`` are thin command-line wrappers.
"""

from prunelab.report.records import Record, find_records, load_wandb_runs
from prunelab.report.table import Cell, Table, aggregate, to_csv, to_latex, to_markdown

__all__ = [
    "Cell",
    "Record",
    "Table",
    "aggregate",
    "find_records",
    "load_wandb_runs",
    "to_csv",
    "to_latex",
    "to_markdown",
]
