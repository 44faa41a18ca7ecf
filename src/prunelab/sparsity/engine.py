"""The engine that owns one model's masks and keeps the invariants of sparse training.

Invariants (each has a test):

- pruned weights are exactly zero after every optimizer step: the masks are re-applied in an
  optimizer step post-hook, so momentum, Adam moments and weight decay cannot bring a pruned
  weight back. The post-hook skips that pass only where it provably changes nothing: for
  SGD, Adam and AdamW (exactly those classes), which leave a weight where it is when its
  gradient and its per-element state are zero, once the gradients of that very step were
  masked here, and after a first step under the current optimizer and masks that re-applied
  the masks and zeroed the optimizer state of every pruned weight (mask updates keep both
  zero: dropped weights and their state are zeroed, and only the methods that mask
  gradients and zero state at changed or inactive weights qualify);
- gradients of pruned weights are zeroed before the step (after the method has seen the
  dense gradients it needs, e.g. RigL's grow scores);
- optimizer state (momentum, Adam moments) is zeroed at positions that were just dropped or
  grown, so a regrown weight starts at zero with no stale history;
- a grown weight ends its update step at exactly zero with zero optimizer state: by default
  (``update_step=masked``) its gradient is masked in that step; ``skip`` undoes the whole
  optimizer step on update steps (google-research/rigl); ``dense`` lets it train at once;
- with Adam/AdamW and ``adam_bias_correction=per_weight``, a regrown weight is bias-corrected
  by its own step count, so its updates equal those of a fresh Adam (the default,
  ``per_tensor``, keeps torch's per-tensor count, as the reference implementations do);
- a mask update whose dense gradients are not finite (an AMP overflow step) is skipped and
  counted, for methods that read gradients;
- random choices are seeded from (seed, step, layer), so every DDP rank makes the same
  choice without communication;
- masks, the ever-active set and the update history round-trip through ``state_dict``, and
  so does the method's own state when it has one (``method.state_dict()``).

Methods that keep pruned values (``keeps_pruned_values = True``, Dynamic Network Surgery)
train a full-precision copy of the weights under the mask instead of zeroing pruned weights
for good. The engine then keeps a *shadow* ``W`` of every prunable weight (on the weight's
device and in its dtype) and the parameter holds ``W ⊙ T`` (``T`` the mask) in forward and
backward, so the gradient is that of the masked forward. In :meth:`before_optimizer_step` the
active values of the parameter are copied into the shadow and the full ``W`` is put into the
parameter, so the optimizer updates every entry of ``W``, pruned ones included (gradients are
masked only if the method sets ``mask_gradients``); the step post-hook copies the new ``W``
into the shadow, lets the method compute the new masks from it on update steps (so a mask
update at step ``t`` decides the masks of the forward at ``t + 1``), and writes ``W ⊙ T`` back
into the parameter. Outside that window the parameter's active entries are authoritative and
its pruned entries are exactly zero, as for every other method; should an optimizer step not
run (an AMP overflow step: no post-hook), a forward pre-hook re-applies the mask before the
next forward. The shadow round-trips through ``state_dict``; a checkpoint without one starts
it from the (masked) weights. ``reset_state = "none"`` leaves the optimizer state alone at an
update (pruned weights keep training, so their moments stay meaningful); ``update_step`` and
the Adam per-weight correction concern weights regrown from zero and do not apply.

Pure torch: the Lightning module calls :meth:`before_optimizer_step` from
``on_before_optimizer_step`` and registers :meth:`attach` on its optimizer.

What the engine reads at an update step: the gradients in ``param.grad`` when
``on_before_optimizer_step`` runs — accumulated and DDP-reduced; under AMP with a GradScaler
Lightning unscales them first unless the optimizer is fused, in which case they are still
multiplied by the loss scale. Every score the methods here take from gradients (RigL's |g|)
is a ranking, unchanged by one positive factor, so both give the same masks; an overflow
shows as inf/NaN either way and the update is skipped.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.analysis.diagnostics import has_skip_connections, mask_diagnostics
from prunelab.sparsity.indices import fill_
from prunelab.sparsity.masks import Masks, as_dtype

log = logging.getLogger(__name__)

# A regrown weight's per-tensor and per-weight Adam bias corrections differ by less than
# one part in 1e7 once beta^k < 1e-7: after that the weight needs no correction.
_ADAM_TOLERANCE = 1e-7


def layer_generator(seed: int, step: int, layer: int, stream: str = "") -> torch.Generator:
    """A CPU generator seeded from (seed, step, layer[, stream]): identical on every rank.

    ``stream`` names an independent sequence (e.g. tie-breaking) for the same layer and step.
    """
    key = f"{seed}:{step}:{layer}" + (f":{stream}" if stream else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@dataclass
class Context:
    """What a pruning method may use besides weights and masks."""

    seed: int
    step: int
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # Yields (inputs, targets) batches and the loss function, for data-driven scores (SNIP).
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    model: nn.Module | None = None
    # The optimizer at update steps (its state holds momentum, e.g. for sparse momentum);
    # read it, never step it.
    optimizer: torch.optim.Optimizer | None = None

    def generator(self, layer: int, stream: str = "") -> torch.Generator:
        return layer_generator(self.seed, self.step, layer, stream)


class SparsityEngine:
    """Applies a :class:`~prunelab.methods.base.PruningMethod` to a model's prunable weights."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        method: Any,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.params = dict(params)
        self.method = method
        self.seed = int(seed)
        self.masks: Masks | None = None
        self.ever_active: Masks | None = None
        # One entry per mask change (and one at init): step, global sparsity, turnover, ITOP
        # rate and the per-layer densities in force from that step on.
        self.history: list[dict[str, Any]] = []
        self.n_updates = 0
        self.n_skipped_updates = 0  # update steps skipped for non-finite gradients
        self.last_stats: dict[str, float] = {}
        self.rank_checks = 0  # cross-rank mask agreement checks passed (DDP)
        # _mask_gradients: the masks, the parameters whose gradients they multiply and the
        # masks as factors in their dtype.
        # (Also the masks' version: a mask replaced in place renews the plan.)
        self._grad_plan: tuple[Masks, list[torch.Tensor], list[torch.Tensor], int] | None = None
        self._handles: list[Any] = []
        # Adam per-weight bias correction: for each regrown weight, the optimizer step count
        # (per tensor) before its first own update; 0 = not regrown. Kept sparse.
        self.adam_resets: dict[str, torch.Tensor] = {}
        self._latest_reset = 0
        # update_step=skip: tensors to restore after the step, and params that had no state.
        self._restore: tuple[dict[torch.Tensor, torch.Tensor], list[torch.Tensor]] | None = None
        # keeps_pruned_values: the full-precision weights (None until needed), the update
        # step whose mask update waits for the post-hook, and whether the parameters hold
        # the full weights (between before_optimizer_step and the post-hook).
        self.shadow: dict[str, torch.Tensor] | None = None
        self._pending: tuple[int, dict[str, torch.Tensor | None]] | None = None
        self._full_in_params = False
        # The post-hook's re-masking pass is skipped when it changes nothing (see the module
        # docstring): the attached optimizer qualifies, this step's gradients were masked,
        # and the pruned weights' optimizer state is known to be zero.
        self._remask_free = False
        self._grads_masked = False
        self._pruned_state_zero = False

    # -- set-up -----------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.masks is not None

    @property
    def active(self) -> bool:
        """False for the dense baseline: nothing to mask, the hooks do nothing."""
        return not getattr(self.method, "is_dense", False)

    @property
    def keeps_pruned_values(self) -> bool:
        """True for methods that train the pruned weights on in a shadow copy (DNS)."""
        return self.active and bool(getattr(self.method, "keeps_pruned_values", False))

    def setup(self, total_steps: int, steps_per_epoch: int) -> None:
        """Tell the method how long training is (schedules are fractions of it)."""
        self.method.setup(
            {n: tuple(p.shape) for n, p in self.params.items()}, total_steps, steps_per_epoch
        )

    def initialize(
        self,
        batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Decide the initial masks (dense, random, SNIP, ...) and zero the pruned weights."""
        ctx = Context(self.seed, 0, batches=batches, loss_fn=loss_fn, model=self.model)
        masks = self.method.init_masks(self.params, ctx)
        self.masks = masks.to(self._device())
        if self.keeps_pruned_values:
            self.shadow = {n: p.detach().clone() for n, p in self.params.items()}
        self.masks.apply_(self.params)
        self.ever_active = self.masks.clone()
        self._pruned_state_zero = False
        self._record(step=0, turnover=0.0)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every step of ``optimizer`` (a step post-hook); for
        methods that keep pruned values, also before every forward of the model if the
        parameters still hold the full weights (a step that did not run)."""
        if self.active:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._remask_free = (
            type(optimizer) in _ZERO_PRESERVING
            and not self.keeps_pruned_values
            and bool(getattr(self.method, "mask_gradients", True))
            and getattr(self.method, "reset_state", "changed") in ("changed", "inactive")
        )
        self._pruned_state_zero = False
        if self.keeps_pruned_values and self.model is not None:
            self._handles.append(self.model.register_forward_pre_hook(self._before_forward))

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._full_in_params:
            self._mask_params()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # (Each path that writes tensors runs without autograd: apply_, _correct_adam and
        # the methods keeping pruned values on their own, the restore below.)
        if self.keeps_pruned_values:
            self._after_step_keeping_values(optimizer)
            return
        masked, self._grads_masked = self._grads_masked, False
        if self._restore is not None:  # update_step=skip: undo this step entirely
            saved, stateless = self._restore
            with torch.no_grad():
                for target, value in saved.items():
                    target.copy_(value)
            for param in stateless:  # state the undone step created
                optimizer.state.pop(param, None)
            self._restore = None
            if self.masks is not None:
                self.masks.apply_(self.params)
            return
        if self.masks is not None:
            if not (masked and self._unchanged_by_step(optimizer)):
                self.masks.apply_(self.params)
            if self.adam_resets and _is_adam(optimizer):
                self._correct_adam(optimizer)

    def _unchanged_by_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether a step whose gradients were masked provably left every pruned weight at
        zero (then the masks need not be re-applied). The first step that qualifies zeroes
        the optimizer state of the pruned weights and says no; later ones rely on it."""
        if not self._remask_free:
            return False
        if not self._pruned_state_zero:
            assert self.masks is not None
            for name, param in self.params.items():
                _zero_optimizer_state(optimizer, param, ~self.masks[name])
            self._pruned_state_zero = True
            return False
        return True

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device if self.params else torch.device("cpu")

    def _ensure_device(self) -> None:
        device = self._device()
        if self.masks is not None and self.masks.device != device:
            self.masks = self.masks.to(device)
            self.ever_active = self.ever_active.to(device) if self.ever_active else None
            self.adam_resets = {n: r.to(device) for n, r in self.adam_resets.items()}
        if self.shadow is not None:
            self.shadow = {
                n: s if s.device == self.params[n].device else s.to(self.params[n].device)
                for n, s in self.shadow.items()
            }

    # -- shadow weights (keeps_pruned_values) -------------------------------------------------
    @torch.no_grad()
    def _sync_shadow(self) -> None:
        """Bring the parameters' current values into the shadow: all of them while the
        parameters hold the full weights, else only the active ones (the pruned entries of a
        parameter are zeros, not values)."""
        if self.shadow is None:  # e.g. resumed from a checkpoint without one
            self.shadow = {n: p.detach().clone() for n, p in self.params.items()}
            return
        for name, param in self.params.items():
            shadow = self.shadow[name]
            if self._full_in_params:
                shadow.copy_(param)
            else:
                shadow.copy_(torch.where(self.masks[name], param, shadow))

    @torch.no_grad()
    def _mask_params(self) -> None:
        """Parameters := shadow ⊙ mask."""
        assert self.shadow is not None and self.masks is not None
        for name, param in self.params.items():
            param.copy_(self.shadow[name])
        self.masks.apply_(self.params)
        self._full_in_params = False

    @torch.no_grad()
    def _before_step_keeping_values(
        self, step: int, optimizer: torch.optim.Optimizer | None
    ) -> bool:
        """Schedule this step's mask update for the post-hook, then put the full weights into
        the parameters for the optimizer step."""
        assert self.masks is not None
        self._sync_shadow()
        grads = {n: p.grad for n, p in self.params.items()}
        update = False
        if self.method.is_update_step(step):
            if getattr(self.method, "needs_dense_grads", False) and not _all_finite(grads):
                self._skip_update(step)
            else:
                self._pending = (step, grads)
                update = True
        if getattr(self.method, "mask_gradients", True):
            self.masks.apply_(grads)
        for name, param in self.params.items():
            param.copy_(self.shadow[name])
        self._full_in_params = True
        return update

    @torch.no_grad()
    def _after_step_keeping_values(self, optimizer: torch.optim.Optimizer) -> None:
        """The new full weights into the shadow, the pending mask update, W ⊙ T back."""
        if self.masks is None:
            return
        self._sync_shadow()
        self._full_in_params = False
        if self._pending is not None:
            step, grads = self._pending
            self._pending = None
            ctx = Context(self.seed, step, grads=grads, model=self.model, optimizer=optimizer)
            assert self.shadow is not None
            new_masks = self.method.update(step, dict(self.shadow), self.masks, ctx)
            self._apply_update(step, new_masks, optimizer)
        self._mask_params()

    def _skip_update(self, step: int) -> None:
        self.n_skipped_updates += 1
        log.warning(
            "step %d: mask update skipped, the dense gradients are not finite "
            "(an AMP overflow step?); %d skipped so far",
            step,
            self.n_skipped_updates,
        )

    # -- per step ---------------------------------------------------------------------------
    def penalty(self, step: int) -> torch.Tensor | None:
        """The method's loss term at ``step`` (penalty-based methods), or None."""
        if not self.active:
            return None
        return self.method.penalty(self.params, step)

    def before_optimizer_step(
        self, step: int, optimizer: torch.optim.Optimizer | None = None
    ) -> bool:
        """Update the masks if ``step`` is an update step, then mask the gradients.

        Call with the dense gradients in place (accumulated, unscaled, DDP-reduced). Returns
        True on update steps (the masks were recomputed, possibly to the same masks). For a
        method that keeps pruned values the update runs in the post-hook of this step, from
        the weights the step produced (see the module docstring); True then says that it
        will.
        """
        if self._plain_step(step):
            return False
        if not self.active or self.masks is None:
            return False
        self._ensure_device()
        self._restore = None
        if self.keeps_pruned_values:
            return self._before_step_keeping_values(step, optimizer)
        changed = False
        grads = {n: p.grad for n, p in self.params.items()}
        if self.method.is_update_step(step):
            if getattr(self.method, "needs_dense_grads", False) and not _all_finite(grads):
                self._skip_update(step)
            else:
                old = self.masks
                ctx = Context(self.seed, step, grads=grads, model=self.model, optimizer=optimizer)
                new_masks = self.method.update(step, self.params, old, ctx)
                grown = self._apply_update(step, new_masks, optimizer)
                self._after_update(grown, grads, optimizer)
                changed = True
                if optimizer is None:  # the dropped weights' optimizer state was not zeroed
                    self._pruned_state_zero = False
        if getattr(self.method, "mask_gradients", True):
            self._mask_gradients(grads)
            self._grads_masked = True
        return changed

    def _plain_step(self, step: int) -> bool:
        """The common case of :meth:`before_optimizer_step`, in a few lookups: no update at
        ``step``, and the masks those of the last step whose gradients were masked. Masks
        the gradients through the cached plan and returns True then; False (nothing done)
        where the full path has to decide (the first step, an update, a model that moved, a
        gradient missing)."""
        plan = self._current_plan()
        if plan is None or self.method.is_update_step(step) or not _multiply(plan[1], plan[2]):
            return False
        self._restore = None
        self._grads_masked = True
        return True

    def _current_plan(self) -> tuple[Masks, list[torch.Tensor], list[torch.Tensor], int] | None:
        """The cached gradient-masking plan, if it was built on the masks in force, unchanged
        since (the same object at the same version)."""
        plan = self._grad_plan
        if plan is None or plan[0] is not self.masks or plan[3] != self.masks.version:
            return None
        return plan

    def _mask_gradients(self, grads: dict[str, torch.Tensor | None]) -> None:
        """``self.masks.apply_(grads)``, through a list of parameters and mask factors kept
        while the masks are unchanged: this runs on every optimizer step, and the lookups
        per layer cost about as much as a small layer's multiplication."""
        plan = self._current_plan()
        if plan is None:
            names, factors = self.masks.factors(self.params)
            params = [self.params[n] for n in names]
            plan = self._grad_plan = (self.masks, params, factors, self.masks.version)
        if not _multiply(plan[1], plan[2]):
            self.masks.apply_(grads)

    @torch.no_grad()
    def _after_update(
        self,
        grown: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor | None],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        """What the optimizer step of an update step does to the grown weights."""
        mode = getattr(self.method, "update_step", "masked")
        if mode == "masked":
            for name, positions in grown.items():
                grad = grads.get(name)
                if grad is not None:
                    _fill_at(grad, positions, 0)
        elif mode == "skip" and optimizer is not None:
            self._restore = _snapshot(optimizer)
        if optimizer is None or not _is_adam(optimizer):
            return
        if getattr(self.method, "adam_bias_correction", "per_tensor") != "per_weight":
            return
        # The step count before the regrown weight's first own update: the step about to run
        # is its first with ``dense``; with ``masked`` it runs with a zero gradient (the
        # moments stay 0) and the next is its first; ``skip`` undoes the coming step.
        offset = 1 if mode == "masked" else 0
        for name, positions in grown.items():
            if not _any_position(positions):
                continue
            param = self.params[name]
            before = _adam_step(optimizer, param)
            reset = self.adam_resets.get(name)
            if reset is None:
                reset = self.adam_resets[name] = torch.zeros_like(param, dtype=torch.int64)
            _fill_at(reset, positions, before + offset)
            self._latest_reset = max(self._latest_reset, before + offset)

    @torch.no_grad()
    def _correct_adam(self, optimizer: torch.optim.Optimizer) -> None:
        """Move each recently regrown weight from the update Adam made with the tensor's step
        count to the update a fresh Adam makes with the weight's own step count."""
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        done = []
        for name, reset in self.adam_resets.items():
            param = self.params[name]
            group = groups.get(id(param))
            state = optimizer.state.get(param)
            if group is None or not state or "exp_avg" not in state:
                continue
            t = _adam_step(optimizer, param)
            beta1, beta2 = (float(b) for b in group["betas"])
            horizon = math.log(_ADAM_TOLERANCE) / math.log(max(beta1, beta2, 1e-12))
            own = t - reset
            active = (reset > 0) & (own > 0) & (own < horizon)
            if self.masks is not None:
                active &= self.masks[name]
            index = active.flatten().nonzero().flatten()
            if t - int(reset.max()) >= horizon:
                done.append(name)
            if index.numel() == 0:
                continue
            k = own.flatten()[index].to(param.dtype)
            m = state["exp_avg"].flatten()[index]
            v = state["max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"]
            v = v.flatten()[index]
            lr, eps = float(group["lr"]), float(group["eps"])
            sign = -1.0 if group.get("maximize") else 1.0

            # torch.optim.Adam's step: lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
            applied = lr / (1 - beta1**t) * m / (v.sqrt() / (1 - beta2**t) ** 0.5 + eps)
            bc1, bc2 = 1 - torch.pow(beta1, k), 1 - torch.pow(beta2, k)
            wanted = lr / bc1 * m / (v.sqrt() / bc2.sqrt() + eps)
            correction = sign * (applied - wanted)
            if param.is_contiguous():
                param.view(-1).index_add_(0, index, correction)
            else:  # (e.g. channels_last) flat indices number the entries row-major
                delta = torch.zeros(param.numel(), dtype=param.dtype, device=param.device)
                param.add_(delta.index_add_(0, index, correction).view(param.shape))
        for name in done:
            del self.adam_resets[name]

    @torch.no_grad()
    def _apply_update(
        self, step: int, new_masks: Masks, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, torch.Tensor]:
        """Install ``new_masks``; zero dropped weights and the optimizer state of every weight
        that changed. Returns the grown positions per layer (a bool mask, or flat indices
        where the method said what it changed). A method that keeps pruned values keeps them
        (the caller re-applies the masks to the parameters)."""
        old = self.masks
        assert old is not None and self.ever_active is not None
        changed_total = 0
        grown: dict[str, torch.Tensor] = {}
        reset_state = getattr(self.method, "reset_state", "changed")
        keep_values = self.keeps_pruned_values
        changes = new_masks.changes_from(old)
        if changes is not None and reset_state == "changed":
            # The method listed the dropped and grown weights: the same writes, made at those
            # indices instead of through whole-layer comparisons.
            for name, param in self.params.items():
                dropped, added = changes[name]
                changed_total += dropped.numel() + added.numel()
                if optimizer is not None and (dropped.numel() or added.numel()):
                    _zero_optimizer_state(optimizer, param, torch.cat([dropped, added]))
                grown[name] = added
                if added.numel():
                    ever = self.ever_active[name]
                    _fill_at(ever, added, True)
                    self.ever_active[name] = ever  # (drops its cached copies)
                if not keep_values:
                    _fill_at(param, dropped, 0)
            self.masks = new_masks
            self.n_updates += 1
            self._record(step=step, turnover=changed_total / max(self.masks.numel(), 1))
            return grown
        # Which optimizer state to zero: at every weight that changed (default), at every
        # weight inactive after the update (sparse momentum: grown weights keep the momentum
        # they gathered while inactive, and the inactive ones start gathering afresh), or
        # nowhere ("none": DNS, whose pruned weights keep training).
        for name, param in self.params.items():
            new = new_masks[name]
            flipped = new ^ old[name]
            changed = int(flipped.count_nonzero())
            changed_total += changed
            if reset_state != "none" and optimizer is not None:
                if reset_state == "inactive":
                    reset = ~new
                    if bool(reset.any()):
                        _zero_optimizer_state(optimizer, param, reset)
                elif changed:
                    _zero_optimizer_state(optimizer, param, flipped)
            grown[name] = new & ~old[name]
            self.ever_active[name] |= new
        if not keep_values:
            new_masks.apply_(self.params)  # dropped weights become zero; grown ones already are
        self.masks = new_masks
        self.n_updates += 1
        self._record(step=step, turnover=changed_total / max(self.masks.numel(), 1))
        return grown

    # -- reporting --------------------------------------------------------------------------
    def _record(self, step: int, turnover: float) -> None:
        assert self.masks is not None and self.ever_active is not None
        self.last_stats = {
            "step": float(step),
            "sparsity/global": self.masks.sparsity(),
            "mask/turnover": turnover,
            "mask/itop_rate": self.ever_active.density(),
        }
        densities = {n: 1.0 - v for n, v in self.masks.layer_sparsity().items()}
        self.history.append({**self.last_stats, "densities": densities})

    def mask_digest(self) -> int:
        """A 63-bit fingerprint of all masks: equal digests mean (almost surely) equal masks."""
        h = hashlib.blake2b(digest_size=8)
        for name, mask in (self.masks or {}).items():
            h.update(name.encode())
            h.update(mask.detach().cpu().numpy().tobytes())
        return int.from_bytes(h.digest(), "little") >> 1

    def layer_sparsity(self) -> dict[str, float]:
        """Measured fraction of zeros per prunable weight (read from the weights)."""
        with torch.no_grad():
            return {n: float((p == 0).count_nonzero()) / p.numel() for n, p in self.params.items()}

    def sparsity_report(self) -> dict[str, Any]:
        """Sparsity of the masks (global and per layer), the measured fraction of weights that
        are exactly zero (at least the mask's: a regrown weight with zero gradient stays 0),
        the ITOP rate, update counts and the masks' health (``diagnostics``)."""
        zeros = self.layer_sparsity()
        total = sum(p.numel() for p in self.params.values())
        zeros_global = sum(zeros[n] * p.numel() for n, p in self.params.items()) / max(total, 1)
        masks = self.masks if self.masks is not None else Masks.dense_like(self.params)
        report = getattr(self.method, "report", None)
        describe = getattr(self.method, "distribution_report", None)
        dense_method = getattr(self.method, "is_dense", False)
        chosen = describe() if describe is not None and not dense_method else {}
        return {
            "global": masks.sparsity(),
            "pruned_layers": self.pruned_layers_sparsity(),
            "dense_layers": sorted(getattr(self.method, "dense", ())),
            "layers": masks.layer_sparsity(),
            "weights_zero_global": zeros_global,
            "weights_zero_layers": zeros,
            "itop_rate": self.ever_active.density() if self.ever_active else 1.0,
            "n_updates": self.n_updates,
            "n_skipped_updates": self.n_skipped_updates,
            "rank_checks": self.rank_checks,
            # The method's own account (L0: realised sparsity vs target, gate sparsity).
            **({"method": report(masks)} if report is not None else {}),
            # What the layer-wise distribution chose (sensitivity: rates and their curves).
            **({"distribution": chosen} if chosen else {}),
            # Mask health of the final masks: dead units, empty and disconnected layers.
            "diagnostics": self.diagnostics(),
        }

    def diagnostics(self, grads: dict[str, torch.Tensor | None] | None = None) -> dict[str, Any]:
        """Mask-health diagnostics of the masks in force (all-dense before the first ones):
        dead units, empty/full and disconnected layers and, given ``grads``, the gradient
        norms of active vs inactive weights (:func:`prunelab.analysis.mask_diagnostics`).
        The path analysis reads the prunable layers as a chain unless the model has skip
        connections."""
        masks = self.masks if self.masks is not None else Masks.dense_like(self.params)
        chain = self.model is None or not has_skip_connections(self.model)
        return mask_diagnostics(masks, grads=grads, chain=chain)

    def pruned_layers_sparsity(self) -> float:
        """Sparsity over the layers that are not kept dense (what ``budget=pruned`` targets)."""
        masks = self.masks if self.masks is not None else Masks.dense_like(self.params)
        dense = set(getattr(self.method, "dense", ()))
        return masks.sparsity(n for n in masks if n not in dense)

    def at_target(self) -> bool:
        """True once the masks hold the method's final sparsity: the dense baseline always; a
        static or gradual method only after its last pruning step (the method decides, see
        ``PruningMethod.at_target``). Best-checkpoint selection counts only epochs at target."""
        if not self.active:
            return True
        return self.masks is not None and self.method.at_target(self.masks)

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "ever_active": self.ever_active.state_dict() if self.ever_active else None,
            "history": list(self.history),
            "n_updates": self.n_updates,
            "n_skipped_updates": self.n_skipped_updates,
            "seed": self.seed,
            # Regrown weights still inside the Adam correction window, stored sparsely.
            "adam_resets": {
                n: (r.nonzero().cpu(), r[r != 0].cpu()) for n, r in self.adam_resets.items()
            },
            # keeps_pruned_values: the full-precision weights, pruned values included.
            "shadow": (
                {n: s.detach().cpu().clone() for n, s in self.shadow.items()}
                if self.shadow is not None
                else None
            ),
            # The method's own state, if it keeps any (DNS: its thresholds).
            "method": (
                self.method.state_dict()
                if callable(getattr(self.method, "state_dict", None))
                else None
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self._device()
        self.masks = Masks.from_state_dict(state["masks"], device) if state["masks"] else None
        ever = state.get("ever_active")
        self.ever_active = Masks.from_state_dict(ever, device) if ever else None
        self.history = list(state.get("history", []))
        self.n_updates = int(state.get("n_updates", 0))
        self.n_skipped_updates = int(state.get("n_skipped_updates", 0))
        self.seed = int(state.get("seed", self.seed))
        self.adam_resets = {}
        for name, (index, values) in state.get("adam_resets", {}).items():
            reset = torch.zeros_like(self.params[name], dtype=torch.int64)
            reset[tuple(index.to(device).t())] = values.to(device)
            self.adam_resets[name] = reset
        self._latest_reset = max((int(r.max()) for r in self.adam_resets.values()), default=0)
        shadow = state.get("shadow")
        # Without a saved shadow (a checkpoint of a method that zeroes pruned weights) it is
        # started from the weights when first needed: they are loaded after this call.
        self.shadow = (
            {
                n: s.to(device=self.params[n].device, dtype=self.params[n].dtype).clone()
                for n, s in shadow.items()
            }
            if shadow is not None and self.keeps_pruned_values
            else None
        )
        self._pending = None
        self._full_in_params = False
        self._pruned_state_zero = False
        method_state = state.get("method")
        if method_state is not None and callable(getattr(self.method, "load_state_dict", None)):
            self.method.load_state_dict(method_state)
        self.last_stats = (
            {k: v for k, v in self.history[-1].items() if k != "densities"} if self.history else {}
        )


@torch.no_grad()
def _zero_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, positions: torch.Tensor
) -> None:
    """Zero every per-element optimizer buffer of ``param`` (momentum, Adam moments) at
    ``positions`` (a bool mask, or flat indices)."""
    state = optimizer.state.get(param)
    if not state:
        return
    if positions.dtype != torch.bool:
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                _fill_at(value, positions, 0)
        return
    keep: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for value in state.values():
        if not (torch.is_tensor(value) and value.shape == param.shape):
            continue
        # A multiplication by the kept positions (float ops are several times faster than
        # masked_fill on a CPU); it leaves a NaN or infinity at a zeroed position, so a
        # buffer whose sum is not finite is zeroed exactly by masked_fill as well.
        factor = keep.get((value.dtype, value.device))
        if factor is None:
            factor = keep[(value.dtype, value.device)] = as_dtype(
                ~positions, value.dtype, value.device
            )
        value.mul_(factor)
        if not bool(torch.isfinite(value.sum())):
            value.masked_fill_(positions, 0)


def _multiply(params: list[torch.Tensor], factors: list[torch.Tensor]) -> bool:
    """The gradients of ``params`` times ``factors``, in place, in one foreach call. False
    (nothing done) where a gradient is missing, is part of a graph, or is not on its
    factor's device (the model moved since the factors were cast)."""
    targets = [p.grad for p in params]
    for grad, factor in zip(targets, factors, strict=True):
        if grad is None or grad.requires_grad or grad.device != factor.device:
            return False
    if targets:
        torch._foreach_mul_(targets, factors)
    return True


def _fill_at(tensor: torch.Tensor, positions: torch.Tensor, value: float | bool) -> None:
    """``tensor[positions] = value`` for a bool mask or flat indices (row-major, as
    ``flatten`` numbers the entries) ``positions``."""
    if positions.dtype == torch.bool:
        tensor.masked_fill_(positions, value)
    elif not positions.numel():
        return
    elif tensor.is_contiguous():
        fill_(tensor.view(-1), positions, value)
    else:  # (e.g. channels_last): through a mask in the logical layout
        where = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
        where[positions.to(tensor.device)] = True
        tensor.masked_fill_(where.view(tensor.shape), value)


def _any_position(positions: torch.Tensor) -> bool:
    """Whether a bool mask or a tensor of indices names any position."""
    return bool(positions.any()) if positions.dtype == torch.bool else positions.numel() > 0


# Optimizers whose step leaves a weight exactly where it is when its gradient and its
# per-element state (momentum, Adam moments) are zero: SGD with momentum, dampening, Nesterov
# and L2 weight decay (0 + λ·0); Adam and AdamW, AMSGrad and decoupled decay (0·(1 − lr·λ))
# included, plain, foreach or fused. Exactly these classes: a subclass may step otherwise.
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _is_adam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _adam_step(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """The optimizer's step count for ``param`` (0 before its first step)."""
    step = optimizer.state.get(param, {}).get("step", 0)
    return int(step.item()) if torch.is_tensor(step) else int(step)


def _all_finite(grads: dict[str, torch.Tensor | None]) -> bool:
    """Whether every gradient entry is finite. A finite sum proves it (a NaN or an infinity
    makes the sum NaN or infinite), in one float reduction; a sum that is not finite (also
    when finite entries overflow it) is settled entry by entry."""
    present = [g for g in grads.values() if g is not None]
    if not present:
        return True
    if len({g.device for g in present}) == 1:  # one reduction each, one sync for all
        total = torch.stack([g.sum().double() for g in present]).sum()
        if bool(torch.isfinite(total)):
            return True
    return all(bool(torch.isfinite(g).all()) for g in present)


def _snapshot(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
    """Copies of every parameter and optimizer-state tensor, and the parameters that have no
    optimizer state yet: what it takes to undo one step."""
    saved: dict[torch.Tensor, torch.Tensor] = {}
    stateless: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            saved[param] = param.detach().clone()
            state = optimizer.state.get(param)
            if not state:
                stateless.append(param)
                continue
            for value in state.values():
                if torch.is_tensor(value):
                    saved[value] = value.detach().clone()
    return saved, stateless
