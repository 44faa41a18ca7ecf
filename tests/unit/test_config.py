import pytest
from omegaconf import OmegaConf

from prunelab.config import check_overrides, config_groups, group_options, validate
from prunelab.errors import ConfigError


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_groups_are_listed():
    groups = config_groups()
    for g in ("dataset", "model", "pruning", "optimizer", "lr_scheduler", "trainer", "logger"):
        assert g in groups
    assert "hydra" not in groups
    assert "mlp" in group_options("model")


def test_unknown_group_option_is_one_line_with_choices():
    with pytest.raises(ConfigError) as err:
        check_overrides(["model=resnet99"])
    msg = _one_line(err)
    assert "resnet99" in msg and "mlp" in msg


def test_unknown_option_inside_a_sweep_list():
    with pytest.raises(ConfigError):
        check_overrides(["-m", "model=mlp,nope", "seed=0,1"])
    check_overrides(["-m", "model=mlp,lenet300_100", "seed=0,1"])


def test_unknown_key_is_one_line():
    with pytest.raises(ConfigError) as err:
        check_overrides(["sparsit=0.9"])
    assert "sparsit" in _one_line(err)
    with pytest.raises(ConfigError):
        check_overrides(["optimizer.momentum=0.9"])  # adam has no momentum
    check_overrides(["optimizer=sgd", "optimizer.momentum=0.5", "sparsity=0.8"])
    check_overrides(["+extra=1", "--help"])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optimizer.lr=-0.1", "optimizer.lr"),
        ("optimizer.lr=abc", "optimizer.lr"),
        ("sparsity=1.0", "sparsity"),
        ("sparsity=-0.5", "sparsity"),
        ("epochs=0", "epochs"),
        ("epochs=2.5", "epochs"),
        ("seed=-1", "seed"),
        ("dataset.batch_size=0", "batch_size"),
        ("optimizer.weight_decay=-1", "weight_decay"),
        ("test_ckpt=middle", "test_ckpt"),
    ],
)
def test_validate_rejects_bad_values(compose_cfg, override, needle):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in _one_line(err)


def test_validate_accepts_defaults(compose_cfg):
    validate(compose_cfg())
    validate(compose_cfg("optimizer=sgd", "lr_scheduler=cosine", "model=mnist1d_cnn"))


def test_validate_rejects_empty_group():
    cfg = OmegaConf.create({"dataset": None})
    with pytest.raises(ConfigError):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "target"),
    [
        ("launcher=joblib", "JoblibLauncher"),
        ("launcher=submitit_local", "LocalLauncher"),
        ("launcher=slurm", "SlurmLauncher"),
    ],
)
def test_launchers_compose(override, target):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from prunelab.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[override], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    "experiment", ["fmnist_static_vs_dynamic", "mnist_lenet300", "cifar10_wrn22_2_rigl"]
)
def test_experiments_compose_and_validate(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}", "pruning=rigl", fast=False)
    validate(cfg)
    assert cfg.task_name == experiment and cfg.skip_completed


def test_unknown_top_level_key_is_one_line(compose_cfg):
    cfg = compose_cfg("+unknown_key=1")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    msg = _one_line(err)
    assert "'unknown_key'" in msg and "nothing reads it" in msg


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("launcher=joblib", "n_jobs=1"),
        ("hparams_search=rigl_optuna",),
        ("debug=fast",),
        ("experiment=mnist_lenet300", "pruning=rigl"),
        ("+trainer.profiler=simple",),
    ],
)
def test_keys_of_the_root_config_and_its_groups_are_known(compose_cfg, overrides):
    validate(compose_cfg(*overrides))


def test_known_keys_follow_the_config_folder(tmp_path):
    """Keys come from the root config and its groups, so new ones need no code change."""
    from prunelab.config import known_keys

    (tmp_path / "train.yaml").write_text(
        "defaults:\n  - _self_\n  - widget: a\n  - optional extra: null\nalpha: 1\n"
    )
    (tmp_path / "widget").mkdir()
    (tmp_path / "widget" / "a.yaml").write_text("size: 3\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "x.yaml").write_text("# @package _global_\nbeta: 2\nwidget:\n  size: 4\n")
    (tmp_path / "unused").mkdir()
    (tmp_path / "unused" / "y.yaml").write_text("gamma: 3\n")
    keys = known_keys(tmp_path)
    assert {"alpha", "widget", "beta", "hydra"} <= keys
    assert not {"extra", "unused", "gamma", "size", "defaults"} & keys


def test_weight_decay_norm_bias_is_a_bool(compose_cfg):
    assert compose_cfg().weight_decay_norm_bias is True
    validate(compose_cfg("weight_decay_norm_bias=false"))
    cfg = compose_cfg("weight_decay_norm_bias=1")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "weight_decay_norm_bias" in _one_line(err)
