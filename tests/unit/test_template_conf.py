"""The template's config groups: callbacks, debug variants, extras, eval.yaml; and their checks."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from prunelab import files
from prunelab.config import (
    CONF_DIR,
    check_overrides,
    check_sweep_tags,
    check_tags,
    group_options,
    known_keys,
    validate,
)
from prunelab.errors import ConfigError

RUN_CHECKPOINT = "prunelab.tracking.checkpoint.RunCheckpoint"
AT_TARGET = "prunelab.tracking.early_stopping.AtTargetEarlyStopping"
SUMMARY = "prunelab.tracking.progress.FitStartModelSummary"


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _compose(config_name: str, *overrides: str):
    """A root config composed as its command line would compose it (no test defaults)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


# --- callbacks -----------------------------------------------------------------------------


def _targets(cfg) -> dict[str, str]:
    nodes = (cfg.get("callbacks") or {}).items()
    return {name: node._target_ for name, node in nodes if node is not None}


def test_callback_options_are_the_templates():
    assert group_options("callbacks") == ["default", "early_stopping", "none", "rich_summary"]
    assert {"callbacks", "extras"} <= known_keys()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ((), {"model_checkpoint": RUN_CHECKPOINT, "rich_summary": SUMMARY}),
        (("callbacks=none",), {}),
        (("callbacks=rich_summary",), {"rich_summary": SUMMARY}),
        (("callbacks=early_stopping",), {"early_stopping": AT_TARGET}),
        (
            ("callbacks=[default,early_stopping]",),
            {
                "model_checkpoint": RUN_CHECKPOINT,
                "rich_summary": SUMMARY,
                "early_stopping": AT_TARGET,
            },
        ),
        (
            ("callbacks=[default,early_stopping]", "callbacks.rich_summary=null"),
            {"model_checkpoint": RUN_CHECKPOINT, "early_stopping": AT_TARGET},
        ),
    ],
)
def test_callback_options_compose_and_validate(compose_cfg, override, expected):
    cfg = compose_cfg(*override)
    validate(cfg)
    assert _targets(cfg) == expected


def test_early_stopping_defaults_and_patience_override(compose_cfg):
    cfg = compose_cfg("callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=2")
    validate(cfg)
    node = cfg.callbacks.early_stopping
    assert (node.monitor, node.mode, node.patience) == ("val/acc", "max", 2)
    assert cfg.callbacks.model_checkpoint.monitor == "val/acc"


def test_callback_choices_are_checked_on_the_command_line():
    check_overrides(["callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=3"])
    check_overrides(["-m", "callbacks=none,early_stopping", "seed=0,1"])
    with pytest.raises(ConfigError) as err:
        check_overrides(["callbacks=[default,early_stoping]"])
    assert "unknown callbacks 'early_stoping'" in _one_line(err) and "early_stopping" in str(err)
    with pytest.raises(ConfigError) as err:
        check_overrides(["callbacks=nope"])
    assert "default, early_stopping, none, rich_summary" in _one_line(err)
    with pytest.raises(ConfigError) as err:  # early stopping not chosen: no such key
        check_overrides(["callbacks.early_stopping.patience=3"])
    assert "callbacks.early_stopping.patience" in _one_line(err)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("callbacks.early_stopping.patience=-1",), "patience must be a non-negative integer"),
        (("callbacks.early_stopping.patience=abc",), "patience must be a non-negative integer"),
        (("callbacks.early_stopping.patience=1.5",), "patience must be a non-negative integer"),
        (("callbacks.early_stopping.mode=middle",), "mode must be 'min' or 'max'"),
        (("callbacks.early_stopping._target_=no.such.Callback",), "not an importable class"),
        (("callbacks.early_stopping._target_=torch.nn.Linear",), "not a Lightning Callback"),
        (("callbacks.early_stopping=3",), "must be a callback config with a _target_"),
        (
            ("+callbacks.ckpt._target_=pytorch_lightning.callbacks.ModelCheckpoint",),
            "RunCheckpoint",
        ),
        ((f"+callbacks.ckpt._target_={RUN_CHECKPOINT}",), "one checkpoint callback per run"),
        (("callbacks.model_checkpoint.mode=up",), "callbacks.model_checkpoint.mode"),
    ],
)
def test_bad_callbacks_are_one_line_errors(compose_cfg, overrides, needle):
    cfg = compose_cfg("callbacks=[default,early_stopping]", *overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in _one_line(err)


def test_cell_hash_ignores_summary_extras_and_default_checkpoint(compose_cfg):
    """Callbacks and extras that do not change what a run measures leave its cell (and hence
    skip_completed and the tables) as before; early stopping makes a new cell."""
    from prunelab.train import _cell_hash

    base = _cell_hash(compose_cfg())
    assert _cell_hash(compose_cfg("callbacks=none")) == base
    assert _cell_hash(compose_cfg("callbacks=rich_summary")) == base
    assert _cell_hash(compose_cfg("extras.print_config=true")) == base
    assert _cell_hash(compose_cfg("callbacks=[default,early_stopping]")) != base
    assert _cell_hash(compose_cfg("callbacks.model_checkpoint.monitor=val/loss")) != base


def _stub_trainer(at_target: bool, value: float) -> SimpleNamespace:
    module = SimpleNamespace(at_target=lambda: at_target)
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)
    return SimpleNamespace(
        lightning_module=module,
        callback_metrics={"val/acc": torch.tensor(value)},
        fast_dev_run=False,
        strategy=strategy,
        should_stop=False,
        current_epoch=0,
    )


def test_early_stopping_ignores_epochs_not_at_target():
    from prunelab.tracking.early_stopping import AtTargetEarlyStopping

    stopper = AtTargetEarlyStopping(monitor="val/acc", mode="max", patience=1)
    dense_best = _stub_trainer(at_target=False, value=0.9)
    stopper._run_early_stopping_check(dense_best)
    assert stopper.wait_count == 0 and not torch.isfinite(stopper.best_score)
    for _ in range(3):  # worse epochs before the target: never counted, never stop
        worse = _stub_trainer(at_target=False, value=0.1)
        stopper._run_early_stopping_check(worse)
        assert not worse.should_stop and stopper.wait_count == 0
    first = _stub_trainer(at_target=True, value=0.5)
    stopper._run_early_stopping_check(first)
    assert not first.should_stop and float(stopper.best_score) == pytest.approx(0.5)
    flat = _stub_trainer(at_target=True, value=0.5)
    stopper._run_early_stopping_check(flat)
    assert flat.should_stop and stopper.wait_count == 1


def test_early_stopping_without_at_target_is_lightnings():
    from prunelab.tracking.early_stopping import AtTargetEarlyStopping

    stopper = AtTargetEarlyStopping(monitor="val/acc", mode="max", patience=1)
    for value, stops in ((0.5, False), (0.4, True)):
        trainer = _stub_trainer(at_target=True, value=value)
        trainer.lightning_module = SimpleNamespace()  # no at_target
        stopper._run_early_stopping_check(trainer)
        assert trainer.should_stop is stops


def test_same_batches_each_epoch_pins_the_loader_epoch():
    from prunelab.data.base import TensorBatchLoader
    from prunelab.tracking.overfit import SameBatchesEachEpoch

    loader = TensorBatchLoader(torch.arange(40.0)[:, None], torch.zeros(40), 10, shuffle=True)
    trainer = SimpleNamespace(
        overfit_batches=2,
        fit_loop=SimpleNamespace(_combined_loader=SimpleNamespace(flattened=[loader])),
    )
    first = None
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)  # what Lightning does at the start of each epoch
        SameBatchesEachEpoch().on_train_epoch_start(trainer, None)
        batches = [x.flatten().tolist() for x, _ in loader]
        first = first or batches
        assert batches == first
    trainer.overfit_batches = 0
    loader.sampler.set_epoch(1)
    SameBatchesEachEpoch().on_train_epoch_start(trainer, None)
    assert [x.flatten().tolist() for x, _ in loader] != first


# --- debug -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("overfit", {"trainer.overfit_batches": 3}),
        ("limit", {"epochs": 3, "trainer.limit_train_batches": 10, "trainer.limit_val_batches": 5}),
        (
            "profiler",
            {
                "epochs": 1,
                "trainer.profiler._target_": "pytorch_lightning.profilers.SimpleProfiler",
            },
        ),
        ("fast", {"epochs": 1, "trainer.limit_train_batches": 5}),
    ],
)
def test_debug_options_compose_validate_and_turn_wandb_off(compose_cfg, option, expected):
    cfg = compose_cfg(f"debug={option}", fast=False)
    validate(cfg)
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key
    # compose_cfg switches W&B off itself; composed as the command line would:
    assert _compose("train").logger.wandb.enabled is True
    assert _compose("train", f"debug={option}").logger.wandb.enabled is False
    header = (CONF_DIR / "debug" / f"{option}.yaml").read_text().splitlines()
    assert header[0] == "# @package _global_" and header[1].startswith("# ")


def test_profiler_writes_into_the_run_folder(compose_cfg, tmp_path):
    cfg = compose_cfg("debug=profiler", fast=False, run_dir=tmp_path / "r")
    assert Path(cfg.trainer.profiler.dirpath) == tmp_path / "r"


# --- extras ----------------------------------------------------------------------------------


def test_extras_defaults_keep_runs_as_before(compose_cfg):
    cfg = compose_cfg()
    assert OmegaConf.to_container(cfg.extras) == {
        "print_config": False,
        "enforce_tags": False,
        "ignore_warnings": False,
    }
    validate(compose_cfg("extras.print_config=true", "extras.ignore_warnings=true"))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("extras.print_config=maybe", "extras.print_config must be true or false"),
        ("extras.enforce_tags=1", "extras.enforce_tags must be true or false"),
        ("+extras.print_tree=true", "unknown extras key 'print_tree'"),
        ("extras=3", "extras must be a mapping"),
    ],
)
def test_bad_extras_are_one_line_errors(compose_cfg, override, needle):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in _one_line(err)


def test_unknown_keys_are_still_errors(compose_cfg):
    with pytest.raises(ConfigError):
        check_overrides(["extras.print_conifg=true"])
    cfg = compose_cfg("+callbackz=1")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "'callbackz'" in _one_line(err)


def test_enforce_tags_refuses_only_untagged_sweeps(compose_cfg):
    cfg = compose_cfg("extras.enforce_tags=true")
    check_tags(cfg, multirun=False)  # a single run needs no tags
    with pytest.raises(ConfigError) as err:
        check_tags(cfg, multirun=True)
    assert "needs tags" in _one_line(err)
    check_tags(compose_cfg("extras.enforce_tags=true", "tags=[a]"), multirun=True)
    check_tags(compose_cfg(), multirun=True)  # off by default


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["-m", "seed=0,1", "extras.enforce_tags=true"], True),
        (["--multirun", "seed=0,1", "extras.enforce_tags=true"], True),
        (["extras.enforce_tags=true", "hparams_search=rigl_optuna"], True),  # MULTIRUN in file
        (["-m", "seed=0,1", "extras.enforce_tags=true", "tags=[sweep1]"], False),
        (["seed=0", "extras.enforce_tags=true"], False),
        (["-m", "seed=0,1"], False),
        (["-m", "seed=0,1", "extras.enforce_tags=true", "--help"], False),
    ],
)
def test_sweep_tags_are_checked_before_hydra_starts(argv, refused):
    if refused:
        with pytest.raises(ConfigError) as err:
            check_sweep_tags(argv)
        assert "extras.enforce_tags" in _one_line(err)
    else:
        check_sweep_tags(argv)


def test_print_config_tree_lists_groups_in_order(compose_cfg):
    from prunelab.tracking.extras import print_config_tree

    out = io.StringIO()
    print_config_tree(compose_cfg("callbacks=[default,early_stopping]"), file=out)
    text = out.getvalue()
    assert text.startswith("CONFIG")
    positions = [text.index(f"── {key}") for key in ("dataset", "model", "callbacks", "trainer")]
    assert positions == sorted(positions)
    assert AT_TARGET in text and "── extras" in text and "── seed" in text


def test_apply_extras_prints_only_when_asked(compose_cfg, capsys):
    from prunelab.tracking.extras import apply_extras

    apply_extras(compose_cfg())
    assert "CONFIG" not in capsys.readouterr().out
    with warnings.catch_warnings():
        apply_extras(compose_cfg("extras.print_config=true", "extras.ignore_warnings=true"))
        warnings.warn("hidden", UserWarning, stacklevel=1)  # silenced: pytest sees nothing
    assert "CONFIG" in capsys.readouterr().out


def test_print_config_only_on_the_main_process(compose_cfg, capsys, monkeypatch):
    from prunelab.tracking.extras import apply_extras

    monkeypatch.setenv("LOCAL_RANK", "1")
    apply_extras(compose_cfg("extras.print_config=true"))
    assert "CONFIG" not in capsys.readouterr().out


# --- eval.yaml -------------------------------------------------------------------------------


def test_eval_config_composes():
    cfg = _compose("eval", "ckpt_path=a.ckpt")
    assert cfg.task_name == "eval" and cfg.ckpt_path == "a.ckpt" and cfg.checkpoint == "last"
    assert cfg.run_dir is None and cfg.export_dir is None and not cfg.extras.print_config
    assert "dataset" not in cfg and "paths" in cfg


def test_eval_command_line_is_checked_against_eval_yaml():
    check_overrides(["ckpt_path=a.ckpt", "checkpoint=best", "paths.log_dir=x"], config_name="eval")
    check_overrides(["-m", "ckpt_path=a.ckpt,b.ckpt"], config_name="eval")
    for bad in ("model=mlp", "sparsity=0.5", "ckpt=a.ckpt"):
        with pytest.raises(ConfigError) as err:
            check_overrides([bad], config_name="eval")
        assert "python eval.py --cfg job" in _one_line(err)


def test_legacy_eval_arguments_become_overrides(tmp_path):
    from prunelab.evaluate import legacy_argv

    odd = tmp_path / "it's a=run"
    odd.mkdir()
    assert legacy_argv(["run1", "--checkpoint", "best"]) == ["run_dir='run1'", "checkpoint=best"]
    assert legacy_argv(["--checkpoint=best", "run1"]) == ["run_dir='run1'", "checkpoint=best"]
    assert legacy_argv(["-m", "ckpt_path=a,b"]) == ["-m", "ckpt_path=a,b"]
    assert legacy_argv(["--cfg", "job", "ckpt_path=a"]) == ["--cfg", "job", "ckpt_path=a"]
    (override,) = legacy_argv([str(odd)])
    assert OverridesParser.create().parse_override(override).value() == str(odd)
    with pytest.raises(ConfigError) as err:
        legacy_argv(["a", "b"])
    assert "-m ckpt_path" in _one_line(err)


def _fake_run(root: Path, status: str = "completed") -> Path:
    files.checkpoint_dir(root).mkdir(parents=True)
    files.results_path(root).write_text(f'{{"status": "{status}"}}')
    files.last_checkpoint(root).write_bytes(b"x")
    return root


def test_resolve_checkpoint(tmp_path):
    from prunelab.evaluate import resolve_checkpoint

    run = _fake_run(tmp_path / "run")
    last = files.last_checkpoint(run)
    assert resolve_checkpoint(ckpt_path=last) == (run, last, "last")
    assert resolve_checkpoint(run_dir=run) == (run, last, "last")
    assert resolve_checkpoint(ckpt_path=run) == (run, last, "last")  # a folder: its last.ckpt
    other = run / "checkpoints" / "epoch3.ckpt"
    other.write_bytes(b"x")
    assert resolve_checkpoint(ckpt_path=other) == (run, other, "epoch3.ckpt")
    (tmp_path / "loose.ckpt").write_bytes(b"x")
    _fake_run(tmp_path / "failed", status="failed")
    for kwargs, needle in [
        ({}, "no checkpoint given"),
        ({"ckpt_path": last, "run_dir": run}, "not both"),
        ({"ckpt_path": last, "checkpoint": "middle"}, "checkpoint must be last or best"),
        ({"ckpt_path": tmp_path / "nope.ckpt"}, "no checkpoint"),
        ({"run_dir": run, "checkpoint": "best"}, "best.ckpt"),
        ({"run_dir": tmp_path / "failed"}, "no completed results.json"),
        ({"ckpt_path": tmp_path / "loose.ckpt"}, "no results.json above"),
    ]:
        with pytest.raises(ConfigError) as err:
            resolve_checkpoint(**kwargs)
        assert needle in _one_line(err), kwargs


def test_eval_main_refuses_missing_checkpoints_before_hydra(tmp_path, capsys):
    from prunelab.evaluate import main

    run = _fake_run(tmp_path / "run")
    for argv in (
        [f"ckpt_path={tmp_path / 'nope.ckpt'}"],
        ["-m", f"ckpt_path={files.last_checkpoint(run)},{tmp_path / 'nope.ckpt'}"],
        [str(run), "--checkpoint", "best"],
        [],
    ):
        assert main([*argv, f"paths.log_dir={tmp_path / 'logs'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "logs").exists()  # Hydra never started


def test_eval_precheck_leaves_interpolations_to_the_job(tmp_path):
    from prunelab.evaluate import check_checkpoints

    check_checkpoints(["ckpt_path=${paths.log_dir}/x.ckpt"])  # resolved (and checked) by the job
    check_checkpoints(["--cfg", "job"])  # no job runs
    with pytest.raises(ConfigError):
        check_checkpoints(["ckpt_path=/nonexistent/x.ckpt"])
