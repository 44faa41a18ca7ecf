"""Iterative magnitude pruning (lottery tickets) as a sequence of sub-runs, one per level.

``python train.py pruning=imp sparsity=0.95`` trains level 0 (dense), then each level of
:meth:`~prunelab.methods.imp.IterativeMagnitude.plan`: prune from the previous level's
trained weights, rewind the survivors to the weights of step ``pruning.rewind_step``, train
again. Every level (and every control branch, ``pruning.branch=``) is a sub-run in
``<run>/levels/level_NN[_branch]/`` with its own results record, checkpoints, CSV log and W&B
run; the W&B runs of one IMP run share one group. The run folder's ``results.json`` is the
IMP summary (one line per level, ``sub_runs``); tables read the levels, not the summary.

Resume: run the same command with ``hydra.run.dir=<the run folder>``; completed levels are
read back (their trained weights from ``last.ckpt``), an interrupted level resumes from its
own ``last.ckpt``.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.methods.imp import IterativeMagnitude, Level, branch_mask, mask_overlap, rewind
from prunelab.sparsity.engine import layer_generator
from prunelab.sparsity.masks import Masks
from prunelab.subruns import check_own_sub_runs, trained_state
from prunelab.tracking.artifacts import Ref, artifact_name
from prunelab.tracking.results import RunRecord, config_hash, read_record

log = logging.getLogger(__name__)

LOTTERY = "lottery"


class RewindCapture(pl.Callback):
    """Saves the model's full state (parameters and buffers) when training reaches optimizer
    step ``step`` (before that step runs), to ``path``; step 0 is the initialisation."""

    def __init__(self, step: int, path: Path) -> None:
        self.step = int(step)
        self.path = Path(path)
        self.saved = self.path.exists()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if self.saved or trainer.global_step != self.step:
            return
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # every DDP rank writes its own
        torch.save(state, tmp)
        tmp.replace(self.path)
        self.saved = True


def estimated_steps(cfg: DictConfig, datamodule: Any) -> int:
    """Optimizer steps of one level, from the data and the trainer config (checked against
    ``rewind_step`` before training; the real count comes from level 0)."""
    datamodule.setup("fit")
    batches = len(datamodule.train_dataloader())
    limit = cfg.trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    steps = max(1, batches // accumulate) * int(cfg.trainer.max_epochs)
    max_steps = int(cfg.trainer.get("max_steps", -1) or -1)
    return min(steps, max_steps) if max_steps > 0 else steps


def run_imp(
    cfg: DictConfig,
    built: dict[str, Any],
    record: RunRecord,
    name: str,
    tags: list,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train every level (and branch) of an IMP run; complete ``record`` as the summary and
    return it. ``built`` is the parent's :func:`prunelab.train.build` (its data and model are
    reused; each level gets a fresh module, engine and optimizer)."""
    from prunelab.sparsity.engine import SparsityEngine
    from prunelab.train import _check_cost_meter, fit_and_record, stage_module

    run_dir = Path(cfg.paths.output_dir)
    seed = int(cfg.seed)
    method: IterativeMagnitude = built["engine"].method
    model, prunable, datamodule = built["model"], built["prunable"], built["datamodule"]
    parent_hash = record.data["config_hash"]
    if cfg.get("ckpt_path"):
        raise ConfigError(
            "pruning=imp resumes by running the same command in the same folder "
            "(hydra.run.dir=<its folder>), not from ckpt_path; set ckpt_path=null"
        )
    check_own_sub_runs(files.imp_levels_dir(run_dir), "imp", parent_hash, "IMP levels")
    _check_cost_meter(cfg, built)  # once, before any level trains; the levels reuse it
    estimate = estimated_steps(cfg, datamodule)
    k = method.rewind_step
    if k >= estimate:
        raise ConfigError(
            f"pruning.rewind_step={k} is beyond training: a level has {estimate} optimizer "
            f"steps; choose 0..{estimate - 1} (0 rewinds to the initialisation)"
        )
    method.setup({n: tuple(p.shape) for n, p in prunable.items()}, estimate, 1)
    plan = method.plan()
    method.check_branch_levels(plan)
    config = record.data["config"]
    group = f"imp-{parent_hash}-seed{seed}"
    record.update(imp={"levels": [_plan_entry(lv) for lv in plan], "rewind_step": k})
    rewind_path = files.imp_rewind_weights(run_dir)
    summary: list[dict[str, Any]] = []

    # W&B lineage: level 0 logs the rewind weights once; every later level (and branch)
    # declares what it starts from: those weights (unless re-initialised) and the previous
    # level's model and masks (its mask is pruned from that level's trained weights).
    rewind_ref = Ref(
        rewind_path,
        "rewind",
        artifact_name("rewind", parent_hash, seed),
        producer=files.imp_level_dir(run_dir, 0),
        metadata={"rewind_step": k},
    )

    def lineage(level: Level, branch: str) -> list[Ref]:
        if level.index == 0:
            return []
        previous = files.imp_level_dir(run_dir, level.index - 1)
        weights = [] if branch == "reinit" else [rewind_ref]
        return [*weights, Ref(previous, "model"), Ref(previous, "masks")]

    def sub_run(level: Level, branch: str, mask: Masks | None, weights: dict) -> dict[str, Any]:
        """Train one level or branch from ``weights`` with ``mask`` fixed."""
        sub_dir = files.imp_level_dir(run_dir, level.index, None if branch == LOTTERY else branch)
        done = read_record(sub_dir)
        if done and done.get("status") == "completed":
            log.info("IMP level %d (%s): completed earlier in %s", level.index, branch, sub_dir)
            return done
        sub_dir.mkdir(parents=True, exist_ok=True)
        level_method = method.for_level(level, mask)
        if mask is None:
            model.load_state_dict(weights)
        else:
            rewind(model, weights, mask, prunable)
        engine = SparsityEngine(model, prunable, level_method, seed=seed)
        first = level.index == 0 or k == 0
        total = steps
        module = stage_module(
            cfg,
            built,
            engine,
            lr_schedule_offset=0 if first else k,
            lr_schedule_total=None if first else total,
        )
        sub_cfg = copy.deepcopy(config)
        sub_cfg["sparsity"] = level.sparsity
        sub_cfg["pruning"] = {**sub_cfg["pruning"], "level": level.index, "branch": branch}
        sub_hash = config_hash({"parent": parent_hash, "level": level.index, "branch": branch})
        sub_record = RunRecord(
            sub_dir, sub_cfg, seed=seed, config_hash=sub_hash, code=record.data.get("code")
        )
        method_name = "imp" if branch == LOTTERY else f"imp_{branch}"
        sub_record.update(
            choices={**record.data.get("choices", {}), "pruning": method_name},
            n_params=record.data.get("n_params"),
            n_prunable=record.data.get("n_prunable"),
        )
        sub_built = {**built, "module": module, "engine": engine}
        extra_callbacks = list(callbacks or [])
        if level.index == 0:
            extra_callbacks.append(RewindCapture(k, rewind_path))
        kwargs = {} if first else {"max_steps": max(1, total - k)}
        resume = files.last_checkpoint(sub_dir)
        if level.index == 0 and not rewind_path.exists():
            resume = None  # the rewind point may lie before the checkpoint: start over
        imp_info = {
            "parent": str(run_dir),
            "parent_hash": parent_hash,
            "level": level.index,
            "levels": len(plan) - 1,
            "branch": branch,
            "rewind_step": k,
            "level_sparsity": level.sparsity,
            "realised_sparsity": level.realised,
        }
        pl.seed_everything(seed, workers=True, verbose=False)  # same data order every level
        try:
            return fit_and_record(
                cfg,
                sub_built,
                sub_record,
                sub_dir,
                name=f"{name}-L{level.index:02d}" + ("" if branch == LOTTERY else f"-{branch}"),
                group=group,
                tags=[*tags, f"level={level.index}", f"branch={branch}"],
                callbacks=extra_callbacks,
                trainer_kwargs=kwargs,
                ckpt_path=str(resume) if resume is not None and resume.exists() else None,
                extra={"imp": {**imp_info, **overlaps.get(branch, {})}},
                config=sub_cfg,
                target={"target": level.realised},
                artifact_inputs=lineage(level, branch),
                artifact_outputs=[rewind_ref] if level.index == 0 else [],
            )
        except BaseException as err:
            sub_record.fail(err)
            raise

    overlaps: dict[str, dict[str, Any]] = {}
    steps = estimate
    # Level 0: dense, from the initialisation; it saves the rewind point.
    initial = {k_: v.detach().cpu().clone() for k_, v in model.state_dict().items()}
    level0 = sub_run(plan[0], LOTTERY, None, initial)
    steps = int(level0.get("global_step") or estimate)
    if not rewind_path.exists():
        raise RuntimeError(
            f"level 0 ended after {steps} steps without reaching "
            f"pruning.rewind_step={k}; choose a smaller rewind step"
        )
    saved = torch.load(rewind_path, map_location="cpu", weights_only=True)
    summary.append(_summary_line(plan[0], LOTTERY, level0))
    previous_dir = files.imp_level_dir(run_dir, 0)
    trained, mask = trained_state(previous_dir)
    for level in plan[1:]:
        new_mask = method.prune(level, trained, mask, seed)
        overlaps = {LOTTERY: {"overlap_previous": mask_overlap(new_mask, mask)}}
        result = sub_run(level, LOTTERY, new_mask, saved)
        summary.append(_summary_line(level, LOTTERY, result))
        for branch in method.branches_at(level):
            branch_masks = branch_mask(branch, new_mask, seed, level.index)
            overlaps[branch] = {"overlap_lottery": mask_overlap(branch_masks, new_mask)}
            weights = saved if branch != "reinit" else _fresh_init(cfg, built, seed, level.index)
            summary.append(
                _summary_line(level, branch, sub_run(level, branch, branch_masks, weights))
            )
        trained, mask = trained_state(files.imp_level_dir(run_dir, level.index))
    record.complete(
        metrics=next(x for x in reversed(summary) if x["branch"] == LOTTERY).get("metrics", {}),
        sparsity={"target": method.sparsity, "global": plan[-1].realised},
        sub_runs=summary,
        imp={"levels": [_plan_entry(lv) for lv in plan], "rewind_step": k, "steps": steps},
    )
    _print_levels(summary)
    return record.data


def _fresh_init(cfg: DictConfig, built: dict[str, Any], seed: int, level: int) -> dict:
    """A new random initialisation of the model (the ``reinit`` branch), seeded from (seed,
    level) and independent of the run's own initialisation."""
    from prunelab.train import _instantiate

    datamodule = built["datamodule"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_generator(seed, level, -1, "reinit").initial_seed())
        fresh = _instantiate(
            cfg.model,
            "model",
            input_shape=tuple(datamodule.input_shape),
            num_classes=datamodule.num_classes,
        )
    return {k: v.detach().clone() for k, v in fresh.state_dict().items()}


def _plan_entry(level: Level) -> dict[str, Any]:
    return {"level": level.index, "sparsity": level.sparsity, "realised": round(level.realised, 6)}


def _summary_line(level: Level, branch: str, result: dict[str, Any]) -> dict[str, Any]:
    metrics = result.get("metrics") or {}
    imp = result.get("imp") or {}
    overlap = imp.get("overlap_previous") or imp.get("overlap_lottery") or {}
    return {
        "level": level.index,
        "branch": branch,
        "sparsity": level.sparsity,
        "realised": round(level.realised, 6),
        "status": result.get("status"),
        "run_dir": result.get("run_dir"),
        "metrics": {k: metrics[k] for k in ("test/acc", "val/acc", "val/acc_best") if k in metrics},
        "overlap": overlap.get("global"),
    }


def _print_levels(summary: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="IMP levels")
    for column in ("level", "branch", "sparsity", "test/acc", "overlap"):
        table.add_column(column)
    for line in summary:
        acc = line["metrics"].get("test/acc")
        overlap = line.get("overlap")
        table.add_row(
            str(line["level"]),
            line["branch"],
            f"{line['sparsity']:.4f}",
            "-" if acc is None else f"{100 * acc:.2f}",
            "-" if overlap is None else f"{overlap:.3f}",
        )
    Console().print(table)
