"""Accuracy-guarded sparsity search: the pure-torch part of ``pruning=adaptive``.

:mod:`prunelab.adaptive` trains a dense stage, then fine-tunes one candidate sparsity after
another as sub-runs; this module decides which candidate comes next and when to stop
(:class:`BisectionSearch`), checks the budget (:func:`check_budget`) and builds each
candidate's mask from the dense stage's trained weights (:class:`AdaptiveMagnitude`).

The budget (top-level config keys):

- ``max_accuracy_drop``: a candidate is within it when ``dense val acc - val acc <=
  max_accuracy_drop`` (absolute: 0.01 is one accuracy point). The search then looks for the
  **highest** sparsity within it (and within any cost budget given with it).
- ``max_macs`` / ``max_latency_ms``: a candidate is within them when its sparse inference
  MACs per sample (``macs_infer_sparse``) / its measured latency are at most the limit.
  Without ``max_accuracy_drop`` the search looks for the **lowest** sparsity (the densest
  model) within them; with it they are extra constraints on the accuracy search.

The search is a bisection over ``[lo, hi]`` in log-density (the midpoint of two sparsities
``a < b`` is ``1 - sqrt((1 - a)(1 - b))``): first the end that should pass (``lo`` for
accuracy, ``hi`` for cost), then the other end, then midpoints between the last point that
passed and the last that failed, until ``steps`` points are tried or the two are within
``tol``. Each point's accuracy is assumed to fall (and its cost to fall) as sparsity
rises; a non-monotone curve still gives a valid answer (every chosen point met the budget
when it was measured), only perhaps not the highest one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruningMethod, positive_int, topk_mask
from prunelab.sparsity.engine import Context, layer_generator
from prunelab.sparsity.masks import Masks

CRITERIA = ("magnitude",)
# The latency variants of the cost report a budget may name (cost.latency's keys).
LATENCY_VARIANTS = ("masked", "sparse", "compact")
# Why a search stopped (the ``stopped_because`` codes).
STOP_SAFE_END_FAILS = "safe_end_fails"
STOP_RANGE_END_PASSES = "range_end_passes"
STOP_CONVERGED = "converged"
STOP_MAX_STEPS = "max_steps"
# What the cost meter's training-FLOP rule calls a stage (dense or a fixed mask).
STAGE_ACCOUNTING = "fixed"
# Candidate sparsities are rounded to this many decimals (they name sub-run folders).
DECIMALS = 4


class BudgetNotMet(ConfigError):
    """No candidate sparsity met the budget; the message names the closest point."""


def _open_fraction(key: str, value: Any, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{key} must be a number in (0, 1), got {value!r}; e.g. {example}")
    return float(value)


def _positive_number(key: str, value: Any, example: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{key} must be a number > 0 (or null), got {value!r}; e.g. {example}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """What a candidate must meet (``None``: no such constraint)."""

    max_accuracy_drop: float | None = None
    max_macs: float | None = None
    max_latency_ms: float | None = None

    @property
    def mode(self) -> str:
        """``accuracy``: find the highest sparsity within the accuracy drop; ``cost``: the
        lowest within the cost budgets."""
        return "accuracy" if self.max_accuracy_drop is not None else "cost"

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in asdict(self).items() if v is not None]
        return ", ".join(parts)


def check_budget(
    max_accuracy_drop: Any = None, max_macs: Any = None, max_latency_ms: Any = None
) -> Budget:
    """The budget of an adaptive run, or a one-line ConfigError."""
    if max_accuracy_drop is None and max_macs is None and max_latency_ms is None:
        raise ConfigError(
            "pruning=adaptive needs a budget: max_accuracy_drop (e.g. max_accuracy_drop=0.01), "
            "max_macs or max_latency_ms"
        )
    drop = (
        None
        if max_accuracy_drop is None
        else _open_fraction("max_accuracy_drop", max_accuracy_drop, "max_accuracy_drop=0.01")
    )
    return Budget(
        max_accuracy_drop=drop,
        max_macs=_positive_number("max_macs", max_macs, "max_macs=50000"),
        max_latency_ms=_positive_number("max_latency_ms", max_latency_ms, "max_latency_ms=0.5"),
    )


@dataclass
class Point:
    """One tried sparsity: what was measured and whether it met the budget."""

    sparsity: float
    val_acc: float | None
    drop: float | None
    macs: float | None
    latency_ms: float | None
    feasible: bool
    # The constraints it broke, each ``name: value > limit``.
    violations: list[str] = field(default_factory=list)
    # How far past its worst constraint (0 when feasible): the accuracy drop beyond
    # max_accuracy_drop (accuracy units), a cost's excess as a fraction of its limit.
    excess: float = 0.0
    realised: float | None = None
    run_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"sparsity {self.sparsity:g}"]
        if self.val_acc is not None:
            parts.append(f"val acc {self.val_acc:.4f}")
        if self.drop is not None:
            parts.append(f"drop {self.drop:+.4f}")
        if self.macs is not None:
            parts.append(f"{self.macs:,.0f} MACs")
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:.4g} ms")
        text = ", ".join(parts)
        return text + (f" ({'; '.join(self.violations)})" if self.violations else "")


def _midpoint(a: float, b: float) -> float:
    """The log-density midpoint of two sparsities, rounded to :data:`DECIMALS`."""
    return round(1.0 - math.sqrt((1.0 - a) * (1.0 - b)), DECIMALS)


class BisectionSearch:
    """The search's state: :meth:`next` gives the sparsity to try (None once stopped),
    :meth:`record` takes its measurements. Every tried point stays in :attr:`points`."""

    def __init__(
        self,
        budget: Budget,
        lo: float,
        hi: float,
        steps: int,
        tol: float = 0.005,
        reference_acc: float | None = None,
    ) -> None:
        if not 0 < lo < hi < 1:
            raise ConfigError(f"the search range needs 0 < lo < hi < 1, got lo={lo}, hi={hi}")
        if steps < 2:
            raise ConfigError(f"pruning.search_steps must be >= 2 (both ends first), got {steps}")
        if budget.max_accuracy_drop is not None and reference_acc is None:
            raise ValueError("an accuracy budget needs the dense model's validation accuracy")
        self.budget = budget
        self.lo, self.hi = round(float(lo), DECIMALS), round(float(hi), DECIMALS)
        self.steps = int(steps)
        self.tol = float(tol)
        self.reference_acc = reference_acc
        self.points: list[Point] = []
        self.stopped_because: str | None = None
        self.reason: str | None = None
        self._passed: float | None = None  # nearest point to the boundary that passed
        self._failed: float | None = None  # ... and that failed
        self._pending: float | None = None

    # -- the driving constraint ---------------------------------------------------------------
    @property
    def upward(self) -> bool:
        """True when a passing point sends the search to higher sparsities (accuracy)."""
        return self.budget.mode == "accuracy"

    def passes(self, point: Point) -> bool:
        """Whether ``point`` meets the constraint the bisection follows: the accuracy drop
        when one is given, else every cost budget."""
        if self.upward:
            return point.drop is not None and point.drop <= self.budget.max_accuracy_drop + 1e-12
        return point.feasible

    def _ends(self) -> tuple[float, float]:
        """(the end that should pass, the other end)."""
        return (self.lo, self.hi) if self.upward else (self.hi, self.lo)

    # -- the loop -------------------------------------------------------------------------------
    def next(self) -> float | None:
        """The next sparsity to try, or None when the search has stopped."""
        if self._pending is not None:
            return self._pending
        if self.stopped_because is not None:
            return None
        if len(self.points) >= self.steps:
            self._stop(STOP_MAX_STEPS, f"tried all pruning.search_steps={self.steps} points")
            return None
        safe, far = self._ends()
        if not self.points:
            self._pending = safe
        elif len(self.points) == 1:
            self._pending = far
        else:
            a, b = sorted((self._passed, self._failed))
            mid = _midpoint(a, b)
            tried = {p.sparsity for p in self.points}
            if b - a <= self.tol or mid in tried or not a < mid < b:
                self._stop(
                    STOP_CONVERGED,
                    f"the last passing and failing sparsities ({self._passed:g}, "
                    f"{self._failed:g}) are within pruning.tol={self.tol:g}",
                )
                return None
            self._pending = mid
        return self._pending

    def record(
        self,
        sparsity: float,
        val_acc: float | None = None,
        macs: float | None = None,
        latency_ms: float | None = None,
        realised: float | None = None,
        run_dir: str | None = None,
    ) -> Point:
        """Measurements of the sparsity :meth:`next` gave; returns the evaluated point."""
        if self._pending is None or abs(sparsity - self._pending) > 1e-9:
            raise RuntimeError(f"record({sparsity}) but the search asked for {self._pending}")
        self._pending = None
        point = self.evaluate(sparsity, val_acc, macs, latency_ms)
        point.realised, point.run_dir = realised, run_dir
        self.points.append(point)
        passed = self.passes(point)
        if passed:
            self._passed = point.sparsity
        else:
            self._failed = point.sparsity
        safe, far = self._ends()
        if len(self.points) == 1 and not passed:
            what = "lowest" if self.upward else "highest"
            key = "pruning.lo" if self.upward else "pruning.hi"
            self._stop(
                STOP_SAFE_END_FAILS,
                f"the {what} sparsity of the range ({key}={safe:g}) already breaks the budget",
            )
        elif len(self.points) == 2 and passed:
            key, fix = ("pruning.hi", "raise") if self.upward else ("pruning.lo", "lower")
            self._stop(
                STOP_RANGE_END_PASSES,
                f"the far end of the range ({key}={far:g}) passes; {fix} {key} to search further",
            )
        return point

    def evaluate(
        self,
        sparsity: float,
        val_acc: float | None,
        macs: float | None,
        latency_ms: float | None,
    ) -> Point:
        """A point's drop, violations and excess under the budget."""
        b = self.budget
        drop = None
        if val_acc is not None and self.reference_acc is not None:
            drop = float(self.reference_acc) - float(val_acc)
        violations: list[str] = []
        excess = 0.0
        if b.max_accuracy_drop is not None:
            if drop is None:
                violations.append("no validation accuracy")
                excess = math.inf
            elif drop > b.max_accuracy_drop + 1e-12:
                violations.append(f"drop {drop:.4f} > {b.max_accuracy_drop:g}")
                excess = max(excess, drop - b.max_accuracy_drop)
        for name, value, limit in (
            ("MACs", macs, b.max_macs),
            ("latency_ms", latency_ms, b.max_latency_ms),
        ):
            if limit is None:
                continue
            if value is None:
                violations.append(f"no {name} measured")
                excess = math.inf
            elif value > limit:
                violations.append(f"{name} {value:.6g} > {limit:g}")
                excess = max(excess, value / limit - 1.0)
        return Point(
            sparsity=float(sparsity),
            val_acc=None if val_acc is None else float(val_acc),
            drop=drop,
            macs=None if macs is None else float(macs),
            latency_ms=None if latency_ms is None else float(latency_ms),
            feasible=not violations,
            violations=violations,
            excess=excess,
        )

    def _stop(self, code: str, reason: str) -> None:
        self.stopped_because, self.reason = code, reason

    # -- the outcome ------------------------------------------------------------------------------
    @property
    def chosen(self) -> Point | None:
        """The best feasible point: the highest sparsity (accuracy), the lowest (cost)."""
        feasible = [p for p in self.points if p.feasible]
        if not feasible:
            return None
        pick = max if self.upward else min
        return pick(feasible, key=lambda p: p.sparsity)

    @property
    def closest(self) -> Point | None:
        """With no feasible point: the one whose worst violation is smallest."""
        if self.chosen is not None or not self.points:
            return None
        return min(
            self.points, key=lambda p: (p.excess, -p.sparsity if self.upward else p.sparsity)
        )

    def not_met_message(self) -> str:
        """One line: the budget was not met, and the point that came closest."""
        closest = self.closest
        near = f"; closest: {closest.describe()}" if closest is not None else ""
        return (
            f"pruning=adaptive: no sparsity in [{self.lo:g}, {self.hi:g}] met the budget "
            f"({self.budget.describe()}) in {len(self.points)} point(s){near}"
        )

    def summary(self) -> dict[str, Any]:
        """What the run reports: the budget, every tried point, the choice and why it
        stopped."""
        chosen, closest = self.chosen, self.closest
        return {
            "mode": self.budget.mode,
            "budget": asdict(self.budget),
            "range": [self.lo, self.hi],
            "search_steps": self.steps,
            "tol": self.tol,
            "reference_val_acc": self.reference_acc,
            "tried": [p.as_dict() for p in self.points],
            "chosen": None if chosen is None else chosen.as_dict(),
            "budget_met": chosen is not None,
            "closest": None if closest is None else closest.as_dict(),
            "stopped_because": self.stopped_because,
            "reason": self.reason,
        }


class AdaptiveMagnitude(PruningMethod):
    """``pruning=adaptive``: the highest sparsity within an accuracy (or cost) budget.

    A dense stage trains the model; every candidate sparsity of :class:`BisectionSearch`
    prunes the dense stage's trained weights by magnitude (one threshold with
    ``distribution=global``, or the counts of the configured distribution), fine-tunes
    ``finetune_epochs`` epochs with the mask fixed and is measured on the validation split.
    :mod:`prunelab.adaptive` runs the stages as sub-runs. ``sparsity`` is the top of the
    search range (``hi`` defaults to it).
    """

    name = "adaptive"
    schedule_kinds = ("fixed",)

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        lo: float = 0.5,
        hi: float = 0.99,
        search_steps: int = 6,
        tol: float = 0.005,
        finetune_epochs: int = 1,
        criterion: str = "magnitude",
        latency_variant: str = "sparse",
        latency_batch: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        self.lo = _open_fraction("pruning.lo", lo, "pruning.lo=0.5")
        self.hi = _open_fraction("pruning.hi", hi, "pruning.hi=0.99")
        if self.lo >= self.hi:
            raise ConfigError(
                f"pruning.lo={self.lo:g} must be below pruning.hi={self.hi:g}; e.g. pruning.lo=0.5"
            )
        self.search_steps = positive_int("search_steps", search_steps, 6)
        if self.search_steps < 2:
            raise ConfigError(
                f"pruning.search_steps must be >= 2 (both ends of the range come first), got "
                f"{search_steps}; e.g. pruning.search_steps=6"
            )
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
            raise ConfigError(f"pruning.tol must be a number in [0, 1), got {tol!r}; e.g. 0.005")
        self.tol = float(tol)
        self.finetune_epochs = positive_int("finetune_epochs", finetune_epochs, 1)
        if criterion not in CRITERIA:
            raise ConfigError(
                f"pruning.criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}; "
                "e.g. pruning.criterion=magnitude"
            )
        self.criterion = str(criterion)
        if latency_variant not in LATENCY_VARIANTS:
            raise ConfigError(
                f"pruning.latency_variant must be one of {', '.join(LATENCY_VARIANTS)}, got "
                f"{latency_variant!r}; e.g. pruning.latency_variant=sparse"
            )
        self.latency_variant = str(latency_variant)
        self.latency_batch = positive_int("latency_batch", latency_batch, 1)
        # Set on the copy that trains one stage (for_candidate).
        self.mask: Masks | None = None

    @property
    def latency_key(self) -> str:
        """The cost report's key that ``max_latency_ms`` bounds."""
        return f"latency_ms/{self.latency_variant}/b{self.latency_batch}"

    def search(self, budget: Budget, reference_acc: float | None) -> BisectionSearch:
        return BisectionSearch(
            budget, self.lo, self.hi, self.search_steps, self.tol, reference_acc=reference_acc
        )

    def candidate_mask(self, trained: Params, sparsity: float, seed: int, step: int) -> Masks:
        """Keep the largest trained magnitudes at ``sparsity`` (per-layer counts from the
        distribution; ``global``: one threshold); needs :meth:`setup`. Exact ties are broken
        at random from (seed, step)."""
        if not self.shapes:
            raise RuntimeError("AdaptiveMagnitude.candidate_mask() needs setup() first")
        ctx = Context(seed, step)
        scores = {n: trained[n].detach().abs().float().cpu() for n in self.shapes}
        counts = self.keep_counts(
            sparsity, scores=scores, generator=ctx.generator(-1, "ties-global")
        )
        return Masks(
            {
                n: topk_mask(scores[n], int(counts[n]), layer_generator(seed, step, i, "ties"))
                for i, n in enumerate(self.shapes)
            }
        )

    def for_candidate(self, sparsity: float, mask: Masks | None) -> AdaptiveMagnitude:
        """A copy that trains one stage with ``mask`` fixed (None: the dense stage)."""
        twin = copy.copy(self)
        twin.sparsity, twin.mask = float(sparsity), mask
        # A stage is a fixed-mask run: the cost meter counts its training FLOPs by the
        # ``fixed`` rule (prunelab.cost.training), which is what this name selects.
        twin.name = STAGE_ACCOUNTING
        return twin

    # -- template ---------------------------------------------------------------------------
    def init_masks(self, params: Params, ctx: Context) -> Masks:
        if self.mask is None:
            return Masks.dense_like(params)
        return Masks({n: self.mask[n].to(p.device) for n, p in params.items()})

    def at_target(self, masks: Masks) -> bool:
        # Every stage trains with its mask fixed from the first step.
        return True

    def sparsity_target(self) -> float:
        return 0.0 if self.mask is None else self.mask.sparsity()


__all__ = [
    "AdaptiveMagnitude",
    "BisectionSearch",
    "Budget",
    "BudgetNotMet",
    "Point",
    "check_budget",
]
