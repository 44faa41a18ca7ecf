"""Small datasets generated or bundled locally: MNIST-1D and the UCI digits. No files, no network."""

from __future__ import annotations

import functools
import logging
import random
import time

import numpy as np
import torch
from torch import Tensor

from prunelab.data.base import InMemoryDataModule

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The default MNIST-1D dataset, generated (never downloaded) once per process.

    ``mnist1d`` reseeds the global ``random`` and ``numpy`` generators; their states are restored
    afterwards so that generating the data does not change the caller's random streams.
    """
    import mnist1d.data  # heavy import (scipy, matplotlib): only when needed

    py_state, np_state = random.getstate(), np.random.get_state()
    start = time.perf_counter()
    try:
        data = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    log.info("mnist1d: generated in %.2f s", time.perf_counter() - start)
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for a in arrays:
        a.setflags(write=False)
    return arrays  # type: ignore[return-value]


class MNIST1DDataModule(InMemoryDataModule):
    """MNIST-1D: 1-D signals of length 40 made from 10 digit templates, 4000 train / 1000 test.

    Greydanus, S. (2020). *Scaling down deep learning* (arXiv:2011.14439), the MNIST-1D dataset.
    The data is generated in memory with ``mnist1d.data.make_dataset`` and its default
    arguments (5000 samples, seed 42, length 40), never downloaded; it takes under a second,
    so it is not cached on disk (``data_dir`` and ``download`` are unused). Inputs are
    float32 of shape ``(N, 1, 40)``, already centred and scaled to unit std by the generator.
    """

    name = "mnist1d"
    num_classes = 10
    input_shape = (1, 40)

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x, y, x_test, y_test = _mnist1d_arrays()
        return (
            torch.tensor(x, dtype=torch.float32).unsqueeze(1),
            torch.tensor(y, dtype=torch.int64),
            torch.tensor(x_test, dtype=torch.float32).unsqueeze(1),
            torch.tensor(y_test, dtype=torch.int64),
        )


class DigitsDataModule(InMemoryDataModule):
    """The UCI optical recognition of handwritten digits dataset, 8x8 images of 0-9.

    Alpaydin, E. & Kaynak, C. (1998). *Optical Recognition of Handwritten Digits*, UCI Machine
    Learning Repository (doi:10.24432/C50P49), as bundled with scikit-learn
    (``sklearn.datasets.load_digits``; 1797 samples). There is no official split: a fixed
    stratified 80/20 train/test split with ``random_state=42`` is used (1437 / 360). Pixels
    (0-16) are scaled to [0, 1] and then normalised with the train split's mean and std.
    """

    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)
    test_size = 0.2
    split_seed = 42

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x / 16.0, y, test_size=self.test_size, random_state=self.split_seed, stratify=y
        )
        mean, std = x_train.mean(), x_train.std()

        def to_x(a: np.ndarray) -> Tensor:
            return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)

        return (
            to_x(x_train),
            torch.tensor(y_train, dtype=torch.int64),
            to_x(x_test),
            torch.tensor(y_test, dtype=torch.int64),
        )
