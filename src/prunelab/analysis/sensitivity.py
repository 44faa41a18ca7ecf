"""Layer-wise sensitivity analysis, and per-layer sparsities allocated from its curves.

**Analysis** (:func:`layer_sensitivity`). Each prunable layer is pruned *alone* to every
sparsity of a grid, by its score among the weights its mask still keeps (magnitude ``|w|``
by default, or any score, e.g. a method's own ``prune_scores``), the accuracy on a fixed set
of batches is measured, and the layer is restored before the next one. This is the
sensitivity analysis of Han et al. 2015 ("Learning both weights and connections for
efficient neural networks", NeurIPS, Fig. 5: accuracy against the fraction of one layer's
parameters pruned away, one curve per layer) and of Distiller
(``distiller.perform_sensitivity_analysis``: per-parameter magnitude pruning at a list of
levels, a CSV and a PNG of the curves). Unlike both, existing masks are respected: a
layer already at 90% starts from its kept weights, and a grid point at or below a layer's
current sparsity changes nothing (its accuracy is the reference). The reference is the
accuracy of the model as given, with its masks (for a dense run, the dense accuracy).

**Allocation** (:meth:`SensitivityCurves.allocate`). Per-layer sparsities that remove a
given fraction of all prunable weights with the least *predicted* accuracy loss. A layer's
predicted drop at sparsity ``s`` is the measured drop interpolated linearly between the grid
points, made monotone (running maximum, never below 0), with 0 at sparsity 0 and, past the
last grid point, a pessimistic straight line to "accuracy 0" at sparsity 1. The total
predicted drop is the *sum* of the per-layer drops: it assumes the layers' losses are
independent and additive, the same assumption Han et al.'s sensitivity-based per-layer
thresholds make. He et al. 2018 ("AMC: AutoML for model compression", ECCV) avoid it by
searching the joint allocation, evaluating whole pruned networks; that is not done here.

The allocation is a **greedy marginal-cost** one (a fractional knapsack): every layer's
curve is replaced by its lower convex envelope, whose segments cost an increasing accuracy
drop per weight removed; segments of all layers are taken cheapest first (equally cheap
segments of several layers together, in proportion to their size), and the last one only in
part so that the target is met exactly. On the convex envelopes this greedy is optimal (the
fractional knapsack); where a measured curve is not convex it optimises the envelope, a
lower bound of the curve. As the target grows every layer's sparsity only grows (the greedy
path is nested), so a gradual schedule (GMP) never has to revive a weight.

Pure torch and the standard library; matplotlib is imported only to draw the curves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab import files
from prunelab.errors import ConfigError

__all__ = [
    "DEFAULT_SPARSITIES",
    "FORMAT",
    "HOW_TO_MAKE",
    "SensitivityCurves",
    "check_grid",
    "curves_path",
    "layer_sensitivity",
    "load_curves",
    "write_sensitivity",
]

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
FORMAT = "prunelab.sensitivity/1"
HOW_TO_MAKE = "make them with `python scripts/sensitivity.py <run dir>`"
# Slopes (accuracy drop per weight) closer than this count as equally cheap.
_SLOPE_RTOL = 1e-9

Score = str | Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------
# the curves
# --------------------------------------------------------------------------------------


def check_grid(sparsities: Sequence[float]) -> list[float]:
    """``sparsities`` as floats, checked: non-empty, in [0, 1], increasing and distinct."""
    try:
        grid = [float(s) for s in sparsities]
    except (TypeError, ValueError):
        grid = []
    if not grid or any(not (0.0 <= s <= 1.0) for s in grid):
        raise ConfigError(
            f"sensitivity sparsities {list(sparsities)!r} must be a non-empty list of numbers "
            "in [0, 1], e.g. 0.5 0.7 0.8 0.9 0.95 0.98 0.99"
        )
    if sorted(set(grid)) != grid:
        raise ConfigError(
            f"sensitivity sparsities {grid} must be increasing and distinct, "
            "e.g. 0.5 0.7 0.8 0.9 0.95 0.98 0.99"
        )
    return grid


@dataclass
class SensitivityCurves:
    """Accuracy of a model with one layer pruned, per layer and per sparsity.

    ``accuracy[layer][i]`` is the accuracy with ``layer`` alone at ``sparsities[i]``;
    ``reference`` the accuracy with nothing pruned beyond the model's own masks; ``numel``
    each layer's weight count and ``start`` its sparsity before the analysis (its mask's).
    ``score`` names the pruning score, ``meta`` says where the curves come from (run,
    checkpoint, split, samples) and ``source`` is the file they were read from, if any.
    """

    sparsities: list[float]
    reference: float
    accuracy: dict[str, list[float]]
    numel: dict[str, int]
    start: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    score: str = "magnitude"
    meta: dict[str, Any] = field(default_factory=dict)
    # The file the curves were read from (not written to JSON, not compared).
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.sparsities = check_grid(self.sparsities)
        self.reference = float(self.reference)
        if not self.accuracy:
            raise ConfigError(f"sensitivity curves hold no layer; {HOW_TO_MAKE}")
        for name, values in self.accuracy.items():
            if len(values) != len(self.sparsities):
                raise ConfigError(
                    f"sensitivity curve of layer '{name}' has {len(values)} points for "
                    f"{len(self.sparsities)} sparsities; {HOW_TO_MAKE}"
                )
            if name not in self.numel or int(self.numel[name]) < 1:
                raise ConfigError(
                    f"sensitivity curves give no weight count for layer '{name}'; {HOW_TO_MAKE}"
                )
        self.accuracy = {str(n): [float(a) for a in v] for n, v in self.accuracy.items()}
        self.numel = {str(n): int(self.numel[n]) for n in self.accuracy}
        self.start = {n: float(self.start.get(n, 0.0)) for n in self.accuracy}
        self.shapes = {n: [int(d) for d in s] for n, s in self.shapes.items()}

    # -- reading the curves ---------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.accuracy)

    def drops(self, layer: str) -> list[float]:
        """Measured accuracy drop (reference - accuracy) at each grid sparsity."""
        return [self.reference - a for a in self.accuracy[layer]]

    def points(self, layer: str) -> list[tuple[float, float]]:
        """The predicted-drop curve of ``layer`` as (sparsity, drop) points: (0, 0), the
        measured drops made monotone (running maximum, at least 0) and, when the grid ends
        before 1, a pessimistic last point (1, reference): all accuracy lost."""
        pts = [(0.0, 0.0)]
        running = 0.0
        for s, drop in zip(self.sparsities, self.drops(layer), strict=True):
            running = max(running, drop)
            if s == pts[-1][0]:
                pts[-1] = (s, max(pts[-1][1], running))
            else:
                pts.append((s, running))
        if pts[-1][0] < 1.0:
            pts.append((1.0, max(running, self.reference)))
        return pts

    def predict(self, layer: str, sparsity: float) -> float:
        """Predicted accuracy drop with ``layer`` alone at ``sparsity`` (linear between the
        points of :meth:`points`)."""
        pts = self.points(layer)
        s = min(max(float(sparsity), 0.0), 1.0)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
            if s <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (s - x0) / (x1 - x0)
        return pts[-1][1]

    def predicted_drop(self, rates: Mapping[str, float]) -> float:
        """Predicted total accuracy drop of per-layer sparsities ``rates``: the sum of the
        layers' drops (layers assumed independent; a layer without a curve counts 0)."""
        return sum(self.predict(n, s) for n, s in rates.items() if n in self.accuracy)

    # -- allocation -----------------------------------------------------------------------
    def check_layers(self, layer_sizes: Mapping[str, int], dense: Iterable[str] = ()) -> None:
        """ConfigError (one line) unless every layer of ``layer_sizes`` not in ``dense`` has
        a curve of the same weight count, and every curve names a layer of ``layer_sizes``."""
        dense = set(dense)
        source = self.source or "the sensitivity curves"
        missing = [n for n in layer_sizes if n not in dense and n not in self.accuracy]
        unknown = [n for n in self.accuracy if n not in layer_sizes]
        if missing or unknown:
            what = []
            if missing:
                what.append(f"no curve for layers {missing}")
            if unknown:
                what.append(f"curves for layers {unknown} the model does not have")
            raise ConfigError(
                f"{source} do not match the model ({'; '.join(what)}); "
                f"{HOW_TO_MAKE} (a run of the same model)"
            )
        for name, size in layer_sizes.items():
            if name in self.accuracy and int(size) != self.numel[name]:
                raise ConfigError(
                    f"{source} give layer '{name}' {self.numel[name]} weights but the model's "
                    f"has {int(size)}; {HOW_TO_MAKE} (a run of the same model)"
                )

    def allocate(
        self,
        target: float,
        layer_sizes: Mapping[str, int] | None = None,
        dense: Iterable[str] = (),
        dense_first: bool = False,
        dense_last: bool = False,
    ) -> dict[str, float]:
        """Per-layer sparsities removing ``target`` of all the weights of ``layer_sizes``
        (default: the curves' layers and sizes; dense layers count in the total, as
        ``sparsity=`` everywhere) with the least predicted accuracy drop.

        ``dense`` (and the first/last layer of ``layer_sizes`` with ``dense_first`` /
        ``dense_last``) stay at 0. Greedy marginal cost over the convex envelopes of the
        curves (see the module docstring); the last step is taken in part, so
        ``sum(rate * size)`` equals ``target * sum(size)`` up to float rounding. Raises a
        one-line ConfigError when the target is outside [0, 1] or needs more weights than
        the layers outside ``dense`` hold, or when the layers do not match the curves.
        """
        sizes = dict(self.numel if layer_sizes is None else layer_sizes)
        sizes = {str(n): int(v) for n, v in sizes.items()}
        names = list(sizes)
        dense = set(dense)
        if names and dense_first:
            dense.add(names[0])
        if names and dense_last:
            dense.add(names[-1])
        self.check_layers(sizes, dense)
        if isinstance(target, bool) or not isinstance(target, (int, float)):
            raise ConfigError(f"target sparsity {target!r} is not a number; e.g. 0.9")
        if not 0.0 <= float(target) <= 1.0:
            raise ConfigError(f"target sparsity {target} is outside [0, 1]; e.g. 0.9")
        total = sum(sizes.values())
        free = [n for n in names if n not in dense]
        need = float(target) * total
        capacity = sum(sizes[n] for n in free)
        if need > capacity * (1.0 + 1e-12):
            raise ConfigError(
                f"sparsity={target} needs {need:.0f} of {total} weights pruned but only "
                f"{capacity} lie outside the dense layers {sorted(dense)}; lower the sparsity "
                "or keep fewer layers dense"
            )
        removed = dict.fromkeys(names, 0.0)
        # Segments of every free layer's convex envelope: (drop per weight, layer, weights).
        segments: list[tuple[float, int, float]] = []
        for i, name in enumerate(free):
            hull = _lower_hull(self.points(name))
            for (x0, y0), (x1, y1) in zip(hull, hull[1:], strict=False):
                width = (x1 - x0) * sizes[name]
                if width > 0:
                    segments.append(((y1 - y0) / width, i, width))
        # Within a layer the envelope's slopes increase, so a stable sort by slope alone keeps
        # each layer's segments in order and orders equal slopes by layer.
        segments.sort(key=lambda seg: seg[0])
        left = min(need, float(capacity))
        at = 0
        while left > 0 and at < len(segments):
            group = [segments[at]]
            at += 1
            while at < len(segments) and math.isclose(
                segments[at][0], group[0][0], rel_tol=_SLOPE_RTOL, abs_tol=1e-15
            ):
                group.append(segments[at])
                at += 1
            width = sum(seg[2] for seg in group)
            share = min(1.0, left / width)
            for _, i, w in group:
                removed[free[i]] += share * w
            left -= share * width
        return {n: min(1.0, removed[n] / sizes[n]) if sizes[n] else 0.0 for n in names}

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "metric": "accuracy",
            "score": self.score,
            "reference": self.reference,
            "sparsities": list(self.sparsities),
            "layers": {
                n: {
                    "numel": self.numel[n],
                    "shape": self.shapes.get(n),
                    "start": self.start[n],
                    "accuracy": list(self.accuracy[n]),
                }
                for n in self.accuracy
            },
            "meta": dict(self.meta),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The curves as JSON text (written to ``path`` too when given)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the sensitivity curves"):
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ConfigError(f"{source} are not prunelab sensitivity curves; {HOW_TO_MAKE}")
        try:
            layers = data["layers"]
            return cls(
                sparsities=list(data["sparsities"]),
                reference=float(data["reference"]),
                accuracy={n: list(v["accuracy"]) for n, v in layers.items()},
                numel={n: int(v["numel"]) for n, v in layers.items()},
                start={n: float(v.get("start", 0.0)) for n, v in layers.items()},
                shapes={n: list(v["shape"]) for n, v in layers.items() if v.get("shape")},
                score=str(data.get("score", "magnitude")),
                meta=dict(data.get("meta") or {}),
            )
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(
                f"{source} are malformed ({type(err).__name__}: {err}); {HOW_TO_MAKE}"
            ) from None

    @classmethod
    def from_json(cls, source: str | Path) -> SensitivityCurves:
        """Curves from JSON text, or from a file path (a ``str`` that does not start with
        ``{`` is a path; ``source`` is then set)."""
        if isinstance(source, str) and source.lstrip().startswith("{"):
            text, where = source, "the sensitivity curves"
        else:
            path = Path(source)
            where = str(path)
            try:
                text = path.read_text()
            except OSError as err:
                raise ConfigError(
                    f"cannot read sensitivity curves {path} ({err.strerror or err}); {HOW_TO_MAKE}"
                ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where} is not JSON ({err.msg}); {HOW_TO_MAKE}") from None
        curves = cls.from_dict(data, where)
        if where != "the sensitivity curves":
            curves.source = where
        return curves

    def digest(self) -> str:
        """SHA-256 of the curves' JSON text (equal to the file's when written by
        :meth:`to_json`)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    # -- presentation -----------------------------------------------------------------------
    def table(self, digits: int = 3) -> str:
        """Markdown: one row per layer, the accuracy at each sparsity with its drop."""
        head = ["layer", "weights", "start"] + [f"{s:g}" for s in self.sparsities]
        lines = [
            f"Reference accuracy {self.reference:.{digits}f} ({self.score} score); each cell: "
            "accuracy with that layer alone at that sparsity (change from the reference).",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        for name in self.accuracy:
            cells = [
                f"{a:.{digits}f} ({a - self.reference:+.{digits}f})" for a in self.accuracy[name]
            ]
            row = [name, str(self.numel[name]), f"{self.start[name]:.{digits}f}", *cells]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """PNG of accuracy against layer sparsity, one line per layer, and the reference
        accuracy dashed. The x axis is ``-log10(density)`` labelled in sparsity, so that
        0.9, 0.99 are as far apart as 0 and 0.9."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        def x_of(s: float) -> float:
            return -math.log10(max(1.0 - s, 1e-4))

        fig = Figure(figsize=(7.5, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        many = len(self.accuracy) > 10
        for i, name in enumerate(self.accuracy):
            start = self.start[name]
            xs = [x_of(start)] + [x_of(s) for s in self.sparsities if s > start]
            ys = [self.reference] + [
                a for s, a in zip(self.sparsities, self.accuracy[name], strict=True) if s > start
            ]
            style = ("-", "--", ":", "-.")[(i // 10) % 4]
            ax.plot(xs, ys, style, marker="o", markersize=3, linewidth=1.2, label=name)
        ax.axhline(self.reference, color="black", linestyle="--", linewidth=0.8, label="reference")
        ticks = sorted({0.0, *self.sparsities})
        ax.set_xticks([x_of(s) for s in ticks])
        ax.set_xticklabels([f"{s:g}" for s in ticks], fontsize=8)
        ax.set_xlabel("sparsity of the one pruned layer")
        ax.set_ylabel("accuracy")
        ax.set_title(title or f"Layer sensitivity ({self.score} pruning)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6 if many else 8, ncol=2 if many else 1, loc="lower left")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        return path


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex envelope of points sorted by x (Andrew's monotone chain); collinear
    middle points are dropped, so the slopes strictly increase."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (ox, oy), (ax_, ay) = hull[-2], hull[-1]
            if (ax_ - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        logits = model(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)


def _keep_top(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` highest ``scores`` among the True entries of ``mask``."""
    flat = scores.detach().flatten().float()
    flat = torch.nan_to_num(flat, nan=-torch.finfo(torch.float32).max)
    flat = torch.where(mask.flatten().to(flat.device), flat, torch.full_like(flat, -math.inf))
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        out[torch.topk(flat, k, sorted=False).indices] = True
    return out.view_as(mask).to(mask.device) & mask


def _scores_of(score: Score | Mapping[str, torch.Tensor], params: dict[str, torch.Tensor]):
    if isinstance(score, str):
        if score != "magnitude":
            raise ConfigError(
                f"score={score!r} is not known; use 'magnitude' or pass a function "
                "params -> {layer: score tensor}"
            )
        return {n: p.abs() for n, p in params.items()}, "magnitude"
    if isinstance(score, Mapping):
        scores, label = dict(score), "given"
    elif callable(score):
        scores = dict(score(params))
        label = getattr(score, "__name__", None) or type(score).__name__
    else:
        raise ConfigError(f"score={score!r} is neither 'magnitude' nor a function")
    for n, p in params.items():
        if n not in scores or tuple(scores[n].shape) != tuple(p.shape):
            raise ConfigError(
                f"the pruning score gives no tensor shaped {tuple(p.shape)} for layer '{n}'; "
                "return one score per weight for every layer"
            )
    return {n: scores[n].detach().to(params[n].device) for n in params}, label


def layer_sensitivity(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor | None] | None,
    batches: Batches,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    score: Score | Mapping[str, torch.Tensor] = "magnitude",
    layers: Sequence[str] | None = None,
    params: Mapping[str, nn.Parameter] | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: Callable[[str, float, float], None] | None = None,
) -> SensitivityCurves:
    """Prune each layer alone to each of ``sparsities`` and measure the accuracy.

    ``model(x)`` gives logits; ``batches`` yields ``(x, y)`` and is read once (kept in
    memory, on the model's device) so every measurement sees the same samples. ``masks``
    (``{layer: bool tensor}``, None or missing = dense) are applied first; a layer is then
    pruned among the weights its mask keeps, keeping the ``numel - round(s * numel)``
    highest scores (``"magnitude"``: ``|w|``; a function ``params -> {layer: scores}``,
    called once on the masked weights, e.g. a method's ``prune_scores``; or the score
    tensors themselves). ``params`` defaults to
    :func:`prunelab.models.prunable_parameters`, ``layers`` to all of them. ``progress``
    is called with ``(layer, sparsity, accuracy)`` after each measurement. The model's
    weights and train/eval mode are restored on return, whatever happens.
    """
    grid = check_grid(sparsities)
    if params is None:
        from prunelab.models import prunable_parameters

        params = prunable_parameters(model)
    params = dict(params)
    chosen = list(params) if layers is None else [str(n) for n in layers]
    unknown = [n for n in chosen if n not in params]
    if unknown or not chosen:
        raise ConfigError(
            f"layers {unknown or chosen} are not prunable layers of the model; "
            f"choose among {list(params)}"
        )
    masks = dict(masks or {})
    device = next(iter(params.values())).device
    data = [(x.to(device), y.to(device)) for x, y in batches]
    if not data:
        raise ConfigError("no batches to measure the accuracy on; pass a non-empty split")
    original = {n: p.detach().clone() for n, p in params.items()}
    was_training = model.training
    try:
        model.eval()
        keep: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n, p in params.items():
                mask = masks.get(n)
                keep[n] = (
                    torch.ones_like(p, dtype=torch.bool)
                    if mask is None
                    else mask.to(device=p.device, dtype=torch.bool)
                )
                p.mul_(keep[n])
        masked = {n: p.detach().clone() for n, p in params.items()}
        scores, label = _scores_of(score, {n: masked[n] for n in params})
        reference = _accuracy(model, data)
        accuracy: dict[str, list[float]] = {}
        start: dict[str, float] = {}
        for name in chosen:
            p, mask = params[name], keep[name]
            numel = p.numel()
            kept = int(mask.sum())
            start[name] = 1.0 - kept / numel
            row = []
            for s in grid:
                k = numel - round(s * numel)
                if k >= kept:  # the mask already prunes this much: nothing changes
                    acc = reference
                else:
                    with torch.no_grad():
                        p.copy_(masked[name] * _keep_top(scores[name], mask, k))
                    try:
                        acc = _accuracy(model, data)
                    finally:
                        with torch.no_grad():
                            p.copy_(masked[name])
                row.append(acc)
                if progress is not None:
                    progress(name, s, acc)
            accuracy[name] = row
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
        model.train(was_training)
    samples = sum(int(y.numel()) for _, y in data)
    return SensitivityCurves(
        sparsities=grid,
        reference=reference,
        accuracy=accuracy,
        numel={n: params[n].numel() for n in chosen},
        start=start,
        shapes={n: list(params[n].shape) for n in chosen},
        score=label,
        meta={"samples": samples, **dict(meta or {})},
    )


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


def curves_path(source: str | Path) -> Path:
    """The sensitivity JSON a path names: a ``.json`` file as is; a folder holding
    ``sensitivity.json`` (an ``--out`` folder); else a run folder's
    ``<run>/sensitivity/sensitivity.json``."""
    path = Path(source).expanduser()
    if path.is_dir():
        own = path / files.SENSITIVITY_JSON
        return own if own.is_file() else files.sensitivity_json(path)
    return path


_CACHE: dict[tuple[str, int, int], tuple[SensitivityCurves, str]] = {}


def load_curves(source: str | Path | SensitivityCurves | Mapping[str, Any]):
    """``(curves, sha256 of the file)`` from a path (see :func:`curves_path`), curves or
    their dict; files are read once per (path, mtime, size). One-line ConfigError when the
    source is missing, unreadable or not sensitivity curves."""
    if isinstance(source, SensitivityCurves):
        return source, source.digest()
    if isinstance(source, Mapping):
        curves = SensitivityCurves.from_dict(source)
        return curves, curves.digest()
    if source is None or (isinstance(source, str) and not source.strip()):
        raise ConfigError(
            "distribution=sensitivity needs distribution.curves=<sensitivity.json or run dir>; "
            + HOW_TO_MAKE
        )
    path = curves_path(source).resolve()
    try:
        stat = path.stat()
    except OSError:
        raise ConfigError(f"no sensitivity curves at {path}; {HOW_TO_MAKE}") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ConfigError(
                f"cannot read sensitivity curves {path} ({err.strerror or err}); {HOW_TO_MAKE}"
            ) from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not JSON ({err}); {HOW_TO_MAKE}") from None
        curves = SensitivityCurves.from_dict(data, str(path))
        curves.source = str(path)
        _CACHE.clear()  # one file in use at a time is the common case; keep memory flat
        _CACHE[key] = (curves, hashlib.sha256(raw).hexdigest())
    return _CACHE[key]


def write_sensitivity(
    curves: SensitivityCurves, out_dir: str | Path, title: str | None = None
) -> dict[str, Path]:
    """Write ``sensitivity.json``, the Markdown table and the PNG plot into ``out_dir``;
    return their paths (keys ``json``, ``table``, ``plot``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / files.SENSITIVITY_JSON,
        "table": out / files.SENSITIVITY_TABLE,
        "plot": out / files.SENSITIVITY_PLOT,
    }
    curves.to_json(paths["json"])
    paths["table"].write_text(curves.table())
    curves.plot(paths["plot"], title=title)
    return paths
