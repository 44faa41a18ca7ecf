"""MNIST and Fashion-MNIST: IDX files read by torchvision, then held in memory as tensors.

Where the files are looked for, in order:

1. ``<data_dir>/<MNIST|FashionMNIST>/raw/`` (torchvision's layout), each file gzipped or not;
2. Fashion-MNIST only: ``system_dir``, by default ``/usr/share/datasets/fashion-mnist`` where the
   Debian package ``dataset-fashion-mnist`` installs the gzipped IDX files;
3. a torchvision download into ``<data_dir>/<Class>/raw`` if ``download`` is on.

torchvision's ``MNIST`` only reads *un*-gzipped files from ``<root>/<Class>/raw``. When the files
found are gzipped, or live elsewhere (``system_dir``), they are decompressed (or symlinked) into
a private temporary torchvision-shaped root that is deleted after loading; nothing is written to
``data_dir`` or ``system_dir``, so parallel runs cannot race on half-written files.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision import datasets

from prunelab.data.base import InMemoryDataModule
from prunelab.errors import ConfigError

log = logging.getLogger(__name__)

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def one_line(error: BaseException) -> str:
    """``Type: message`` of an exception squeezed onto one line (for ConfigError messages)."""
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text}"


def has_idx_files(directory: Path) -> bool:
    """True if all four IDX files are in ``directory``, each plain or as ``.gz``."""
    return all((directory / f).is_file() or (directory / f"{f}.gz").is_file() for f in IDX_FILES)


class _IdxDataModule(InMemoryDataModule):
    """Shared loading of the two MNIST-format datasets (see the module docstring)."""

    torchvision_cls: type[datasets.MNIST] = datasets.MNIST
    mean: float = 0.0
    std: float = 1.0

    @property
    def raw_dir(self) -> Path:
        """torchvision's folder for the raw files under ``data_dir``."""
        return Path(self.data_dir) / self.torchvision_cls.__name__ / "raw"

    def search_dirs(self) -> list[Path]:
        """Folders searched for the IDX files, in order."""
        return [self.raw_dir]

    def find_raw_dir(self) -> Path | None:
        """The first folder of :meth:`search_dirs` holding all four IDX files, else None."""
        return next((d for d in self.search_dirs() if has_idx_files(d)), None)

    def not_found_message(self) -> str:
        return (
            f"{self.name} not found in {self.raw_dir}; put the IDX files "
            f"({', '.join(IDX_FILES)}, gzipped or not) there, or set dataset.download=true"
        )

    def check_available(self) -> None:
        if self.find_raw_dir() is None and not self.download:
            raise ConfigError(self.not_found_message())

    def prepare_data(self) -> None:
        if self.find_raw_dir() is not None:
            return
        if not self.download:
            raise ConfigError(self.not_found_message())
        log.info("%s: downloading into %s", self.name, self.raw_dir)
        try:
            # train=False: download() fetches all four files; only the small test set is parsed.
            self.torchvision_cls(self.data_dir, train=False, download=True)
        except Exception as error:
            raise ConfigError(
                f"downloading {self.name} into {self.raw_dir} failed ({one_line(error)}); "
                f"check the network or put the IDX files in {self.raw_dir}"
            ) from error

    def _torchvision_root(self, raw: Path, scratch: Path) -> str:
        """A root under which ``torchvision_cls`` finds the files of ``raw``, un-gzipped."""
        if raw == self.raw_dir and all((raw / f).is_file() for f in IDX_FILES):
            return self.data_dir
        dest = scratch / self.torchvision_cls.__name__ / "raw"
        dest.mkdir(parents=True)
        for f in IDX_FILES:
            if (raw / f).is_file():
                (dest / f).symlink_to((raw / f).resolve())
            else:
                with gzip.open(raw / f"{f}.gz", "rb") as src, open(dest / f, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
        return str(scratch)

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raw = self.find_raw_dir()
        if raw is None:
            self.prepare_data()  # raises ConfigError unless download is on and succeeds
            raw = self.find_raw_dir()
            if raw is None:
                raise ConfigError(self.not_found_message())
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="prunelab-idx-") as scratch:
            try:
                root = self._torchvision_root(raw, Path(scratch))
                train = self.torchvision_cls(root, train=True, download=False)
                test = self.torchvision_cls(root, train=False, download=False)
            except Exception as error:
                raise ConfigError(
                    f"{self.name}: the IDX files in {raw} could not be read ({one_line(error)}); "
                    "replace them with intact copies"
                ) from error
        log.info("%s: read from %s in %.2f s", self.name, raw, time.perf_counter() - start)
        return (
            self._to_x(train.data),
            train.targets.long(),
            self._to_x(test.data),
            test.targets.long(),
        )

    def _to_x(self, images: Tensor) -> Tensor:
        """uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28)."""
        x = images.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x.unsqueeze(1)


class MNISTDataModule(_IdxDataModule):
    """MNIST handwritten digits, 60000 train / 10000 test 28x28 grey images.

    LeCun, Y., Bottou, L., Bengio, Y. & Haffner, P. (1998). *Gradient-based learning applied to
    document recognition*. Proc. IEEE 86(11). Read with ``torchvision.datasets.MNIST`` from
    ``<data_dir>/MNIST/raw`` (downloaded there if ``download``), normalised with the train-set
    mean/std 0.1307/0.3081.
    """

    name = "mnist"
    num_classes = 10
    input_shape = (1, 28, 28)
    torchvision_cls = datasets.MNIST
    mean = 0.1307
    std = 0.3081


class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST, 60000 train / 10000 test 28x28 grey images of 10 clothing classes.

    Xiao, H., Rasul, K. & Vollgraf, R. (2017). *Fashion-MNIST: a novel image dataset for
    benchmarking machine learning algorithms* (arXiv:1708.07747). Read with
    ``torchvision.datasets.FashionMNIST`` from ``<data_dir>/FashionMNIST/raw``, else from
    ``system_dir`` (the Debian package ``dataset-fashion-mnist``), else downloaded if
    ``download``; normalised with the train-set mean/std 0.2860/0.3530.
    """

    name = "fashion_mnist"
    num_classes = 10
    input_shape = (1, 28, 28)
    torchvision_cls = datasets.FashionMNIST
    mean = 0.2860
    std = 0.3530

    def __init__(self, system_dir: str = DEBIAN_FASHION_MNIST_DIR, **kwargs: Any) -> None:
        """``system_dir``: where the Debian package puts the IDX files; every other argument
        is the base datamodule's."""
        super().__init__(**kwargs)
        self.system_dir = str(system_dir)

    def search_dirs(self) -> list[Path]:
        return [self.raw_dir, Path(self.system_dir)]

    def not_found_message(self) -> str:
        return (
            f"{self.name} not found in {self.raw_dir} or {self.system_dir}; install the Debian "
            "package dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist), put the "
            f"IDX files in {self.raw_dir}, or set dataset.download=true"
        )
