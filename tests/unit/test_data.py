"""Fast tests of the data layer: TensorBatchLoader, splits, mnist1d/digits, config errors, and
a real two-epoch Lightning fit on an in-memory datamodule."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from prunelab.data import (
    DATAMODULES,
    CIFAR10DataModule,
    DigitsDataModule,
    EpochRandomSampler,
    FashionMNISTDataModule,
    MNIST1DDataModule,
    MNISTDataModule,
    TensorBatchLoader,
    epoch_permutation,
    split_indices,
)
from prunelab.errors import ConfigError


def _labels(loader: TensorBatchLoader) -> torch.Tensor:
    return torch.cat([y for _, y in loader])


def _loader(n: int = 103, batch_size: int = 10, **kwargs) -> TensorBatchLoader:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorBatchLoader(x, torch.arange(n), batch_size, **kwargs)


# -- TensorBatchLoader ---------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_covers_every_sample_once(shuffle: bool) -> None:
    loader = _loader(shuffle=shuffle, seed=3)
    assert len(loader) == 11
    batches = list(loader)
    assert len(batches) == 11
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    for x, y in batches:
        assert torch.equal(x.squeeze(1).long(), y)  # inputs and targets stay paired
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels.sort().values, torch.arange(103))
    assert torch.equal(labels, torch.arange(103)) != shuffle


def test_loader_drop_last() -> None:
    loader = _loader(drop_last=True, shuffle=True)
    assert len(loader) == 10
    assert [len(y) for _, y in loader] == [10] * 10


def test_loader_permutation_is_a_function_of_seed_and_epoch() -> None:
    a, b = _loader(shuffle=True, seed=7), _loader(shuffle=True, seed=7)
    a.sampler.set_epoch(4)
    b.sampler.set_epoch(4)
    first = _labels(a)
    assert torch.equal(first, _labels(b))
    assert torch.equal(first, _labels(a))  # set_epoch pins the epoch: no auto-advance
    assert torch.equal(first, epoch_permutation(103, 7, 4))
    b.sampler.set_epoch(5)
    assert not torch.equal(first, _labels(b))
    other_seed = _loader(shuffle=True, seed=8)
    other_seed.sampler.set_epoch(4)
    assert not torch.equal(first, _labels(other_seed))


def test_loader_advances_its_own_epoch_until_set_epoch_is_called() -> None:
    loader = _loader(shuffle=True, seed=1)
    epoch0, epoch1 = _labels(loader), _labels(loader)
    assert loader.sampler.epoch == 2
    assert torch.equal(epoch0, epoch_permutation(103, 1, 0))
    assert torch.equal(epoch1, epoch_permutation(103, 1, 1))
    # An interrupted pass does not count as an epoch.
    next(iter(loader))
    assert loader.sampler.epoch == 2
    # A resumed run that jumps straight to epoch 1 sees the same order.
    resumed = _loader(shuffle=True, seed=1)
    resumed.sampler.set_epoch(1)
    assert torch.equal(_labels(resumed), epoch1)


@pytest.mark.parametrize(("n", "world_size"), [(120, 3), (103, 4)])
def test_loader_rank_shards(n: int, world_size: int) -> None:
    shards = []
    for rank in range(world_size):
        loader = _loader(n, 7, shuffle=True, seed=5, rank=rank, world_size=world_size)
        loader.sampler.set_epoch(2)
        shards.append(_labels(loader))
        assert len(loader) == len(list(loader))
    sizes = {len(s) for s in shards}
    assert sizes == {-(-n // world_size)}  # equal size: ceil(n / world_size)
    assert len({len(_loader(n, 7, rank=r, world_size=world_size)) for r in range(world_size)}) == 1
    together = torch.cat(shards)
    assert set(together.tolist()) == set(range(n))
    if n % world_size == 0:
        assert len(together) == n  # disjoint
    else:
        assert len(together) - n == world_size * sizes.pop() - n  # only the wrap-around padding


def test_loader_rejects_mismatched_and_bad_args() -> None:
    with pytest.raises(ValueError):
        TensorBatchLoader(torch.zeros(3), torch.zeros(4), 2)
    with pytest.raises(ConfigError):
        TensorBatchLoader(torch.zeros(3), torch.zeros(3), 0)
    with pytest.raises(ValueError):
        TensorBatchLoader(torch.zeros(3), torch.zeros(3), 1, rank=2, world_size=2)


def test_epoch_random_sampler() -> None:
    sampler = EpochRandomSampler(50, seed=2)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(50)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first == epoch_permutation(50, 2, 0).tolist()


def test_split_indices() -> None:
    train, val = split_indices(1000, 0.1, seed=0)
    assert len(train) == 900 and len(val) == 100
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert set(train.tolist()) | set(val.tolist()) == set(range(1000))
    assert torch.equal(val, split_indices(1000, 0.1, seed=0)[1])
    assert not torch.equal(val, split_indices(1000, 0.1, seed=1)[1])
    assert len(split_indices(10, 0.0, seed=0)[1]) == 0


# -- datamodules ---------------------------------------------------------------------------------
def test_static_attributes_need_no_io(tmp_path) -> None:
    expected = {
        "mnist1d": (10, (1, 40)),
        "digits": (10, (1, 8, 8)),
        "mnist": (10, (1, 28, 28)),
        "fashion_mnist": (10, (1, 28, 28)),
        "cifar10": (10, (3, 32, 32)),
        "cifar100": (100, (3, 32, 32)),
    }
    assert set(DATAMODULES) == set(expected)
    for name, cls in DATAMODULES.items():
        dm = cls(data_dir=str(tmp_path / "nothing-here"))
        assert (dm.name, dm.num_classes, dm.input_shape) == (name, *expected[name])
        assert cls.__doc__ and len(cls.__doc__) > 100
    assert not (tmp_path / "nothing-here").exists()


def test_mnist1d_datamodule() -> None:
    dm = MNIST1DDataModule(batch_size=64, eval_batch_size=500, val_fraction=0.1, seed=0)
    dm.check_available()
    dm.prepare_data()
    dm.setup("fit")
    data = dm._data
    dm.setup("test")  # idempotent: nothing reloaded
    assert dm._data is data
    assert (dm.num_train_samples, dm.num_val_samples, dm.num_test_samples) == (3600, 400, 1000)
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert (len(train), len(val), len(test)) == (57, 1, 2)
    for loader in (train, val, test):
        x, y = next(iter(loader))
        assert x.shape[1:] == (1, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(len(y) for _, y in test) == 1000
    assert set(_labels(test).tolist()) == set(range(10))


def test_mnist1d_split_is_seeded_and_disjoint() -> None:
    def split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dm = MNIST1DDataModule(seed=seed)
        dm.setup()
        assert dm.train_indices is not None and dm.val_indices is not None
        return dm.train_indices, dm.val_indices, dm._data["val"][0]

    train0, val0, xval0 = split(0)
    train0b, val0b, xval0b = split(0)
    _, val1, _ = split(1)
    assert torch.equal(val0, val0b) and torch.equal(xval0, xval0b)
    assert not torch.equal(val0, val1)
    assert set(train0.tolist()).isdisjoint(val0.tolist())
    assert len(train0) + len(val0) == 4000


def test_mnist1d_generation_leaves_global_rngs_alone() -> None:
    import random

    import numpy as np

    from prunelab.data.memory import _mnist1d_arrays

    _mnist1d_arrays.cache_clear()
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    MNIST1DDataModule().setup()
    assert (random.random(), np.random.rand()) == expected


def test_digits_datamodule() -> None:
    dm = DigitsDataModule(batch_size=32, val_fraction=0.2)
    dm.check_available()
    dm.setup()
    assert dm.num_train_samples + dm.num_val_samples == 1437 and dm.num_test_samples == 360
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    xtrain = dm._data["train"][0]
    assert abs(xtrain.mean().item()) < 0.05 and abs(xtrain.std().item() - 1) < 0.05
    again = DigitsDataModule(val_fraction=0.2)
    again.setup()
    assert torch.equal(dm._data["test"][0], again._data["test"][0])  # fixed test split


def test_val_fraction_zero_gives_empty_val_loader() -> None:
    dm = DigitsDataModule(val_fraction=0.0)
    dm.setup()
    assert len(dm.val_dataloader()) == 0 and list(dm.val_dataloader()) == []
    assert dm.num_train_samples == 1437


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"val_fraction": "0.1"},
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"eval_batch_size": -1},
        {"num_workers": -1},
        {"seed": "abc"},
        {"batchsize": 10},  # typo: unknown option
    ],
)
def test_bad_args_raise_one_line_config_error(kwargs: dict) -> None:
    for cls in (MNIST1DDataModule, FashionMNISTDataModule, CIFAR10DataModule):
        with pytest.raises(ConfigError) as info:
            cls(**kwargs)
        message = str(info.value)
        assert "\n" not in message and message.strip() == message and ";" in message


def test_fashion_mnist_missing_names_all_three_options(tmp_path) -> None:
    data_dir, system_dir = tmp_path / "data", tmp_path / "no-such-dir"
    data_dir.mkdir()
    dm = FashionMNISTDataModule(data_dir=str(data_dir), system_dir=str(system_dir))
    with pytest.raises(ConfigError) as info:
        dm.check_available()
    message = str(info.value)
    assert "\n" not in message
    assert str(data_dir / "FashionMNIST" / "raw") in message
    assert str(system_dir) in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "dataset.download=true" in message
    with pytest.raises(ConfigError):
        dm.setup()


def test_mnist_missing_without_download(tmp_path) -> None:
    dm = MNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="dataset.download=true"):
        dm.check_available()
    with pytest.raises(ConfigError):
        dm.prepare_data()
    # With download on, the cheap check passes (the download itself happens in prepare_data).
    MNISTDataModule(data_dir=str(tmp_path), download=True).check_available()


def test_cifar_missing_without_download(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cifar-10-batches-py"):
        CIFAR10DataModule(data_dir=str(tmp_path)).check_available()


# -- Lightning -----------------------------------------------------------------------------------
class _TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(40, 10))
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.val_batches = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).append(y)
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_batches += 1
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_with_tensor_batch_loader() -> None:
    dm = MNIST1DDataModule(batch_size=400, eval_batch_size=200, seed=3)
    model = _TinyModule()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.seen) == [0, 1]
    assert model.val_batches == 2 * 2  # 400 val samples / 200, two epochs
    y_train = dm._data["train"][1]
    for epoch, batches in model.seen.items():
        assert len(batches) == 9  # 3600 / 400
        # The fit loop called sampler.set_epoch(epoch): the order is epoch_permutation's.
        assert torch.equal(torch.cat(batches), y_train[epoch_permutation(3600, 3, epoch)])
    assert not torch.equal(torch.cat(model.seen[0]), torch.cat(model.seen[1]))
    trainer.test(model, datamodule=dm, verbose=False)
