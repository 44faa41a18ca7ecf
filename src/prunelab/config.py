"""Validation of a composed config, and of command-line overrides before Hydra sees them.

Every check raises :class:`~prunelab.errors.ConfigError` with one line that names the key,
what it holds, what was expected, and the override that fixes it.
"""

from __future__ import annotations

import functools
import numbers
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from prunelab.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Command-line flags of Hydra after which no composition happens (help, config printing).
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion")
_LR_SCHEDULER_INTERVALS = ("step", "epoch")
# Top-level keys that Hydra itself adds to a composed config.
_HYDRA_KEYS = frozenset({"hydra"})
_PACKAGE_HEADER = re.compile(r"^#\s*@package\s+(\S+)")
# The switches of the root config's ``extras`` block.
EXTRAS = ("print_config", "enforce_tags", "ignore_warnings")
_MULTIRUN_FLAGS = ("-m", "--multirun")


def _number(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{key} must be a number, got {value!r}; e.g. {key}=0.01")
    return float(value)


def _positive(cfg: DictConfig, key: str, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be a positive integer, got {value!r}; e.g. {key}=10")
    if _number(cfg, key) <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}; pass a positive value, e.g. {key}=10")


def _package(path: Path) -> str | None:
    """The ``# @package`` of a config file (its leading comment lines), if it names one."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = _PACKAGE_HEADER.match(line)
        if match:
            return match.group(1)
    return None


def _read_yaml(path: Path) -> Any:
    """The content of a yaml file, parsed safely, with libyaml when PyYAML has it (about five
    times faster than the pure-Python parser; same result)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)


def _root_groups(conf_dir: Path, config_name: str = "train") -> list[str]:
    """The config groups named in a root config's defaults list."""
    root = _read_yaml(conf_dir / f"{config_name}.yaml") or {}
    groups = []
    for entry in root.get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                name = str(key).removeprefix("override ").removeprefix("optional ").strip()
                groups.append(name.lstrip("/").split("@")[0])
    return groups


@functools.cache
def known_keys(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """Every top-level key that the root config or one of its groups defines.

    An option of a group (a yaml file in its folder) adds the group's name, or the first part
    of its ``# @package``; an option in ``_global_`` (dataset, experiment, launcher, ...) adds
    its own top-level keys. Read from the config folder, so new keys and groups need no
    change here.
    """
    keys = set(_HYDRA_KEYS)
    root = _read_yaml(conf_dir / "train.yaml") or {}
    keys.update(str(k) for k in root if k != "defaults")
    for group in _root_groups(conf_dir):
        folder = conf_dir / group
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            package = _package(path) or group
            if package == "_global_":
                content = _read_yaml(path) or {}
                keys.update(str(k) for k in content if k != "defaults")
            else:
                keys.add(package.removeprefix("_global_.").replace("_group_", group).split(".")[0])
    return frozenset(keys)


def _check_top_level_keys(cfg: DictConfig) -> None:
    known = known_keys()
    for key in cfg:
        if key not in known:
            raise ConfigError(
                f"unknown config key '{key}': nothing reads it; check the spelling "
                f"(keys: {', '.join(sorted(known - _HYDRA_KEYS))})"
            )


def _check_optimization_options(cfg: DictConfig) -> None:
    """The trainer options that the Lightning module applies (it optimizes manually), checked
    here as the Trainer used to check them."""
    if OmegaConf.select(cfg, "trainer.accumulate_grad_batches") is not None:
        _positive(cfg, "trainer.accumulate_grad_batches", integer=True)
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val")
    if clip is not None and _number(cfg, "trainer.gradient_clip_val") < 0:
        raise ConfigError("trainer.gradient_clip_val must be >= 0 (null or 0: no clipping)")
    algorithm = OmegaConf.select(cfg, "trainer.gradient_clip_algorithm")
    if algorithm is not None and str(algorithm).lower() not in ("norm", "value"):
        raise ConfigError(
            f"trainer.gradient_clip_algorithm must be 'norm' or 'value', got {algorithm!r}"
        )


def validate(cfg: DictConfig) -> None:
    """Check a composed config; raise ConfigError with a one-line fix on the first mistake."""
    _check_top_level_keys(cfg)
    for group in ("dataset", "model", "optimizer", "trainer", "pruning"):
        if OmegaConf.select(cfg, group) is None:
            raise ConfigError(f"config group '{group}' is empty; choose one, e.g. {group}=...")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}; e.g. seed=0")
    sparsity = _number(cfg, "sparsity")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}; e.g. sparsity=0.9")
    _positive(cfg, "epochs", integer=True)
    _positive(cfg, "optimizer.lr")
    if OmegaConf.select(cfg, "optimizer.weight_decay") is not None:
        wd = _number(cfg, "optimizer.weight_decay")
        if wd < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {wd}; e.g. 5e-4")
    if OmegaConf.select(cfg, "optimizer.momentum") is not None:
        momentum = _number(cfg, "optimizer.momentum")
        if not 0 <= momentum < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {momentum}")
    _positive(cfg, "dataset.batch_size", integer=True)
    if OmegaConf.select(cfg, "dataset.val_fraction") is not None:
        val = _number(cfg, "dataset.val_fraction")
        if not 0 <= val < 1:
            raise ConfigError(f"dataset.val_fraction must be in [0, 1), got {val}; e.g. 0.1")
    interval = OmegaConf.select(cfg, "lr_scheduler.interval", default="epoch")
    if interval not in _LR_SCHEDULER_INTERVALS:
        raise ConfigError(f"lr_scheduler.interval must be 'step' or 'epoch', got {interval!r}")
    _check_optimization_options(cfg)
    norm_bias = cfg.get("weight_decay_norm_bias", True)
    if not isinstance(norm_bias, bool):
        raise ConfigError(
            f"weight_decay_norm_bias must be true or false, got {norm_bias!r}; "
            "e.g. weight_decay_norm_bias=false"
        )
    wandb_artifacts = OmegaConf.select(cfg, "logger.wandb.artifacts", default=True)
    if not isinstance(wandb_artifacts, bool):
        raise ConfigError(
            f"logger.wandb.artifacts must be true or false, got {wandb_artifacts!r}; "
            "e.g. logger.wandb.artifacts=false"
        )
    pruning_method(cfg)
    if cfg.get("test_ckpt") not in ("last", "best"):
        raise ConfigError(f"test_ckpt must be 'last' or 'best', got {cfg.get('test_ckpt')!r}")
    check_extras(cfg)
    check_callbacks(cfg)
    optimized_metrics(cfg)


def _input_adaptive(name: Any) -> bool:
    """Whether ``pruning=<name>`` gates channels per input (its dynamic costs exist)."""
    from prunelab.methods import METHODS

    return name in METHODS and METHODS[name].input_adaptive


def optimized_metrics(cfg: DictConfig) -> list[str]:
    """The names in ``optimized_metric``: none, one, or a list (a multi-objective sweep),
    checked before training. Each is a distinct non-empty string; ``cost/<key>`` (or
    ``cost.<key>``) must be a numeric key of the cost meter that this config measures; under
    an Optuna sweeper there is one name per ``hydra.sweeper.direction``. Metric names can
    only be looked up in the record's ``metrics`` once the run has ended."""
    value = cfg.get("optimized_metric")
    example = "e.g. 'optimized_metric=[val/acc_best,cost/flops_train]'"
    items = [] if value is None else list(value) if OmegaConf.is_list(value) else [value]
    if (value is not None and not items) or not all(isinstance(n, str) and n for n in items):
        raise ConfigError(
            f"optimized_metric must be a name or a list of names, got {value!r}; {example}"
        )
    if len(set(items)) < len(items):
        raise ConfigError(f"optimized_metric names a metric twice: {items}; {example}")
    costs = (
        "flops_train, flops_train_x_dense, flops_infer_sparse, macs_infer_sparse, "
        "macs_prunable_sparse, params_nonzero, params_prunable_nonzero, bytes_csr, bytes_bitmask, "
        "bytes_int8_sparse, energy_uj_estimate_sparse, density_prunable, compression_ratio, "
        "theoretical_speedup, latency_ms/<dense|masked|sparse|compact>/b<batch>; pruning=fbs: "
        "macs_dynamic_<mean|p50|p90|p99|max>, dynamic_speedup_b1"
    )
    pattern = re.compile(
        r"flops_train(_dense|_x_dense)?|(flops|macs)_infer_(dense|sparse)|macs_prunable_(dense|sparse)"
        r"|params_(total|nonzero|prunable|prunable_nonzero)|bytes_(dense_fp32|csr|bitmask|int8_sparse)"
        r"|energy_uj_estimate_(dense|sparse)(_compute|_weights|_activations)?|energy_ratio_estimate"
        r"|density_prunable|compression_ratio|theoretical_speedup"
        r"|macs_dynamic_(mean|p50|p90|p99|max)|dynamic_speedup_b1"
        r"|(latency_ms|peak_tensor_alloc_mb|peak_cuda_alloc_mb)/(dense|masked|sparse|compact)/b(\d+)"
    )
    settings = cfg.get("cost") or {}
    for name in (n for n in items if n.startswith(("cost/", "cost."))):
        match = pattern.fullmatch(name[len("cost/") :])
        if match is None:
            raise ConfigError(
                f"optimized_metric '{name}' is not a cost of the run; cost keys: {costs}"
            )
        if not settings.get("enabled", True):
            raise ConfigError(f"optimized_metric '{name}' needs cost.enabled=true")
        if "dynamic" in name and not _input_adaptive(OmegaConf.select(cfg, "pruning.name")):
            raise ConfigError(
                f"optimized_metric '{name}' is measured only for input-adaptive runs (pruning=fbs)"
            )
        batch = match.group(match.re.groups)
        if batch is not None and not settings.get("latency", True):
            raise ConfigError(f"optimized_metric '{name}' is measured only with cost.latency=true")
        if batch is not None and int(batch) not in list(settings.get("latency_batch_sizes") or ()):
            raise ConfigError(
                f"optimized_metric '{name}': batch {batch} is not timed; add it to "
                "cost.latency_batch_sizes (e.g. cost.latency_batch_sizes=[1,256])"
            )
    try:
        from hydra.core.hydra_config import HydraConfig

        directions = HydraConfig.get().sweeper.get("direction")
    except Exception:  # outside a Hydra app, or a sweeper without directions
        directions = None
    if directions is not None and items:
        count = len(directions) if OmegaConf.is_list(directions) else 1
        if count != len(items):
            raise ConfigError(
                f"optimized_metric names {len(items)} value(s) but hydra.sweeper.direction has "
                f"{count}; give one name per direction, {example}"
            )
    return items


def check_extras(cfg: DictConfig) -> None:
    """``extras`` holds the switches of :data:`EXTRAS`, each true or false (or is absent)."""
    extras = cfg.get("extras")
    if extras is None:
        return
    if not isinstance(extras, DictConfig):
        raise ConfigError(
            f"extras must be a mapping of {', '.join(EXTRAS)}, got {extras!r}; "
            "e.g. extras.print_config=true"
        )
    for key in extras:
        if key not in EXTRAS:
            raise ConfigError(
                f"unknown extras key '{key}'; extras are {', '.join(EXTRAS)} "
                "(e.g. extras.print_config=true)"
            )
        value = extras.get(key)
        if not isinstance(value, bool):
            raise ConfigError(
                f"extras.{key} must be true or false, got {value!r}; e.g. extras.{key}=true"
            )


def check_tags(cfg: DictConfig, multirun: bool) -> None:
    """With ``extras.enforce_tags``, a multirun sweep must carry ``tags`` (they name the sweep
    in W&B and in the results records); a single run needs none."""
    if not (multirun and OmegaConf.select(cfg, "extras.enforce_tags", default=False)):
        return
    tags = cfg.get("tags")
    if not tags:
        raise ConfigError(
            "extras.enforce_tags: a multirun sweep needs tags; e.g. 'tags=[rigl,sweep1]' "
            "(or extras.enforce_tags=false)"
        )


def callback_class(target: str, where: str) -> type:
    """The class a ``_target_`` names, or a ConfigError naming ``where`` when none is found."""
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception:
        raise ConfigError(
            f"{where}._target_ '{target}' is not an importable class; check the spelling "
            "(e.g. pytorch_lightning.callbacks.EarlyStopping)"
        ) from None


def check_callbacks(cfg: DictConfig) -> None:
    """``callbacks`` maps names to Lightning callbacks, each with a ``_target_`` (or null to
    drop one). The run's checkpointing stays :class:`RunCheckpoint`: best-checkpoint selection
    and IMP read it, so any other ModelCheckpoint is refused, as is a second RunCheckpoint;
    ``patience`` and ``mode`` of early stopping are checked here rather than after the first
    epoch."""
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    from prunelab.tracking.checkpoint import RunCheckpoint

    callbacks = cfg.get("callbacks")
    if callbacks is None:
        return
    if not isinstance(callbacks, DictConfig):
        raise ConfigError(
            f"callbacks must be a mapping of name -> callback, got {callbacks!r}; "
            f"choose one of: {', '.join(group_options('callbacks'))} (e.g. callbacks=default)"
        )
    checkpoints = []
    for name in callbacks:
        where = f"callbacks.{name}"
        node = callbacks.get(name)
        if node is None:
            continue
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if not isinstance(target, str):
            raise ConfigError(
                f"{where} must be a callback config with a _target_, got {node!r}; "
                f"e.g. {where}=null to drop it"
            )
        cls = callback_class(target, where)
        if not issubclass(cls, Callback):
            raise ConfigError(f"{where}._target_ '{target}' is not a Lightning Callback")
        if issubclass(cls, ModelCheckpoint):
            if not issubclass(cls, RunCheckpoint):
                raise ConfigError(
                    f"{where}: the run's checkpoint callback is "
                    "prunelab.tracking.checkpoint.RunCheckpoint (best-checkpoint selection and "
                    f"IMP rely on it); set callbacks.model_checkpoint.monitor/mode instead of "
                    f"adding {target}"
                )
            checkpoints.append(where)
        if "patience" in node:
            patience = node.get("patience")
            if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
                raise ConfigError(
                    f"{where}.patience must be a non-negative integer, got {patience!r}; "
                    f"e.g. {where}.patience=5"
                )
        if "mode" in node and node.get("mode") not in ("min", "max"):
            raise ConfigError(
                f"{where}.mode must be 'min' or 'max', got {node.get('mode')!r}; "
                f"e.g. {where}.mode=max"
            )
        if "monitor" in node and not (isinstance(node.get("monitor"), str) and node.monitor):
            raise ConfigError(
                f"{where}.monitor must name a logged metric, got {node.get('monitor')!r}; "
                f"e.g. {where}.monitor=val/acc"
            )
    if len(checkpoints) > 1:
        raise ConfigError(
            f"one checkpoint callback per run, got {len(checkpoints)} ({', '.join(checkpoints)}); "
            "keep callbacks.model_checkpoint"
        )


# pruning.<key> that a sub-run's record adds to its parent's config: IMP's level, the
# adaptive search's step (None for its dense stage).
SUB_RUN_KEYS = ("level", "step")
SUB_RUN_METHODS = ("imp", "adaptive")


def pruning_method(cfg: DictConfig):
    """The pruning method a composed config asks for (raises ConfigError on a mismatch)."""
    from prunelab.methods import build_method

    pruning = OmegaConf.to_container(cfg.pruning, resolve=True)
    name = pruning.pop("name", None)
    if name is None:
        raise ConfigError("pruning.name is missing; choose a method, e.g. pruning=dynamic")
    # The record of a sub-run (an IMP level, an adaptive search point) names its place in the
    # parent run under pruning; rebuilt from such a record (eval.py, scripts/sensitivity.py),
    # the method takes the parent's settings and the weights and masks come from the
    # sub-run's checkpoint.
    sub_run = str(name) in SUB_RUN_METHODS and any(key in pruning for key in SUB_RUN_KEYS)
    if sub_run:
        # The level plan and branches are the parent's (a level need not end the plan; its
        # record names its own branch, e.g. "lottery").
        for key in (*SUB_RUN_KEYS, "levels", "level_sparsities", "branch", "branch_levels"):
            pruning.pop(key, None)
    method = build_method(
        str(name),
        float(cfg.sparsity),
        distribution=OmegaConf.to_container(cfg.get("distribution") or {}, resolve=True),
        schedule=OmegaConf.to_container(cfg.get("schedule") or {}, resolve=True),
        **pruning,
    )
    boost_only = getattr(method, "allows_zero_sparsity", False)  # fbs at density 1
    if not method.is_dense and float(cfg.sparsity) == 0.0 and not sub_run and not boost_only:
        raise ConfigError(
            f"pruning={name} needs sparsity > 0; e.g. sparsity=0.9 (or pruning=dense)"
        )
    return method


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group, from the yaml files in its folder."""
    folder = conf_dir / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def config_groups(conf_dir: Path = CONF_DIR) -> list[str]:
    """The config groups users choose from on the command line (top-level folders)."""
    return sorted(
        p.name for p in conf_dir.iterdir() if p.is_dir() and p.name not in ("hydra", "local")
    )


def _parse_value(value: str) -> Any:
    """The parsed value of an override's right-hand side (a ChoiceSweep for ``a,b``), or the
    text itself when Hydra's grammar rejects it (Hydra reports that later, in its own words)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(f"x={value}")
    except Exception:
        return value
    if parsed.is_sweep_override():
        return [str(v) for v in parsed.sweep_string_iterator()]
    return parsed


def _split_values(value: str) -> list[str]:
    """The values of a sweep override ``a,b,c`` (or a single value), as override text: a
    list value ``[a,b]`` stays one value."""
    if "," not in value:
        return [value]
    parsed = _parse_value(value)
    return parsed if isinstance(parsed, list) else [value]


def _options_named(value: str) -> list[str]:
    """The group options an override value names: each value of a sweep, each element of a
    list (``callbacks=[default,early_stopping]`` selects two options of one group)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    names = []
    for one in _split_values(value):
        if not one.startswith("["):
            names.append(one)
            continue
        try:
            parsed = OverridesParser.create().parse_override(f"x={one}").value()
        except Exception:
            names.append(one)
            continue
        if isinstance(parsed, list):
            names.extend(str(v) for v in parsed)
        else:
            names.append(one)
    return names


def _groups_of(config_name: str, conf_dir: Path) -> list[str]:
    """The groups a root config lets the command line choose: for train, every top-level
    folder (as :func:`config_groups`); for another root (eval), its own defaults list."""
    if config_name == "train":
        return config_groups(conf_dir)
    return sorted(g for g in _root_groups(conf_dir, config_name) if g not in ("hydra", "local"))


def check_overrides(argv: list[str], conf_dir: Path = CONF_DIR, config_name: str = "train") -> None:
    """Reject unknown config-group options and unknown keys before Hydra starts.

    Hydra reports these itself, but over several lines and after its own start-up; checking
    here gives one line that lists the valid choices. ``config_name`` is the root config the
    command line is for (``train`` or ``eval``).
    """
    if any(arg in _INFO_FLAGS for arg in argv):
        return
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    groups = _groups_of(config_name, conf_dir)
    plain: list[str] = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith(("hydra.", "hydra/", "+", "~")):
            continue
        name = key.lstrip("+")
        if name in groups:
            options = group_options(name, conf_dir)
            for choice in _options_named(value):
                if choice not in options and choice != "null":
                    raise ConfigError(
                        f"unknown {name} '{choice}'; choose one of: {', '.join(options)} "
                        f"(e.g. {name}={options[0]})"
                    )
        else:
            plain.append(name)
    if plain:
        _check_keys(overrides, plain, conf_dir, config_name)


def _first_overrides(overrides: list[str], keep: Any = None) -> list[str]:
    """Overrides with each sweep replaced by its first value (what the first job composes);
    ``keep(key)`` selects which overrides to keep (default: all)."""
    chosen = []
    for override in overrides:
        key, _, value = override.partition("=")
        if keep is None or keep(key):
            chosen.append(f"{key}={_split_values(value)[0]}")
    return chosen


def _check_keys(
    overrides: list[str], keys: list[str], conf_dir: Path, config_name: str = "train"
) -> None:
    """Compose once with the group choices (first sweep value) and check every key exists."""
    from hydra import compose, initialize_config_dir

    groups = set(_groups_of(config_name, conf_dir))
    chosen = _first_overrides(overrides, keep=lambda key: key in groups)
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=chosen)
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node: Any = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            script = "train.py" if config_name == "train" else f"{config_name}.py"
            raise ConfigError(
                f"unknown config key '{key}'; see `python {script} --cfg job` for the keys, "
                f"or add a new one with +{key}=..."
            )


# Command-line flags that bring in config files from elsewhere than the config folder.
_CONFIG_SOURCE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def _may_enforce_tags(argv: list[str], conf_dir: Path, config_name: str) -> bool:
    """Whether ``extras.enforce_tags`` can be on for this command line, read from the text
    of the command line and the config files (a few milliseconds), so that
    :func:`check_sweep_tags` composes the config only when it can matter: False when the root
    config sets it to false and no other config file and no override mentions it (nor
    ``extras`` as a whole, nor another config folder)."""
    import yaml

    for arg in argv:
        key = arg.partition("=")[0].lstrip("+~")
        if (
            "enforce_tags" in arg
            or key == "extras"
            or "searchpath" in key
            or arg.partition("=")[0] in _CONFIG_SOURCE_FLAGS
        ):
            return True
    root = conf_dir / f"{config_name}.yaml"
    try:
        content = _read_yaml(root) or {}
        extras = content.get("extras") or {}
        # Other configs at the top (roots such as eval.yaml) count only if the root includes them.
        included = {str(e) for e in content.get("defaults") or [] if not isinstance(e, dict)}
    except (OSError, yaml.YAMLError, AttributeError):
        return True
    if not isinstance(extras, dict) or extras.get("enforce_tags", False) is not False:
        return True
    for path in conf_dir.rglob("*.yaml"):
        if path != root and (path.parent != conf_dir or path.stem in included):
            try:
                if "enforce_tags" in path.read_text():
                    return True
            except OSError:
                return True
    return False


def check_sweep_tags(
    argv: list[str], conf_dir: Path = CONF_DIR, config_name: str = "train"
) -> None:
    """With ``extras.enforce_tags``, refuse a multirun sweep without ``tags`` before any job
    starts (one ConfigError line), rather than failing every job of the sweep.

    The config is composed once as the first job would see it; a sweep is ``-m`` on the
    command line or ``hydra.mode: MULTIRUN`` in the composed config (``hparams_search``).
    Composition errors are left for Hydra to report. When nothing can switch the check on
    (:func:`_may_enforce_tags`), nothing is composed: Hydra composes the config itself.
    """
    from hydra import compose, initialize_config_dir
    from hydra.types import RunMode

    if any(arg in _INFO_FLAGS for arg in argv) or not _may_enforce_tags(
        argv, conf_dir, config_name
    ):
        return
    overrides = _first_overrides([a for a in argv if not a.startswith("-") and "=" in a])
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception:
        return
    if not OmegaConf.select(cfg, "extras.enforce_tags", default=False):
        return
    multirun = any(a in _MULTIRUN_FLAGS for a in argv) or cfg.hydra.mode == RunMode.MULTIRUN
    check_tags(cfg, multirun)


def compose_config(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """Compose the root config outside a Hydra app (tests, benchmarks, scripts).

    The result is what ``python train.py <overrides>`` would run, with its output directory
    set to ``output_dir``; Hydra's own config is registered so that ``${hydra:...}`` and the
    recorded choices work as in a real run.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    check_overrides(list(overrides))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra
    return cfg
