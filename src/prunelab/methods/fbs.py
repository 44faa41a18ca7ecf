"""Feature Boosting and Suppression: input-adaptive channel pruning (Gao et al. 2019)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from prunelab.dynamic.gates import GATINGS, FBSGates
from prunelab.dynamic.plan import gate_points
from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruningMethod, positive_int
from prunelab.sparsity.masks import Masks

# |sparsity - (1 - density)| tolerated when both are given.
DENSITY_TOLERANCE = 1e-6


def _finite(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(float(value))
    )


class FeatureBoostingSuppression(PruningMethod):
    """``pruning=fbs``: Gao, Zhao, Dudziak, Mullins & Xu 2019, "Dynamic Channel Pruning:
    Feature Boosting and Suppression" (ICLR). Nothing is pruned from the weights: each conv
    gets a small saliency predictor that decides, per input, which of its output channels
    are computed (:mod:`prunelab.dynamic.gates`); the kept channels are scaled by their
    saliency (boosting), the others are zero (suppression) and need not be computed, nor the
    next layer's inputs that read them (:mod:`prunelab.dynamic.executor`).

    **Options.** ``density`` ``d`` in (0, 1]: the fraction of each gated conv's output
    channels kept per input (``gating=topk``: exactly ``k = ceil(d C)``, the paper's
    k-winners-take-all) or kept on average (``gating=threshold``). ``sparsity`` is the
    fraction *removed*, ``1 - d``; ``density=None`` (the default) takes ``d = 1 - sparsity``,
    and a ``density`` that contradicts ``sparsity`` is a ConfigError. (``sparsity`` here counts
    output channels, not weights: no weight is zero, and a middle layer whose input is gated
    too spends about ``d**2`` of its MACs.) ``l1_lambda``: weight of the paper's L1 penalty on
    the saliencies, ``l1_lambda * sum over gated convs of mean over the batch of ||g||_1``.
    ``gating=threshold``: channel gating with a per-layer threshold on the saliency, so the
    number of channels varies per input; ``threshold=None`` calibrates it from the top-k
    statistics of training batches by an exponential moving average (``threshold_decay``),
    as the reference implementation's ``threshold: local`` mode does; a number is an absolute
    threshold for every layer (``sparsity`` and ``density`` then decide nothing, and the
    record's target is ``null``, as for a magnitude threshold). ``mac_samples``: test inputs
    over which the run's record averages the MACs (None: the whole test split);
    ``latency_samples``: inputs timed at batch 1.

    **Deviations from the paper** (and its reference code, deep-fry/mayo):

    - the model is trained from scratch with its gates (the paper fine-tunes a trained
      network, warming the predictors up with the network frozen first);
    - the predictor reads the global *average* of each input channel (the reference's
      default ``pool: avg``; the paper writes the mean absolute value, equal after a ReLU);
    - the gate multiplies the output of the BatchNorm that follows the conv, which keeps its
      own scale ``gamma`` (the paper replaces ``gamma`` by the saliency; here the two
      multiply), or the conv's output (with its bias) where no BatchNorm follows (Conv-4,
      LeNet-5: the paper's networks all have one); every conv with ``groups=1`` is gated,
      the first one and residual projections included;
    - the L1 penalty covers all saliencies, as the paper writes it (the reference code masks
      it to the kept ones) and is averaged over the batch (the reference sums over it);
    - exact top-k ties are broken as ``torch.topk`` breaks them; a kept channel whose saliency
      is 0 is not computed (it would be multiplied by 0);
    - the threshold's moving average starts at the first batch's value (the reference starts
      at -0.1) and decays by 0.9 per step by default (the reference: 0.9997, for far longer
      training; with 0.99 a run of a hundred steps still averages in its first batches, whose
      saliencies differ from the final ones, and keeps far fewer channels than ``density``).
    """

    name = "fbs"
    schedule_kinds = ("fixed",)
    # sparsity=0 (density 1) is boosting without suppression: every channel computed, each
    # scaled by its saliency.
    allows_zero_sparsity = True
    input_adaptive = True

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        density: float | None = None,
        gating: str = "topk",
        threshold: float | None = None,
        threshold_decay: float = 0.9,
        l1_lambda: float = 1e-5,
        mac_samples: int | None = None,
        latency_samples: int = 32,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if gating not in GATINGS:
            raise ConfigError(
                f"pruning.gating must be one of {', '.join(GATINGS)}, got {gating!r}; "
                "e.g. pruning.gating=threshold"
            )
        self.gating = str(gating)
        if density is not None and not (_finite(density) and 0.0 < float(density) <= 1.0):
            raise ConfigError(
                f"pruning.density must be a number in (0, 1], got {density!r}; "
                "e.g. pruning.density=0.5"
            )
        if threshold is not None and not (_finite(threshold) and float(threshold) >= 0.0):
            raise ConfigError(
                f"pruning.threshold must be null (calibrated) or a number >= 0, got "
                f"{threshold!r}; e.g. pruning.threshold=0.5"
            )
        if threshold is not None and self.gating != "threshold":
            raise ConfigError(
                "pruning.threshold works with pruning.gating=threshold, not topk; set "
                "pruning.gating=threshold or pruning.threshold=null"
            )
        if threshold is not None and density is not None:
            raise ConfigError(
                f"pruning.threshold={threshold} decides the channels kept, so "
                f"pruning.density={density} would be ignored; set one of them to null"
            )
        if density is not None and abs(float(density) - (1.0 - self.sparsity)) > DENSITY_TOLERANCE:
            raise ConfigError(
                f"pruning.density={density} keeps {float(density):g} of the channels but "
                f"sparsity={self.sparsity:g} removes {self.sparsity:g} (sparsity = 1 - density "
                f"for fbs); set sparsity={1.0 - float(density):g} or pruning.density=null"
            )
        self.density = 1.0 - self.sparsity if density is None else float(density)
        if not _finite(threshold_decay) or not 0.0 < float(threshold_decay) < 1.0:
            raise ConfigError(
                f"pruning.threshold_decay must be a number in (0, 1), got {threshold_decay!r}; "
                "e.g. pruning.threshold_decay=0.9"
            )
        self.threshold_decay = float(threshold_decay)
        if not _finite(l1_lambda) or float(l1_lambda) < 0:
            raise ConfigError(
                f"pruning.l1_lambda must be a number >= 0, got {l1_lambda!r}; "
                "e.g. pruning.l1_lambda=1e-5"
            )
        self.l1_lambda = float(l1_lambda)
        # A fixed threshold is reported as magnitude thresholds are (train._target).
        self.threshold = None if threshold is None else float(threshold)
        self.threshold_mode = "absolute"
        self.mac_samples = (
            None if mac_samples is None else positive_int("mac_samples", mac_samples, 1000)
        )
        self.latency_samples = positive_int("latency_samples", latency_samples, 32)
        self.gates: FBSGates | None = None
        # The measured mean executed density (set by dynamic_cost), for the report.
        self.measured: dict[str, Any] = {}

    # -- the model ------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """A one-line ConfigError unless ``model`` has a conv layer the gates can go on."""
        if not any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules()):
            raise ConfigError(
                f"pruning=fbs gates convolution channels, and model {type(model).__name__} "
                "has no convolution; choose a CNN (e.g. model=conv4, lenet5, resnet20, vgg16, "
                "wrn22_2)"
            )
        if not gate_points(model):
            raise ConfigError(
                f"pruning=fbs found no conv layer to gate in {type(model).__name__} (each "
                "must have groups=1 and be called once per forward)"
            )

    def attach(self, model: nn.Module, params: dict[str, nn.Parameter]) -> FBSGates:
        """Create the saliency predictors of ``model``'s convs and hook the gates into it
        (once; the caller registers the returned module so that it is saved and moved with
        the model). Calling it again returns the same gates."""
        if self.gates is not None:
            return self.gates
        self.check_model(model)
        points = gate_points(model)
        device = next(model.parameters()).device
        self.gates = FBSGates(
            points,
            dict(model.named_modules()),
            self.density,
            self.gating,
            self.threshold,
            self.threshold_decay,
        ).to(device)
        return self.gates

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer group of the saliency predictors (none before :meth:`attach`)."""
        if self.gates is None:
            return []
        return [{"params": list(self.gates.parameters())}]

    # -- template -------------------------------------------------------------------------------
    def penalty(self, params: Params, step: int) -> torch.Tensor | None:
        """``l1_lambda`` x the summed (over gates) batch-mean L1 norm of the saliencies of
        the last training forward."""
        if self.gates is None or self.l1_lambda == 0.0:
            return None
        l1 = self.gates.l1()
        return None if l1 is None else self.l1_lambda * l1

    def at_target(self, masks: Masks) -> bool:
        """Always: the gating is in force from the first step (no weight is pruned)."""
        return True

    def report(self, masks: Masks) -> dict[str, Any]:
        """The gating and its target: ``density`` (kept fraction of each gated conv's output
        channels), ``gating``, the fixed ``threshold`` (or null) and, once measured
        (:meth:`dynamic_cost`), the mean executed density; the calibrated thresholds."""
        out: dict[str, Any] = {
            "gating": self.gating,
            "density": None if self.threshold is not None else self.density,
            "target": None if self.threshold is not None else 1.0 - self.density,
            "threshold": self.threshold,
            "gated_convs": [p.conv for p in self.gates.points] if self.gates else [],
            "l1_lambda": self.l1_lambda,
        }
        if self.gates is not None and self.gating == "threshold":
            out["thresholds"] = [round(float(t), 6) for t in self.gates.thresholds]
        out.update(self.measured)
        return out

    # -- cost -----------------------------------------------------------------------------------
    def dynamic_cost(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        batches: Iterable[Any],
        measure_latency: bool = True,
    ) -> dict[str, Any]:
        """The run's dynamic cost (:func:`prunelab.dynamic.report.dynamic_cost_report`) on
        ``batches`` (the test split), ``mac_samples`` and ``latency_samples`` inputs."""
        from prunelab.dynamic.report import dynamic_cost_report

        if self.gates is None:
            raise RuntimeError("pruning=fbs: the gates are not attached")
        report = dynamic_cost_report(
            model,
            self.gates,
            input_shape,
            batches,
            samples=self.mac_samples,
            measure_latency=measure_latency,
            latency_samples=self.latency_samples,
        )
        self.measured = {
            "realised_density": report["dynamic_density_mean"],
            "realised": 1.0 - report["dynamic_density_mean"],
        }
        return report


__all__ = ["FeatureBoostingSuppression"]
