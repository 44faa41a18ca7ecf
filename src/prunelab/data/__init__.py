"""Datasets as Lightning datamodules with one shared constructor signature.

Every datamodule takes ``(data_dir="data", batch_size=100, eval_batch_size=1000,
val_fraction=0.1, seed=0, num_workers=2, download=False, **dataset_specific)`` and exposes
``name``, ``num_classes`` and ``input_shape`` (per sample) without any I/O, plus
``check_available()`` (cheap; raises :class:`~prunelab.errors.ConfigError` when the data
cannot be had), ``prepare_data()``, an idempotent ``setup()``, the three ``*_dataloader()``
methods and, after setup, ``num_train_samples``.

The validation set is a seeded random ``val_fraction`` of the training set; the test set is the
official test split. The small datasets (mnist1d, digits, mnist, fashion_mnist) live in memory
and are served by :class:`TensorBatchLoader`; CIFAR uses torchvision and DataLoader workers.
The modules that use torchvision (MNIST, Fashion-MNIST, CIFAR) are imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping

from prunelab.data.base import (
    BaseDataModule,
    EpochRandomSampler,
    EpochSampler,
    InMemoryDataModule,
    TensorBatchLoader,
    epoch_permutation,
    split_indices,
)
from prunelab.data.memory import DigitsDataModule, MNIST1DDataModule
from prunelab.lazy import LazyClasses, lazy_attributes

# The datasets read with torchvision are imported on first use (``prunelab.data.CIFAR10DataModule``
# imports torchvision then), so that a run on the other datasets never imports it.
_LAZY = {
    "DEBIAN_FASHION_MNIST_DIR": "prunelab.data.idx",
    "FashionMNISTDataModule": "prunelab.data.idx",
    "MNISTDataModule": "prunelab.data.idx",
    "CIFAR10DataModule": "prunelab.data.vision",
    "CIFAR100DataModule": "prunelab.data.vision",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


#: Hydra option name (``conf/dataset/<name>.yaml``) -> datamodule class.
DATAMODULES: Mapping[str, type[BaseDataModule]] = LazyClasses(
    __name__,
    {
        "mnist1d": "MNIST1DDataModule",
        "digits": "DigitsDataModule",
        "mnist": "MNISTDataModule",
        "fashion_mnist": "FashionMNISTDataModule",
        "cifar10": "CIFAR10DataModule",
        "cifar100": "CIFAR100DataModule",
    },
)

__all__ = [
    "DATAMODULES",
    "DEBIAN_FASHION_MNIST_DIR",
    "BaseDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "EpochRandomSampler",
    "EpochSampler",
    "FashionMNISTDataModule",
    "InMemoryDataModule",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "TensorBatchLoader",
    "epoch_permutation",
    "split_indices",
]
