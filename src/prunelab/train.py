"""compose -> validate -> build -> fit -> test -> record.

:func:`main` is the console entry (``python train.py``): it checks the command line, then
hands over to Hydra, which calls :func:`train` with the composed config once per job.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from prunelab import files
from prunelab.config import (
    CONF_DIR,
    callback_class,
    check_overrides,
    check_sweep_tags,
    check_tags,
    pruning_method,
    validate,
)
from prunelab.errors import ConfigError
from prunelab.tracking import artifacts, startup, wandb_setup
from prunelab.tracking.results import (
    RunRecord,
    code_version,
    config_hash,
    describe_code,
    is_main_process,
    read_record,
    same_code,
    write_json_atomic,
)
from prunelab.tracking.summary import print_summary

log = logging.getLogger(__name__)


def _hydra_runtime() -> Any:
    """Hydra's runtime config of the current job, or None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except Exception:
        return None


def _is_multirun() -> bool:
    from hydra.types import RunMode

    hc = _hydra_runtime()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def _choices() -> dict[str, str]:
    hc = _hydra_runtime()
    return {k: str(v) for k, v in hc.runtime.choices.items()} if hc is not None else {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _instantiate(node: Any, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of the config group ``group`` (``trainer``, ``model``, ...).

    A ConfigError from a constructor goes through as is; any other failure becomes a
    one-line ConfigError naming the group, its ``_target_`` and the underlying message (the
    innermost exception's first line), instead of Hydra's multi-line report.
    """
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause: BaseException = err
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        target = OmegaConf.select(node, "_target_", default="?") if node is not None else "?"
        raise ConfigError(
            f"{group}: cannot instantiate {target}: {_first_line(cause).rstrip('.')}; "
            f"check the {group}.* values (`python train.py --cfg job --package {group}`)"
        ) from None


# Trainer options that the Lightning module applies itself: it optimizes manually (see
# prunelab.module), and Lightning's Trainer refuses them under manual optimization.
MODULE_TRAINER_OPTIONS = {
    "gradient_clip_val": None,
    "gradient_clip_algorithm": None,
    "accumulate_grad_batches": 1,
}


def optimization_options(cfg: DictConfig) -> dict[str, Any]:
    """``gradient_clip_val``, ``gradient_clip_algorithm`` and ``accumulate_grad_batches``
    of the trainer config, for :class:`~prunelab.module.ClassificationModule`."""
    return {
        key: default if cfg.trainer.get(key) is None else cfg.trainer.get(key)
        for key, default in MODULE_TRAINER_OPTIONS.items()
    }


def stage_module(cfg: DictConfig, built: dict[str, Any], engine: Any, **options: Any) -> Any:
    """A new Lightning module for one stage of a multi-stage run (an IMP level, an adaptive
    candidate): the run's model under ``engine``, with the optimizer and scheduler factories
    of ``built`` and every option of the config, plus ``options`` (e.g. the LR schedule
    offset of a rewound level)."""
    from prunelab.module import ClassificationModule

    return ClassificationModule(
        model=engine.model,
        num_classes=built["datamodule"].num_classes,
        optimizer=built["module"]._optimizer_factory,
        scheduler=built["module"]._scheduler_factory,
        scheduler_interval=cfg.lr_scheduler.get("interval", "epoch"),
        log_every_n_steps=cfg.trainer.get("log_every_n_steps", 50),
        engine=engine,
        weight_decay_norm_bias=bool(cfg.get("weight_decay_norm_bias", True)),
        **optimization_options(cfg),
        **options,
    )


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate the datamodule, model, Lightning module (and check the data is there)."""
    from prunelab.models import prunable_parameters
    from prunelab.module import ClassificationModule
    from prunelab.sparsity.engine import SparsityEngine

    datamodule = _instantiate(cfg.dataset, "dataset")
    datamodule.check_available()
    model = _instantiate(
        cfg.model,
        "model",
        input_shape=tuple(datamodule.input_shape),
        num_classes=datamodule.num_classes,
    )
    method = pruning_method(cfg)
    check_model = getattr(method, "check_model", None)
    if check_model is not None:  # a method that needs a kind of layer (fbs: convolutions)
        check_model(model)
    prunable = prunable_parameters(model)
    engine = SparsityEngine(model, prunable, method, seed=int(cfg.seed))
    scheduler_cfg = cfg.lr_scheduler.get("scheduler") if cfg.get("lr_scheduler") else None
    module = ClassificationModule(
        model=model,
        num_classes=datamodule.num_classes,
        optimizer=_instantiate(cfg.optimizer, "optimizer"),
        scheduler=_instantiate(scheduler_cfg, "lr_scheduler") if scheduler_cfg else None,
        scheduler_interval=cfg.lr_scheduler.get("interval", "epoch"),
        log_every_n_steps=cfg.trainer.get("log_every_n_steps", 50),
        engine=engine,
        weight_decay_norm_bias=bool(cfg.get("weight_decay_norm_bias", True)),
        **optimization_options(cfg),
    )
    return {
        "datamodule": datamodule,
        "model": model,
        "module": module,
        "engine": engine,
        "prunable": prunable,
    }


def _loggers(
    cfg: DictConfig, run_dir: Path, config: dict[str, Any], name: str, group: str, tags: list
) -> list:
    from pytorch_lightning.loggers import CSVLogger

    loggers: list = []
    if cfg.logger.get("csv", {}).get("enabled", True):
        loggers.append(CSVLogger(save_dir=str(run_dir), name=files.CSV_DIR, version=""))
    wandb_logger = wandb_setup.make_wandb_logger(
        OmegaConf.to_container(cfg.logger.wandb, resolve=True),
        run_dir,
        name=name,
        tags=[*tags, *list(cfg.get("tags", []))],
        config=config,
        group=group,
    )
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return loggers


def _limit_threads() -> None:
    """In a parallel sweep, give each job its share of the cores: joblib's cores // n_jobs,
    submitit's cpus_per_task."""
    import torch

    hc = _hydra_runtime()
    if hc is None or not _is_multirun():
        return
    launcher = hc.launcher or {}
    if isinstance(launcher.get("cpus_per_task"), int):  # submitit: the job's own allocation
        torch.set_num_threads(max(1, launcher.cpus_per_task))
        return
    parallel = launcher.get("n_jobs")
    if isinstance(parallel, int) and parallel > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel))


def _skip_unloadable_nvml() -> None:
    """Stop a failed NVML load on every optimizer step where no NVIDIA driver is installed.

    Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when it is imported, so that checking
    for CUDA does not initialise it before DataLoader workers fork. With it set,
    ``torch.cuda.is_available()`` first tries to load ``libnvidia-ml.so.1``, and falls back
    to the CUDA runtime's device count when that fails; torch's optimizers ask on every
    ``step()``. Where the library cannot be loaded, every step pays a failed ``dlopen``
    (tens of microseconds, a few per cent of a small model's step) for the same answer
    from the same fallback, so the variable is cleared. Machines with the driver are left
    as Lightning set them.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


def _latency_under_load() -> bool:
    """Whether other jobs of this sweep may run on this machine while this one is timed: a
    joblib sweep with ``n_jobs`` other than 1, or submitit's local launcher (which starts
    every job at once). SLURM jobs run in their own allocation and are not flagged."""
    hc = _hydra_runtime()
    if hc is None or not _is_multirun():
        return False
    launcher = hc.launcher or {}
    if str(launcher.get("_target_", "")).endswith("LocalLauncher"):
        return True
    n_jobs = launcher.get("n_jobs")
    return isinstance(n_jobs, int) and not isinstance(n_jobs, bool) and n_jobs != 1


def _check_skip_completed(cfg: DictConfig) -> None:
    """skip_completed must be false (run every job), true (reuse a completed record of the
    same cell and seed made by this code) or 'any_code' (reuse one made by any code);
    anything else is a ConfigError (one line)."""
    value = cfg.get("skip_completed", False)
    if not (isinstance(value, bool) or value == "any_code"):
        raise ConfigError(
            f"skip_completed must be true, false or any_code, got {value!r}; e.g. "
            "skip_completed=true (reuse what this code completed) or skip_completed=any_code"
        )


def _completed_records(cfg: DictConfig, cell: str, seed: int) -> list[dict[str, Any]]:
    """Completed records of the same cell and seed in this sweep's folder (or run folder)."""
    hc = _hydra_runtime()
    root = Path(hc.sweep.dir) if hc is not None and _is_multirun() else Path(cfg.paths.output_dir)
    found = []
    for path in sorted(root.rglob(files.RESULTS)):
        record = read_record(path.parent)
        if (
            record
            and record.get("status") == "completed"
            and record.get("config_hash") == cell
            and record.get("seed") == seed
        ):
            found.append(record)
    return found


def _completed_elsewhere(
    cfg: DictConfig, cell: str, seed: int, code: dict[str, Any]
) -> dict[str, Any] | None:
    """The completed record of this cell and seed that ``skip_completed`` may reuse, or None.

    ``skip_completed=true`` reuses only a record made by the same code (:func:`same_code`:
    same commit, clean, or dirty with the same changes); ``any_code`` reuses any. Either
    way one log line says which record is reused, or why none is.
    """
    records = _completed_records(cfg, cell, seed)
    if not records:
        return None
    any_code = cfg.get("skip_completed") == "any_code"
    chosen = next((r for r in records if any_code or same_code(r.get("code"), code)), None)
    if chosen is None:
        other = records[0]
        log.info(
            "skip_completed: cell %s seed %s was completed in %s by other code (%s; this run: "
            "%s); running it again (skip_completed=any_code would reuse it)",
            cell,
            seed,
            other.get("run_dir"),
            describe_code(other.get("code")),
            describe_code(code),
        )
        return None
    log.info(
        "skip_completed: cell %s seed %s already completed in %s by %s; reusing it",
        cell,
        seed,
        chosen.get("run_dir"),
        describe_code(chosen.get("code")),
    )
    return chosen


def _unpruned(built: dict[str, Any]) -> dict[str, Any]:
    """Weights with two or more dimensions that pruning leaves out, for the record's
    ``sparsity`` (``unpruned_params``: name -> numel, ``unpruned_share``); one warning line
    names them when the method prunes."""
    from prunelab.models import unpruned_share, unpruned_weights

    model, prunable = built["model"], built["prunable"]
    unpruned = unpruned_weights(model, prunable)
    share = unpruned_share(model, prunable)
    if unpruned and not built["engine"].method.is_dense:
        log.warning(
            "pruning leaves out %d weight(s) with 2+ dimensions, %.1f%% of all such weights: %s",
            len(unpruned),
            100 * share,
            ", ".join(f"{name} ({numel:,})" for name, numel in unpruned.items()),
        )
    return {"unpruned_params": unpruned, "unpruned_share": share}


def _check_cost_meter(cfg: DictConfig, built: dict[str, Any]) -> None:
    """Count the model's dense per-layer FLOPs once, before training, so that a model the
    cost meter cannot measure (a prunable layer credited with no FLOPs, see
    :func:`prunelab.cost.layer_flops`) fails now with a ConfigError rather than after
    training; the end-of-run cost report reuses the count (``built["dense_flops"]``). Torch's
    CPU random state is restored afterwards, so training draws the same numbers as without
    the check."""
    import torch

    from prunelab.cost import layer_flops

    if not (cfg.get("cost") or {}).get("enabled", True) or "dense_flops" in built:
        return  # off, or counted already (an IMP run counts once for all its levels)
    shape = tuple(built["datamodule"].input_shape)
    with torch.random.fork_rng(devices=[]):
        built["dense_flops"] = layer_flops(built["model"], shape, params=built["prunable"])


def _cost(cfg: DictConfig, built: dict[str, Any], trainer: Any) -> dict[str, Any]:
    """The run's hardware cost (cost/ package), or {} when switched off."""
    from prunelab.cost import cost_report

    settings = cfg.get("cost") or {}
    if not settings.get("enabled", True):
        return {}
    latency = _latency_setting(settings.get("latency", True))
    engine, model = built["engine"], built["model"]
    method = engine.method
    accumulate = built["module"].accumulate_grad_batches
    samples = int(cfg.dataset.batch_size) * int(trainer.world_size) * int(accumulate)
    drop = getattr(method, "drop_schedule", None)
    model.eval()
    # Input-adaptive methods (fbs): the static figures are the plain model's (gates unhooked);
    # what the gated model spends per input is measured on the test split below.
    dynamic = getattr(method, "dynamic_cost", None)
    plain = method.gates.removed() if dynamic is not None else contextlib.nullcontext()
    with plain:
        report = cost_report(
            model,
            engine.masks,
            tuple(built["datamodule"].input_shape),
            history=engine.history,
            total_steps=int(trainer.global_step),
            samples_per_step=samples,
            # fbs trains the gated model computing every channel: the dense accounting
            method_name="dense" if dynamic is not None else method.name,
            update_every=drop.update_every if drop is not None else None,
            measure_latency=latency is not False,
            latency_mode="full" if latency == "full" else "quick",
            latency_batch_sizes=tuple(settings.get("latency_batch_sizes", (1, 256))),
            latency_repeats=int(settings.get("latency_repeats", 15)),
            latency_under_load=_latency_under_load(),
            dense_flops=built.get("dense_flops"),
        )
    if dynamic is not None:
        datamodule = built["datamodule"]
        report.update(
            dynamic(
                model,
                tuple(datamodule.input_shape),
                datamodule.test_dataloader(),
                measure_latency=latency is not False,
            )
        )
    return {k: v for k, v in report.items() if v is not None}


def _process_memory() -> dict[str, Any]:
    """This process's resident memory at the end of the run and its peak so far (MiB), and
    its pid: in a sweep, the runs a worker process made show whether it grows."""
    import resource

    memory: dict[str, Any] = {"pid": os.getpid()}
    # ru_maxrss is in KiB on Linux
    memory["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        memory["rss_mb"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):  # not Linux
        pass
    return memory


def _latency_setting(value: Any) -> bool | str:
    """``cost.latency``: false (no timing), true or ``quick`` (the default: a few short blocks
    per variant, about a second), ``full`` (the thorough timing); anything else is a
    ConfigError (one line)."""
    if value is False or value is True or value in ("quick", "full"):
        return "quick" if value is True else value
    raise ConfigError(
        f"cost.latency={value!r}: choose false (no timing), true / quick (short, the "
        "default) or full (thorough), e.g. cost.latency=full"
    )


def _check_quantize(cfg: DictConfig) -> None:
    """The quantize group's options (one ConfigError line), before any training."""
    from prunelab.quantization import check_quantize

    settings = cfg.get("quantize")
    name = check_quantize(OmegaConf.to_container(settings) if settings is not None else None)
    if name != "none" and OmegaConf.select(cfg, "pruning.name") == "imp":
        raise ConfigError(
            f"quantize={name} does not run after pruning=imp's levels; quantize a level's "
            "checkpoint instead: python eval.py ckpt_path=<run>/levels/level_NN/checkpoints/last.ckpt"
        )


def _quantize(
    cfg: DictConfig, built: dict[str, Any], run_dir: Path, metrics: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's quantization step (:mod:`prunelab.quantization`) on the tested model."""
    settings = cfg.get("quantize")
    if settings is None or settings.get("name", "none") == "none":
        return {}, {}
    from prunelab.quantization import run_quantization

    cost_cfg = cfg.get("cost") or {}
    return run_quantization(
        OmegaConf.to_container(settings, resolve=True),
        built["model"],
        built["engine"].masks,
        built["datamodule"],
        run_dir,
        test_accuracy=metrics.get("test/acc"),
        lr=float(cfg.optimizer.lr) if OmegaConf.select(cfg, "optimizer.lr") else None,
        measure_latency=bool(cost_cfg.get("latency", True)),
        batch_sizes=tuple(cost_cfg.get("latency_batch_sizes", (1, 256))),
    )


def _target(method: Any, sparsity: float) -> dict[str, Any]:
    """The record's target: the sparsity asked for, or, with a magnitude threshold, none
    (the threshold decides it) and the threshold itself."""
    if method.is_dense:
        return {"target": 0.0}
    threshold = getattr(method, "threshold", None)
    if threshold is not None:
        return {"target": None, "threshold": {"value": threshold, "mode": method.threshold_mode}}
    return {"target": sparsity}


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = round(float(value), 6)
        except (TypeError, ValueError):
            continue
    return out


def _measured_callbacks(callbacks: Any) -> dict[str, Any]:
    """The callbacks that change what a run measures: early stopping does, a model summary
    does not, nor does the checkpoint callback with the settings every run had before it
    became configurable (best by val/acc, max)."""
    from pytorch_lightning.callbacks import ModelSummary

    from prunelab.tracking.checkpoint import RunCheckpoint

    kept = {}
    for name, node in (callbacks or {}).items():
        if not isinstance(node, dict):
            continue
        try:
            cls = callback_class(str(node.get("_target_")), f"callbacks.{name}")
        except ConfigError:
            cls = None
        if cls is not None and issubclass(cls, ModelSummary):
            continue
        settings = {k: v for k, v in node.items() if k != "_target_"}
        if (
            cls is not None
            and issubclass(cls, RunCheckpoint)
            and settings in ({}, {"monitor": "val/acc", "mode": "max"})
        ):
            continue
        kept[name] = node
    return kept


def _cell_hash(cfg: DictConfig) -> str:
    """The experiment cell of a config: its hash without seed, paths and logger, computed on
    the config as written. The dense baseline ignores ``sparsity``, so it is hashed with
    sparsity 0: a sweep over sparsities shares one dense cell (and skip_completed runs it
    once per seed). ``extras`` and the callbacks that do not change the measurement (see
    :func:`_measured_callbacks`) are left out, so the default callbacks hash as a run made
    before callbacks were configurable."""
    unresolved = OmegaConf.to_container(cfg, resolve=False)
    if OmegaConf.select(cfg, "pruning.name") == "dense":
        unresolved["sparsity"] = 0.0
    unresolved.pop("extras", None)
    callbacks = _measured_callbacks(unresolved.pop("callbacks", None))
    if callbacks:
        unresolved["callbacks"] = callbacks
    return config_hash(unresolved)


def train(cfg: DictConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Run one training job described by ``cfg``; return its results record.

    ``callbacks`` are extra Lightning callbacks (benchmarks add a timer).

    Raises ConfigError (one line) for any mistake found before training starts.
    """
    with startup.framework_import():
        import pytorch_lightning as pl

        from prunelab.tracking.extras import apply_extras

    _skip_unloadable_nvml()
    startup.mark("framework")
    run_dir = Path(cfg.paths.output_dir)
    try:
        validate(cfg)
        _latency_setting(OmegaConf.select(cfg, "cost.latency", default=True))
        _check_quantize(cfg)
        _check_skip_completed(cfg)
        check_tags(cfg, _is_multirun())
    except ConfigError as err:
        if _is_multirun():  # the sweep's table must show this cell as failed
            unresolved = OmegaConf.to_container(cfg, resolve=False)
            RunRecord(
                run_dir, unresolved, seed=cfg.get("seed", 0), config_hash=_cell_hash(cfg)
            ).fail(err)
        raise
    apply_extras(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    # Hash the config as written (interpolations such as dataset.seed=${seed} unresolved),
    # so that seeds and machines do not change an experiment cell's name.
    cell = _cell_hash(cfg)
    code = code_version()
    if cfg.get("skip_completed"):
        done = _completed_elsewhere(cfg, cell, int(cfg.seed), code)
        if done is not None:
            if Path(done.get("run_dir", "")) != run_dir:
                write_json_atomic(
                    files.results_path(run_dir), {**done, "skipped_from": done.get("run_dir")}
                )
            return done
    _limit_threads()
    record = RunRecord(run_dir, config, seed=int(cfg.seed), config_hash=cell, code=code)
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        built = build(cfg)
        choices = _choices()
        method = str(cfg.pruning.get("name", choices.get("pruning", "dense")))
        dataset, model = choices.get("dataset", "data"), choices.get("model", "model")
        name = f"{dataset}-{model}-{method}-s{cfg.sparsity}-seed{cfg.seed}"
        tags = [method, f"sparsity={cfg.sparsity}", dataset, model]
        record.update(
            choices=choices,
            n_params=sum(p.numel() for p in built["model"].parameters()),
            n_prunable=sum(p.numel() for p in built["prunable"].values()),
        )
        if getattr(built["engine"].method, "name", None) == "imp":
            from prunelab.lottery import run_imp

            return run_imp(cfg, built, record, name=name, tags=tags, callbacks=callbacks)
        if getattr(built["engine"].method, "name", None) == "adaptive":
            from prunelab.adaptive import run_adaptive

            return run_adaptive(cfg, built, record, name=name, tags=tags, callbacks=callbacks)
        return fit_and_record(
            cfg, built, record, run_dir, name=name, group=cell, tags=tags, callbacks=callbacks
        )
    except BaseException as err:
        record.fail(err)
        raise
    finally:
        wandb_setup.finish()


def _callbacks(cfg: DictConfig, run_dir: Path) -> tuple[Any, list]:
    """The run's checkpoint callback and the other callbacks of ``cfg.callbacks``.

    The checkpoint callback is a :class:`RunCheckpoint` writing to ``run_dir`` (a run's, or
    an IMP level's, folder): the one configured (``callbacks.model_checkpoint``: monitor,
    mode) or, when none is (``callbacks=none``), one with the defaults; every run has it.
    Each other entry is instantiated afresh (null entries are dropped), so every IMP level
    gets its own early-stopping state. With ``trainer.overfit_batches`` the training batches
    are pinned to the same ones every epoch (:class:`SameBatchesEachEpoch`).
    """
    from prunelab.tracking.checkpoint import RunCheckpoint

    checkpoint = None
    others: list = []
    node = cfg.get("callbacks") or {}
    for name in node:
        sub = node.get(name)
        if sub is None:
            continue
        where = f"callbacks.{name}"
        if issubclass(callback_class(str(sub.get("_target_")), where), RunCheckpoint):
            checkpoint = _instantiate(sub, where, run_dir=run_dir)
        else:
            others.append(_instantiate(sub, where))
    if cfg.trainer.get("overfit_batches"):
        from prunelab.tracking.overfit import SameBatchesEachEpoch

        others.append(SameBatchesEachEpoch())
    return checkpoint if checkpoint is not None else RunCheckpoint(run_dir), others


def fit_and_record(
    cfg: DictConfig,
    built: dict[str, Any],
    record: RunRecord,
    run_dir: Path,
    name: str,
    group: str,
    tags: list,
    callbacks: list | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
    extra: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    target: dict[str, Any] | None = None,
    artifact_inputs: list[artifacts.Ref] | None = None,
    artifact_outputs: list[artifacts.Ref] | None = None,
) -> dict[str, Any]:
    """Fit ``built`` under a fresh Trainer writing to ``run_dir``, test it, measure its cost
    and complete ``record``; return the record.

    ``trainer_kwargs`` override the trainer config (an IMP level's ``max_steps``),
    ``ckpt_path`` resumes (default: ``cfg.ckpt_path``), ``extra`` adds fields to the record,
    ``config`` is what the loggers are given (default: the resolved ``cfg``) and ``target``
    the record's sparsity target (default: from the method and ``cfg.sparsity``).
    ``artifact_inputs`` / ``artifact_outputs`` are W&B artifacts (:class:`artifacts.Ref`) the
    run starts from (besides the checkpoint it resumes from) / logs besides its own files.
    Errors propagate: the caller fails the record.
    """
    from prunelab.tracking import fastpath
    from prunelab.tracking.profiler import NullProfiler
    from prunelab.tracking.progress import ThrottledRichProgressBar

    fastpath.install()

    startup.mark("built")
    if config is None:
        config = OmegaConf.to_container(cfg, resolve=True)
    unpruned = _unpruned(built)
    _check_cost_meter(cfg, built)
    checkpoint, configured = _callbacks(cfg, run_dir)
    progress = []
    if cfg.trainer.get("enable_progress_bar", True):
        progress.append(ThrottledRichProgressBar(leave=True))
    if startup.enabled():
        progress.append(startup.callback())
    loggers = _loggers(cfg, run_dir, config, name, group=group, tags=tags)
    wandb_logger = next((lg for lg in loggers if hasattr(lg, "trainer_view")), None)
    try:
        if wandb_logger is not None:
            # W&B starts while the Trainer is built, the data set up and the first steps
            # run; what is logged meanwhile reaches the run in order (tracking.wandb_logger).
            wandb_logger.start()
        trainer = _instantiate(
            cfg.trainer,
            "trainer",
            logger=[wandb_setup.for_trainer(lg) for lg in loggers],
            callbacks=[checkpoint, *configured, *progress, *(callbacks or [])],
            default_root_dir=str(run_dir),
            **({} if cfg.trainer.get("profiler") else {"profiler": NullProfiler()}),
            **MODULE_TRAINER_OPTIONS,  # the module has them (optimization_options)
            **(trainer_kwargs or {}),
        )
        start = time.time()
        resume = ckpt_path if ckpt_path is not None else cfg.get("ckpt_path")
        if is_main_process() and artifacts.enabled(wandb_logger):
            resumed = [artifacts.checkpoint_ref(resume)] if resume else []
            artifacts.use_inputs(wandb_logger, [*(artifact_inputs or []), *resumed])
        startup.mark("trainer")
        trainer.fit(built["module"], datamodule=built["datamodule"], ckpt_path=resume)
        fit_s = time.time() - start
        fit_metrics = dict(trainer.callback_metrics)
        test_ckpt = "best" if cfg.test_ckpt == "best" and checkpoint.best_model_path else None
        test = trainer.test(built["module"], datamodule=built["datamodule"], ckpt_path=test_ckpt)
        metrics = _scalar_metrics({**fit_metrics, **(test[0] if test else {})})
        cost_start = time.perf_counter()
        cost = _cost(cfg, built, trainer)
        cost_s = time.perf_counter() - cost_start
        quantized = _quantize(cfg, built, run_dir, metrics)
        cost.update(quantized[0])
        for logger in loggers:
            logger.log_metrics(
                {f"cost/{k}": int(v) if isinstance(v, bool) else v for k, v in cost.items()},
                step=trainer.global_step,
            )
        record.complete(
            metrics=metrics,
            sparsity={
                **(target or _target(built["engine"].method, float(cfg.sparsity))),
                **built["engine"].sparsity_report(),
                **unpruned,
            },
            sparsity_curve=built["engine"].history,
            cost=cost,
            memory=_process_memory(),
            fit_time_s=round(fit_s, 3),
            cost_time_s=round(cost_s, 3),
            epochs_completed=int(trainer.current_epoch),
            global_step=int(trainer.global_step),
            checkpoint=str(files.last_checkpoint(run_dir)),
            # The epoch best.ckpt holds: only epochs at the target sparsity compete.
            best_checkpoint={
                "epoch": checkpoint.best_epoch,
                "sparsity": checkpoint.best_sparsity,
                "val/acc": _scalar_metrics({"v": checkpoint.best_model_score}).get("v"),
                "tested": test_ckpt == "best",
            },
            **({"quantize": quantized[1]} if quantized[1] else {}),
            **(extra or {}),
        )
        if is_main_process():
            wandb_setup.log_run_end(wandb_logger, record.data)
            artifacts.log_run_artifacts(
                wandb_logger,
                run_dir,
                record.data,
                masks=built["engine"].masks,
                extra=artifact_outputs or (),
            )
            print_summary(record.data)
        return record.data
    finally:
        if wandb_logger is not None:
            wandb_setup.finish()


def _train_and_release(cfg: DictConfig) -> dict[str, Any]:
    """:func:`train`, then one full garbage collection. A run's Trainer, module, callbacks
    and datamodule hold one another in reference cycles, and with them the run's data and
    model; in a sweep's worker they would stay until CPython's next full collection, so
    that a worker held two or three runs' data at once. With the framework's objects frozen
    at import the collection scans only what the run made (~20 ms). In a sweep the first
    job also releases the import's frozen garbage, which holds the first run's frame
    (:func:`startup.release_import_garbage`, once per worker, ~0.35 s)."""
    try:
        return train(cfg)
    finally:
        if _is_multirun():
            startup.release_import_garbage()
        gc.collect()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | list[float] | None:
    """Run one job; return what a sweeper optimises: the value of ``optimized_metric`` (one
    name), the values in its order (a list of names: multi-objective), or None. ``cost/<key>``
    is read from the record's ``cost``, any other name from its ``metrics``; a missing value
    is one error line and None (a failed trial in a sweep; the run itself is complete)."""
    from prunelab.config import optimized_metrics

    startup.mark("config")
    try:
        result = _train_and_release(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        if _is_multirun():  # one bad cell must not stop the sweep
            return None
        sys.exit(2)
    except Exception:
        if _is_multirun():
            log.exception("job failed; the sweep goes on")
            return None
        raise
    names = optimized_metrics(cfg)
    values = []
    for name in names:
        part = "cost" if name.startswith(("cost/", "cost.")) else "metrics"
        found = (result.get(part) or {}).get(name[len("cost/") :] if part == "cost" else name)
        if isinstance(found, bool) or not isinstance(found, (int, float)):
            have = ", ".join(sorted(result.get(part) or {})) or "nothing"
            print(
                f"error: optimized_metric '{name}' is not in the run's {part} "
                f"(run {result.get('run_dir')}; it has: {have})",
                file=sys.stderr,
            )
            return None
        values.append(float(found))
    if not values:
        return None
    return values if OmegaConf.is_list(cfg.get("optimized_metric")) else values[0]


def main() -> None:
    """Console entry: check the command line, then run the Hydra app."""
    startup.mark("imports")
    os.environ.setdefault("PROJECT_ROOT", str(CONF_DIR.parent))
    try:
        check_overrides(sys.argv[1:])
        check_sweep_tags(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    with _mode_from_command_line(sys.argv[1:]):
        _hydra_main()


# Flags that bring configs from outside conf/.
_CONFIG_FLAGS = ("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name")
# Hydra keys that set the mode or bring configs from elsewhere (hydra.run.dir etc. do not).
_MODE_KEYS = ("hydra.mode", "hydra.searchpath")


def groups_setting_mode(conf_dir: Path = CONF_DIR) -> set[str]:
    """The config groups of ``conf_dir`` with an option that sets ``hydra.mode`` (a
    top-level ``hydra:`` block with a ``mode:`` key): the experiments and searches that are
    sweeps by themselves."""
    groups = set()
    for path in conf_dir.glob("*/*.yaml"):
        in_hydra = False
        for line in path.read_text().splitlines():
            if line and not line[0].isspace() and not line.startswith("#"):
                in_hydra = line.startswith("hydra:")
            elif in_hydra and line.strip().startswith("mode:"):
                groups.add(path.parent.name)
                break
    return groups


def may_set_mode(args: list[str]) -> bool:
    """Whether these command-line arguments may set ``hydra.mode``: they name it, select a
    config of Hydra's own groups or an option of a group that sets it
    (:func:`groups_setting_mode`), or bring configs from outside conf/."""
    setting = groups_setting_mode()
    for arg in args:
        flag = arg.split("=")[0]
        key = flag.lstrip("+~").split("@")[0]
        group = key.split("/")[0].split(".")[0]
        if flag in _CONFIG_FLAGS or group in setting or key in _MODE_KEYS:
            return True
        if group == "hydra" and not key.startswith("hydra."):  # hydra=..., hydra/x=...
            return True
    return False


@contextlib.contextmanager
def _mode_from_command_line(args: list[str]):
    """Spare Hydra's extra composition of the whole config (~0.07 s of start-up) that only
    reads ``hydra.mode``, when the command line cannot set it: the defaults of train.yaml
    leave it unset (a test checks), and no argument selects an option of a group that sets
    it, names it, or brings configs from elsewhere (:func:`may_set_mode`). Hydra's answer
    would be None then, and ``--multirun`` decides the mode as Hydra decides it."""
    from hydra._internal.hydra import Hydra

    if may_set_mode(args):
        yield
        return
    get_mode = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = get_mode  # type: ignore[method-assign]
