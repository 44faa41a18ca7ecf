"""The torchvision-backed datamodules read small files written here in the real on-disk formats:
gzipped IDX for MNIST / Fashion-MNIST and the python pickle batches of CIFAR-10/100.
Nothing touches the network (download=False everywhere)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelab.data import (
    DEBIAN_FASHION_MNIST_DIR,
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from prunelab.data.idx import IDX_FILES
from prunelab.errors import ConfigError

N_TRAIN, N_TEST = 60, 20


# -- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """IDX as LeCun's files: big-endian magic 2051 (uint8, 3 dims) or 2049 (uint8, 1 dim)."""
    magic = {3: 2051, 1: 2049}[array.ndim]
    payload = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(">u1").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _write_idx_set(raw: Path, seed: int, gz: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    for name, array in arrays.items():
        _write_idx(raw / name, array, gz=gz)
    return arrays


def _check_idx_module(dm, arrays: dict[str, np.ndarray], mean: float, std: float) -> None:
    dm.check_available()
    dm.prepare_data()
    dm.setup()
    assert (dm.num_train_samples, dm.num_val_samples, dm.num_test_samples) == (48, 12, 20)

    def expected(name: str) -> torch.Tensor:
        images = torch.from_numpy(arrays[name].astype(np.float32)) / 255.0
        return ((images - mean) / std).unsqueeze(1)

    x_test = torch.cat([x for x, _ in dm.test_dataloader()])
    y_test = torch.cat([y for _, y in dm.test_dataloader()])
    torch.testing.assert_close(x_test, expected("t10k-images-idx3-ubyte"))
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())

    x_train_all = expected("train-images-idx3-ubyte")
    y_train_all = torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()
    x_val, y_val = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(x_val, x_train_all[dm.val_indices])
    assert torch.equal(y_val, y_train_all[dm.val_indices])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,) and x.dtype == torch.float32
    seen = torch.cat([y for _, y in dm.train_dataloader()])
    assert seen.sort().values.tolist() == y_train_all[dm.train_indices].sort().values.tolist()


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_in_data_dir(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx_set(tmp_path / "MNIST" / "raw", seed=0, gz=gz)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=16, val_fraction=0.2, seed=1)
    _check_idx_module(dm, arrays, 0.1307, 0.3081)
    assert sorted(os.listdir(tmp_path / "MNIST" / "raw")) == sorted(
        f"{f}.gz" if gz else f for f in IDX_FILES
    )  # nothing written next to the user's files


def test_fashion_mnist_idx_in_data_dir(tmp_path: Path) -> None:
    arrays = _write_idx_set(tmp_path / "data" / "FashionMNIST" / "raw", seed=2)
    dm = FashionMNISTDataModule(
        data_dir=str(tmp_path / "data"),
        system_dir=str(tmp_path / "absent"),
        batch_size=16,
        val_fraction=0.2,
    )
    _check_idx_module(dm, arrays, 0.2860, 0.3530)


def test_fashion_mnist_idx_in_system_dir(tmp_path: Path) -> None:
    # The Debian package's layout: the four .gz files directly in one folder.
    arrays = _write_idx_set(tmp_path / "share" / "fashion-mnist", seed=3)
    dm = FashionMNISTDataModule(
        data_dir=str(tmp_path / "empty"),
        system_dir=str(tmp_path / "share" / "fashion-mnist"),
        batch_size=16,
        val_fraction=0.2,
    )
    _check_idx_module(dm, arrays, 0.2860, 0.3530)
    assert not (tmp_path / "empty").exists()  # loading wrote nothing into data_dir


def test_fashion_mnist_data_dir_wins_over_system_dir(tmp_path: Path) -> None:
    arrays = _write_idx_set(tmp_path / "data" / "FashionMNIST" / "raw", seed=4)
    _write_idx_set(tmp_path / "system", seed=5)
    dm = FashionMNISTDataModule(
        data_dir=str(tmp_path / "data"), system_dir=str(tmp_path / "system"), val_fraction=0.2
    )
    assert dm.find_raw_dir() == tmp_path / "data" / "FashionMNIST" / "raw"
    dm.setup()
    y_test = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.equal(y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


def test_corrupt_idx_file_is_a_config_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_idx_set(raw, seed=6)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="could not be read") as info:
        MNISTDataModule(data_dir=str(tmp_path)).setup()
    assert "\n" not in str(info.value)


@pytest.mark.skipif(
    not Path(DEBIAN_FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_fraction=0.1, batch_size=256)
    dm.check_available()
    dm.setup()
    assert dm.num_train_samples + dm.num_val_samples == 60000 and dm.num_test_samples == 10000
    assert (dm.num_train_samples, dm.num_val_samples) == (54000, 6000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 28, 28) and int(y.max()) <= 9
    x_train = dm._data["train"][0]
    # Normalised with the train-set statistics: about zero mean and unit std.
    assert abs(x_train.mean().item()) < 0.02 and abs(x_train.std().item() - 1) < 0.02


# -- CIFAR python pickles ------------------------------------------------------------------------
@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's CIFAR checks every file's md5 against the official archive's, which small
    hand-written files cannot match. In this test only, the check is reduced to "the file
    exists"; the rest of torchvision's real loading code (unpickling, reshaping) runs as is."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows of 3072 uint8: 1024 red, 1024 green, 1024 blue values, row-major, as in CIFAR."""
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def _write_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(10)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(rng, 8), rng.integers(0, 10, 8).tolist()
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"batch {i}", "data": x, "labels": y})
        xs.append(x)
        ys += y
    x_test, y_test = _images(rng, 10), rng.integers(0, 10, 10).tolist()
    _pickle(folder / "test_batch", {"data": x_test, "labels": y_test})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return np.concatenate(xs), np.array(ys), x_test, np.array(y_test)


def _write_cifar100(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    folder = root / "cifar-100-python"
    x, y = _images(rng, 40), rng.integers(0, 100, 40).tolist()
    x_test, y_test = _images(rng, 10), rng.integers(0, 100, 10).tolist()
    for name, xx, yy in (("train", x, y), ("test", x_test, y_test)):
        coarse = [v // 5 for v in yy]
        _pickle(folder / name, {"data": xx, "fine_labels": yy, "coarse_labels": coarse})
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"coarse{i}" for i in range(20)],
        },
    )
    return x, np.array(y), x_test, np.array(y_test)


def _normalised(rows: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    x = torch.from_numpy(rows.reshape(-1, 3, 32, 32).astype(np.float32)) / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    ("cls", "writer"), [(CIFAR10DataModule, _write_cifar10), (CIFAR100DataModule, _write_cifar100)]
)
def test_cifar_pickles(tmp_path: Path, skip_md5: None, cls, writer) -> None:
    x_train, y_train, x_test, y_test = writer(tmp_path)
    dm = cls(
        data_dir=str(tmp_path), batch_size=8, eval_batch_size=6, val_fraction=0.25, num_workers=0
    )
    dm.check_available()
    dm.prepare_data()
    dm.setup()
    dm.setup()  # idempotent
    assert (dm.num_train_samples, dm.num_val_samples, dm.num_test_samples) == (30, 10, 10)

    xt, yt = zip(*dm.test_dataloader(), strict=True)
    torch.testing.assert_close(torch.cat(xt), _normalised(x_test, dm.mean, dm.std))
    assert torch.cat(yt).tolist() == y_test.tolist()

    # Validation comes from the training set, with the eval transform (no augmentation).
    xv, yv = zip(*dm.val_dataloader(), strict=True)
    val = dm.val_indices.numpy()
    torch.testing.assert_close(torch.cat(xv), _normalised(x_train[val], dm.mean, dm.std))
    assert torch.cat(yv).tolist() == y_train[val].tolist()

    batches = list(dm.train_dataloader())
    assert [tuple(x.shape) for x, _ in batches] == [(8, 3, 32, 32)] * 3 + [(6, 3, 32, 32)]
    seen = sorted(torch.cat([y for _, y in batches]).tolist())
    assert seen == sorted(y_train[dm.train_indices.numpy()].tolist())


def test_cifar_corrupt_files_are_a_config_error(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)  # real md5 check on: hand-written files do not match
    with pytest.raises(ConfigError, match="missing or corrupted"):
        CIFAR10DataModule(data_dir=str(tmp_path), num_workers=0).setup()
