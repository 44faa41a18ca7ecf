"""The engine that owns one model's masks and keeps the invariants of sparse training.

Invariants (each has a test):

- pruned weights are exactly zero after every optimizer step: the masks are re-applied in an
  optimizer step post-hook, so momentum, Adam moments and weight decay cannot bring a pruned
  weight back;
- gradients of pruned weights are zeroed before the step (after the method has seen the
  dense gradients it needs, e.g. RigL's grow scores);
- optimizer state (momentum, Adam moments) is zeroed at positions that were just dropped or
  grown, so a regrown weight starts at zero with no stale history;
- random choices are seeded from (seed, step, layer), so every DDP rank makes the same
  choice without communication;
- masks, the ever-active set and the update history round-trip through ``state_dict``.

Pure torch: the Lightning module calls :meth:`before_optimizer_step` from
``on_before_optimizer_step`` and registers :meth:`attach` on its optimizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.sparsity.masks import Masks


def layer_generator(seed: int, step: int, layer: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, layer): identical on every rank."""
    digest = hashlib.blake2b(f"{seed}:{step}:{layer}".encode(), digest_size=8).digest()
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

    def generator(self, layer: int) -> torch.Generator:
        return layer_generator(self.seed, self.step, layer)


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
        self.last_stats: dict[str, float] = {}
        self.rank_checks = 0  # cross-rank mask agreement checks passed (DDP)
        self._handles: list[Any] = []

    # -- set-up -----------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.masks is not None

    @property
    def active(self) -> bool:
        """False for the dense baseline: nothing to mask, the hooks do nothing."""
        return not getattr(self.method, "is_dense", False)

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
        self.masks.apply_(self.params)
        self.ever_active = self.masks.clone()
        self._record(step=0, turnover=0.0)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every step of ``optimizer`` (a step post-hook)."""
        if self.active:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.masks is not None:
            self.masks.apply_(self.params)

    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device if self.params else torch.device("cpu")

    def _ensure_device(self) -> None:
        device = self._device()
        if self.masks is not None and next(iter(self.masks.values())).device != device:
            self.masks = self.masks.to(device)
            self.ever_active = self.ever_active.to(device) if self.ever_active else None

    # -- per step ---------------------------------------------------------------------------
    def before_optimizer_step(
        self, step: int, optimizer: torch.optim.Optimizer | None = None
    ) -> bool:
        """Update the masks if ``step`` is an update step, then mask the gradients.

        Call with the dense gradients in place (accumulated, unscaled, DDP-reduced). Returns
        True on update steps (the masks were recomputed, possibly to the same masks).
        """
        if not self.active or self.masks is None:
            return False
        self._ensure_device()
        changed = False
        if self.method.is_update_step(step):
            grads = {n: p.grad for n, p in self.params.items()}
            ctx = Context(self.seed, step, grads=grads, model=self.model)
            new_masks = self.method.update(step, self.params, self.masks, ctx)
            self._apply_update(step, new_masks, optimizer)
            changed = True
        self.masks.apply_({n: p.grad for n, p in self.params.items()})
        return changed

    @torch.no_grad()
    def _apply_update(
        self, step: int, new_masks: Masks, optimizer: torch.optim.Optimizer | None
    ) -> None:
        old = self.masks
        changed_total = 0
        for name, param in self.params.items():
            new = new_masks[name]
            flipped = new ^ old[name]
            changed_total += int(flipped.sum())
            if optimizer is not None and bool(flipped.any()):
                _zero_optimizer_state(optimizer, param, flipped)
            param.mul_(new)  # dropped weights become zero; grown ones are zero already
            self.ever_active[name] |= new
        self.masks = new_masks
        self.n_updates += 1
        self._record(step=step, turnover=changed_total / max(self.masks.numel(), 1))

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
            return {n: float((p == 0).sum()) / p.numel() for n, p in self.params.items()}

    def sparsity_report(self) -> dict[str, Any]:
        """Sparsity of the masks (global and per layer), the measured fraction of weights that
        are exactly zero (at least the mask's: a regrown weight with zero gradient stays 0),
        the ITOP rate and update counts."""
        zeros = self.layer_sparsity()
        total = sum(p.numel() for p in self.params.values())
        zeros_global = sum(zeros[n] * p.numel() for n, p in self.params.items()) / max(total, 1)
        masks = self.masks if self.masks is not None else Masks.dense_like(self.params)
        return {
            "global": masks.sparsity(),
            "layers": masks.layer_sparsity(),
            "weights_zero_global": zeros_global,
            "weights_zero_layers": zeros,
            "itop_rate": self.ever_active.density() if self.ever_active else 1.0,
            "n_updates": self.n_updates,
            "rank_checks": self.rank_checks,
        }

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict() if self.masks is not None else None,
            "ever_active": self.ever_active.state_dict() if self.ever_active else None,
            "history": list(self.history),
            "n_updates": self.n_updates,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self._device()
        self.masks = Masks.from_state_dict(state["masks"], device) if state["masks"] else None
        ever = state.get("ever_active")
        self.ever_active = Masks.from_state_dict(ever, device) if ever else None
        self.history = list(state.get("history", []))
        self.n_updates = int(state.get("n_updates", 0))
        self.seed = int(state.get("seed", self.seed))
        self.last_stats = (
            {k: v for k, v in self.history[-1].items() if k != "densities"} if self.history else {}
        )


@torch.no_grad()
def _zero_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, positions: torch.Tensor
) -> None:
    """Zero every per-element optimizer buffer of ``param`` (momentum, Adam moments) at
    ``positions``."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(positions, 0)
