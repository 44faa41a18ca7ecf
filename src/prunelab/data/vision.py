"""CIFAR-10 and CIFAR-100 through torchvision, with augmentation and worker DataLoaders."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.vision import StandardTransform

from prunelab.data.base import BaseDataModule, EpochRandomSampler
from prunelab.data.idx import one_line
from prunelab.errors import ConfigError

log = logging.getLogger(__name__)


class _CIFARDataModule(BaseDataModule):
    """Shared CIFAR logic. Train: RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor +
    Normalize; validation (held out of the training set) and test: ToTensor + Normalize."""

    torchvision_cls: type[datasets.CIFAR10] = datasets.CIFAR10
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    input_shape = (3, 32, 32)

    _train: Dataset[Any] | None = None
    _val: Dataset[Any] | None = None
    _test: Dataset[Any] | None = None

    @property
    def folder(self) -> Path:
        """Where torchvision keeps the extracted python batches."""
        return Path(self.data_dir) / self.torchvision_cls.base_folder

    def _files_present(self) -> bool:
        cls = self.torchvision_cls
        names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return all((self.folder / name).is_file() for name in names)

    def not_found_message(self) -> str:
        cls = self.torchvision_cls
        return (
            f"{self.name} not found in {self.folder}; set dataset.download=true, or download "
            f"{cls.url} and extract it into {self.data_dir}"
        )

    def check_available(self) -> None:
        """Checks the files exist (their md5 sums are verified by torchvision in setup)."""
        if not self._files_present() and not self.download:
            raise ConfigError(self.not_found_message())

    def prepare_data(self) -> None:
        if self._files_present():
            return
        if not self.download:
            raise ConfigError(self.not_found_message())
        log.info("%s: downloading into %s", self.name, self.data_dir)
        try:
            self.torchvision_cls(self.data_dir, train=False, download=True)
        except Exception as error:
            raise ConfigError(
                f"downloading {self.name} into {self.data_dir} failed ({one_line(error)}); "
                f"check the network, or download {self.torchvision_cls.url} and extract it there"
            ) from error

    def train_transform(self) -> T.Compose:
        return T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def eval_transform(self) -> T.Compose:
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def setup(self, stage: str | None = None) -> None:
        """Load once and split; later calls (any stage) do nothing."""
        if self._train is not None:
            return
        if not self._files_present():
            self.prepare_data()
        eval_tf = self.eval_transform()
        try:
            train_aug = self.torchvision_cls(
                self.data_dir, train=True, transform=self.train_transform(), download=False
            )
            test = self.torchvision_cls(self.data_dir, train=False, transform=eval_tf)
        except RuntimeError as error:
            raise ConfigError(
                f"{self.name}: the files in {self.folder} are missing or corrupted "
                f"({one_line(error)}); delete that folder and set dataset.download=true"
            ) from error
        # The validation view shares the arrays of the training set but not its augmentation.
        train_eval = copy.copy(train_aug)
        train_eval.transform = eval_tf
        train_eval.transforms = StandardTransform(eval_tf, None)
        train_idx, val_idx = self._split(len(train_aug))
        self._train = Subset(train_aug, train_idx.tolist())
        self._val = Subset(train_eval, val_idx.tolist())
        self._test = test
        log.info(
            "%s: %d train / %d val / %d test samples",
            self.name,
            len(train_idx),
            len(val_idx),
            len(test),
        )

    def _dataset(self, split: str) -> Dataset[Any]:
        data = {"train": self._train, "val": self._val, "test": self._test}[split]
        self._require_setup(data)
        assert data is not None
        return data

    @property
    def num_train_samples(self) -> int:
        return len(self._dataset("train"))  # type: ignore[arg-type]

    @property
    def num_val_samples(self) -> int:
        return len(self._dataset("val"))  # type: ignore[arg-type]

    @property
    def num_test_samples(self) -> int:
        return len(self._dataset("test"))  # type: ignore[arg-type]

    def _loader(
        self, split: str, batch_size: int, sampler: EpochRandomSampler | None = None
    ) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by :class:`EpochRandomSampler` (order fixed by ``(seed, epoch)``)."""
        sampler = EpochRandomSampler(self.num_train_samples, seed=self.seed)
        return self._loader("train", self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 50000 train / 10000 test 32x32 colour images in 10 classes.

    Krizhevsky, A. (2009). *Learning Multiple Layers of Features from Tiny Images*. Tech. report,
    University of Toronto. Read with ``torchvision.datasets.CIFAR10`` from
    ``<data_dir>/cifar-10-batches-py`` (downloaded there if ``download``).
    """

    name = "cifar10"
    num_classes = 10
    torchvision_cls = datasets.CIFAR10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 50000 train / 10000 test 32x32 colour images in 100 (fine) classes.

    Krizhevsky, A. (2009). *Learning Multiple Layers of Features from Tiny Images*. Tech. report,
    University of Toronto. Read with ``torchvision.datasets.CIFAR100`` from
    ``<data_dir>/cifar-100-python`` (downloaded there if ``download``).
    """

    name = "cifar100"
    num_classes = 100
    torchvision_cls = datasets.CIFAR100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
