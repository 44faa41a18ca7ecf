"""Layer sensitivity of a trained run: prune each layer alone at several sparsities.

    python scripts/sensitivity.py outputs/runs/train/<time>
    python scripts/sensitivity.py <run>/checkpoints/best.ckpt --sparsities 0.5 0.9 0.99
    python scripts/sensitivity.py <run> --split test --out outputs/sensitivity/lenet --no-wandb
    python train.py pruning=rigl distribution=sensitivity distribution.curves=<run>

Reloads the run (its ``last`` checkpoint, ``--checkpoint best``, or the ``.ckpt`` given),
and for every prunable layer alone prunes it to each sparsity by magnitude among the
weights its mask keeps (``--score method``: by the run's method's own ``prune_scores``),
measures the accuracy on the validation split (the test split, with a note, when the run
held out no validation data) and restores it (Han et al. 2015, Fig. 5; Distiller's
sensitivity analysis; see :mod:`prunelab.analysis.sensitivity`). Writes
``sensitivity.json``, a Markdown table (``sensitivity.md``, also printed) and a PNG of
accuracy against layer sparsity, one line per layer, into ``<run>/sensitivity/`` (or
``--out``), and logs the table and plot to W&B when the run did (``--wandb`` /
``--no-wandb`` to choose): into the run's own W&B run when its folder holds one (resumed,
offline if it was), else into a new run of the same group. The last line printed is ``sensitivity: <path to the json>``, the file
``distribution=sensitivity distribution.curves=...`` reads. Mistakes are one ``error:``
line and exit status 2.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunelab import files  # noqa: E402
from prunelab.analysis.sensitivity import (  # noqa: E402
    DEFAULT_SPARSITIES,
    SensitivityCurves,
    check_grid,
    layer_sensitivity,
    write_sensitivity,
)
from prunelab.errors import ConfigError  # noqa: E402

SPLITS = ("val", "test")
SCORES = ("magnitude", "method")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Prune each layer of a trained run alone at several sparsities and "
        "measure the accuracy (layer sensitivity curves)."
    )
    parser.add_argument("run", help="a run folder or a checkpoint (.ckpt) inside one")
    parser.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=list(DEFAULT_SPARSITIES),
        help="sparsities of the one pruned layer (default: %(default)s)",
    )
    parser.add_argument("--split", choices=SPLITS, default="val", help="data split (val)")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/sensitivity)")
    parser.add_argument(
        "--checkpoint", choices=("last", "best"), default="last", help="for a run folder (last)"
    )
    parser.add_argument(
        "--score",
        choices=SCORES,
        default="magnitude",
        help="prune by |w| or by the run's method's own prune_scores (magnitude)",
    )
    parser.add_argument("--max-batches", type=int, help="measure on the first N batches only")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if any)")
    parser.add_argument(
        "--wandb",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log the table and plot to W&B (default: when the run itself logged to W&B)",
    )
    return parser.parse_args(argv)


def _method_score(cfg: Any, model: Any, params: dict, data: list, seed: int) -> Callable:
    """The run's method's ``prune_scores`` as a score function, with a Context holding the
    measured batches and the cross-entropy loss (for data-driven scores such as SNIP)."""
    import torch.nn.functional as F

    from prunelab.config import pruning_method
    from prunelab.sparsity.engine import Context

    method = pruning_method(cfg)
    method.setup({n: tuple(p.shape) for n, p in params.items()}, 1, 1)
    ctx = Context(seed, 0, batches=lambda: data, loss_fn=F.cross_entropy, model=model)

    def score(weights: dict) -> dict:
        return method.prune_scores(weights, ctx)

    score.__name__ = f"method:{method.name}"
    return score


def sensitivity_of_run(
    source: str | Path,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    split: str = "val",
    out: str | Path | None = None,
    checkpoint: str = "last",
    score: str = "magnitude",
    wandb: bool | None = None,
    device: str = "auto",
    max_batches: int | None = None,
    note: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """Measure, write and log the sensitivity curves of a run folder or checkpoint.

    Returns ``{"curves", "json", "table", "plot", "split", "wandb"}`` (``wandb``: the W&B
    run id logged to, or None). ``wandb=None`` logs when the run's own config had W&B on
    (``logger.wandb.enabled``). ``note`` receives progress and notes (one line each).
    Raises ConfigError (one line) for a bad source or option.
    """
    import torch
    from omegaconf import OmegaConf

    from prunelab.evaluate import load_run, resolve_checkpoint
    from prunelab.models import prunable_parameters

    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if score not in SCORES:
        raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"--max-batches must be >= 1, got {max_batches}")
    sparsities = check_grid(sorted(set(sparsities)))
    path = Path(source)
    if path.is_file():
        run_dir, ckpt, label = resolve_checkpoint(ckpt_path=path)
    else:
        run_dir, ckpt, label = resolve_checkpoint(run_dir=path, checkpoint=checkpoint)
    loaded = load_run(run_dir, which=checkpoint, ckpt_path=ckpt)
    record, model, datamodule = loaded["record"], loaded["model"], loaded["datamodule"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    used = split
    if split == "val" and datamodule.num_val_samples == 0:
        used = "test"
        note(f"note: {run_dir} held out no validation split (dataset.val_fraction=0); using test")
    loader = datamodule.val_dataloader() if used == "val" else datamodule.test_dataloader()
    batches = list(itertools.islice(loader, max_batches) if max_batches else loader)
    params = prunable_parameters(model)
    masks = loaded["masks"]
    cfg = OmegaConf.create(record["config"])
    scorer: Any = "magnitude"
    if score == "method":
        scorer = _method_score(cfg, model, params, batches, int(record.get("seed", 0)))
    config = record.get("config") or {}
    meta = {
        "run": str(run_dir),
        "checkpoint": str(ckpt),
        "checkpoint_label": label,
        "split": used,
        "pruning": (config.get("pruning") or {}).get("name"),
        "sparsity": config.get("sparsity"),
        "seed": record.get("seed"),
        "config_hash": record.get("config_hash"),
    }

    def progress(layer: str, sparsity: float, acc: float) -> None:
        note(f"{layer} @ {sparsity:g}: accuracy {acc:.4f}")

    curves = layer_sensitivity(
        model,
        dict(masks) if masks is not None else None,
        batches,
        sparsities=sparsities,
        score=scorer,
        params=params,
        meta=meta,
        progress=progress,
    )
    out_dir = Path(out) if out is not None else files.sensitivity_dir(run_dir)
    paths = write_sensitivity(curves, out_dir, title=f"Layer sensitivity: {Path(run_dir).name}")
    if wandb is None:
        wandb = bool(((config.get("logger") or {}).get("wandb") or {}).get("enabled", True))
    logged = log_to_wandb(run_dir, record, curves, paths, note) if wandb else None
    return {"curves": curves, **paths, "split": used, "wandb": logged}


def _wandb_run(run_dir: Path) -> tuple[str | None, bool]:
    """``(run id, offline)`` of the newest W&B run in ``<run>/wandb`` (None if none)."""
    folder = Path(run_dir) / files.WANDB_DIR
    found = sorted(
        (p for p in folder.glob("*run-*-*") if p.is_dir()),
        key=lambda p: p.name.split("run-", 1)[1],
    )
    if not found:
        return None, False
    newest = found[-1]
    return newest.name.rsplit("-", 1)[1], newest.name.startswith("offline-")


def log_to_wandb(
    run_dir: str | Path,
    record: dict[str, Any],
    curves: SensitivityCurves,
    paths: dict[str, Path],
    note: Callable[[str], None] = print,
) -> str | None:
    """Log the curves (a table: layer, sparsity, accuracy, drop), the plot and the reference
    accuracy to W&B: into the run's own W&B run when ``<run>/wandb`` holds one (resumed;
    offline if that run was), else into a new run (job type ``sensitivity``) of the run's
    group. Uses the run's W&B settings and mode (``WANDB_MODE`` wins); never raises: a
    failure is a note. Returns the W&B run id, or None."""
    from prunelab.tracking.wandb_setup import resolve_mode

    config = record.get("config") or {}
    wandb_cfg = ((config.get("logger") or {}).get("wandb")) or {}
    run_id, offline = _wandb_run(Path(run_dir))
    mode = "offline" if offline and not os.environ.get("WANDB_MODE") else None
    mode = mode or resolve_mode(str(wandb_cfg.get("mode", "auto")))
    if mode == "disabled":
        note("note: W&B is disabled; not logged")
        return None
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        init: dict[str, Any] = {
            "project": wandb_cfg.get("project") or "prunelab",
            "entity": wandb_cfg.get("entity"),
            "group": wandb_cfg.get("group") or record.get("config_hash"),
            "dir": str(run_dir),
            "mode": mode,
            "settings": {"init_timeout": 60, "console": "off", "x_disable_stats": True},
        }
        if run_id:
            init.update(id=run_id, resume="allow")
        else:
            init.update(
                job_type="sensitivity",
                name=f"sensitivity-{Path(run_dir).name}",
                config={"run": str(run_dir), "sensitivity": dict(curves.meta)},
            )
        run = wandb.init(**init)
        try:
            rows = [
                [name, s, acc, curves.reference - acc]
                for name in curves.layers
                for s, acc in zip(curves.sparsities, curves.accuracy[name], strict=True)
            ]
            run.log(
                {
                    "sensitivity/curves": wandb.Table(
                        columns=["layer", "sparsity", "accuracy", "drop"], data=rows
                    ),
                    "sensitivity/plot": wandb.Image(str(paths["plot"])),
                }
            )
            run.summary.update(
                {
                    "sensitivity/reference": curves.reference,
                    "sensitivity/json": str(paths["json"]),
                }
            )
            return str(run.id)
        finally:
            run.finish()
    except Exception as err:  # W&B must never stop the analysis
        note(f"note: W&B logging failed ({type(err).__name__}: {err}); the files are written")
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = sensitivity_of_run(
            args.run,
            sparsities=args.sparsities,
            split=args.split,
            out=args.out,
            checkpoint=args.checkpoint,
            score=args.score,
            wandb=args.wandb,
            device=args.device,
            max_batches=args.max_batches,
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["curves"].table(), end="")
    print(f"wrote {result['table']}")
    print(f"wrote {result['plot']}")
    if result["wandb"]:
        print(f"W&B run {result['wandb']}")
    print(f"sensitivity: {result['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
