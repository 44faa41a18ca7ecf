"""Pruning schedules: pure functions of the step (Zhu & Gupta 2017; SET; RigL)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunelab.errors import ConfigError
from prunelab.sparsity import DropSchedule, SparsitySchedule, resolve_fraction

SETTINGS = settings(max_examples=50, deadline=None)

steps = st.integers(0, 5000)


@st.composite
def sparsity_schedules(draw, kind=None):
    begin = draw(st.integers(0, 1000))
    return SparsitySchedule(
        kind=kind or draw(st.sampled_from(["fixed", "one_shot", "polynomial"])),
        begin_step=begin,
        end_step=begin + draw(st.integers(0, 2000)),
        frequency=draw(st.integers(1, 300)),
        power=draw(st.sampled_from([1.0, 2.0, 3.0, 0.5])),
        initial_sparsity=draw(st.floats(0.0, 0.5)),
    )


@st.composite
def drop_schedules(draw):
    begin = draw(st.integers(0, 1000))
    return DropSchedule(
        update_every=draw(st.integers(1, 300)),
        drop_fraction=draw(st.floats(0.01, 1.0)),
        anneal=draw(st.sampled_from(["constant", "cosine", "linear"])),
        begin_step=begin,
        end_step=begin + draw(st.integers(0, 3000)),
    )


targets = st.floats(0.5, 0.99)


# --------------------------------------------------------------------------------------
# purity
# --------------------------------------------------------------------------------------


@SETTINGS
@given(schedule=sparsity_schedules(), target=targets, probe=st.lists(steps, min_size=1))
def test_sparsity_schedule_is_pure(schedule, target, probe):
    first = [(schedule.sparsity_at(t, target), schedule.is_update_step(t)) for t in probe]
    again = [(schedule.sparsity_at(t, target), schedule.is_update_step(t)) for t in reversed(probe)]
    assert first == list(reversed(again))
    clone = dataclasses.replace(schedule)
    assert clone == schedule and hash(clone) == hash(schedule)
    assert [clone.sparsity_at(t, target) for t in probe] == [f[0] for f in first]
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.begin_step = 7  # type: ignore[misc]


@SETTINGS
@given(schedule=drop_schedules(), probe=st.lists(steps, min_size=1))
def test_drop_schedule_is_pure(schedule, probe):
    first = [(schedule.fraction_at(t), schedule.is_update_step(t)) for t in probe]
    again = [(schedule.fraction_at(t), schedule.is_update_step(t)) for t in reversed(probe)]
    assert first == list(reversed(again))
    assert hash(dataclasses.replace(schedule)) == hash(schedule)
    assert len({schedule, dataclasses.replace(schedule)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.drop_fraction = 0.1  # type: ignore[misc]


# --------------------------------------------------------------------------------------
# SparsitySchedule
# --------------------------------------------------------------------------------------


@SETTINGS
@given(schedule=sparsity_schedules("polynomial"), target=targets)
def test_polynomial_monotone_from_initial_to_target(schedule, target):
    s_i = schedule.initial_sparsity
    values = [schedule.sparsity_at(t, target) for t in range(0, schedule.end_step + 50, 7)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert all(s_i <= v <= target for v in values)
    if schedule.begin_step > 0:
        assert schedule.sparsity_at(schedule.begin_step - 1, target) == s_i
    assert schedule.sparsity_at(schedule.begin_step, target) == (
        target if schedule.begin_step == schedule.end_step else s_i
    )
    for t in (schedule.end_step, schedule.end_step + 1, schedule.end_step + 10**6):
        assert schedule.sparsity_at(t, target) == target


@SETTINGS
@given(schedule=sparsity_schedules("polynomial"), probe=steps)
def test_polynomial_update_steps_on_grid_and_include_end(schedule, probe):
    t0, t_end, freq = schedule.begin_step, schedule.end_step, schedule.frequency
    assert schedule.is_update_step(t0)
    assert schedule.is_update_step(t_end)
    assert not schedule.is_update_step(t_end + 1)
    if t0 > 0:
        assert not schedule.is_update_step(t0 - 1)
    expected = t0 <= probe <= t_end and ((probe - t0) % freq == 0 or probe == t_end)
    assert schedule.is_update_step(probe) == expected


def test_cubic_matches_zhu_gupta_by_hand():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt)) ** 3, t0 = 100, n Δt = 1000.
    schedule = SparsitySchedule("polynomial", begin_step=100, end_step=1100, frequency=100)
    assert schedule.sparsity_at(100, 0.9) == pytest.approx(0.0)
    assert schedule.sparsity_at(600, 0.9) == pytest.approx(0.9 - 0.9 * 0.125)  # 0.7875
    assert schedule.sparsity_at(350, 0.9) == pytest.approx(0.9 - 0.9 * 0.75**3)  # 0.5203125
    assert schedule.sparsity_at(1000, 0.8) == pytest.approx(0.8 - 0.8 * 0.1**3)  # 0.7992
    with_initial = dataclasses.replace(schedule, initial_sparsity=0.5)
    assert with_initial.sparsity_at(600, 0.9) == pytest.approx(0.9 - 0.4 * 0.125)  # 0.85
    linear = dataclasses.replace(schedule, power=1.0)
    assert linear.sparsity_at(600, 0.9) == pytest.approx(0.45)
    assert schedule.sparsity_at(1100, 0.9) == 0.9


def test_polynomial_single_step_when_begin_equals_end():
    schedule = SparsitySchedule("polynomial", begin_step=50, end_step=50, frequency=7)
    assert [t for t in range(200) if schedule.is_update_step(t)] == [50]
    assert schedule.sparsity_at(49, 0.9) == 0.0
    assert schedule.sparsity_at(50, 0.9) == 0.9


def test_polynomial_update_steps_listed():
    schedule = SparsitySchedule("polynomial", begin_step=10, end_step=45, frequency=10)
    assert [t for t in range(100) if schedule.is_update_step(t)] == [10, 20, 30, 40, 45]


@SETTINGS
@given(schedule=sparsity_schedules("fixed"), target=targets, probe=steps)
def test_fixed(schedule, target, probe):
    assert schedule.sparsity_at(probe, target) == target
    assert not schedule.is_update_step(probe)


@SETTINGS
@given(schedule=sparsity_schedules("one_shot"), target=targets, probe=steps)
def test_one_shot(schedule, target, probe):
    t0 = schedule.begin_step
    assert schedule.is_update_step(probe) == (probe == t0)
    expected = schedule.initial_sparsity if probe < t0 else target
    assert schedule.sparsity_at(probe, target) == expected


def test_one_shot_ignores_end_step():
    schedule = SparsitySchedule("one_shot", begin_step=500)  # end_step 0 < begin: fine here
    assert schedule.sparsity_at(499, 0.9) == 0.0
    assert schedule.sparsity_at(500, 0.9) == 0.9


# --------------------------------------------------------------------------------------
# DropSchedule
# --------------------------------------------------------------------------------------


@SETTINGS
@given(schedule=drop_schedules(), probe=steps)
def test_drop_update_steps(schedule, probe):
    expected = (
        probe > 0
        and schedule.begin_step <= probe < schedule.end_step
        and (probe - schedule.begin_step) % schedule.update_every == 0
    )
    assert schedule.is_update_step(probe) == expected
    for t in range(schedule.end_step, schedule.end_step + 2 * schedule.update_every + 1):
        assert not schedule.is_update_step(t)
        assert schedule.fraction_at(t) == 0.0


@SETTINGS
@given(schedule=drop_schedules(), probe=steps)
def test_drop_fraction_bounds_and_monotone(schedule, probe):
    alpha = schedule.drop_fraction
    assert 0.0 <= schedule.fraction_at(probe) <= alpha
    assert schedule.fraction_at(probe + 1) <= schedule.fraction_at(probe)


@SETTINGS
@given(alpha=st.floats(0.01, 1.0), half=st.integers(1, 5000))
def test_cosine_anneal_points(alpha, half):
    schedule = DropSchedule(drop_fraction=alpha, anneal="cosine", end_step=2 * half)
    assert schedule.fraction_at(0) == pytest.approx(alpha)
    assert schedule.fraction_at(half) == pytest.approx(alpha / 2)
    assert schedule.fraction_at(2 * half) == 0.0
    expected = alpha / 2 * (1 + math.cos(math.pi * (half // 2) / (2 * half)))
    assert schedule.fraction_at(half // 2) == pytest.approx(expected)


def test_linear_and_constant_anneal():
    linear = DropSchedule(drop_fraction=0.4, anneal="linear", end_step=1000)
    assert linear.fraction_at(0) == pytest.approx(0.4)
    assert linear.fraction_at(250) == pytest.approx(0.3)
    assert linear.fraction_at(1000) == 0.0
    constant = DropSchedule(drop_fraction=0.3, anneal="constant", end_step=1000)
    assert constant.fraction_at(999) == 0.3
    assert constant.fraction_at(1000) == 0.0


def test_drop_update_steps_listed():
    schedule = DropSchedule(update_every=100, begin_step=0, end_step=450)
    assert [t for t in range(1000) if schedule.is_update_step(t)] == [100, 200, 300, 400]
    late = DropSchedule(update_every=100, begin_step=50, end_step=350)
    assert [t for t in range(1000) if late.is_update_step(t)] == [50, 150, 250]
    assert not any(DropSchedule().is_update_step(t) for t in range(1000))  # end_step=0


# --------------------------------------------------------------------------------------
# resolve_fraction
# --------------------------------------------------------------------------------------


@SETTINGS
@given(value=st.floats(0.0, 1.0), total=st.integers(0, 10**6))
def test_resolve_fraction_is_the_nearest_step(value, total):
    step = resolve_fraction(value, total)
    assert isinstance(step, int) and 0 <= step <= total
    assert abs(step - value * total) <= 0.5


@pytest.mark.parametrize(
    ("value", "total", "step"),
    [
        (0.75, 1000, 750),
        (0.0, 1000, 0),
        (1.0, 1000, 1000),
        (0.75, 97656, 73242),  # RigL's T_end on the CIFAR-10 recipe (97,656 steps)
        (0.75, 54000, 40500),  # 100 epochs of 540 steps
        (0.5, 391, 196),  # 195.5: ties go to the even step
        (0.5, 393, 196),  # 196.5: ties go to the even step
        (0.3, 1001, 300),  # 300.3
        (0.29, 100, 29),  # 28.999999999999996 in floating point
        (0.57, 100, 57),  # 56.99999999999999 in floating point
        (0.999, 1000, 999),
        (0.25, 0, 0),
    ],
)
def test_resolve_fraction_examples(value, total, step):
    assert resolve_fraction(value, total) == step


# --------------------------------------------------------------------------------------
# bad arguments: one-line ConfigError
# --------------------------------------------------------------------------------------


def one_line_error(fn, match):
    with pytest.raises(ConfigError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cubic"}, "choose one of"),
        ({"kind": "polynomial", "frequency": -1}, "frequency"),
        ({"kind": "polynomial", "frequency": 0}, "frequency"),
        ({"kind": "polynomial", "begin_step": 10, "end_step": 5}, "end_step"),
        ({"kind": "polynomial", "begin_step": -1}, "begin_step"),
        ({"kind": "polynomial", "begin_step": 1.5}, "whole number"),
        ({"kind": "polynomial", "power": 0.0}, "power"),
        ({"kind": "polynomial", "initial_sparsity": 1.0}, "initial_sparsity"),
    ],
)
def test_bad_sparsity_schedule(kwargs, match):
    one_line_error(lambda: SparsitySchedule(**kwargs), match)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"update_every": -5}, "update_every"),
        ({"update_every": 0}, "update_every"),
        ({"drop_fraction": 0.0}, "drop_fraction"),
        ({"drop_fraction": 1.5}, "drop_fraction"),
        ({"drop_fraction": -0.1}, "drop_fraction"),
        ({"anneal": "exponential"}, "choose one of"),
        ({"begin_step": 100, "end_step": 50}, "end_step"),
    ],
)
def test_bad_drop_schedule(kwargs, match):
    one_line_error(lambda: DropSchedule(**kwargs), match)


def test_bad_calls():
    schedule = SparsitySchedule("polynomial", end_step=100, initial_sparsity=0.5)
    one_line_error(lambda: schedule.sparsity_at(10, 1.0), "target")
    one_line_error(lambda: schedule.sparsity_at(10, 0.2), "initial_sparsity")
    one_line_error(lambda: schedule.sparsity_at(-1, 0.9), "step")
    one_line_error(lambda: DropSchedule().fraction_at(-3), "step")
    one_line_error(lambda: resolve_fraction(1.5, 100), "outside")
    one_line_error(lambda: resolve_fraction(-0.1, 100), "outside")
    one_line_error(lambda: resolve_fraction(0.5, -1), "total_steps")


def test_integral_values_are_normalised():
    schedule = SparsitySchedule("polynomial", begin_step=10.0, end_step=20, frequency=5)
    assert schedule.begin_step == 10 and isinstance(schedule.begin_step, int)
    assert schedule == SparsitySchedule("polynomial", begin_step=10, end_step=20, frequency=5)
