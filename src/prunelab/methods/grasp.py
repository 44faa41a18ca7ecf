"""Pruning at initialisation by gradient signal preservation (GraSP)."""

from __future__ import annotations

import math
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruningMethod, positive_int
from prunelab.methods.snip import _all_reduce_sum
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks


class GraSP(PruningMethod):
    """Wang, Zhang & Grosse 2020, "Picking winning tickets before training by preserving
    gradient flow" (ICLR, arXiv:2002.07376).

    Before training, ``g`` is the gradient of the loss summed over the first ``batches``
    mini-batches, and ``Hg`` the Hessian-gradient product of the same summed loss, taken by
    double backpropagation: the gradient of ``stopgrad(g) · ∇L`` with the graph of ``∇L``
    kept. The paper scores each weight by ``S(-θ) = -θ ⊙ Hg`` and removes the weights with
    the *highest* score (those whose removal reduces the gradient flow least, or increases
    it);
    the authors' code (alecwangcq/GraSP) does the same. prunelab's scores are "higher =
    keep", so the keep score here is ``θ ⊙ Hg`` and the weights with its largest values are
    kept (one threshold over all layers with ``distribution=global``, the default, as in the
    paper). The mask is then fixed.

    As in the reference code the logits are divided by a temperature (``temperature``,
    default 200) in both passes, which keeps the softmax away from saturation so that the
    Hessian term is informative. The passes run in training mode, BatchNorm running
    statistics (every buffer) and the training mode are restored afterwards, and existing
    ``.grad`` fields are left untouched (gradients are taken with ``torch.autograd.grad``).
    Under DDP ``g`` is summed over the ranks before ``Hg`` is taken, and ``Hg`` is summed
    afterwards, so every rank scores the Hessian of the global loss against the global
    gradient and keeps the same mask.

    Differences from the reference code: the data are the first ``batches`` training
    batches, not a class-balanced sample (the reference draws a fixed number of samples per
    class and splits them in halves only to save memory; its sum over halves is the sum
    over batches here); Linear layers are not re-initialised with Xavier-normal weights before
    scoring (prunelab scores the model's own initialisation); the scores are not divided by
    their absolute sum (a positive factor, which leaves the ranking unchanged). With dropout
    the two passes draw different dropout masks, as they do in the reference.
    """

    name = "grasp"
    schedule_kinds = ("fixed",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        batches: int = 1,
        temperature: float = 200.0,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        self.batches = positive_int("batches", batches, example=1)
        try:
            value = float(temperature)
        except (TypeError, ValueError):
            value = math.nan
        if isinstance(temperature, bool) or not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"pruning.temperature must be a finite number > 0, got {temperature!r}; "
                "e.g. 200 (the reference's value) or 1 (no scaling)"
            )
        self.temperature = value

    def hessian_gradient(self, params: Params, ctx: Context) -> tuple[Params, Params]:
        """``(g, Hg)`` of the loss summed over the first ``batches`` batches, the logits
        divided by ``temperature`` (each summed over DDP ranks)."""
        if ctx.batches is None or ctx.loss_fn is None or ctx.model is None:
            raise ValueError("GraSP needs training batches, a loss and the model at init")
        model, was_training = ctx.model, ctx.model.training
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        names, tensors = list(params), list(params.values())
        device = tensors[0].device
        model.train()
        try:
            data = []
            for x, y in ctx.batches():
                data.append((x.to(device), y.to(device)))
                if len(data) >= self.batches:
                    break
            grad = {n: torch.zeros_like(p) for n, p in params.items()}
            with torch.enable_grad():
                for x, y in data:
                    loss = ctx.loss_fn(model(x) / self.temperature, y)
                    parts = torch.autograd.grad(loss, tensors, allow_unused=True)
                    for n, part in zip(names, parts, strict=True):
                        if part is not None:
                            grad[n] += part
            _all_reduce_sum(grad)
            hg = {n: torch.zeros_like(p) for n, p in params.items()}
            with torch.enable_grad():
                for x, y in data:
                    loss = ctx.loss_fn(model(x) / self.temperature, y)
                    parts = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
                    terms = [
                        (grad[n] * part).sum()
                        for n, part in zip(names, parts, strict=True)
                        if part is not None
                    ]
                    if not terms or not any(t.requires_grad for t in terms):
                        continue  # the loss is linear in the weights: Hg = 0
                    products = torch.autograd.grad(
                        torch.stack(terms).sum(), tensors, allow_unused=True
                    )
                    for n, product in zip(names, products, strict=True):
                        if product is not None:
                            hg[n] += product
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
            model.train(was_training)
        _all_reduce_sum(hg)
        return grad, hg

    def scores(self, params: Params, ctx: Context) -> Params:
        """Keep scores ``θ ⊙ Hg`` (higher = keep): minus the paper's ``S(-θ) = -θ ⊙ Hg``,
        whose highest values GraSP removes."""
        _, hg = self.hessian_gradient(params, ctx)
        return {n: (p.detach() * hg[n]).detach() for n, p in params.items()}

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        return self.masks_from_scores(self.scores(params, ctx), ctx)

    def describe(self) -> dict[str, Any]:
        return {"batches": self.batches, "temperature": self.temperature}
