"""Adaptive pruning: the highest sparsity within an accuracy (or cost) budget, by search.

``python train.py pruning=adaptive max_accuracy_drop=0.01`` trains a dense stage (``epochs``
epochs) in ``<run>/search/dense/``, then tries candidate sparsities chosen by
:class:`~prunelab.methods.adaptive.BisectionSearch`: each prunes the dense stage's trained
weights by magnitude (:meth:`~prunelab.methods.adaptive.AdaptiveMagnitude.candidate_mask`),
fine-tunes ``pruning.finetune_epochs`` epochs with the mask fixed and is measured — its final
``val/acc`` against the dense stage's, its sparse inference MACs (from the mask and the FLOP
counter) and, with ``max_latency_ms``, its measured latency from the run's cost report — as
a sub-run in ``<run>/search/step_NN_s<sparsity>/`` with its own results record, checkpoints
and W&B run (one W&B group per search).

The run folder's ``results.json`` is the summary: ``adaptive`` holds the budget, every
tried point (``tried``: sparsity, val_acc, drop, macs, latency_ms, feasible, ...), the
``chosen`` point, ``stopped_because`` and its ``reason``; ``metrics``, ``sparsity`` and
``cost`` are the chosen sub-run's; ``sub_runs`` lists the stages (tables read the sub-runs,
not the summary). When no point meets the budget, the summary is written with ``chosen:
null`` and the ``closest`` point, then :class:`~prunelab.methods.adaptive.BudgetNotMet` (a
ConfigError) ends the run: one error line, exit status 2, record status ``failed``.

Resume: the same command with ``hydra.run.dir=<the run folder>`` reads completed stages back
(the search is deterministic given their results) and trains the rest.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from prunelab import files
from prunelab.errors import ConfigError
from prunelab.methods.adaptive import AdaptiveMagnitude, Budget, BudgetNotMet, check_budget
from prunelab.sparsity.masks import Masks
from prunelab.subruns import check_own_sub_runs, trained_state
from prunelab.tracking.results import RunRecord, config_hash, read_record

log = logging.getLogger(__name__)


def check_run(cfg: DictConfig, built: dict[str, Any]) -> Budget:
    """Everything about an adaptive run that can be wrong before training: the budget, a
    validation split to measure on, the latency settings; one ConfigError line."""
    budget = check_budget(
        cfg.get("max_accuracy_drop"), cfg.get("max_macs"), cfg.get("max_latency_ms")
    )
    if cfg.get("ckpt_path"):
        raise ConfigError(
            "pruning=adaptive resumes by running the same command in the same folder "
            "(hydra.run.dir=<its folder>), not from ckpt_path; set ckpt_path=null"
        )
    quantize = OmegaConf.select(cfg, "quantize.name", default="none")
    if quantize not in (None, "none"):
        raise ConfigError(
            f"quantize={quantize} does not run inside pruning=adaptive's search; quantize the "
            "chosen point's sub-run afterwards (quantize=none)"
        )
    val = getattr(built["datamodule"], "val_fraction", None)
    if val is None:
        val = OmegaConf.select(cfg, "dataset.val_fraction", default=None)
    if val is not None and float(val) == 0.0:
        raise ConfigError(
            "pruning=adaptive measures every candidate on the validation split, but "
            "dataset.val_fraction=0 holds none out; set one, e.g. dataset.val_fraction=0.1"
        )
    if cfg.trainer.get("limit_val_batches") == 0:
        raise ConfigError(
            "pruning=adaptive measures every candidate on the validation split, but "
            "trainer.limit_val_batches=0 skips it; set trainer.limit_val_batches=null"
        )
    if budget.max_latency_ms is not None:
        method: AdaptiveMagnitude = built["engine"].method
        settings = cfg.get("cost") or {}
        if not settings.get("enabled", True) or not settings.get("latency", True):
            raise ConfigError(
                "max_latency_ms needs the measured latency: set cost.enabled=true and "
                "cost.latency=true"
            )
        sizes = [int(b) for b in settings.get("latency_batch_sizes") or ()]
        if method.latency_batch not in sizes:
            raise ConfigError(
                f"max_latency_ms bounds batch {method.latency_batch} "
                f"(pruning.latency_batch), which is not timed; add it to "
                f"cost.latency_batch_sizes (now {sizes})"
            )
    return budget


def _macs(lf: Any, mask: Masks | None, params: dict[str, torch.Tensor]) -> float:
    """Sparse inference MACs per sample of ``mask`` (None: dense), as the cost report
    counts them (``macs_infer_sparse``)."""
    from prunelab.cost.flops import inference_report

    densities = {
        n: 1.0 if mask is None else float(mask[n].sum()) / max(1, mask[n].numel()) for n in params
    }
    return float(inference_report(lf, densities)["macs_infer_sparse"])


def run_adaptive(
    cfg: DictConfig,
    built: dict[str, Any],
    record: RunRecord,
    name: str,
    tags: list,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train the dense stage and every candidate of the search; complete ``record`` as the
    summary and return it (or raise BudgetNotMet after writing it). ``built`` is the parent's
    :func:`prunelab.train.build`: its data and model are reused, each stage gets a fresh
    module, engine and optimizer."""
    from prunelab.cost.flops import layer_flops
    from prunelab.sparsity.engine import SparsityEngine
    from prunelab.train import _check_cost_meter, fit_and_record, stage_module

    run_dir = Path(cfg.paths.output_dir)
    seed = int(cfg.seed)
    method: AdaptiveMagnitude = built["engine"].method
    model, prunable, datamodule = built["model"], built["prunable"], built["datamodule"]
    budget = check_run(cfg, built)
    parent_hash = record.data["config_hash"]
    check_own_sub_runs(files.adaptive_dir(run_dir), "adaptive", parent_hash, "an adaptive search")
    _check_cost_meter(cfg, built)
    if "dense_flops" not in built:  # cost.enabled=false: MACs are still needed
        with torch.random.fork_rng(devices=[]):
            built["dense_flops"] = layer_flops(
                model, tuple(datamodule.input_shape), params=prunable
            )
    lf = built["dense_flops"]
    method.setup({n: tuple(p.shape) for n, p in prunable.items()}, 1, 1)
    config = record.data["config"]
    group = f"adaptive-{parent_hash}-seed{seed}"
    settings = {
        "budget": {
            "max_accuracy_drop": budget.max_accuracy_drop,
            "max_macs": budget.max_macs,
            "max_latency_ms": budget.max_latency_ms,
        },
        "mode": budget.mode,
        "range": [method.lo, method.hi],
        "search_steps": method.search_steps,
        "finetune_epochs": method.finetune_epochs,
    }
    record.update(adaptive=settings)
    sub_runs: list[dict[str, Any]] = []

    def stage(step: int | None, sparsity: float, mask: Masks | None, weights: dict) -> dict:
        """Train one stage (``step`` None: dense) from ``weights`` with ``mask`` fixed."""
        sub_dir = files.adaptive_point_dir(run_dir, step, sparsity)
        done = read_record(sub_dir)
        if done and done.get("status") == "completed":
            log.info("adaptive: %s completed earlier", sub_dir.name)
            return done
        sub_dir.mkdir(parents=True, exist_ok=True)
        model.load_state_dict(weights)
        model.train()  # the previous stage's cost report left it in eval mode
        engine = SparsityEngine(model, prunable, method.for_candidate(sparsity, mask), seed=seed)
        module = stage_module(cfg, built, engine)
        sub_cfg = copy.deepcopy(config)
        sub_cfg["sparsity"] = sparsity
        sub_cfg["pruning"] = {**sub_cfg["pruning"], "step": step}
        key = "dense" if step is None else step
        sub_hash = config_hash({"parent": parent_hash, "step": key, "sparsity": sparsity})
        sub_record = RunRecord(
            sub_dir, sub_cfg, seed=seed, config_hash=sub_hash, code=record.data.get("code")
        )
        sub_record.update(
            choices=record.data.get("choices", {}),
            n_params=record.data.get("n_params"),
            n_prunable=record.data.get("n_prunable"),
        )
        info = {"parent": str(run_dir), "parent_hash": parent_hash, "step": step}
        kwargs = {} if step is None else {"max_epochs": method.finetune_epochs}
        resume = files.last_checkpoint(sub_dir)
        pl.seed_everything(seed, workers=True, verbose=False)
        try:
            return fit_and_record(
                cfg,
                {**built, "module": module, "engine": engine},
                sub_record,
                sub_dir,
                name=f"{name}-{sub_dir.name}",
                group=group,
                tags=[*tags, f"search={sub_dir.name}"],
                callbacks=list(callbacks or []),
                trainer_kwargs=kwargs,
                ckpt_path=str(resume) if resume.exists() else None,
                extra={"adaptive": info},
                config=sub_cfg,
                target={"target": sparsity},
            )
        except BaseException as err:
            sub_record.fail(err)
            raise

    initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    dense = stage(None, 0.0, None, initial)
    reference = (dense.get("metrics") or {}).get("val/acc")
    if reference is None:
        raise RuntimeError(
            f"the dense stage ({dense.get('run_dir')}) logged no val/acc to compare against"
        )
    sub_runs.append(_line("dense", 0.0, dense))
    trained, _ = trained_state(files.adaptive_point_dir(run_dir, None))
    search = method.search(budget, float(reference))
    results: dict[float, dict[str, Any]] = {}
    step = 0
    while (sparsity := search.next()) is not None:
        step += 1
        mask = method.candidate_mask(trained, sparsity, seed, step)
        macs = _macs(lf, mask, prunable)
        result = stage(step, sparsity, mask, trained)
        results[sparsity] = result
        metrics, cost = result.get("metrics") or {}, result.get("cost") or {}
        point = search.record(
            sparsity,
            val_acc=metrics.get("val/acc"),
            macs=macs,
            latency_ms=cost.get(method.latency_key),
            realised=mask.sparsity(),
            run_dir=result.get("run_dir"),
        )
        sub_runs.append(_line(f"step_{step:02d}", sparsity, result, point.feasible))
        log.info("adaptive: %s: %s", "ok" if point.feasible else "out", point.describe())
        record.update(adaptive={**settings, **search.summary(), "parent_hash": parent_hash})
    summary = {**settings, **search.summary(), "dense_val_acc": float(reference)}
    summary["dense_macs"] = _macs(lf, None, prunable)
    chosen = search.chosen
    _print_points(search, float(reference))
    if chosen is None:
        record.update(adaptive=summary, sub_runs=sub_runs)
        raise BudgetNotMet(search.not_met_message())
    best = results[chosen.sparsity]
    record.complete(
        metrics=best.get("metrics") or {},
        sparsity={**(best.get("sparsity") or {}), "target": chosen.sparsity},
        cost=best.get("cost") or {},
        chosen_run=best.get("run_dir"),
        sub_runs=sub_runs,
        adaptive=summary,
    )
    log.info(
        "adaptive: chose sparsity %g (%s); stopped: %s",
        chosen.sparsity,
        chosen.describe(),
        search.reason,
    )
    return record.data


def _line(stage: str, sparsity: float, result: dict[str, Any], feasible: bool | None = None):
    metrics = result.get("metrics") or {}
    return {
        "stage": stage,
        "sparsity": sparsity,
        "status": result.get("status"),
        "run_dir": result.get("run_dir"),
        "feasible": feasible,
        "metrics": {k: metrics[k] for k in ("val/acc", "test/acc") if k in metrics},
    }


def _print_points(search: Any, reference: float) -> None:
    from rich.console import Console
    from rich.table import Table

    chosen = search.chosen
    table = Table(title=f"adaptive search (dense val acc {100 * reference:.2f})")
    for column in ("sparsity", "val/acc", "drop", "MACs", "latency ms", "within budget"):
        table.add_column(column)
    for p in search.points:
        mark = "chosen" if chosen is not None and p is chosen else ("yes" if p.feasible else "no")
        table.add_row(
            f"{p.sparsity:.4f}",
            "-" if p.val_acc is None else f"{100 * p.val_acc:.2f}",
            "-" if p.drop is None else f"{100 * p.drop:+.2f}",
            "-" if p.macs is None else f"{p.macs:,.0f}",
            "-" if p.latency_ms is None else f"{p.latency_ms:.4g}",
            mark,
        )
    console = Console()
    console.print(table)
    console.print(f"stopped: {search.reason}")
