"""Weights & Biases that never stops a run.

``auto`` mode goes online only when an API key is configured and the W&B server answers
within two seconds; otherwise the run logs offline (``make wandb-sync`` uploads it later).
An explicit ``WANDB_MODE`` in the environment always wins.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prunelab.tracking import artifacts

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"


def _host() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)


def has_api_key() -> bool:
    """True when an API key is set in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    hostname = urlparse(_host()).hostname or ""
    try:
        return netrc.netrc().authenticators(hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def server_reachable(timeout_s: float = 2.0) -> bool:
    """True when a TCP connection to the W&B host opens within ``timeout_s``."""
    url = urlparse(_host())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_mode(requested: str) -> str:
    """The W&B mode a run will use: the environment's, the requested one, or auto-detected."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    if not has_api_key():
        log.info("W&B: no API key configured, logging offline")
        return "offline"
    if not server_reachable():
        log.info("W&B: server not reachable, logging offline")
        return "offline"
    return "online"


def make_wandb_logger(
    wandb_cfg: dict[str, Any],
    run_dir: Path,
    name: str,
    tags: list[str],
    config: dict[str, Any],
    group: str | None = None,
):
    """A Lightning WandbLogger writing under ``run_dir``, or None when W&B is disabled.

    Runs are grouped by ``group`` (the config hash: all seeds of one cell) unless the
    config names a group. ``wandb_cfg["artifacts"]`` (default true) travels with the logger
    (:data:`prunelab.tracking.artifacts.ENABLED_ATTR`): whether the run logs and declares
    artifacts (:mod:`prunelab.tracking.artifacts`). The logger is a
    :class:`~prunelab.tracking.wandb_logger.BackgroundWandbLogger`: its ``start()`` starts
    the W&B run in the background (the run starts on first use otherwise); W&B itself is
    imported only there, never when W&B is off.
    """
    if not wandb_cfg.get("enabled", True):
        return None
    mode = resolve_mode(str(wandb_cfg.get("mode", "auto")))
    if mode == "disabled":
        return None
    from prunelab.tracking.wandb_logger import BackgroundWandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    save_dir = run_dir
    save_dir.mkdir(parents=True, exist_ok=True)
    logger = BackgroundWandbLogger(
        project=wandb_cfg.get("project", "prunelab"),
        entity=wandb_cfg.get("entity"),
        group=wandb_cfg.get("group") or group,
        name=name,
        tags=[str(t) for t in tags],
        save_dir=str(save_dir),
        mode=mode,
        config=config,
        settings={"init_timeout": 60, "console": "off", "x_disable_stats": True},
    )
    setattr(logger, artifacts.ENABLED_ATTR, bool(wandb_cfg.get("artifacts", True)))
    return logger


def for_trainer(logger: Any) -> Any:
    """What to give a Trainer in place of ``logger``: a W&B logger's view that does not wait
    for its background start (:meth:`BackgroundWandbLogger.trainer_view`), else the logger."""
    view = getattr(logger, "trainer_view", None)
    return view() if callable(view) else logger


def finish() -> None:
    """Close the current W&B run if there is one (safe to call always; W&B is not imported
    when nothing imported it). Waits for a run still starting in the background first."""
    try:
        starting = sys.modules.get("prunelab.tracking.wandb_logger")
        if starting is not None:
            starting.wait_for_starts()
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
    except Exception as err:  # never let W&B shutdown hide the run's own outcome
        log.warning("W&B finish failed: %s", err)


def log_run_end(wandb_logger: Any, record: dict[str, Any]) -> None:
    """At the end of a run: the per-layer sparsity table, the sparsity curve and the
    record's final metrics in the run summary."""
    if wandb_logger is None:
        return
    import wandb

    run = wandb_logger.experiment
    sparsity = record.get("sparsity", {})
    zeros = sparsity.get("weights_zero_layers", {})
    rows = [[name, value, zeros.get(name)] for name, value in sparsity.get("layers", {}).items()]
    run.log({"sparsity/layers": wandb.Table(columns=["layer", "sparsity", "zeros"], data=rows)})
    curve = record.get("sparsity_curve") or []
    if len(curve) > 1:
        table = wandb.Table(
            columns=["step", "sparsity", "turnover", "itop_rate"],
            data=[
                [p["step"], p["sparsity/global"], p["mask/turnover"], p["mask/itop_rate"]]
                for p in curve
            ],
        )
        run.log({"sparsity/curve": wandb.plot.line(table, "step", "sparsity", title="sparsity")})
    summary = {f"final/{k}": v for k, v in record.get("metrics", {}).items()}
    summary.update({f"cost/{k}": v for k, v in (record.get("cost") or {}).items()})
    summary["sparsity/final"] = sparsity.get("global")
    summary["config_hash"] = record.get("config_hash")
    run.summary.update(summary)
