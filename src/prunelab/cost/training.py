"""Training FLOPs of each pruning method, following Evci et al. (2020), "Rigging the lottery:
making all tickets winners" (ICML, arXiv:1911.11134), appendix H.

One training step on one sample costs a forward pass ``f`` plus a backward pass ``2 f`` (the
gradients with respect to the activations and to the weights each cost about one forward), so
``3 f``. With ``f_D`` the dense forward FLOPs per sample and ``f_S`` the sparse forward FLOPs
with the masks in force (:func:`prunelab.cost.flops.sparse_forward_flops`), per sample and
step:

- ``dense``: ``3 f_D``;
- ``fixed`` (static sparse from the start: random, SNIP) and ``set``: ``3 f_S``; SET's random
  regrowth and SNIP's one-off saliency pass are negligible and, as in the paper, ignored;
- ``gradual`` (GMP, Zhu & Gupta 2017) and ``one_shot`` (train dense, prune once, fine-tune):
  ``3 f(t)`` with ``f(t)`` the sparse forward FLOPs of the masks in force at step ``t`` (the
  paper's ``3 f_D (1 - s_t)`` for uniform sparsity; one-shot is ``3 f_D`` before the pruning
  step and ``3 f_S`` after); pruning by magnitude costs no extra passes;
- ``rigl``: ``3 f_S`` on ordinary steps and ``2 f_S + f_D`` on a mask-update step (the
  gradient with respect to the weights is computed densely), i.e. on average
  ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)`` with ``ΔT`` the update interval;
- ``snfs`` (Dettmers & Zettlemoyer 2019, dense gradients every step): ``2 f_S + f_D``.

Each piece of training is a *segment* ``(n_steps, densities, n_update_steps)`` during which the
per-layer densities are constant; :func:`segments_from_history` builds them from the sparsity
engine's per-update history. All counts are absolute FLOPs (``samples_per_step`` samples per
step); the dense reference run costs ``3 f_D x samples_per_step x total_steps``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prunelab.cost.flops import LayerFlops, check_densities, sparse_forward_flops
from prunelab.errors import ConfigError

ACCOUNTINGS = ("dense", "fixed", "set", "gradual", "one_shot", "rigl", "snfs")

# prunelab method name -> accounting rule (see the module docstring).
METHOD_ACCOUNTING: dict[str, str] = {
    "dense": "dense",
    "static": "one_shot",
    "l1": "one_shot",  # dense (penalised) until the cut, then the fixed mask
    "random": "fixed",
    "snip": "fixed",
    "grasp": "fixed",
    "synflow": "fixed",
    "gmp": "gradual",
    "set": "set",
    "rigl": "rigl",
    "dynamic": "rigl",
    "snfs": "snfs",
    "imp": "fixed",  # each level trains with its mask fixed (level 0: dense)
    "adaptive": "fixed",  # each candidate fine-tunes with its mask fixed (the dense stage: dense)
    "han": "gradual",  # the masks in force at each step, from the history
    "dns": "snfs",  # dense weight gradients every step: pruned weights keep training
    "l0": "one_shot",  # dense (gated) until the gates are folded, then the fixed mask
    # Structured methods, one-shot or gradual: the masks in force at each step, from the
    # history. Taylor's scoring passes at pruning steps (pruning.batches forward/backward
    # passes per pruning step) are not counted, like SNIP's.
    "structured_l1": "gradual",
    "neuron_sensitivity": "gradual",
    "taylor": "gradual",
    "block": "gradual",
}

Segment = tuple[int, Mapping[str, float], "int | None"]


def accounting_for(method_name: str) -> str:
    """The appendix-H accounting rule of a prunelab method (``rigl`` -> ``'rigl'``, ...)."""
    if method_name in ACCOUNTINGS:
        return method_name
    if method_name not in METHOD_ACCOUNTING:
        raise ConfigError(
            f"no training-FLOP accounting for method '{method_name}'; known methods: "
            f"{', '.join(METHOD_ACCOUNTING)}"
        )
    return METHOD_ACCOUNTING[method_name]


def training_flops(
    lf: LayerFlops,
    segments: Sequence[Segment],
    samples_per_step: int,
    accounting: str,
    update_every: int | None = None,
) -> float:
    """Total training FLOPs over ``segments`` for one of :data:`ACCOUNTINGS`.

    ``segments``: ``(n_steps, densities, n_update_steps)`` with piecewise-constant per-layer
    ``densities`` (layers left out are dense). ``n_update_steps`` (how many of the segment's
    steps are mask updates) matters only for ``rigl``; it may be ``None`` when unknown, and
    then ``update_every`` (ΔT) applies the paper's average per step,
    ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``, to every step of the segment.
    """
    if accounting not in ACCOUNTINGS:
        raise ConfigError(
            f"unknown training-FLOP accounting '{accounting}'; choose one of {list(ACCOUNTINGS)}"
        )
    samples = _positive_int("samples_per_step", samples_per_step)
    if update_every is not None:
        update_every = _positive_int("update_every", update_every)
    f_d = lf.total
    total = 0.0
    for i, segment in enumerate(segments):
        if len(segment) != 3:
            raise ConfigError(
                f"segment {i} is {segment!r}; expected (n_steps, densities, n_update_steps)"
            )
        n_steps, densities, n_updates = segment
        n_steps = _nonneg_int(f"segment {i} n_steps", n_steps)
        f_s = sparse_forward_flops(lf, check_densities(lf, densities))
        if accounting == "dense":
            per_segment = 3 * f_d * n_steps
        elif accounting in ("fixed", "set", "gradual", "one_shot"):
            per_segment = 3 * f_s * n_steps
        elif accounting == "snfs":
            per_segment = (2 * f_s + f_d) * n_steps
        elif n_updates is not None:  # rigl, exact counts
            n_updates = _nonneg_int(f"segment {i} n_update_steps", n_updates)
            if n_updates > n_steps:
                raise ConfigError(
                    f"segment {i} has {n_updates} update steps but only {n_steps} steps"
                )
            per_segment = 3 * f_s * (n_steps - n_updates) + (2 * f_s + f_d) * n_updates
        elif update_every is not None:  # rigl, the paper's average
            dt = update_every
            per_segment = n_steps * (3 * f_s * dt + 2 * f_s + f_d) / (dt + 1)
        else:
            raise ConfigError(
                f"rigl accounting: segment {i} has no update count; pass n_update_steps "
                "in the segments or update_every (ΔT)"
            )
        total += per_segment * samples
    return total


def dense_training_flops(lf: LayerFlops, samples_per_step: int, total_steps: int) -> float:
    """FLOPs of the dense reference run: ``3 f_D x samples_per_step x total_steps``."""
    samples = _positive_int("samples_per_step", samples_per_step)
    return 3 * lf.total * samples * _nonneg_int("total_steps", total_steps)


def training_flops_x_dense(
    flops: float, lf: LayerFlops, samples_per_step: int, total_steps: int
) -> float:
    """``flops`` as a multiple of the dense run of the same length (RigL paper, table 2)."""
    dense = dense_training_flops(lf, samples_per_step, total_steps)
    if dense <= 0:
        raise ConfigError("the dense run costs 0 FLOPs: total_steps must be positive")
    return flops / dense


def segments_from_history(
    history: Sequence[Mapping[str, Any]], total_steps: int
) -> list[tuple[int, dict[str, float], int]]:
    """Turn a per-update history into segments for :func:`training_flops`.

    ``history``: entries ``{"step": int, "densities": {name: density}, "update": bool}``
    sorted by step, as :attr:`prunelab.sparsity.engine.SparsityEngine.history` records them
    (there ``"update"`` is absent: the first entry is the initial masks, every later entry a
    mask update, which is the default here). Timing, as in the engine: the initial densities
    are in force from step 0; an update recorded at step ``t`` is computed during step ``t``
    (whose forward and backward passes still use the previous masks, and which counts as an
    update step of the previous segment), and its densities are in force from step ``t + 1``.
    Steps run from 0 to ``total_steps - 1``.
    """
    steps_total = _positive_int("total_steps", total_steps)
    if not history:
        raise ConfigError("segments_from_history: the history is empty; it needs the initial masks")
    entries = []
    for i, entry in enumerate(history):
        try:
            step = int(entry["step"])
            densities = {str(k): float(v) for k, v in dict(entry["densities"]).items()}
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"history entry {i} needs 'step' (int) and 'densities' ({{name: float}})"
            ) from None
        update = bool(entry.get("update", i > 0))
        if i == 0 and update:
            raise ConfigError("the first history entry must be the initial masks (update=False)")
        if i > 0 and not update:
            raise ConfigError(f"history entry {i} (step {step}) is not an update; only the first")
        if not 0 <= step < steps_total:
            raise ConfigError(f"history entry {i} is at step {step}, outside [0, {steps_total})")
        if entries and step < entries[-1][0]:
            raise ConfigError(f"history entry {i} (step {step}) comes before the entry before it")
        entries.append((step, densities))
    segments = []
    for i, (step, densities) in enumerate(entries):
        start = 0 if i == 0 else step + 1
        if i + 1 < len(entries):
            stop, n_updates = entries[i + 1][0] + 1, 1
        else:
            stop, n_updates = steps_total, 0
        if stop - start < n_updates:  # two updates recorded at the same step
            raise ConfigError(f"two mask updates at step {step}; one update per step is allowed")
        segments.append((stop - start, densities, n_updates))
    return segments


def _positive_int(name: str, value: Any) -> int:
    out = _nonneg_int(name, value)
    if out == 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return out


def _nonneg_int(name: str, value: Any) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = -1
    if isinstance(value, bool) or out != value or out < 0:
        raise ConfigError(f"{name} must be a non-negative int, got {value!r}")
    return out
