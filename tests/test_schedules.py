# SPDX-License-Identifier: MIT
"""cpuadam.schedules against float64 formulas written here, torch's schedulers, and bad input."""

from __future__ import annotations

import math
import pickle
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpuadam import schedules

EPS64 = np.finfo(np.float64).eps
# A schedule value is a handful of float64 operations on numbers of the size
# of peak_lr; eight ulps of peak_lr bounds the difference between two correct
# ways of writing the same formula.
ULPS = 8 * EPS64

WARMUP_FACTORIES = [schedules.linear_warmup_decay, schedules.cosine]


def linear_reference(steps, peak_lr, warmup_steps, total_steps, end_lr):
    """Piecewise-linear interpolation through (0, 0), (W, peak), (T, end), flat after T."""
    if warmup_steps == 0:
        knots, levels = [0.0, total_steps], [peak_lr, end_lr]
    else:
        knots, levels = [0.0, warmup_steps, total_steps], [0.0, peak_lr, end_lr]
        if warmup_steps == total_steps:
            knots, levels = [0.0, warmup_steps], [0.0, peak_lr]
    out = np.interp(np.asarray(steps, dtype=np.float64), knots, levels)
    return np.where(np.asarray(steps) > total_steps, end_lr, out)


def cosine_reference(steps, peak_lr, warmup_steps, total_steps, end_lr):
    """Warmup as a ratio, then end + (peak - end) * cos^2(pi/2 * progress), flat after T."""
    s = np.asarray(steps, dtype=np.float64)
    w, t = float(warmup_steps), float(total_steps)
    warm = peak_lr * (s / w) if warmup_steps else np.zeros_like(s)
    span = max(t - w, 1.0)
    progress = np.clip((s - w) / span, 0.0, 1.0)
    anneal = end_lr + (peak_lr - end_lr) * np.cos(0.5 * np.pi * progress) ** 2
    return np.where(s <= w, warm, np.where(s > t, end_lr, anneal))


def step_decay_reference(steps, lr, step_size, gamma):
    """lr multiplied by gamma once at the start of each new block of step_size steps."""
    out, current = [], lr
    for s in steps:
        if s > 1 and (s - 1) % step_size == 0:
            current *= gamma
        out.append(current)
    return np.array(out)


warmup_params = st.fixed_dictionaries(
    {
        "peak_lr": st.floats(1e-6, 10.0),
        "end_fraction": st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
        "warmup_steps": st.integers(0, 40),
        "decay_steps": st.integers(0, 60),
    }
).filter(lambda d: d["warmup_steps"] + d["decay_steps"] >= 1)


def build(factory, d):
    total = d["warmup_steps"] + d["decay_steps"]
    end_lr = d["peak_lr"] * d["end_fraction"]
    return factory(d["peak_lr"], d["warmup_steps"], total, end_lr), (
        d["peak_lr"], d["warmup_steps"], total, end_lr)


def values(schedule, steps):
    return np.array([schedule(int(s)) for s in steps])


def test_constant_gives_its_lr_on_every_step():
    s = schedules.constant(3e-4)
    for step in (1, 2, 17, 10**9):
        assert s(step) == 3e-4


@given(warmup_params)
def test_linear_warmup_decay_matches_the_interpolation_through_its_knots(d):
    schedule, args = build(schedules.linear_warmup_decay, d)
    steps = np.arange(1, args[2] + 6)
    np.testing.assert_allclose(values(schedule, steps), linear_reference(steps, *args),
                               rtol=ULPS, atol=ULPS * args[0])


@given(warmup_params)
def test_cosine_matches_the_squared_cosine_form(d):
    schedule, args = build(schedules.cosine, d)
    steps = np.arange(1, args[2] + 6)
    np.testing.assert_allclose(values(schedule, steps), cosine_reference(steps, *args),
                               rtol=ULPS, atol=ULPS * args[0])


@pytest.mark.parametrize("lr, step_size, gamma", [(0.1, 1, 0.5), (1e-3, 3, 0.1), (2.0, 7, 1.3)])
def test_step_decay_multiplies_by_gamma_every_step_size_steps(lr, step_size, gamma):
    steps = np.arange(1, 8 * step_size + 3)
    expected = step_decay_reference(steps, lr, step_size, gamma)
    got = values(schedules.step_decay(lr, step_size, gamma), steps)
    # The reference multiplies once per block; the schedule raises gamma to a power.
    rtol = (len(steps) // step_size + 2) * EPS64
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("factory", WARMUP_FACTORIES)
def test_warmup_schedules_hit_their_endpoints_exactly(factory):
    # peak * 11 / 11 is not peak in float64; the schedule must still return peak on step W.
    peak, end, warmup, total = 3.806474470664532, 1e-5, 11, 50
    s = factory(peak, warmup, total, end)
    assert s(1) == pytest.approx(peak / warmup, rel=ULPS)
    assert s(warmup) == peak
    assert s(total) == end
    assert s(total + 1) == end
    assert s(100 * total) == end


@pytest.mark.parametrize("factory", WARMUP_FACTORIES)
def test_no_warmup_starts_one_step_below_the_peak(factory):
    s = factory(1.0, 0, 20, 0.0)
    assert 0.0 < s(1) < 1.0
    assert s(20) == 0.0


@pytest.mark.parametrize("factory", WARMUP_FACTORIES)
def test_warmup_as_long_as_the_schedule_peaks_on_the_last_step_then_drops_to_the_floor(factory):
    s = factory(1.0, 8, 8, 0.25)
    assert s(8) == 1.0
    assert s(9) == 0.25


@pytest.mark.parametrize("factory", WARMUP_FACTORIES)
@given(d=warmup_params)
def test_warmup_rises_and_decay_falls_monotonically(factory, d):
    schedule, (peak, warmup, total, end) = build(factory, d)
    lrs = values(schedule, np.arange(1, total + 4))
    rise, fall = np.diff(lrs[:warmup]), np.diff(lrs[warmup - 1 if warmup else 0:])
    assert (rise > 0).all()
    assert (fall <= 0).all()
    assert lrs.max() <= peak and lrs.min() >= min(end, lrs[0])
    if warmup:
        assert schedule(warmup) == peak
    assert schedule(total) == (peak if warmup == total else end)
    assert schedule(total + 1) == end


def test_step_decay_is_monotone_for_gamma_below_one():
    lrs = values(schedules.step_decay(1.0, 4, 0.7), np.arange(1, 60))
    assert (np.diff(lrs) <= 0).all()
    assert (np.diff(lrs)[3::4] < 0).all()


@pytest.mark.parametrize("lr, step_size, gamma", [(0.1, 1, 0.5), (1e-3, 3, 0.1), (0.05, 10, 0.9)])
def test_step_decay_follows_torch_steplr(lr, step_size, gamma):
    torch = pytest.importorskip("torch")
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    ours = schedules.step_decay(lr, step_size, gamma)
    n = 6 * step_size + 2
    for step in range(1, n + 1):
        # torch's epoch step-1 is the lr in use for our step `step`.
        decays = (step - 1) // step_size
        assert opt.param_groups[0]["lr"] == pytest.approx(ours(step), rel=(decays + 2) * EPS64)
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "warmup, total, end", [(0, 25, 0.0), (5, 30, 1e-4), (12, 13, 2e-4), (3, 203, 0.0)]
)
def test_cosine_after_warmup_follows_torch_cosine_annealing(warmup, total, end):
    # Both are end + (peak - end) * (1 + cos(pi * e / T_max)) / 2 with e = step - warmup.
    torch = pytest.importorskip("torch")
    peak = 1e-3
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=peak)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=end)
    ours = schedules.cosine(peak, warmup, total, end)
    for epoch in range(total - warmup + 1):
        # torch updates its lr by a ratio each epoch, so its rounding grows with the epoch.
        tol = ULPS * peak * (epoch + 1)
        # Without warmup torch's epoch 0 (the peak) is our step 0, which is never taken.
        if warmup + epoch >= 1:
            assert abs(opt.param_groups[0]["lr"] - ours(warmup + epoch)) <= tol
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.5),
        schedules.linear_warmup_decay(1e-3, 10, 100, 1e-5),
        schedules.cosine(3e-4, 0, 40),
        schedules.step_decay(0.1, 5, 0.5),
    ],
    ids=repr,
)
def test_schedules_survive_a_pickle_round_trip(schedule):
    copy = pickle.loads(pickle.dumps(schedule))
    assert copy == schedule
    assert repr(copy) == repr(schedule)
    steps = range(1, 130)
    assert [copy(s) for s in steps] == [schedule(s) for s in steps]


def test_repr_reads_as_the_call_that_builds_the_schedule():
    s = schedules.cosine(1e-3, 5, 50, end_lr=1e-5)
    assert repr(s) == "cosine(peak_lr=0.001, warmup_steps=5, total_steps=50, end_lr=1e-05)"
    assert eval(repr(s), vars(schedules)) == s


def test_schedules_with_different_arguments_are_not_equal():
    assert schedules.step_decay(0.1, 5, 0.5) != schedules.step_decay(0.1, 5, 0.25)
    assert schedules.cosine(1.0, 0, 10) != schedules.linear_warmup_decay(1.0, 0, 10)


@pytest.mark.parametrize(
    "factory, args, error, message",
    [
        (schedules.constant, (-1e-3,), ValueError, "Invalid lr: -0.001"),
        (schedules.constant, (math.nan,), ValueError, "Invalid lr: nan"),
        (schedules.constant, (math.inf,), ValueError, "Invalid lr: inf"),
        (schedules.constant, ("0.1",), TypeError, "Invalid lr: expected a real number, got str"),
        (schedules.linear_warmup_decay, (-1.0, 1, 10), ValueError, "Invalid peak_lr: -1.0"),
        (schedules.linear_warmup_decay, (1.0, 11, 10), ValueError,
         "Invalid warmup_steps: 11 (expected at most total_steps=10)"),
        (schedules.linear_warmup_decay, (1.0, -1, 10), ValueError, "Invalid warmup_steps: -1"),
        (schedules.linear_warmup_decay, (1.0, 0, 0), ValueError,
         "Invalid total_steps: 0 (expected an integer >= 1)"),
        (schedules.linear_warmup_decay, (1.0, 2.5, 10), TypeError,
         "Invalid warmup_steps: expected an integer, got float"),
        (schedules.cosine, (1.0, 0, 10, -0.1), ValueError, "Invalid end_lr: -0.1"),
        (schedules.cosine, (1.0, 0, 10, 2.0), ValueError,
         "Invalid end_lr: 2.0 (expected at most peak_lr=1.0)"),
        (schedules.cosine, (1.0, 3, 2), ValueError, "Invalid warmup_steps: 3"),
        (schedules.cosine, (1.0, 0, True), TypeError, "Invalid total_steps"),
        (schedules.step_decay, (-0.1, 5, 0.5), ValueError, "Invalid lr: -0.1"),
        (schedules.step_decay, (0.1, 0, 0.5), ValueError, "Invalid step_size: 0"),
        (schedules.step_decay, (0.1, 5, 0.0), ValueError, "Invalid gamma: 0.0"),
        (schedules.step_decay, (0.1, 5, -0.5), ValueError, "Invalid gamma: -0.5"),
        (schedules.step_decay, (0.1, 5, math.nan), ValueError, "Invalid gamma: nan"),
    ],
)
def test_bad_arguments_are_rejected_with_the_argument_named(factory, args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        factory(*args)


@pytest.mark.parametrize("step, error", [(-1, ValueError), (-3, ValueError), (1.0, TypeError),
                                         ("1", TypeError)])
def test_steps_below_zero_and_non_integers_are_refused(step, error):
    with pytest.raises(error, match="Invalid step"):
        schedules.linear_warmup_decay(1.0, 2, 10)(step)


def test_numpy_integers_are_accepted_as_steps_and_counts():
    s = schedules.cosine(np.float32(0.5), np.int64(2), np.int32(10))
    assert s(np.int64(2)) == 0.5
    assert type(s(np.int64(3))) is float


@pytest.mark.parametrize("make, at_zero", [
    (lambda: schedules.linear_warmup_decay(1.0, 4, 10), 0.0),
    (lambda: schedules.linear_warmup_decay(1.0, 0, 10), 1.0),
    (lambda: schedules.cosine(2.0, 0, 10, end_lr=0.5), 2.0),
    (lambda: schedules.step_decay(0.3, 2, 0.5), 0.3),
    (lambda: schedules.constant(0.1), 0.1),
], ids=["warmup", "no-warmup", "cosine", "step", "constant"])
def test_step_zero_is_the_formulas_value(make, at_zero):
    assert make()(0) == at_zero


def test_the_torch_lambda_drives_lambdalr_through_the_schedule():
    torch = pytest.importorskip("torch")
    sched = schedules.cosine(0.5, 3, 12, end_lr=0.05)
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=sched.base_lr)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, sched.torch_lambda())
    seen = []
    for _ in range(14):
        w.grad = torch.zeros(2)
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        lam.step()
    assert seen == pytest.approx([sched(k) for k in range(1, 15)], rel=1e-12)
