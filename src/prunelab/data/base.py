"""Shared data machinery: argument checks, the seeded validation split, epoch-seeded shuffling
and :class:`TensorBatchLoader`, the batch iterator of the in-memory datasets.

Reproducible shuffling
    Every shuffled order is a function of ``(seed, epoch)`` only: a fresh ``torch.Generator`` is
    seeded from the pair for each epoch. PyTorch Lightning's fit loop calls
    ``dataloader.sampler.set_epoch(epoch)`` at the start of every epoch (see
    ``lightning_fabric.utilities.data._set_sampler_epoch``), so epoch ``e`` sees the same order
    whether training ran straight through or was resumed from a checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from prunelab.errors import ConfigError

log = logging.getLogger(__name__)

# Extra entropy word that separates the train/val split stream from the (seed, epoch) streams.
_SPLIT_STREAM = 0x5B117


def derive_seed(*keys: int) -> int:
    """Mix integer keys such as ``(seed, epoch)`` into one 63-bit seed (numpy SeedSequence)."""
    entropy = [int(k) % 2**64 for k in keys]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffled order of ``range(n)`` for ``epoch``: always the same for the same arguments."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded random hold-out of ``round(n * val_fraction)`` of ``range(n)``.

    Returns ``(train_indices, val_indices)``, both sorted, disjoint and together ``range(n)``.
    """
    n_val = int(round(n * val_fraction))
    if n - n_val < 1:
        raise ConfigError(
            f"val_fraction={val_fraction} leaves no training samples out of {n}; "
            "use a smaller dataset.val_fraction"
        )
    generator = torch.Generator().manual_seed(derive_seed(seed, _SPLIT_STREAM, 0))
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class EpochSampler:
    """Holds the epoch of a loader; Lightning calls :meth:`set_epoch` on it each epoch.

    Until :meth:`set_epoch` is first called, the owning loader advances :attr:`epoch` by one
    after every *complete* pass (an interrupted pass does not count), so plain ``for`` loops
    over several epochs still see a new order each time. Once :meth:`set_epoch` has been called
    the epoch changes only through :meth:`set_epoch`.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.explicit = False

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch (and hence the shuffled order) of the next passes."""
        self.epoch = int(epoch)
        self.explicit = True

    def _finished_pass(self) -> None:
        if not self.explicit:
            self.epoch += 1


class EpochRandomSampler(torch.utils.data.Sampler[int]):
    """A ``RandomSampler`` whose order is :func:`epoch_permutation` of ``(seed, epoch)``.

    Used for the torchvision datasets (CIFAR) so that their shuffling is as reproducible as that
    of :class:`TensorBatchLoader`. Epoch handling is the same as :class:`EpochSampler`'s; under
    DDP Lightning wraps it in a ``DistributedSamplerWrapper``, which forwards ``set_epoch``.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self._epoch = EpochSampler()

    @property
    def epoch(self) -> int:
        return self._epoch.epoch

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch (and hence the order) of the next passes."""
        self._epoch.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        yield from epoch_permutation(self.num_samples, self.seed, self._epoch.epoch).tolist()
        self._epoch._finished_pass()


class TensorBatchLoader:
    """Serve whole batches of in-memory tensors by indexing: no per-sample work, no DataLoader.

    Args:
        x, y: inputs and targets with the same first dimension (kept where they are; usually CPU).
        batch_size: samples per batch; the last batch of a pass may be smaller unless
            ``drop_last``.
        shuffle: draw a new order per epoch from ``torch.Generator`` seeded by ``(seed, epoch)``;
            otherwise the data comes in stored order.
        seed: base seed of the shuffling.
        drop_last: drop the last, incomplete batch of this rank's shard.
        rank, world_size: DDP sharding. The (shared) order is padded by wrapping around to a
            multiple of ``world_size`` (as ``DistributedSampler`` does) and rank ``r`` takes the
            ``r``-th equal contiguous slice, so every rank yields the same number of batches and
            the shards are disjoint whenever ``len(x)`` divides evenly.

    Iterating yields ``(x[idx], y[idx])`` tuples. The epoch lives in ``self.sampler`` (an
    :class:`EpochSampler`), where PyTorch Lightning finds it and calls ``set_epoch``; see that
    class for what happens when nobody calls it. ``batch_sampler`` is ``None`` because
    Lightning looks that attribute up next to ``sampler``. Lightning never replaces this
    loader's sampler (it only does that for ``torch.utils.data.DataLoader``), so the rank
    sharding here is what splits the data under DDP.
    """

    batch_sampler: Any = None

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is not positive; set it to 1 or more")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self.x = x
        self.y = y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.sampler = EpochSampler()

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per pass (before ``drop_last``), padding included."""
        return math.ceil(len(self.x) / self.world_size)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _order(self, epoch: int) -> Tensor | None:
        """Indices of this rank's shard, or None for 'all samples in stored order'."""
        n = len(self.x)
        if not self.shuffle and self.world_size == 1:
            return None
        order = epoch_permutation(n, self.seed, epoch) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            per_rank = self.num_samples
            total = per_rank * self.world_size
            if total > n and n > 0:
                order = order[torch.arange(total) % n]
            order = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order(self.sampler.epoch)
        bs = self.batch_size
        for b in range(len(self)):
            if order is None:  # contiguous views, no copy
                yield self.x[b * bs : (b + 1) * bs], self.y[b * bs : (b + 1) * bs]
            else:
                idx = order[b * bs : (b + 1) * bs]
                yield self.x[idx], self.y[idx]
        self.sampler._finished_pass()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self.x)}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, rank={self.rank}/{self.world_size}, batches={len(self)})"
        )


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"dataset.{name}={value!r} is invalid; set it to an integer >= {minimum}")
    return int(value)


class BaseDataModule(pl.LightningDataModule):
    """Arguments, checks and the seeded train/val split shared by all prunelab datamodules.

    Subclasses set the class attributes :attr:`name`, :attr:`num_classes` and
    :attr:`input_shape` (per sample, no batch dimension), so they are available without I/O.
    """

    name: str = ""
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 2,
        download: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(
                f"unknown option(s) for dataset {self.name}: {', '.join(sorted(unknown))}; "
                "remove them or check their spelling in conf/dataset"
            )
        self.data_dir = str(data_dir)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.eval_batch_size = _check_int("eval_batch_size", eval_batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"dataset.seed={seed!r} is not an integer; set seed to e.g. 0")
        self.seed = int(seed)
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
            raise ConfigError(
                f"dataset.val_fraction={val_fraction!r} is not a number; set it in [0, 1)"
            )
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(
                f"dataset.val_fraction={val_fraction} is outside [0, 1); set it to e.g. 0.1"
            )
        self.val_fraction = float(val_fraction)
        self.download = bool(download)
        self.train_indices: Tensor | None = None
        self.val_indices: Tensor | None = None

    # -- hooks subclasses may override -------------------------------------------------------
    def check_available(self) -> None:
        """Cheaply check the data can be had; raise :class:`ConfigError` if not."""

    def prepare_data(self) -> None:
        """Download if the data is missing and ``download`` is on (rank 0 only under DDP)."""

    # -- helpers -----------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _split(self, n: int) -> tuple[Tensor, Tensor]:
        self.train_indices, self.val_indices = split_indices(n, self.val_fraction, self.seed)
        return self.train_indices, self.val_indices

    def _require_setup(self, data: object) -> None:
        if data is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before using the data")

    @property
    def num_train_samples(self) -> int:
        """Training samples after the validation hold-out, over all ranks (after setup)."""
        raise NotImplementedError


class InMemoryDataModule(BaseDataModule):
    """A datamodule whose whole dataset lives in memory as tensors, served by
    :class:`TensorBatchLoader`. Subclasses implement :meth:`_load`."""

    _data: dict[str, tuple[Tensor, Tensor]] | None = None  # set by setup()

    def _load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(x_train, y_train, x_test, y_test)``: float32 inputs of shape
        ``(N, *input_shape)`` and int64 labels."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load once and split; later calls (any stage) do nothing."""
        if self._data is not None:
            return
        x_train, y_train, x_test, y_test = self._load()
        for x, y in ((x_train, y_train), (x_test, y_test)):
            if tuple(x.shape[1:]) != self.input_shape or len(x) != len(y):
                raise RuntimeError(
                    f"{self.name}: loaded x{tuple(x.shape)} / y{tuple(y.shape)}, expected "
                    f"(N, {self.input_shape}) / (N,)"
                )
        train_idx, val_idx = self._split(len(x_train))
        self._data = {
            "train": (x_train[train_idx].contiguous(), y_train[train_idx].contiguous()),
            "val": (x_train[val_idx].contiguous(), y_train[val_idx].contiguous()),
            "test": (x_test.contiguous(), y_test.contiguous()),
        }
        log.info(
            "%s: %d train / %d val / %d test samples in memory",
            self.name,
            len(train_idx),
            len(val_idx),
            len(x_test),
        )

    def _tensors(self, split: str) -> tuple[Tensor, Tensor]:
        self._require_setup(self._data)
        assert self._data is not None
        return self._data[split]

    @property
    def num_train_samples(self) -> int:
        return len(self._tensors("train")[0])

    @property
    def num_val_samples(self) -> int:
        return len(self._tensors("val")[0])

    @property
    def num_test_samples(self) -> int:
        return len(self._tensors("test")[0])

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> TensorBatchLoader:
        x, y = self._tensors(split)
        rank, world_size = self._rank_world()
        return TensorBatchLoader(
            x, y, batch_size, shuffle=shuffle, seed=self.seed, rank=rank, world_size=world_size
        )

    def train_dataloader(self) -> TensorBatchLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> TensorBatchLoader:
        """Held-out part of the training set; zero batches when ``val_fraction`` is 0."""
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> TensorBatchLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
