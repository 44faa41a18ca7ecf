"""L0 regularisation: learned hard-concrete gates, folded into the weights as a fixed mask."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruningMethod, topk_mask
from prunelab.sparsity.distributions import dense_layers
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks
from prunelab.sparsity.schedules import SparsitySchedule

log = logging.getLogger(__name__)

GRANULARITIES = ("weight", "neuron")
# The uniform noise of a gate sample is drawn from [EPSILON, 1 - EPSILON] (as the reference).
EPSILON = 1e-6
# log_alpha is kept inside [log 1e-2, log 1e2] (the reference clamps it after every step).
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)


class HardConcreteGates(nn.Module):
    """Hard-concrete gates (Louizos et al. 2018, section 4) on a set of weights.

    One ``log_alpha`` tensor per gated weight: shaped like the weight (``weight``
    granularity) or one value per output row / output channel (``neuron``: shape
    ``(out, 1, ..., 1)``). A gate is ``z = min(1, max(0, s (zeta - gamma) + gamma))`` with
    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, ``u ~ U(0, 1)``, one sample per
    gate per forward pass in training; in evaluation ``s = sigmoid(log_alpha)``.

    The gates act through forward hooks on the layers that own the weights: before a gated
    layer's forward, an instance attribute of the same name shadows the weight with
    ``weight * z`` (Python finds it before nn.Module's parameter lookup); after the forward
    the shadow is removed. The weight Parameter, its name and the model's state dict are
    untouched, so the sparsity engine keeps its Parameter objects and checkpoints keep their
    keys. :meth:`fold` ends the gating: the hooks go and this module's state dict becomes
    empty, so the finished model loads into a plain one; loading a state dict without the
    gates' keys (saved after the fold) marks the gates folded again.
    """

    def __init__(
        self,
        targets: dict[str, tuple[nn.Module, str]],
        shapes: dict[str, tuple[int, ...]],
        granularity: str = "weight",
        droprate_init: float = 0.5,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
    ) -> None:
        super().__init__()
        self.names = list(targets)
        self.index = {name: i for i, name in enumerate(self.names)}
        # Plain lists, not registered: the layers belong to the model, not to the gates.
        self._targets = [targets[name] for name in self.names]
        self.granularity = granularity
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        # log_alpha - beta * log(-gamma / zeta) is the logit of P(z != 0).
        self._open_shift = self.beta * math.log(-self.gamma / self.zeta)
        mean = math.log(1.0 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.ParameterList()
        self.group_sizes: list[int] = []
        for name in self.names:
            shape = tuple(shapes[name])
            gate_shape = shape if granularity == "weight" else (shape[0],) + (1,) * (len(shape) - 1)
            self.log_alpha.append(nn.Parameter(torch.randn(gate_shape) * 1e-2 + mean))
            self.group_sizes.append(math.prod(shape) // math.prod(gate_shape))
        self.n_weights = sum(math.prod(shapes[name]) for name in self.names)
        self.folded = False
        self._handles: list[Any] = []
        self.register_state_dict_post_hook(HardConcreteGates._drop_when_folded)
        self.register_load_state_dict_pre_hook(HardConcreteGates._load_or_fold)
        self._install()

    # -- gate values ------------------------------------------------------------------------
    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(self, index: int) -> torch.Tensor:
        """A stochastic gate for layer ``index``: one draw per gate (training)."""
        log_alpha = self.log_alpha[index]
        # log u - log(1 - u), u ~ U(EPSILON, 1 - EPSILON): logistic noise.
        noise = torch.logit(torch.rand_like(log_alpha), eps=EPSILON)
        return self._stretch(torch.sigmoid((noise + log_alpha) / self.beta))

    def deterministic(self, index: int) -> torch.Tensor:
        """The test-time gate ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``."""
        return self._stretch(torch.sigmoid(self.log_alpha[index]))

    def open_probability(self, index: int) -> torch.Tensor:
        """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))`` per gate."""
        return torch.sigmoid(self.log_alpha[index] - self._open_shift)

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero gated weights: each gate's probability of being
        non-zero times the number of weights it gates."""
        return sum(self.open_probability(i).sum() * size for i, size in enumerate(self.group_sizes))

    # -- hooks ------------------------------------------------------------------------------
    def _install(self) -> None:
        if self._handles:
            return
        for i, (module, _) in enumerate(self._targets):
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._gate, i)))
            self._handles.append(
                module.register_forward_hook(functools.partial(self._ungate, i), always_call=True)
            )

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _gate(self, index: int, module: nn.Module, args: Any) -> None:
        attr = self._targets[index][1]
        weight = module._parameters[attr]
        if module.training:
            # The reference clamps log_alpha after every optimizer step; here it happens
            # before the step's forward pass, which is the same for one forward per step.
            with torch.no_grad():
                self.log_alpha[index].clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
            gate = self.sample(index)
        else:
            gate = self.deterministic(index)
        module.__dict__[attr] = weight * gate

    def _ungate(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        module.__dict__.pop(self._targets[index][1], None)

    # -- folding and persistence ------------------------------------------------------------
    def set_folded(self, folded: bool) -> None:
        """Stop (True) or resume (False) gating the weights in forward."""
        self.folded = bool(folded)
        if self.folded:
            self._remove()
        else:
            self._install()

    @torch.no_grad()
    def fold(self, params: Params) -> dict[str, torch.Tensor]:
        """Multiply every gated weight by its deterministic gate and stop gating; returns the
        per-layer bool masks ``gate != 0``, shaped like the weights."""
        masks = {}
        for i, name in enumerate(self.names):
            gate = self.deterministic(i)
            params[name].mul_(gate.to(params[name].dtype))
            masks[name] = (gate != 0).expand_as(params[name]).clone()
        self.set_folded(True)
        return masks

    @staticmethod
    def _drop_when_folded(
        module: HardConcreteGates, state_dict: dict[str, Any], prefix: str, metadata: Any
    ) -> None:
        if module.folded:
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]

    @staticmethod
    def _load_or_fold(
        module: HardConcreteGates, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        keys = [f"{prefix}log_alpha.{i}" for i in range(len(module.log_alpha))]
        if keys and not any(key in state_dict for key in keys):
            # Saved after the fold: the weights hold the gates already, nothing to restore.
            for key, log_alpha in zip(keys, module.log_alpha, strict=True):
                state_dict[key] = log_alpha.detach().clone()
            module.set_folded(True)
        else:
            module.set_folded(False)


class L0Regularization(PruningMethod):
    """L0-regularised training with hard-concrete gates, then the deterministic gates as the
    final mask.

    Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
    Regularization" (ICLR; reference code AMLab-Amsterdam/L0_regularization). Every prunable
    weight not kept dense gets a learned gate (``granularity=weight``) or every output row
    of a Linear weight / output channel of a conv weight shares one (``neuron``). In
    training the weights are multiplied by stochastic hard-concrete gates (``beta``,
    ``gamma``, ``zeta``; ``log_alpha`` starts at ``log((1 - droprate_init) /
    droprate_init)`` plus N(0, 0.01²) noise) and the loss gains ``l0_lambda * E[L0] / W``:
    the expected number of non-zero gated weights over the number W of gated weights, i.e.
    the expected density of the gated layers, so ``l0_lambda`` does not scale with the model
    or the data (the reference's per-gate ``lamba / N`` is ``l0_lambda = lamba * W / N`` at
    ``granularity=weight``). Evaluation uses the deterministic gates
    ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``.

    The gates are parameters of their own (:class:`HardConcreteGates`, returned by
    :meth:`attach`, trained by the run's optimizer without weight decay, see
    :meth:`parameter_groups`). The engine's masks stay dense while the gates train; at the
    last optimizer step (``schedule=fixed``, the default) or at ``schedule.at`` /
    ``schedule.at_epoch`` (``schedule=one_shot``: the rest of training fine-tunes the
    surviving weights with the mask fixed and no penalty) the deterministic gates are folded
    into the weights and the mask ``gate != 0`` goes to the engine, so from then on the model
    is an ordinary masked one. The folding step's optimizer update is not taken
    (``update_step=skip``): the weights are then exactly the gated weights the last
    evaluation saw. The sparsity reached is whatever the gates learned: :meth:`at_target` is
    true only if it is at least the target, and the fold logs the distance (see
    :meth:`report`); ``prune_to_target=true`` then prunes the smallest folded magnitudes of
    the surviving weights (whole rows at ``granularity=neuron``) until the target is met.
    """

    name = "l0"
    schedule_kinds = ("fixed", "one_shot")

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        l0_lambda: float = 1.0,
        granularity: str = "weight",
        droprate_init: float = 0.5,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        prune_to_target: bool = False,
        gate_lr: float | None = None,
        update_step: str = "skip",
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, update_step=update_step, **options)
        self.l0_lambda = _number("l0_lambda", l0_lambda, ">= 0", lambda v: v >= 0, "1.0")
        if granularity not in GRANULARITIES:
            raise ConfigError(
                f"pruning.granularity must be one of {', '.join(GRANULARITIES)}, got "
                f"{granularity!r}; e.g. pruning.granularity=neuron"
            )
        self.granularity = str(granularity)
        self.droprate_init = _number(
            "droprate_init", droprate_init, "in (0, 1)", lambda v: 0 < v < 1, "0.5"
        )
        self.beta = _number("beta", beta, "> 0", lambda v: v > 0, "0.6667")
        self.gamma = _number("gamma", gamma, "< 0", lambda v: v < 0, "-0.1")
        self.zeta = _number("zeta", zeta, "> 1", lambda v: v > 1, "1.1")
        if not isinstance(prune_to_target, bool):
            raise ConfigError(
                f"pruning.prune_to_target must be true or false, got {prune_to_target!r}"
            )
        self.prune_to_target = prune_to_target
        # The gates' own learning rate (None: the optimizer's). With SGD the gates of a large
        # layer move by lr * l0_lambda / W per step from the penalty: far too little at the
        # weights' learning rate (Adam, as in the paper, is scale-free).
        self.gate_lr = (
            None if gate_lr is None else _number("gate_lr", gate_lr, "> 0", lambda v: v > 0, "10.0")
        )
        self.gates: HardConcreteGates | None = None
        # What the fold found, for the run's log and report (empty before the fold).
        self.fold_summary: dict[str, Any] = {}

    # -- trainable state --------------------------------------------------------------------
    def attach(self, model: nn.Module, params: dict[str, nn.Parameter]) -> HardConcreteGates:
        """Create the gates of ``params`` (the engine's prunable weights of ``model``, minus
        the kept-dense layers) and hook them into the layers that own the weights. Call it
        once, before the optimizer is built and before a checkpoint is loaded: the owner
        registers the returned module as a submodule (saved and restored with its state
        dict). Calling it again returns the same gates."""
        if self.gates is not None:
            return self.gates
        owners: dict[int, tuple[nn.Module, str]] = {}
        for module in model.modules():
            for attr, param in module.named_parameters(recurse=False):
                owners.setdefault(id(param), (module, attr))
        dense = dense_layers(list(params), self.dense_first, self.dense_last)
        targets: dict[str, tuple[nn.Module, str]] = {}
        for name, param in params.items():
            if name in dense:
                continue
            if id(param) not in owners:
                raise ValueError(f"pruning=l0: the weight '{name}' is not a parameter of the model")
            targets[name] = owners[id(param)]
        self.gates = HardConcreteGates(
            targets,
            {name: tuple(params[name].shape) for name in targets},
            self.granularity,
            self.droprate_init,
            self.beta,
            self.gamma,
            self.zeta,
        ).to(next(iter(params.values())).device if params else "cpu")
        return self.gates

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer group of the gates (no weight decay), or none before :meth:`attach`."""
        if self.gates is None:
            return []
        group: dict[str, Any] = {"params": list(self.gates.parameters()), "weight_decay": 0.0}
        if self.gate_lr is not None:
            group["lr"] = self.gate_lr
        return [group]

    def _require_gates(self) -> HardConcreteGates:
        if self.gates is None:
            raise RuntimeError(
                "pruning=l0: the gates are not attached; call method.attach(model, params) "
                "before training (the Lightning module does it in setup)"
            )
        return self.gates

    @property
    def folded(self) -> bool:
        """Whether the gates have been folded into the weights (the mask is final)."""
        return self.gates is not None and self.gates.folded

    # -- template ---------------------------------------------------------------------------
    def build_schedule(self) -> None:
        """One update, the fold: at the last optimizer step (``fixed``) or at ``schedule.at``
        / ``schedule.at_epoch`` (``one_shot``), the rest of training then fine-tuning the
        surviving weights with the mask fixed and no penalty."""
        if self.schedule_cfg.get("kind") == "one_shot":
            step = self._step_of("at", 0.5)
        else:
            step = max(0, self.total_steps - 1)
        self.schedule = SparsitySchedule(kind="one_shot", begin_step=step, end_step=step)

    def fold_step(self) -> int:
        """The optimizer step before which the gates are folded."""
        return self.schedule.begin_step

    def is_update_step(self, step: int) -> bool:
        return step >= self.fold_step() and not self.folded

    def penalty(self, params: Params, step: int) -> torch.Tensor | None:
        """``l0_lambda * E[L0] / W`` until the fold, nothing after."""
        gates = self._require_gates()
        if gates.folded or self.l0_lambda == 0.0 or not gates.n_weights:
            return None
        return self.l0_lambda * gates.expected_l0() / gates.n_weights

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        """Fold the deterministic gates into the weights; the mask is ``gate != 0`` (and,
        with ``prune_to_target``, the target's count of the largest surviving weights)."""
        gates = self._require_gates()
        before = self.report(masks)
        gate_masks = gates.fold(params)
        new = Masks({n: (m & gate_masks[n]) if n in gate_masks else m for n, m in masks.items()})
        gate_sparsity = self._sparsity(new)
        if self.prune_to_target and gate_sparsity < self.sparsity_target():
            new = self._prune_to_target(params, new, ctx)
        self.fold_summary = {
            "step": step,
            "expected_density": before["expected_density"],
            "gate_sparsity": gate_sparsity,
            **self.report(new),
        }
        self._log_fold()
        return new

    def at_target(self, masks: Masks) -> bool:
        """True once the gates are folded and the masks are at least as sparse as the target
        (within one weight per layer)."""
        return self.folded and super().at_target(masks)

    # -- reporting --------------------------------------------------------------------------
    def _budget_names(self, masks: Masks) -> list[str]:
        if self.budget == "pruned":
            return [n for n in masks if n not in self.dense]
        return list(masks)

    def _sparsity(self, masks: Masks) -> float:
        names = self._budget_names(masks)
        return masks.sparsity(names) if names else 0.0

    @torch.no_grad()
    def report(self, masks: Masks) -> dict[str, Any]:
        """Where the run stands: the target sparsity (over the layers ``budget`` counts), the
        masks' sparsity and its distance to the target (realised - target), whether that is
        at the target, and before the fold the expected density of the gated weights and the
        sparsity the deterministic gates would give now (``gate_sparsity``)."""
        target = self.sparsity_target()
        realised = self._sparsity(masks)
        out: dict[str, Any] = {
            "folded": self.folded,
            "target": target,
            "realised": realised,
            "distance": realised - target,
            "at_target": self.at_target(masks),
        }
        if self.gates is not None and not self.gates.folded:
            gates = self.gates
            zeros = sum(
                int((gates.deterministic(i) == 0).sum()) * size
                for i, size in enumerate(gates.group_sizes)
            )
            names = self._budget_names(masks)
            total = sum(masks[n].numel() for n in names)
            out["expected_density"] = float(gates.expected_l0()) / max(gates.n_weights, 1)
            out["gate_sparsity"] = zeros / max(total, 1)
        return out

    def _log_fold(self) -> None:
        s = self.fold_summary
        pruned = " after pruning to the target" if s["realised"] > s["gate_sparsity"] else ""
        message = (
            f"pruning=l0: gates folded at step {s['step']}; sparsity {s['realised']:.4f}{pruned} "
            f"(deterministic gates alone {s['gate_sparsity']:.4f}), target {s['target']:.4f}, "
            f"distance {s['distance']:+.4f}"
        )
        if s["at_target"]:
            log.info(message)
        else:
            log.warning(
                "%s: below the target, so no epoch competes for val/acc_best or best.ckpt; "
                "raise pruning.l0_lambda or set pruning.prune_to_target=true",
                message,
            )

    # -- pruning to the target --------------------------------------------------------------
    @torch.no_grad()
    def _prune_to_target(self, params: Params, masks: Masks, ctx: Context) -> Masks:
        """Keep the distribution's count per layer of the largest folded magnitudes among the
        surviving weights (never reviving one). At ``granularity=neuron`` rows are ranked by
        their norm and a layer keeps whole rows, rounding its count down (so the target is
        met or exceeded by less than one row per layer)."""
        scores: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            weight = params[name].detach().float().abs()
            if self.granularity == "neuron" and name not in self.dense:
                rows = weight.flatten(1).norm(dim=1)
                weight = rows.view(-1, *(1,) * (weight.dim() - 1)).expand_as(weight)
            scores[name] = torch.where(mask, weight, torch.full_like(weight, -1.0))
        counts = self.keep_counts(
            self.sparsity, scores=scores, generator=ctx.generator(-1, "ties-global")
        )
        new: dict[str, torch.Tensor] = {}
        for i, (name, mask) in enumerate(masks.items()):
            if name in self.dense:
                new[name] = mask
                continue
            keep = min(counts[name], int(mask.sum()))
            generator = self.tie_generator(ctx, i, "prune")
            if self.granularity == "neuron":
                row_scores = scores[name].flatten(1)[:, 0]
                row_size = mask[0].numel()
                rows = topk_mask(row_scores, keep // row_size, generator)
                new[name] = rows.view(-1, *(1,) * (mask.dim() - 1)).expand_as(mask) & mask
            else:
                new[name] = topk_mask(scores[name], keep, generator)
        return Masks(new)


def _number(
    key: str, value: Any, bounds: str, valid: Callable[[float], bool], example: str
) -> float:
    """``value`` as a float if it is a finite number that ``valid`` accepts, else a one-line
    ConfigError naming ``pruning.<key>``, its ``bounds`` and an ``example``."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not (number and math.isfinite(value) and valid(float(value))):
        raise ConfigError(
            f"pruning.{key} must be a number {bounds}, got {value!r}; e.g. pruning.{key}={example}"
        )
    return float(value)
