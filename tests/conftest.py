"""Shared test set-up: W&B offline, the repo's src on the path, a composed-config helper."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

FAST = (
    "epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
)
QUIET = (
    "logger.wandb.enabled=false",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
)


@pytest.fixture
def compose_cfg(tmp_path):
    """Compose the real root config with overrides for a quick, quiet CPU run in tmp_path."""
    from hydra.core.global_hydra import GlobalHydra

    from prunelab.config import compose_config

    def _compose(*overrides: str, fast: bool = True, run_dir: Path | None = None):
        extra = (*QUIET, *(FAST if fast else ()))
        return compose_config([*extra, *overrides], run_dir or tmp_path / "run")

    yield _compose
    GlobalHydra.instance().clear()
