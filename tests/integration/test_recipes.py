"""Experiment files: each method keeps its own parts, and paper recipes say what the papers do."""

from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from prunelab.config import CONF_DIR, compose_config, group_options, pruning_method, validate

EXPERIMENTS = group_options("experiment")
METHODS = group_options("pruning")


@pytest.fixture
def compose(tmp_path):
    """Compose ``python train.py <overrides>``; also return the group choices Hydra made."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def _compose(*overrides: str):
        cfg = compose_config(list(overrides), tmp_path / "run")
        return cfg, dict(HydraConfig.get().runtime.choices)

    yield _compose
    GlobalHydra.instance().clear()


def _sweep(experiment: str, key: str) -> list[str | None]:
    """The values an experiment sweeps ``key`` over; [None] when it keeps its own (an
    experiment of one method, e.g. the lottery-ticket study)."""
    spec = yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text())
    params = spec["hydra"]["sweeper"]["params"]
    return str(params[key]).split(",") if key in params else [None]


def _schedule_deltas(experiment: str, kind: str) -> dict:
    """The values an experiment sets on purpose for one kind of schedule (its recipe), from
    conf/experiment/<experiment>/<kind>.yaml, which the schedule files of that kind include."""
    path = CONF_DIR / "experiment" / experiment / f"{kind}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# -- every method keeps the distribution and schedule its own yaml picks -------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("method", METHODS)
def test_experiment_keeps_the_methods_distribution_and_schedule(compose, experiment, method):
    alone, alone_choices = compose(f"pruning={method}")
    cfg, choices = compose(f"experiment={experiment}", f"pruning={method}")
    for group in ("distribution", "schedule"):
        assert choices[group] == alone_choices[group], (group, choices[group])
    assert cfg.distribution == alone.distribution
    schedule = OmegaConf.to_container(cfg.schedule)
    own = OmegaConf.to_container(alone.schedule)
    expected = {**own, **_schedule_deltas(experiment, own["kind"])}
    # The same keys (nothing leaks in from another kind of schedule) and the same values,
    # except those the experiment sets on purpose for this kind of schedule.
    assert schedule == expected


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_cell_of_an_experiment_sweep_validates(compose, experiment):
    for method in _sweep(experiment, "pruning"):
        chosen = () if method is None else (f"pruning={method}",)
        cfg, _ = compose(f"experiment={experiment}", *chosen)
        validate(cfg)


# -- RigL, CIFAR-10 WRN-22-2 (Evci et al. 2020) --------------------------------------------------
@pytest.mark.parametrize("method", _sweep("cifar10_wrn22_2_rigl", "pruning"))
def test_cifar10_wrn22_2_rigl_recipe(compose, method):
    cfg, choices = compose("experiment=cifar10_wrn22_2_rigl", f"pruning={method}")
    assert (choices["dataset"], choices["model"]) == ("cifar10", "wrn22_2")
    assert cfg.dataset.batch_size == 128
    assert cfg.dataset.val_fraction == 0  # all 50k training images
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.lr == 0.1
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.nesterov is True
    assert cfg.optimizer.weight_decay == 5.0e-4
    assert cfg.weight_decay_norm_bias is False  # no decay on BatchNorm parameters and biases
    assert cfg.lr_scheduler.interval == "step"
    assert cfg.lr_scheduler.scheduler._target_ == "torch.optim.lr_scheduler.MultiStepLR"
    assert list(cfg.lr_scheduler.scheduler.milestones) == [30000, 60000, 90000]
    assert cfg.lr_scheduler.scheduler.gamma == 0.2
    assert cfg.trainer.max_steps == 97656
    # 250 epochs of ceil(50000 / 128) = 391 batches would be 97,750 steps: max_steps binds.
    assert math.ceil(50000 / cfg.dataset.batch_size) * cfg.epochs > cfg.trainer.max_steps
    validate(cfg)


def test_cifar10_recipe_lr_drops_at_optimizer_steps(compose):
    import hydra
    import torch

    cfg, _ = compose("experiment=cifar10_wrn22_2_rigl", "pruning=rigl")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    scheduler = hydra.utils.instantiate(cfg.lr_scheduler.scheduler)(optimizer=optimizer)
    lr_at = {}
    for step in range(90001):  # interval: step, so Lightning calls step() once per batch
        lr_at[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    expected = {0: 0.1, 29999: 0.1, 30000: 0.02, 59999: 0.02, 60000: 0.004, 90000: 0.0008}
    for step, lr in expected.items():
        assert lr_at[step] == pytest.approx(lr), step


def test_cifar10_recipe_trainer_stops_at_max_steps(compose):
    import hydra

    cfg, _ = compose("experiment=cifar10_wrn22_2_rigl", "pruning=rigl")
    trainer = hydra.utils.instantiate(
        cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False
    )
    assert trainer.max_steps == 97656 and trainer.max_epochs == 250


def test_cifar10_datamodule_trains_on_every_image_with_val_fraction_zero(
    compose, tmp_path, monkeypatch
):
    """The recipe's dataset config (val_fraction 0) on a small stand-in for CIFAR-10."""
    import hydra
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))

    cfg, _ = compose("experiment=cifar10_wrn22_2_rigl", "pruning=rigl")
    dm = hydra.utils.instantiate(
        cfg.dataset, data_dir=str(tmp_path / "data"), download=False, num_workers=0
    )
    dm.setup("fit")
    assert (dm.num_train_samples, dm.num_val_samples) == (20, 0)
    assert len(dm.val_dataloader()) == 0


# -- sparse momentum, MNIST LeNet-300-100 (Dettmers & Zettlemoyer 2019) ---------------------------
PRUNE_AND_GROW = [m for m in METHODS if m in ("set", "rigl", "dynamic")]


@pytest.mark.parametrize("method", PRUNE_AND_GROW)
def test_mnist_lenet300_recipe_updates_every_epoch_to_the_end(compose, method):
    cfg, choices = compose("experiment=mnist_lenet300", f"pruning={method}")
    assert (choices["dataset"], choices["model"]) == ("mnist", "lenet300_100")
    schedule = cfg.schedule
    assert schedule.kind == "prune_grow"
    assert schedule.end == 1.0 and schedule.anneal == "cosine"
    assert schedule.drop_fraction == 0.5
    # update_every is in optimizer steps: one epoch is 54,000 training images / batch 100.
    per_epoch = round(60000 * (1 - cfg.dataset.val_fraction)) // cfg.dataset.batch_size
    assert schedule.update_every == per_epoch == 540
    validate(cfg)

    pruner = pruning_method(cfg)
    shapes = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}
    total = cfg.epochs * per_epoch
    pruner.setup(shapes, total_steps=total, steps_per_epoch=per_epoch)
    updates = [t for t in range(total) if pruner.is_update_step(t)]
    # After every epoch but the last, as the reference code does.
    assert updates == [540 * k for k in range(1, 100)]
    fractions = [pruner.drop_schedule.fraction_at(t) for t in updates]
    # α annealed (cosine) over all of training: 0.5 at the start, near zero at the end.
    assert fractions[0] == pytest.approx(0.25 * (1 + math.cos(math.pi * 540 / total)), rel=1e-3)
    assert all(a > b for a, b in zip(fractions, fractions[1:], strict=False))
    assert 0 < fractions[-1] < 1e-3


def test_mnist_lenet300_gmp_cell_is_plain_gmp(compose):
    """The recipe's prune-and-grow values do not reach GMP: its cubic ramp ends at 75% of
    training and leaves the last quarter for fine-tuning."""
    alone, _ = compose("pruning=gmp")
    cfg, choices = compose("experiment=mnist_lenet300", "pruning=gmp")
    assert (choices["schedule"], choices["distribution"]) == ("cubic", "uniform")
    assert cfg.schedule == alone.schedule
    validate(cfg)
    pruner = pruning_method(cfg)
    shapes = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}
    pruner.setup(shapes, total_steps=54000, steps_per_epoch=540)
    updates = [t for t in range(54000) if pruner.is_update_step(t)]
    assert max(updates) == 40500  # 0.75 * 54,000


def test_experiment_headers_name_their_recipe():
    cifar = (CONF_DIR / "experiment" / "cifar10_wrn22_2_rigl.yaml").read_text()
    for fact in ("97,656", "Nesterov", "30k, 60k and 90k", "BatchNorm", "all 50,000"):
        assert fact in cifar, fact
    mnist = (CONF_DIR / "experiment" / "mnist_lenet300.yaml").read_text()
    for fact in ("end of training", "540"):
        assert fact in mnist, fact


def test_experiment_schedule_deltas_only_set_keys_the_schedules_have():
    """conf/experiment/<name>/prune_grow.yaml holds an experiment's prune-and-grow values:
    only for a real experiment, and only keys that every drop_* schedule defines (a typo
    must not slip into the config unread)."""
    drop = [yaml.safe_load(p.read_text()) for p in (CONF_DIR / "schedule").glob("drop_*.yaml")]
    drop_keys = set.intersection(*({k for k in d if k != "defaults"} for d in drop))
    for folder in (CONF_DIR / "experiment").iterdir():
        if folder.is_dir():
            assert folder.name in EXPERIMENTS, folder.name
            for path in folder.glob("*.yaml"):
                assert path.stem == "prune_grow", path
                assert set(yaml.safe_load(path.read_text())) <= drop_keys - {"kind"}, path
