"""What the runners of runs made of sub-runs share (IMP levels in :mod:`prunelab.lottery`,
adaptive search points in :mod:`prunelab.adaptive`): reading a finished sub-run's weights
and masks, and refusing a folder that holds another configuration's sub-runs."""

from __future__ import annotations

from pathlib import Path

import torch

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.sparsity.masks import Masks
from prunelab.tracking.results import read_record


def trained_state(sub_dir: Path) -> tuple[dict[str, torch.Tensor], Masks | None]:
    """The final model state (parameters and buffers) and masks of a completed sub-run, from
    its last checkpoint (masks None when its engine held none)."""
    ckpt = torch.load(files.last_checkpoint(sub_dir), map_location="cpu", weights_only=False)
    prefix = "model."
    model = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    masks = (ckpt.get("sparsity_engine") or {}).get("masks")
    return model, Masks.from_state_dict(masks) if masks else None


def check_own_sub_runs(folder: Path, key: str, parent_hash: str, what: str) -> None:
    """``folder`` may hold sub-runs of this run only (a resume), never another
    configuration's: every sub-run record there must name ``parent_hash`` under ``key``
    (one ConfigError line otherwise; ``what`` names the sub-runs in it)."""
    if not folder.is_dir():
        return
    for sub in sorted(folder.iterdir()):
        record = read_record(sub)
        if record is None:
            continue
        if (record.get(key) or {}).get("parent_hash") != parent_hash:
            raise ConfigError(
                f"{folder.parent} holds {what} of another configuration ({sub.name}); resume "
                "only with the same command, or choose a new folder (drop hydra.run.dir=...)"
            )
