"""Unit tests for the model zoo (prunelab.models) and conf/model/*.yaml."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models import MODELS, ResNet18, ResNet20, prunable_parameters

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"

SEQ = (1, 40)
DIGITS = (1, 8, 8)
MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)

# A compatible (usually the canonical) input shape for every registered model.
SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": SEQ,
    "lenet300_100": MNIST,
    "lenet5": MNIST,
    "mnist1d_cnn": SEQ,
    "conv4": CIFAR,
    "conv6": CIFAR,
    "resnet20": CIFAR,
    "resnet32": CIFAR,
    "resnet56": CIFAR,
    "vgg16": CIFAR,
    "wrn22_2": CIFAR,
    "resnet18": CIFAR,
}
IMAGE_MODELS = [n for n, s in SHAPES.items() if len(s) == 3 and n != "lenet300_100"]
YAMLS = sorted(CONF_DIR.glob("*.yaml"))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_model_has_a_shape_and_a_yaml() -> None:
    assert set(SHAPES) == set(MODELS)
    assert {p.stem for p in YAMLS} == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_gives_logits(name: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name](SHAPES[name], 7)
    out = model(torch.randn(2, *SHAPES[name]))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_docstring_cites_a_paper(name: str) -> None:
    doc = MODELS[name].__doc__ or ""
    assert any(str(year) in doc for year in range(1990, 2030)), doc


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "expected"),
    [
        ("mlp", SEQ, {"hidden": [100, 100], "residual": True}, 15_210),
        ("lenet300_100", MNIST, {}, 266_610),
        ("lenet5", MNIST, {}, 431_080),
        ("mnist1d_cnn", SEQ, {}, 5_210),
        ("resnet20", CIFAR, {}, 272_474),
        ("resnet20", CIFAR, {"shortcut": "A"}, 269_722),
        ("conv4", CIFAR, {}, 2_425_930),
        ("conv6", CIFAR, {}, 2_262_602),
        ("vgg16", CIFAR, {}, 14_987_722),
        ("wrn22_2", CIFAR, {}, 1_079_642),
        ("resnet18", CIFAR, {}, 11_173_962),
    ],
)
def test_parameter_counts(name: str, shape: tuple[int, ...], kwargs: dict, expected: int) -> None:
    assert n_params(MODELS[name](shape, 10, **kwargs)) == expected


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_matches_he_et_al(shortcut: str) -> None:
    # He et al. (2016), Table 6: ResNet-20 has 0.27M parameters.
    assert abs(n_params(ResNet20(CIFAR, 10, shortcut=shortcut)) - 270_000) / 270_000 < 0.01


def test_residual_mlp_uses_skip_connection() -> None:
    model = MODELS["mlp"](SEQ, 10, hidden=[100, 100], residual=True)
    assert model.skip == [False, True]
    plain = MODELS["mlp"](SEQ, 10, hidden=[100, 100], residual=False)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, *SEQ)
    assert not torch.allclose(model(x), plain(x))


def test_resnet18_imagenet_stem_matches_torchvision() -> None:
    from torchvision.models import resnet18

    model = ResNet18((3, 224, 224), 10, cifar_stem=False)
    reference = resnet18(weights=None, num_classes=10)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in reference.named_parameters()
    ]
    assert isinstance(model.maxpool, nn.MaxPool2d)
    cifar = ResNet18(CIFAR, 10)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prunable_parameters_are_conv_and_linear_weights(name: str) -> None:
    model = MODELS[name](SHAPES[name], 10)
    prunable = prunable_parameters(model)
    named = dict(model.named_parameters())
    expected = [
        f"{m_name}.weight"
        for m_name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]
    assert list(prunable) == expected
    for p_name, param in prunable.items():
        assert named[p_name] is param
        assert p_name.endswith(".weight")
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
        for p in m.parameters()
    }
    assert not norm_ids & {id(p) for p in prunable.values()}


def test_prunable_parameters_respects_model_override() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def prunable_parameters(self) -> dict[str, nn.Parameter]:
            return {"b.weight": self.b.weight}

    model = Custom()
    assert prunable_parameters(model) == {"b.weight": model.b.weight}
    assert list(prunable_parameters(nn.Sequential(nn.Linear(2, 2)))) == ["0.weight"]


def _assert_one_line_config_error(exc: pytest.ExceptionInfo[ConfigError], *parts: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_models_reject_sequences(name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        MODELS[name](SEQ, 10)
    _assert_one_line_config_error(exc, f"'{name}'", "(C, H, W)", "(1, 40)", "model=mlp")


def test_resnet20_message_is_exact() -> None:
    with pytest.raises(ConfigError) as exc:
        ResNet20((1, 40), 10)
    assert str(exc.value) == (
        "model 'resnet20' needs image inputs (C, H, W) but dataset gives shape (1, 40); "
        "choose an image dataset or model=mlp/mnist1d_cnn"
    )


@pytest.mark.parametrize("shape", [MNIST, CIFAR, (40,)])
def test_mnist1d_cnn_rejects_non_sequences(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError) as exc:
        MODELS["mnist1d_cnn"](shape, 10)
    _assert_one_line_config_error(exc, "'mnist1d_cnn'", "(C, L)", str(shape))


@pytest.mark.parametrize("name", ["lenet5", "vgg16"])
def test_too_small_images_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        MODELS[name](DIGITS, 10)
    _assert_one_line_config_error(exc, f"'{name}'", "(1, 8, 8)", "too small")


@pytest.mark.parametrize("name", ["conv4", "conv6", "resnet20", "wrn22_2", "resnet18"])
def test_small_images_still_work(name: str) -> None:
    model = MODELS[name](DIGITS, 10)
    assert model(torch.randn(2, *DIGITS)).shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "lenet300_100"])
@pytest.mark.parametrize("shape", [SEQ, DIGITS, CIFAR])
def test_mlps_flatten_any_shape(name: str, shape: tuple[int, ...]) -> None:
    assert MODELS[name](shape, 3)(torch.randn(2, *shape)).shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "shape", "num_classes", "kwargs", "fragment"),
    [
        ("mlp", SEQ, 10, {"activation": "swishy"}, "activation"),
        ("mlp", SEQ, 10, {"hidden": [100, -1]}, "hidden"),
        ("mlp", SEQ, 0, {}, "num_classes"),
        ("mlp", (1, 0), 10, {}, "input_shape"),
        ("mlp", "abc", 10, {}, "input_shape"),
        ("resnet20", CIFAR, 10, {"shortcut": "C"}, "shortcut"),
        ("wrn22_2", CIFAR, 10, {"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_hparams_raise_config_error(
    name: str, shape: tuple[int, ...], num_classes: int, kwargs: dict, fragment: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        MODELS[name](shape, num_classes, **kwargs)
    _assert_one_line_config_error(exc, f"'{name}'", fragment)


def test_construction_leaves_model_in_training_mode() -> None:
    assert MODELS["vgg16"](CIFAR, 10).training
    assert MODELS["lenet5"](MNIST, 10).training


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_configs_instantiate(path: Path) -> None:
    cfg = OmegaConf.load(path)
    assert "input_shape" not in cfg and "num_classes" not in cfg
    assert path.stem in MODELS
    assert hydra.utils.get_class(cfg._target_) is MODELS[path.stem]
    shape = SHAPES[path.stem]
    model = hydra.utils.instantiate(cfg, input_shape=shape, num_classes=10)
    assert isinstance(model, MODELS[path.stem])
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_mlp_yaml_is_the_mnist1d_residual_mlp() -> None:
    cfg = OmegaConf.load(CONF_DIR / "mlp.yaml")
    model = hydra.utils.instantiate(cfg, input_shape=SEQ, num_classes=10)
    assert n_params(model) == 15_210
