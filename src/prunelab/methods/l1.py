"""Penalty-based pruning: an L1 term drives weights towards zero, then one magnitude cut."""

from __future__ import annotations

from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import MagnitudePruning, Params


class L1Penalty(MagnitudePruning):
    """L1-regularised training, then magnitude pruning to the target and a fine-tune.

    Han et al. 2015, "Learning both weights and connections for efficient neural networks"
    (section 3.1: L1 regularisation before pruning leaves more weights near zero, so the
    magnitude cut costs less accuracy before retraining). Until the pruning step
    (``schedule.at`` / ``schedule.at_epoch``) the loss gains ``l1 * sum(|w|)`` over the
    prunable weights; at that step the smallest magnitudes are removed at once (one global
    threshold by default) to reach ``sparsity``; the rest of training fine-tunes the
    surviving weights with the mask fixed and no penalty (Han et al. retrain without it).
    """

    name = "l1"
    schedule_kinds = ("one_shot",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        l1: float = 1e-5,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if isinstance(l1, bool) or not isinstance(l1, (int, float)) or l1 < 0:
            raise ConfigError(f"pruning.l1 must be a number >= 0, got {l1!r}; e.g. pruning.l1=1e-5")
        self.l1 = float(l1)

    def penalty(self, params: Params, step: int) -> torch.Tensor | None:
        """``l1 * sum |w|`` before the pruning step, nothing after."""
        if self.l1 == 0.0 or step >= self.schedule.begin_step:
            return None
        return self.l1 * sum(p.abs().sum() for p in params.values())
