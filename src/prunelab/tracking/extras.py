"""The ``extras`` block of a root config: what happens at the start of a run besides the run.

``print_config`` prints the composed config as a Rich tree (main process only);
``ignore_warnings`` silences Python warnings; ``enforce_tags`` is a check
(:func:`prunelab.config.check_tags`, before any job of a sweep starts).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import IO

from omegaconf import DictConfig, OmegaConf

from prunelab.tracking.results import is_main_process

log = logging.getLogger(__name__)

# The groups printed first, in this order; every other top-level key follows in config order.
PRINT_ORDER = (
    "dataset",
    "model",
    "pruning",
    "distribution",
    "schedule",
    "optimizer",
    "lr_scheduler",
    "callbacks",
    "trainer",
    "logger",
    "paths",
    "extras",
)


def print_config_tree(
    cfg: DictConfig,
    order: Sequence[str] = PRINT_ORDER,
    resolve: bool = True,
    file: IO[str] | None = None,
) -> None:
    """Print ``cfg`` as a Rich tree: one branch per top-level key, ``order`` first, each
    group's yaml under it (resolved, unless resolving fails or ``resolve`` is false)."""
    import rich
    import rich.console
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="dim", guide_style="dim")
        node = cfg.get(key)
        if isinstance(node, DictConfig):
            try:
                text = OmegaConf.to_yaml(node, resolve=resolve)
            except Exception:
                text = OmegaConf.to_yaml(node, resolve=False)
        else:
            text = str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    console = rich.console.Console(file=file) if file is not None else rich.get_console()
    console.print(tree)


def apply_extras(cfg: DictConfig) -> None:
    """Apply ``cfg.extras``: silence warnings, print the config tree (main process only)."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings", False):
        log.info("extras.ignore_warnings: Python warnings are silenced")
        warnings.filterwarnings("ignore")
    if extras.get("print_config", False) and is_main_process():
        print_config_tree(cfg)
