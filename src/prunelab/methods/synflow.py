"""Data-free pruning at initialisation by iterative synaptic flow conservation (SynFlow)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import functional_call

from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruningMethod, positive_int, topk_mask
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class SynFlow(PruningMethod):
    """Tanaka et al. 2020, "Pruning neural networks without any data by iteratively
    conserving synaptic flow" (NeurIPS, arXiv:2006.05467; code: ganguli-lab/Synaptic-Flow).

    No data are used. The network is linearised: every parameter and floating-point buffer
    is replaced by its absolute value (BatchNorm in eval mode, so it is an affine map of
    positive numbers), a single all-ones input shaped like one sample is fed through it, and
    ``R`` is the sum of the output. The score of a weight is ``|θ ⊙ ∂R/∂θ|``, the synaptic
    flow through it. Pruning is iterative: over ``rounds`` rounds (default 100, as in the
    paper) the density follows the exponential schedule ``d_k = d^(k/rounds)``, ``d`` the
    final density, and round ``k`` rescores the network with the current mask in force and
    keeps the top ``d_k`` of the weights among those still active (one threshold over all
    layers with ``distribution=global``, the default, as in the paper). The last round lands
    exactly on the target count. The mask is then fixed.

    Implementation notes: the model itself is never modified. The linearised network is run
    with :func:`torch.func.functional_call` on absolute-value copies of the parameters and
    buffers (the masked weights set to zero), so signs, weights, buffers, ``.grad`` fields
    and the training mode are as they were afterwards (the mode is switched to eval for the
    passes and restored). Only the input's shape is read from the first training batch.
    The passes run in ``dtype`` (default ``float64``): ``R`` grows like the product of the
    layers' absolute row sums and overflows float32 in deep networks, which the reference
    notes; the scores of each round are divided by their maximum (a positive factor, so the
    ranking is unchanged) before the float32 rankers of the sparsity distributions see them.

    Biases: as in the reference, the linearised network keeps ``|bias|``
    (``bias_flow=true``). A bias injects flow that did not pass through the earlier layers,
    so the conservation law behind SynFlow's protection from layer collapse no longer holds:
    on an 8-layer, 32-wide MLP with PyTorch's default bias initialisation it emptied the
    first layers at 98-99.5% sparsity. ``bias_flow=false`` zeroes the biases in the
    linearised pass only (a deviation from the reference), which restores the balance.
    """

    name = "synflow"
    schedule_kinds = ("fixed",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        rounds: int = 100,
        dtype: str = "float64",
        bias_flow: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if not isinstance(bias_flow, bool):
            raise ConfigError(f"pruning.bias_flow must be true or false, got {bias_flow!r}")
        self.bias_flow = bias_flow
        self.rounds = positive_int("rounds", rounds, example=100)
        if dtype not in DTYPES:
            raise ConfigError(
                f"pruning.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}; "
                "e.g. pruning.dtype=float64"
            )
        self.dtype = str(dtype)

    def input_shape(self, ctx: Context) -> tuple[int, ...]:
        """The shape of one sample, read from the first training batch (its values unused)."""
        if ctx.batches is None:
            raise ValueError("SynFlow needs a training batch at init to learn the input shape")
        for x, _ in ctx.batches():
            return tuple(x.shape[1:])
        raise ValueError("SynFlow needs a training batch at init; the loader yielded none")

    def synaptic_flow(
        self, params: Params, masks: Params, ctx: Context, shape: tuple[int, ...]
    ) -> Params:
        """``|θ ⊙ ∂R/∂θ|`` of the linearised network with ``masks`` applied to ``params``,
        for an all-ones input of one sample of ``shape``."""
        if ctx.model is None:
            raise ValueError("SynFlow needs the model at init")
        model, was_training = ctx.model, ctx.model.training
        dtype = DTYPES[self.dtype]
        device = next(iter(params.values())).device
        prunable = {id(p): n for n, p in params.items()}
        state: dict[str, torch.Tensor] = {}
        leaves: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, tensor in model.named_parameters():
                value = tensor.detach().abs().to(dtype)
                if not self.bias_flow and key.rsplit(".", 1)[-1] == "bias":
                    value = torch.zeros_like(value)
                name = prunable.get(id(tensor))
                if name is not None:
                    value = (value * masks[name].to(value.device)).requires_grad_(True)
                    leaves[name] = value
                state[key] = value
            for key, buffer in model.named_buffers():
                floating = buffer.is_floating_point()
                state[key] = buffer.detach().abs().to(dtype) if floating else buffer
        missing = [n for n in params if n not in leaves]
        if missing:
            raise ValueError(f"SynFlow: the prunable weights {missing} are not in the model")
        ones = torch.ones((1, *shape), dtype=dtype, device=device)
        model.eval()
        try:
            with torch.enable_grad():
                flow = functional_call(model, state, (ones,)).sum()
                grads = torch.autograd.grad(flow, [leaves[n] for n in params], allow_unused=True)
        finally:
            model.train(was_training)
        return {
            n: torch.zeros_like(leaves[n]) if g is None else (g * leaves[n]).detach().abs()
            for n, g in zip(params, grads, strict=True)
        }

    def init_masks(self, params: Params, ctx: Context) -> Masks:
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        density, shape = 1.0 - self.sparsity, self.input_shape(ctx)
        for k in range(1, self.rounds + 1):
            target = self.sparsity if k == self.rounds else 1.0 - density ** (k / self.rounds)
            flow = self.synaptic_flow(params, masks, ctx, shape)
            top = max(float(s.max()) for s in flow.values())
            scale = 1.0 / top if 0 < top < math.inf else 1.0
            # Pruned weights are never revived: they rank below every active one.
            ranked = {
                n: torch.where(masks[n], (s * scale).float(), torch.full_like(s, -1.0).float())
                for n, s in flow.items()
            }
            counts = self.keep_counts(
                target, scores=ranked, generator=ctx.generator(-1, f"ties-{k}")
            )
            masks = {
                n: topk_mask(
                    ranked[n],
                    min(counts[n], int(masks[n].sum())),
                    self.tie_generator(ctx, i, f"round-{k}"),
                )
                for i, n in enumerate(params)
            }
        return Masks(masks)

    def describe(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "dtype": self.dtype}
