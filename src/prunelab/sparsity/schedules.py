"""Pruning schedules as pure functions of the optimizer step (so resuming is exact).

``step`` is the number of optimizer steps taken so far (Lightning's ``trainer.global_step``).
Nothing here keeps state: the same step always gives the same answer, in any call order.

* :class:`SparsitySchedule` moves the sparsity target: fixed, one-shot, or the polynomial
  (cubic by default) ramp of Zhu & Gupta 2017, "To prune, or not to prune: exploring the
  efficacy of pruning for model compression", arXiv:1710.01878.
* :class:`DropSchedule` says when a prune-and-grow method updates its mask and what fraction
  of the active weights it swaps: SET (Mocanu et al. 2018, Nature Communications 9:2383)
  and RigL (Evci et al. 2020, "Rigging the lottery", arXiv:1911.11134, eq. 1 cosine decay).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from prunelab.errors import ConfigError

__all__ = ["DropSchedule", "SparsitySchedule", "resolve_fraction"]

SPARSITY_KINDS = ("fixed", "one_shot", "polynomial")
ANNEALS = ("constant", "cosine", "linear")


def _as_int(owner: str, field: str, value: object, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            number = int(value)
        else:
            raise ConfigError(
                f"{owner}.{field}={value!r} is not a whole number; set it to an int >= {minimum}"
            ) from None
    if number < minimum:
        raise ConfigError(f"{owner}.{field}={value!r} is too small; set it to an int >= {minimum}")
    return number


def _as_float(owner: str, field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{owner}.{field}={value!r} is not a number; set it to a float")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{owner}.{field}={value!r} is not finite; set it to a finite float")
    return number


def _check_step(owner: str, step: int) -> int:
    return _as_int(owner, "step", step, 0)


@dataclass(frozen=True)
class SparsitySchedule:
    """How the sparsity target moves with the step (Zhu & Gupta 2017, arXiv:1710.01878).

    ``kind``:

    * ``"fixed"``: the mask is set once at initialisation and never changes;
      :meth:`sparsity_at` is the target at every step and there are no update steps.
    * ``"one_shot"``: ``initial_sparsity`` before ``begin_step``, the target from
      ``begin_step`` on; the only update step is ``begin_step``.
    * ``"polynomial"``: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** power``
      between ``t0 = begin_step`` and ``t_end = end_step``, ``s_i`` before and ``s_f`` from
      ``t_end`` on (``power=3`` is Zhu & Gupta's cubic, ``1`` linear). Updates happen every
      ``frequency`` steps from ``t0`` and always at ``t_end``, so the target is reached.
    """

    kind: str
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 100
    power: float = 3.0
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        owner = "SparsitySchedule"
        if self.kind not in SPARSITY_KINDS:
            raise ConfigError(
                f"unknown sparsity schedule kind {self.kind!r}; choose one of {list(SPARSITY_KINDS)}"
            )
        begin = _as_int(owner, "begin_step", self.begin_step, 0)
        end = _as_int(owner, "end_step", self.end_step, 0)
        frequency = _as_int(owner, "frequency", self.frequency, 1)
        power = _as_float(owner, "power", self.power)
        initial = _as_float(owner, "initial_sparsity", self.initial_sparsity)
        if self.kind == "polynomial" and end < begin:
            raise ConfigError(
                f"{owner} end_step={end} is before begin_step={begin}; set end_step >= begin_step"
            )
        if power <= 0.0:
            raise ConfigError(
                f"{owner}.power={self.power!r} must be > 0; use 3 (cubic, Zhu & Gupta) or 1"
            )
        if not 0.0 <= initial < 1.0:
            raise ConfigError(
                f"{owner}.initial_sparsity={self.initial_sparsity!r} is outside [0, 1); "
                "use e.g. 0.0"
            )
        for field, value in (
            ("begin_step", begin),
            ("end_step", end),
            ("frequency", frequency),
            ("power", power),
            ("initial_sparsity", initial),
        ):
            object.__setattr__(self, field, value)

    def is_update_step(self, step: int) -> bool:
        """True if the mask should be (re)computed after ``step`` optimizer steps."""
        step = _check_step("SparsitySchedule", step)
        if self.kind == "fixed":
            return False
        if self.kind == "one_shot":
            return step == self.begin_step
        if step < self.begin_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.frequency == 0

    def sparsity_at(self, step: int, target: float) -> float:
        """The sparsity the schedule asks for after ``step`` optimizer steps.

        ``target`` is the final sparsity ``s_f`` in ``[initial_sparsity, 1)``.
        """
        step = _check_step("SparsitySchedule", step)
        final = _as_float("SparsitySchedule", "target", target)
        if not 0.0 <= final < 1.0:
            raise ConfigError(f"target sparsity {target!r} is outside [0, 1); use e.g. 0.9")
        if self.kind == "fixed":
            return final
        initial = self.initial_sparsity
        if final < initial:
            raise ConfigError(
                f"target sparsity {target!r} is below initial_sparsity={initial}; "
                "set initial_sparsity <= target"
            )
        if step < self.begin_step:
            return initial
        if self.kind == "one_shot" or step >= self.end_step:
            return final
        progress = (step - self.begin_step) / (self.end_step - self.begin_step)
        # Zhu & Gupta's s_f + (s_i - s_f)(1 - p)^power, written to give s_i exactly at p = 0.
        value = initial + (final - initial) * (1.0 - (1.0 - progress) ** self.power)
        return min(max(value, initial), final)


@dataclass(frozen=True)
class DropSchedule:
    """When a prune-and-grow method updates its mask and how much it swaps.

    Updates happen every ``update_every`` steps (``ΔT``) from ``begin_step``, never at step
    0 and never at or after ``end_step`` (``T_end``). The drop fraction ``α`` is annealed
    over the absolute step ``t`` as in RigL (Evci et al. 2020, arXiv:1911.11134, eq. 1):
    cosine ``α/2 (1 + cos(π t / T_end))``, linear ``α (1 - t / T_end)`` or constant ``α``
    (SET, Mocanu et al. 2018), and 0 at/after ``T_end``. With the default
    ``end_step=0`` there are no updates: set it, e.g. via :func:`resolve_fraction`.
    """

    update_every: int = 100
    drop_fraction: float = 0.3
    anneal: str = "cosine"
    begin_step: int = 0
    end_step: int = 0

    def __post_init__(self) -> None:
        owner = "DropSchedule"
        every = _as_int(owner, "update_every", self.update_every, 1)
        alpha = _as_float(owner, "drop_fraction", self.drop_fraction)
        if self.anneal not in ANNEALS:
            raise ConfigError(
                f"unknown drop-fraction anneal {self.anneal!r}; choose one of {list(ANNEALS)}"
            )
        begin = _as_int(owner, "begin_step", self.begin_step, 0)
        end = _as_int(owner, "end_step", self.end_step, 0)
        if not 0.0 < alpha <= 1.0:
            raise ConfigError(
                f"{owner}.drop_fraction={self.drop_fraction!r} is outside (0, 1]; "
                "use e.g. 0.3 (RigL) or 0.5"
            )
        if end < begin:
            raise ConfigError(
                f"{owner} end_step={end} is before begin_step={begin}; set end_step >= begin_step"
            )
        for field, value in (
            ("update_every", every),
            ("drop_fraction", alpha),
            ("begin_step", begin),
            ("end_step", end),
        ):
            object.__setattr__(self, field, value)

    def is_update_step(self, step: int) -> bool:
        """True if the mask should be pruned-and-regrown after ``step`` optimizer steps."""
        step = _check_step("DropSchedule", step)
        return (
            step > 0
            and self.begin_step <= step < self.end_step
            and (step - self.begin_step) % self.update_every == 0
        )

    def fraction_at(self, step: int) -> float:
        """The fraction of active weights to drop (and regrow) at ``step``."""
        step = _check_step("DropSchedule", step)
        if step >= self.end_step:
            return 0.0
        alpha = self.drop_fraction
        if self.anneal == "constant":
            return alpha
        progress = step / self.end_step
        if self.anneal == "linear":
            return alpha * (1.0 - progress)
        return 0.5 * alpha * (1.0 + math.cos(math.pi * progress))


def resolve_fraction(value: float, total_steps: int) -> int:
    """Turn a fraction of training (a float in ``[0, 1]``) into a step: ``round(value * total)``.

    E.g. RigL stops mask updates at 75% of training: ``resolve_fraction(0.75, total_steps)``.
    """
    fraction = _as_float("resolve_fraction", "value", value)
    total = _as_int("resolve_fraction", "total_steps", total_steps, 0)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"step fraction {value!r} is outside [0, 1]; give a fraction of training, e.g. 0.75"
        )
    return round(fraction * total)
