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
"""

from prunelab.data.base import (
    BaseDataModule,
    EpochRandomSampler,
    EpochSampler,
    InMemoryDataModule,
    TensorBatchLoader,
    epoch_permutation,
    split_indices,
)
from prunelab.data.idx import DEBIAN_FASHION_MNIST_DIR, FashionMNISTDataModule, MNISTDataModule
from prunelab.data.memory import DigitsDataModule, MNIST1DDataModule
from prunelab.data.vision import CIFAR10DataModule, CIFAR100DataModule

#: Hydra option name (``conf/dataset/<name>.yaml``) -> datamodule class.
DATAMODULES: dict[str, type[BaseDataModule]] = {
    cls.name: cls
    for cls in (
        MNIST1DDataModule,
        DigitsDataModule,
        MNISTDataModule,
        FashionMNISTDataModule,
        CIFAR10DataModule,
        CIFAR100DataModule,
    )
}

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
