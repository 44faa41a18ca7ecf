"""Layer-wise sparsity distributions: how one global target is split over the layers.

Every distribution has the same signature and returns the number of weights to KEEP in each
layer, as ints, so that the realised sparsity is exact:

* the total number of zeros, ``sum(numel) - sum(keep)``, equals ``round(sparsity * N)``
  where ``N`` counts the weights of every layer in ``shapes`` (dense ones included);
* each layer keeps within one weight of its ideal real-valued allocation;
* ``0 <= keep <= numel``, and the layers named in ``dense`` keep all their weights.

When the target cannot be met (the dense layers alone hold more weights than the budget
allows), a one-line :class:`ConfigError` says so.

Distributions:

``uniform``
    Every non-dense layer gets the same density (Zhu & Gupta 2017, "To prune, or not to
    prune", arXiv:1710.01878; Gale et al. 2019, "The state of sparsity in deep neural
    networks", arXiv:1902.09574).
``er``
    Erdős–Rényi (Mocanu et al. 2018, "Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science", Nature Communications 9,
    SET): density proportional to ``(n_out + n_in) / (n_out * n_in)``.
``erk``
    Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the lottery: making all tickets
    winners", ICML, arXiv:1911.11134, section 3): like ER but the kernel dimensions count
    too, ``sum(shape) / prod(shape)``.
``global``
    One magnitude threshold over all non-dense layers (Han et al. 2015, "Learning both
    weights and connections for efficient neural networks"; global pruning as compared by
    Blalock et al. 2020, "What is the state of neural network pruning?"): keep the top-k
    scores of the concatenation.
``sensitivity``
    Per-layer sparsities chosen from measured layer-sensitivity curves (Han et al. 2015,
    Fig. 5; Distiller's sensitivity analysis) to meet the target with the least predicted
    accuracy drop, by a greedy marginal-cost allocation
    (:meth:`prunelab.analysis.sensitivity.SensitivityCurves.allocate`). Its one option,
    ``curves``, names a ``sensitivity.json`` or a run folder holding one
    (``python scripts/sensitivity.py <run>`` makes it).

Options beyond the common ones (``curves``) reach a distribution through ``keep_counts(...,
options=...)``; :func:`distribution_options` picks them from a distribution config and
checks them, :func:`check_distribution` checks them against the layers and
:func:`describe_distribution` says what they chose, for the run's record.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from prunelab.errors import ConfigError

Shapes = Mapping[str, Sequence[int]]

__all__ = [
    "DISTRIBUTIONS",
    "OPTIONS",
    "check_distribution",
    "dense_layers",
    "describe_distribution",
    "distribution_options",
    "er",
    "erk",
    "global_magnitude",
    "keep_counts",
    "round_to_total",
    "sensitivity",
    "uniform",
]


# --------------------------------------------------------------------------------------
# validation and shared helpers
# --------------------------------------------------------------------------------------


def _check_shapes(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    if not shapes:
        raise ConfigError(
            "no prunable layers were given to the sparsity distribution; "
            "pass at least one layer name -> weight shape"
        )
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        try:
            dims = tuple(operator.index(d) for d in shape)
        except TypeError:
            dims = ()
        if not dims or any(d < 1 for d in dims):
            raise ConfigError(
                f"layer '{name}' has weight shape {tuple(shape)!r}; every layer needs a "
                "non-empty shape of positive ints, e.g. (out, in) or (out, in, kh, kw)"
            )
        out[str(name)] = dims
    return out


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ConfigError(
            f"sparsity={sparsity!r} is not a number; set it to a float in [0, 1), e.g. 0.9"
        )
    value = float(sparsity)
    if not (0.0 <= value < 1.0):
        raise ConfigError(
            f"sparsity={sparsity!r} is outside [0, 1); set it to the fraction of weights "
            "to remove, e.g. 0.9"
        )
    return value


def _check_dense(shapes: Mapping[str, tuple[int, ...]], dense: frozenset[str]) -> frozenset[str]:
    dense = frozenset(dense)
    unknown = sorted(dense - shapes.keys())
    if unknown:
        raise ConfigError(
            f"dense layers {unknown} are not among the prunable layers {list(shapes)}; "
            "name only layers that are being pruned"
        )
    return dense


def _check_power(power_scale: float) -> float:
    if isinstance(power_scale, bool) or not isinstance(power_scale, (int, float)):
        raise ConfigError(f"power_scale={power_scale!r} is not a number; use e.g. 1.0")
    value = float(power_scale)
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(
            f"power_scale={power_scale!r} must be a finite number >= 0; use 1.0 for the "
            "standard ER/ERK (0 gives uniform)"
        )
    return value


class _Budget:
    """The integer budget of one call: what the non-dense layers may keep in total."""

    def __init__(self, shapes: Shapes, sparsity: float, dense: frozenset[str]) -> None:
        self.shapes = _check_shapes(shapes)
        self.sparsity = _check_sparsity(sparsity)
        self.dense = _check_dense(self.shapes, dense)
        self.numel = {name: math.prod(s) for name, s in self.shapes.items()}
        self.total = sum(self.numel.values())
        self.zeros = round(self.sparsity * self.total)
        self.keep = self.total - self.zeros
        self.dense_numel = sum(self.numel[n] for n in self.dense)
        self.sparse_names = [n for n in self.shapes if n not in self.dense]
        self.sparse_numel = self.total - self.dense_numel
        # What the non-dense layers keep between them.
        self.remaining = self.keep - self.dense_numel
        if self.remaining < 0:
            raise ConfigError(
                f"sparsity={self.sparsity} needs {self.zeros} of {self.total} weights pruned "
                f"but only {self.sparse_numel} lie outside the dense layers {sorted(self.dense)}; "
                "lower the sparsity or keep fewer layers dense"
            )

    def finish(self, ideal: Mapping[str, float]) -> dict[str, int]:
        """Integer counts for all layers from real-valued ideals of the non-dense ones."""
        counts = round_to_total(
            ideal, {n: self.numel[n] for n in self.sparse_names}, self.remaining
        )
        return {n: (self.numel[n] if n in self.dense else counts[n]) for n in self.shapes}


def round_to_total(
    ideal: Mapping[str, float], caps: Mapping[str, int], total: int
) -> dict[str, int]:
    """Round real-valued keep counts to ints that sum to exactly ``total``.

    Each ideal is clipped to ``[0, caps[name]]`` and floored; the remaining units go, one
    each, to the layers with the largest fractional parts (ties: the order of ``ideal``),
    never above a layer's cap. Every result is therefore the floor or the ceiling of its
    ideal whenever the ideals sum to ``total`` ("largest remainder" rounding).

    Raises :class:`ConfigError` if ``total`` is negative or larger than ``sum(caps)``.
    """
    names = list(ideal)
    capacity = sum(caps[n] for n in names)
    if total < 0 or total > capacity:
        raise ConfigError(
            f"cannot keep {total} weights in layers holding {capacity}; "
            "choose a sparsity whose budget fits the prunable layers"
        )
    clipped = {n: min(max(float(ideal[n]), 0.0), float(caps[n])) for n in names}
    counts = {n: min(math.floor(clipped[n]), caps[n]) for n in names}
    left = total - sum(counts.values())
    if left > 0:
        # Largest fractional part first; stable sort keeps the given order on ties.
        order = sorted(names, key=lambda n: clipped[n] - counts[n], reverse=True)
        while left > 0:  # a second pass only if float error left a unit over
            for n in order:
                if left == 0:
                    break
                if counts[n] < caps[n]:
                    counts[n] += 1
                    left -= 1
    elif left < 0:
        # Only reachable through float error in the ideals: take from the smallest fractions.
        order = sorted(names, key=lambda n: clipped[n] - counts[n])
        while left < 0:
            for n in order:
                if left == 0:
                    break
                if counts[n] > 0:
                    counts[n] -= 1
                    left += 1
    return counts


def _proportional(budget: _Budget, raw: Mapping[str, float]) -> dict[str, float]:
    """Ideal keep counts ``min(1, eps * raw) * numel`` summing to the remaining budget.

    This is the iteration of Evci et al. (2020), ``sparse_utils.get_sparsities`` in
    google-research/rigl: solve ``eps`` so the free layers hold the budget, make every
    layer whose density would exceed 1 dense, and solve again until none exceeds.
    """
    free = list(budget.sparse_names)
    full: list[str] = []
    while True:
        left = budget.remaining - sum(budget.numel[n] for n in full)
        divisor = sum(raw[n] * budget.numel[n] for n in free)
        if not free:
            break
        if not divisor > 0.0:
            raise ConfigError(
                "the ER/ERK layer scores underflowed to zero; use a smaller power_scale, e.g. 1.0"
            )
        eps = left / divisor
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            ideal = {n: eps * raw[n] * budget.numel[n] for n in free}
            ideal.update({n: float(budget.numel[n]) for n in full})
            return ideal
        full.extend(over)
        free = [n for n in free if n not in over]
    # Every layer became dense: only possible when nothing is pruned outside dense layers.
    return {n: float(budget.numel[n]) for n in budget.sparse_names}


# --------------------------------------------------------------------------------------
# the distributions
# --------------------------------------------------------------------------------------


def uniform(
    shapes: Shapes,
    sparsity: float,
    dense: frozenset[str] = frozenset(),
    scores: Mapping[str, torch.Tensor] | None = None,
    power_scale: float = 1.0,
) -> dict[str, int]:
    """Same density in every non-dense layer, chosen so the global count is met exactly.

    If some layers are kept dense, the others are pruned harder than ``sparsity`` so that
    the global fraction of zeros over ALL layers is still ``sparsity`` (Zhu & Gupta 2017,
    arXiv:1710.01878; Gale et al. 2019, arXiv:1902.09574). ``scores`` and ``power_scale``
    are ignored.
    """
    del scores, power_scale
    budget = _Budget(shapes, sparsity, dense)
    if budget.sparse_numel == 0:
        return budget.finish({})
    density = budget.remaining / budget.sparse_numel
    return budget.finish({n: density * budget.numel[n] for n in budget.sparse_names})


def _er_family(
    shapes: Shapes, sparsity: float, dense: frozenset[str], power_scale: float, kernel: bool
) -> dict[str, int]:
    budget = _Budget(shapes, sparsity, dense)
    power = _check_power(power_scale)
    raw = {}
    for name in budget.sparse_names:
        dims = budget.shapes[name] if kernel else budget.shapes[name][:2]
        raw[name] = (sum(dims) / math.prod(dims)) ** power
    return budget.finish(_proportional(budget, raw))


def erk(
    shapes: Shapes,
    sparsity: float,
    dense: frozenset[str] = frozenset(),
    scores: Mapping[str, torch.Tensor] | None = None,
    power_scale: float = 1.0,
) -> dict[str, int]:
    """Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the lottery", arXiv:1911.11134, §3).

    Layer density is ``eps * (sum(shape) / prod(shape)) ** power_scale`` with ``eps``
    solved so the non-dense layers hold exactly the remaining budget; a layer whose
    density would exceed 1 is made dense and ``eps`` re-solved, until none exceeds.
    Larger layers get lower densities. ``scores`` is ignored.
    """
    del scores
    return _er_family(shapes, sparsity, dense, power_scale, kernel=True)


def er(
    shapes: Shapes,
    sparsity: float,
    dense: frozenset[str] = frozenset(),
    scores: Mapping[str, torch.Tensor] | None = None,
    power_scale: float = 1.0,
) -> dict[str, int]:
    """Erdős–Rényi (Mocanu et al. 2018, SET, Nature Communications 9:2383).

    As :func:`erk` but the raw score uses only ``(out, in)``, the first two dimensions:
    ``((n_out + n_in) / (n_out * n_in)) ** power_scale``; kernel dimensions are ignored.
    For Linear layers ER equals ERK. ``scores`` is ignored.
    """
    del scores
    return _er_family(shapes, sparsity, dense, power_scale, kernel=False)


def global_magnitude(
    shapes: Shapes,
    sparsity: float,
    dense: frozenset[str] = frozenset(),
    scores: Mapping[str, torch.Tensor] | None = None,
    power_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, int]:
    """One threshold over all non-dense layers: keep the top-k of the concatenated scores.

    ``k`` is the keep budget left after the dense layers; the result is how many of each
    layer's entries are among the top k (global magnitude pruning, Han et al. 2015 with a
    global threshold as in Blalock et al. 2020, arXiv:2003.03033). ``scores[name]`` must be
    shaped like the layer's weight (e.g. ``|w|``). Exact ties are broken at random with
    ``generator`` (a random order before a stable sort), or without one deterministically:
    a stable descending sort of the concatenation in ``shapes`` order, earlier entries
    first. NaN scores rank last. ``power_scale`` is ignored.
    """
    del power_scale
    budget = _Budget(shapes, sparsity, dense)
    if scores is None:
        raise ConfigError(
            "the 'global' distribution needs per-weight scores; pass scores={layer: |w|} "
            "or choose distribution uniform/er/erk"
        )
    names = budget.sparse_names
    missing = [n for n in names if n not in scores]
    if missing:
        raise ConfigError(
            f"the 'global' distribution got no scores for layers {missing}; "
            "pass a score tensor for every non-dense layer"
        )
    flat: list[torch.Tensor] = []
    device = scores[names[0]].device if names else torch.device("cpu")
    for n in names:
        score = scores[n]
        if tuple(score.shape) != budget.shapes[n]:
            raise ConfigError(
                f"scores['{n}'] has shape {tuple(score.shape)} but the layer's weight is "
                f"{budget.shapes[n]}; pass one score per weight"
            )
        flat.append(score.detach().reshape(-1).to(device))
    counts = dict.fromkeys(names, 0)
    k = budget.remaining
    if names and k > 0:
        everything = torch.nan_to_num(torch.cat(flat).float(), nan=-math.inf)
        if generator is not None:
            shuffle = torch.randperm(everything.numel(), generator=generator).to(device)
            order = shuffle[torch.sort(everything[shuffle], descending=True, stable=True).indices]
            order = order[:k]
        else:
            order = torch.sort(everything, descending=True, stable=True).indices[:k]
        offsets = torch.tensor([budget.numel[n] for n in names], device=device).cumsum(0)
        per_layer = torch.bucketize(order, offsets, right=True)
        tally = torch.bincount(per_layer, minlength=len(names)).tolist()
        counts = dict(zip(names, tally, strict=True))
    return {n: (budget.numel[n] if n in budget.dense else counts[n]) for n in budget.shapes}


def sensitivity(
    shapes: Shapes,
    sparsity: float,
    dense: frozenset[str] = frozenset(),
    scores: Mapping[str, torch.Tensor] | None = None,
    power_scale: float = 1.0,
    curves: Any = None,
) -> dict[str, int]:
    """Per-layer sparsities from layer-sensitivity curves, least predicted accuracy drop.

    ``curves``: a ``sensitivity.json``, a run folder whose ``sensitivity/sensitivity.json``
    to read, or :class:`~prunelab.analysis.sensitivity.SensitivityCurves`. The non-dense
    layers' real-valued sparsities come from the greedy marginal-cost allocation over the
    curves (:meth:`~prunelab.analysis.sensitivity.SensitivityCurves.allocate`: cheapest
    accuracy drop per weight removed first, the layers' drops assumed additive as in Han et
    al. 2015's per-layer sensitivity thresholds), then are rounded like every distribution
    here, so the global count is exact. Growing ``sparsity`` never lowers a layer's
    sparsity, as a gradual schedule needs. A missing or unreadable file, or curves whose
    layers are not those of ``shapes``, is a one-line ConfigError saying how to make them.
    ``scores`` and ``power_scale`` are ignored.
    """
    del scores, power_scale
    budget = _Budget(shapes, sparsity, dense)
    loaded, _ = _load_curves(curves, budget.numel, budget.dense)
    if budget.sparse_numel == 0 or budget.zeros == 0:
        return budget.finish({n: float(budget.numel[n]) for n in budget.sparse_names})
    rates = loaded.allocate(budget.zeros / budget.total, budget.numel, dense=budget.dense)
    return budget.finish({n: budget.numel[n] * (1.0 - rates[n]) for n in budget.sparse_names})


def _load_curves(curves: Any, numel: Mapping[str, int], dense: frozenset[str]):
    """``(curves, sha256)`` checked against the layers (one-line ConfigError otherwise)."""
    from prunelab.analysis.sensitivity import load_curves

    loaded, digest = load_curves(curves)
    loaded.check_layers(numel, dense)
    return loaded, digest


Distribution = Callable[..., dict[str, int]]

DISTRIBUTIONS: dict[str, Distribution] = {
    "uniform": uniform,
    "er": er,
    "erk": erk,
    "global": global_magnitude,
    "sensitivity": sensitivity,
}
# The options each distribution takes beyond the common keys of conf/distribution/*.yaml.
OPTIONS: dict[str, tuple[str, ...]] = {"sensitivity": ("curves",)}


def _key(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DISTRIBUTIONS:
        raise ConfigError(
            f"unknown sparsity distribution '{name}'; choose one of {sorted(DISTRIBUTIONS)}"
        )
    return key


def _name(name: str) -> str:
    """``name`` normalised; an unknown name is left for :func:`keep_counts` to report."""
    return str(name).strip().lower()


def distribution_options(name: str, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options of distribution ``name`` found in its ``config`` (a
    ``conf/distribution`` mapping), checked as far as they can be without the model:
    ``sensitivity``'s ``curves`` must be given and readable as sensitivity curves
    (one-line ConfigError otherwise). ``{}`` for a distribution without options (or an
    unknown name, which :func:`keep_counts` reports)."""
    key = _name(name)
    config = dict(config or {})
    options = {k: config.get(k) for k in OPTIONS.get(key, ())}
    if key == "sensitivity":
        from prunelab.analysis.sensitivity import curves_path, load_curves

        load_curves(options["curves"])
        options["curves"] = str(curves_path(options["curves"]).resolve())
    return options


def check_distribution(
    name: str,
    shapes: Shapes,
    dense: frozenset[str] = frozenset(),
    options: Mapping[str, Any] | None = None,
) -> None:
    """Check a distribution's options against the layers before training
    (``sensitivity``: a curve for every layer not kept dense, none for a layer the model
    lacks, the same weight counts); one-line ConfigError otherwise."""
    if _name(name) == "sensitivity":
        checked = _check_shapes(shapes)
        _load_curves(
            (options or {}).get("curves"),
            {n: math.prod(s) for n, s in checked.items()},
            frozenset(dense),
        )


def describe_distribution(
    name: str,
    shapes: Shapes,
    sparsity: float,
    dense: frozenset[str] = frozenset(),
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a distribution chose, for a run's record: for ``sensitivity`` the per-layer
    sparsities at ``sparsity`` (``rates``, from the exact keep counts), their predicted
    total accuracy drop, and the curves they came from (path, SHA-256 of the file, score,
    reference accuracy, grid and measured accuracies); ``{}`` for the other
    distributions, whose choice the record's per-layer sparsities already show."""
    if _name(name) != "sensitivity" or not shapes:
        return {}
    curves = (options or {}).get("curves")
    budget = _Budget(shapes, sparsity, dense)
    loaded, digest = _load_curves(curves, budget.numel, budget.dense)
    counts = sensitivity(shapes, sparsity, dense, curves=loaded)
    rates = {n: 1.0 - counts[n] / budget.numel[n] for n in budget.shapes}
    return {
        "name": "sensitivity",
        "rates": rates,
        "predicted_drop": loaded.predicted_drop(rates),
        "curves": {
            "path": loaded.source,
            "sha256": digest,
            "score": loaded.score,
            "reference": loaded.reference,
            "sparsities": list(loaded.sparsities),
            "accuracy": {n: list(v) for n, v in loaded.accuracy.items()},
        },
    }


def keep_counts(
    name: str,
    shapes: Shapes,
    sparsity: float,
    dense: frozenset[str] = frozenset(),
    scores: Mapping[str, torch.Tensor] | None = None,
    power_scale: float = 1.0,
    generator: torch.Generator | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """Keep counts per layer from the distribution registered as ``name`` (see module doc).

    ``generator`` breaks exact score ties of the ``global`` distribution at random;
    ``options`` are the distribution's own (:data:`OPTIONS`, e.g. ``sensitivity``'s
    ``curves``), the others' are ignored."""
    key = _key(name)
    if key == "global":
        return global_magnitude(shapes, sparsity, dense, scores, power_scale, generator)
    own = {k: v for k, v in (options or {}).items() if k in OPTIONS.get(key, ())}
    return DISTRIBUTIONS[key](shapes, sparsity, dense, scores, power_scale, **own)


def dense_layers(names: Sequence[str], dense_first: bool, dense_last: bool) -> frozenset[str]:
    """The layers to keep dense: the first and/or last of ``names``, in the given order.

    Keeping the first (and often the last) layer dense is common practice (Gale et al.
    2019; Evci et al. 2020 keep the first layer dense for ImageNet).
    """
    names = list(names)
    chosen: set[str] = set()
    if names and dense_first:
        chosen.add(names[0])
    if names and dense_last:
        chosen.add(names[-1])
    return frozenset(chosen)
