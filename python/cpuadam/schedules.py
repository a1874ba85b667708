# SPDX-License-Identifier: MIT
"""Learning-rate schedules: small picklable callables mapping the step number to an lr.

A schedule is called with the step about to be taken, counted from 1 (the same
count the optimizers keep in ``state['step']`` and use for bias correction),
and returns a Python float. Any other callable of the step works wherever a
schedule does; these add argument checks, a readable ``repr``, equality and
pickling (they hold numbers only, never a lambda).

Example:
    >>> from cpuadam import schedules
    >>> s = schedules.linear_warmup_decay(1e-3, warmup_steps=4, total_steps=10)
    >>> [round(s(k), 6) for k in (1, 4, 7, 10, 11)]
    [0.00025, 0.001, 0.0005, 0.0, 0.0]

Keras calls its ``LearningRateSchedule`` objects with the 0-based iteration
count; the same sequence is ``keras_schedule(step - 1)`` here.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "Constant",
    "Cosine",
    "LinearWarmupDecay",
    "Schedule",
    "StepDecay",
    "constant",
    "cosine",
    "linear_warmup_decay",
    "step_decay",
]


def _check_lr(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"Invalid {name}: {value} (expected a finite value in [0.0, inf))")
    return v


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected an integer, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"Invalid {name}: expected an integer, got {type(value).__name__}"
        ) from None
    if v < low:
        raise ValueError(f"Invalid {name}: {v} (expected an integer >= {low})")
    return v


def _check_warmup(warmup_steps: int, total_steps: int) -> None:
    if warmup_steps > total_steps:
        raise ValueError(
            f"Invalid warmup_steps: {warmup_steps} (expected at most total_steps={total_steps})"
        )


def _check_floor(end_lr: float, peak_lr: float) -> None:
    if end_lr > peak_lr:
        raise ValueError(f"Invalid end_lr: {end_lr} (expected at most peak_lr={peak_lr})")


class Schedule:
    """Base of the built-in schedules: ``schedule(step) -> float``.

    Step 1 is the first update; step 0 gives the formula's value there too, so a
    schedule also serves Keras's 0-based counter and torch's ``LambdaLR`` (which
    calls its function with 0 when it is made).
    """

    # The public factory name, used by repr so that it reads as the call that made it.
    _factory = ""
    # The field holding the lr a factor form is relative to.
    _base_field = "peak_lr"

    def __call__(self, step: int) -> float:
        return self._lr(_check_int(step, "step", 0))

    def _lr(self, step: int) -> float:
        raise NotImplementedError

    @property
    def base_lr(self) -> float:
        """The lr the schedule is built around (peak_lr, or lr)."""
        return getattr(self, self._base_field)

    def torch_lambda(self) -> "TorchLambda":
        """This schedule as a factor for ``torch.optim.lr_scheduler.LambdaLR``.

        Give the optimizer ``lr=schedule.base_lr`` and call ``scheduler.step()``
        after each ``optimizer.step()``: update k (from 1) then uses
        ``schedule(k)``, as a cpuadam optimizer given the schedule as lr does.
        """
        return TorchLambda(self)

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{self._factory}({args})"


@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    """``lr(step) = lr`` for every step."""

    lr: float
    _factory = "constant"
    _base_field = "lr"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _check_lr(self.lr, "lr"))

    def _lr(self, step: int) -> float:
        return self.lr


@dataclass(frozen=True, repr=False)
class _WarmupThenDecay(Schedule):
    """Linear warmup to ``peak_lr`` over W steps, a decay to ``end_lr`` by step
    T shaped by ``_weight`` (1 at W, 0 at T), then ``end_lr``."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    end_lr: float = 0.0

    def __post_init__(self) -> None:
        _init_warmup_fields(self)

    def _weight(self, step: int, w: int, t: int) -> float:
        raise NotImplementedError

    def _lr(self, step: int) -> float:
        w, t = self.warmup_steps, self.total_steps
        if step <= w:
            return self.peak_lr * (step / w) if w > 0 else self.peak_lr
        if step >= t:
            return self.end_lr
        return self.end_lr + (self.peak_lr - self.end_lr) * self._weight(step, w, t)


@dataclass(frozen=True, repr=False)
class LinearWarmupDecay(_WarmupThenDecay):
    """Linear warmup to ``peak_lr``, linear decay to ``end_lr``, then ``end_lr``.

    With W = warmup_steps and T = total_steps::

        lr(s) = peak_lr * s / W                                    1 <= s <= W
        lr(s) = end_lr + (peak_lr - end_lr) * (T - s) / (T - W)    W <  s <= T
        lr(s) = end_lr                                             s >  T

    The first step already moves (lr = peak_lr / W), the peak is reached on
    step W and the floor on step T, both exactly (the ratio s / W is formed
    first so that step W gives peak_lr * 1.0). With W = 0 there is no warmup: the decay
    starts from peak_lr at step 0, so step 1 is already one step down.
    """

    _factory = "linear_warmup_decay"

    def _weight(self, step: int, w: int, t: int) -> float:
        return (t - step) / (t - w)


@dataclass(frozen=True, repr=False)
class Cosine(_WarmupThenDecay):
    """Linear warmup to ``peak_lr``, half a cosine down to ``end_lr``, then ``end_lr``.

    With W = warmup_steps and T = total_steps::

        lr(s) = peak_lr * s / W                                               1 <= s <= W
        lr(s) = end_lr + (peak_lr - end_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2
                                                                              W <  s <= T
        lr(s) = end_lr                                                        s >  T

    After the warmup this is torch's ``CosineAnnealingLR(T_max=T - W,
    eta_min=end_lr)`` started at ``peak_lr``, its epoch e being step W + e.
    """

    _factory = "cosine"

    def _weight(self, step: int, w: int, t: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * ((step - w) / (t - w))))


@dataclass(frozen=True, repr=False)
class StepDecay(Schedule):
    """``lr(s) = lr * gamma ** ((s - 1) // step_size)``: multiplied by gamma every step_size steps.

    Steps 1..step_size use ``lr``, the next step_size steps ``lr * gamma``, and
    so on: the sequence torch's ``StepLR(step_size, gamma)`` gives when its
    epoch 0 is our step 1.
    """

    lr: float
    step_size: int
    gamma: float
    _factory = "step_decay"
    _base_field = "lr"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _check_lr(self.lr, "lr"))
        object.__setattr__(self, "step_size", _check_int(self.step_size, "step_size", 1))
        gamma = _check_lr(self.gamma, "gamma")
        if gamma == 0.0:
            raise ValueError(f"Invalid gamma: {self.gamma} (expected a finite value > 0.0)")
        object.__setattr__(self, "gamma", gamma)

    def _lr(self, step: int) -> float:
        # Step 0 (before the first update) is the first interval's lr.
        return self.lr * self.gamma ** (max(step - 1, 0) // self.step_size)


class TorchLambda:
    """A schedule as LambdaLR's factor: epoch e (0 first) -> schedule(e + 1) / base_lr."""

    def __init__(self, schedule: Schedule):
        if schedule.base_lr <= 0:
            raise ValueError("a schedule whose base lr is 0 has no factor form")
        self.schedule = schedule

    def __call__(self, epoch: int) -> float:
        return self.schedule(epoch + 1) / self.schedule.base_lr

    def __repr__(self) -> str:
        return f"{self.schedule!r}.torch_lambda()"


def _init_warmup_fields(s: Any) -> None:
    """Checks and normalises the four fields shared by the warmup schedules."""
    peak_lr = _check_lr(s.peak_lr, "peak_lr")
    end_lr = _check_lr(s.end_lr, "end_lr")
    warmup_steps = _check_int(s.warmup_steps, "warmup_steps", 0)
    total_steps = _check_int(s.total_steps, "total_steps", 1)
    _check_warmup(warmup_steps, total_steps)
    _check_floor(end_lr, peak_lr)
    object.__setattr__(s, "peak_lr", peak_lr)
    object.__setattr__(s, "end_lr", end_lr)
    object.__setattr__(s, "warmup_steps", warmup_steps)
    object.__setattr__(s, "total_steps", total_steps)


def constant(lr: float) -> Constant:
    """The same lr on every step.

    Raises:
        ValueError: lr is negative, inf or nan.
    """
    return Constant(lr)


def linear_warmup_decay(
    peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
) -> LinearWarmupDecay:
    """Linear warmup over ``warmup_steps``, linear decay to ``end_lr`` at ``total_steps``.

    ``lr(s) = peak_lr * s / W`` for ``s <= W``, then
    ``end_lr + (peak_lr - end_lr) * (T - s) / (T - W)`` up to ``T``, ``end_lr`` after.

    Args:
        peak_lr: lr reached on step ``warmup_steps``.
        warmup_steps: W >= 0 (0: no warmup).
        total_steps: T >= max(1, W), the step on which ``end_lr`` is reached.
        end_lr: the floor, at most ``peak_lr``.

    Raises:
        ValueError: an lr negative or not finite, ``end_lr > peak_lr``,
            ``warmup_steps < 0``, ``total_steps < 1`` or ``warmup_steps > total_steps``.
        TypeError: a step count that is not an integer.
    """
    return LinearWarmupDecay(peak_lr, warmup_steps, total_steps, end_lr)


def cosine(
    peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0
) -> Cosine:
    """Linear warmup over ``warmup_steps``, then half a cosine to ``end_lr`` at ``total_steps``.

    ``lr(s) = peak_lr * s / W`` for ``s <= W``, then
    ``end_lr + (peak_lr - end_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2`` up to
    ``T``, ``end_lr`` after. Arguments and errors as in :func:`linear_warmup_decay`.
    """
    return Cosine(peak_lr, warmup_steps, total_steps, end_lr)


def step_decay(lr: float, step_size: int, gamma: float) -> StepDecay:
    """``lr * gamma ** ((step - 1) // step_size)``, torch's StepLR counted from step 1.

    Raises:
        ValueError: lr negative or not finite, gamma not a finite value > 0,
            ``step_size < 1``.
        TypeError: a step_size that is not an integer.
    """
    return StepDecay(lr, step_size, gamma)
