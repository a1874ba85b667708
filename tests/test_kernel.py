# SPDX-License-Identifier: MIT
"""_core.adam_step against the fp64 oracle: every flag, sizes around the vector width, guards."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from reference import adam_step as reference_step

from cpuadam import _core

EPS32 = float(np.finfo(np.float32).eps)

# Tolerance, per element, after k steps:
#     |x32 - x64| <= C * eps32 * k * scale
# Each step rounds a handful of float32 operations (each within eps32/2 of
# exact) on top of the error carried in from the previous step. For the param,
# rounding p - update costs up to ~eps32 * |p| and the update (of size ~lr)
# carries a relative error of a few eps32, inherited partly from m and v, so
# scale = max over the trajectory of |p| plus lr. For m and v the scale is
# their own size plus the grad's contribution (|g| for m, g*g for v). Errors
# add at most linearly over k steps. Worst single step: the decay factor, the
# decayed param and the fused update each round once (1.5 eps32 * |p|), plus
# a few eps32 on the update. Measured over every flag, every level and
# thousands of random hyperparameters (lr <= 1e-2, weight_decay <= 0.1), the
# largest error was 1.2 * eps32 * k * scale; the mistakes in
# test_tolerance_is_tight_enough_to_catch exceed 800 * C. (With L2 decay and
# lr * weight_decay near 0.1 or more, p's error feeds back through g and
# grows step by step: a trait of the recurrence, kept out of these ranges.)
C = 4.0

SIZES = [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 1009, (7, 13), (3, 5, 7)]
STEPS = 50
LR, BETA1, BETA2, EPS, WD = 1e-2, 0.9, 0.999, 1e-5, 0.02


class Pair:
    """float32 buffers stepped by the core beside a float64 copy stepped by the oracle.

    The oracle runs once per step over all tensors concatenated (it is
    elementwise), and records what the tolerance needs along the trajectory.
    """

    def __init__(self, shapes, rng: np.random.Generator, amsgrad: bool):
        self.shapes = [s if isinstance(s, tuple) else (s,) for s in shapes]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.bounds = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        n = int(self.bounds[-1])
        self.rng = rng
        self.amsgrad = amsgrad
        flat = rng.standard_normal(n).astype(np.float32)
        self.params = [flat[a:b].reshape(s).copy() for a, b, s in self.pieces()]
        self.exp_avgs = [np.zeros(s, np.float32) for s in self.shapes]
        self.exp_avg_sqs = [np.zeros(s, np.float32) for s in self.shapes]
        self.max_exp_avg_sqs = [np.zeros(s, np.float32) for s in self.shapes]
        self.ref_param = flat.astype(np.float64)
        self.ref_state: dict = {}
        # Grad magnitudes spread over four decades per element (so eps matters
        # for some elements and not others) and wobble per step (so amsgrad's
        # max differs from v).
        self.grad_scale_per_element = 10.0 ** rng.uniform(-4, 0, n)
        self.steps = 0
        self.lr_max = 0.0
        self.p_scale = np.abs(self.ref_param)
        self.m_scale = np.zeros(n)
        self.v_scale = np.zeros(n)

    def pieces(self):
        return [(int(a), int(b), s) for a, b, s in zip(self.bounds[:-1], self.bounds[1:], self.shapes)]

    def new_grads(self) -> np.ndarray:
        n = self.ref_param.size
        wobble = 2.0 ** self.rng.uniform(-1, 1, n)
        return (self.grad_scale_per_element * wobble * self.rng.standard_normal(n)).astype(np.float32)

    def split(self, flat: np.ndarray) -> list[np.ndarray]:
        return [flat[a:b].reshape(s) for a, b, s in self.pieces()]

    def batch(self, grads: np.ndarray, step: int, hyper: dict) -> dict:
        b = dict(params=self.params, grads=self.split(grads), exp_avgs=self.exp_avgs,
                 exp_avg_sqs=self.exp_avg_sqs, step=step, amsgrad=self.amsgrad, **hyper)
        if self.amsgrad:
            b["max_exp_avg_sqs"] = self.max_exp_avg_sqs
        return b

    def reference(self, grads: np.ndarray, step: int, hyper: dict) -> None:
        h = dict(hyper)
        # Size of the grad the kernel forms; with L2 decay it includes
        # weight_decay * p, and p's own error bound scales with p_scale + lr.
        g = np.abs(grads.astype(np.float64)) * abs(h.get("grad_scale", 1.0))
        if not h.get("decoupled", False):
            g += h.get("weight_decay", 0.0) * (self.p_scale + h["lr"])
        reference_step(self.ref_param, grads, self.ref_state, step=step, amsgrad=self.amsgrad, **h)
        self.steps += 1
        self.lr_max = max(self.lr_max, h["lr"])
        np.maximum(self.p_scale, np.abs(self.ref_param), out=self.p_scale)
        np.maximum(self.m_scale, np.abs(self.ref_state["exp_avg"]) + g, out=self.m_scale)
        np.maximum(self.v_scale, self.ref_state["exp_avg_sq"] + g * g, out=self.v_scale)

    def step(self, step: int, hyper: dict) -> None:
        grads = self.new_grads()
        _core.adam_step([self.batch(grads, step, hyper)])
        self.reference(grads, step, hyper)

    def flat(self, buffers: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([b.ravel() for b in buffers]) if buffers else np.zeros(0, np.float32)

    def ratios(self) -> dict[str, np.ndarray]:
        """Per element |error| / tolerance for each buffer: <= 1 passes, NaN fails."""
        unit = C * EPS32 * self.steps
        pairs = {
            "param": (self.params, self.ref_param, self.p_scale + self.lr_max),
            "exp_avg": (self.exp_avgs, self.ref_state["exp_avg"], self.m_scale),
            "exp_avg_sq": (self.exp_avg_sqs, self.ref_state["exp_avg_sq"], self.v_scale),
        }
        if self.amsgrad:
            pairs["max_exp_avg_sq"] = (self.max_exp_avg_sqs, self.ref_state["max_exp_avg_sq"], self.v_scale)
        out = {}
        for name, (got, want, scale) in pairs.items():
            err = np.abs(self.flat(got) - want)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = err / (unit * scale)
            # An exact match is a match even where the scale is zero; a NaN
            # from the core stays NaN and fails.
            ratio[err == 0] = 0.0
            out[name] = ratio
        return out

    def check(self) -> None:
        """Asserts every buffer of every tensor is within tolerance of the oracle."""
        for name, ratio in self.ratios().items():
            bad = np.flatnonzero(~(ratio <= 1.0))
            if bad.size:
                i = int(bad[np.argmax(ratio[bad])])
                t = int(np.searchsorted(self.bounds, i, side="right")) - 1
                raise AssertionError(
                    f"{name}: {bad.size} of {ratio.size} elements outside tolerance after {self.steps} "
                    f"steps; worst is element {i - self.bounds[t]} of tensor {t} (shape {self.shapes[t]}) "
                    f"at {ratio[i]:.3g}x the tolerance")


def options():
    decays = {
        "no_decay": dict(weight_decay=0.0, decoupled=False),
        "adam_l2": dict(weight_decay=WD, decoupled=False),
        "adamw_lr": dict(weight_decay=WD, decoupled=True, decay_mode="lr"),
        "adamw_independent": dict(weight_decay=WD, decoupled=True, decay_mode="independent"),
    }
    for (dname, decay), amsgrad, maximize, eps_mode, grad_scale in itertools.product(
            decays.items(), (False, True), (False, True), ("torch", "keras"), (1.0, 0.3)):
        hyper = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, maximize=maximize, eps_mode=eps_mode,
                     grad_scale=grad_scale, **decay)
        words = [dname, "amsgrad" if amsgrad else "no_amsgrad", "maximize" if maximize else "minimize",
                 f"eps_{eps_mode}", f"grad_scale={grad_scale:g}"]
        yield pytest.param(hyper, amsgrad, id="-".join(words))


def run_steps(pair: Pair, hyper: dict, steps: int = STEPS, first_step: int = 1) -> Pair:
    for t in range(first_step, first_step + steps):
        pair.step(t, hyper)
    return pair


@pytest.mark.parametrize("hyper, amsgrad", list(options()))
def test_every_option_matches_the_reference_on_every_size(hyper, amsgrad, rng):
    run_steps(Pair(SIZES, rng, amsgrad), hyper).check()


FULL = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WD, decoupled=True,
            decay_mode="lr", eps_mode="keras", grad_scale=0.3)
ADAM_L2_MAXIMIZE = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=WD, decoupled=False,
                        maximize=True)


@pytest.mark.parametrize("shape", SIZES + [65521, (256, 257)], ids=lambda s: f"shape={s}")
@pytest.mark.parametrize("hyper, amsgrad", [pytest.param(FULL, True, id="adamw_amsgrad_keras"),
                                            pytest.param(ADAM_L2_MAXIMIZE, False, id="adam_l2_maximize")])
def test_a_single_tensor_of_each_size_matches_the_reference(shape, hyper, amsgrad, rng):
    run_steps(Pair([shape], rng, amsgrad), hyper).check()


@pytest.mark.parametrize("hyper, amsgrad", [pytest.param(FULL, True, id="adamw_amsgrad_keras"),
                                            pytest.param(ADAM_L2_MAXIMIZE, False, id="adam_l2_maximize")])
def test_a_thousand_tiny_tensors_in_one_batch_match_the_reference(hyper, amsgrad, rng):
    sizes = [int(n) for n in rng.integers(0, 21, 1000)]
    run_steps(Pair(sizes, rng, amsgrad), hyper).check()


def test_steps_numbered_in_the_ten_thousands_match_the_reference(rng):
    run_steps(Pair([1009], rng, True), FULL, steps=20, first_step=10_000).check()


# Mistakes the tolerance must catch: each entry changes what the oracle does,
# as a kernel with that bug would; test_tolerance_is_tight_enough_to_catch
# runs the core unchanged and expects the comparison to fail.
MISTAKES = {
    "bias_correction_one_step_late": (FULL, True, lambda h, t: (h, t + 1)),
    "eps_mode_swapped": (FULL, True, lambda h, t: (dict(h, eps_mode="torch"), t)),
    "decay_mode_swapped": (FULL, True, lambda h, t: (dict(h, decay_mode="independent"), t)),
    "l2_instead_of_decoupled": (FULL, True, lambda h, t: (dict(h, decoupled=False), t)),
    "grad_scale_ignored": (FULL, True, lambda h, t: (dict(h, grad_scale=1.0), t)),
    "eps_ignored": (ADAM_L2_MAXIMIZE, False, lambda h, t: (dict(h, eps=0.0), t)),
    "weight_decay_ignored": (ADAM_L2_MAXIMIZE, False, lambda h, t: (dict(h, weight_decay=0.0), t)),
    "beta2_rounded": (ADAM_L2_MAXIMIZE, False, lambda h, t: (dict(h, beta2=0.99), t)),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_tolerance_is_tight_enough_to_catch(mistake, rng):
    hyper, amsgrad, wrong = MISTAKES[mistake]
    pair = Pair([1009], rng, amsgrad)
    for t in range(1, STEPS + 1):
        grads = pair.new_grads()
        _core.adam_step([pair.batch(grads, t, hyper)])
        wrong_hyper, wrong_step = wrong(hyper, t)
        pair.reference(grads, wrong_step, wrong_hyper)
    with pytest.raises(AssertionError, match="outside tolerance"):
        pair.check()


@pytest.mark.parametrize("buffer", ["params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_a_nan_from_the_core_fails_the_comparison(buffer, rng):
    pair = run_steps(Pair([33], rng, amsgrad=True), FULL, steps=3)
    getattr(pair, buffer)[0][5] = np.nan
    with pytest.raises(AssertionError, match="outside tolerance"):
        pair.check()


def test_amsgrad_is_caught_when_the_oracle_forgets_the_max(rng):
    pair = Pair([1009], rng, amsgrad=True)
    for t in range(1, STEPS + 1):
        grads = pair.new_grads()
        _core.adam_step([pair.batch(grads, t, FULL)])
        pair.amsgrad = False
        pair.reference(grads, t, FULL)
        pair.amsgrad = True
        pair.ref_state["max_exp_avg_sq"] = pair.ref_state["exp_avg_sq"]
    assert np.nanmax(pair.ratios()["param"]) > 1.0


def test_exp_avg_is_exactly_the_grad_when_beta1_is_zero(rng):
    # beta1 * m + (1 - beta1) * g is g itself at beta1 = 0, whatever the old m.
    n = 1009
    grad = (1e-3 * rng.standard_normal(n)).astype(np.float32)
    exp_avg = (1e4 * rng.standard_normal(n)).astype(np.float32)
    _core.adam_step([dict(params=[rng.standard_normal(n).astype(np.float32)], grads=[grad],
                          exp_avgs=[exp_avg], exp_avg_sqs=[np.ones(n, np.float32)], step=2,
                          lr=1e-3, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.0)])
    assert exp_avg.view(np.uint32).tobytes() == grad.view(np.uint32).tobytes()


def test_several_batches_in_one_call_match_the_reference_and_separate_calls(rng):
    batches = [
        (Pair([17, 1009, (3, 5, 7)], rng, True), FULL, 1),
        (Pair([64, 65, 1], rng, False), ADAM_L2_MAXIMIZE, 1000),
        (Pair([33, 0, 97], rng, False),
         dict(lr=1e-3, beta1=0.5, beta2=0.99, eps=1e-6, weight_decay=0.1, decoupled=True,
              decay_mode="independent", eps_mode="torch", grad_scale=4.0), 7),
    ]
    # Copies of every buffer, stepped one batch per call, must match bitwise.
    solo = []
    for pair, _, _ in batches:
        solo.append({k: [a.copy() for a in getattr(pair, k)]
                     for k in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")})
    for k in range(STEPS):
        calls = []
        for (pair, hyper, first), copies in zip(batches, solo):
            grads = pair.new_grads()
            calls.append(pair.batch(grads, first + k, hyper))
            pair.reference(grads, first + k, hyper)
            one = dict(calls[-1], params=copies["params"], exp_avgs=copies["exp_avgs"],
                       exp_avg_sqs=copies["exp_avg_sqs"])
            if pair.amsgrad:
                one["max_exp_avg_sqs"] = copies["max_exp_avg_sqs"]
            _core.adam_step([one])
        _core.adam_step(calls)
    for (pair, _, _), copies in zip(batches, solo):
        pair.check()
        for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
            for got, want in zip(getattr(pair, key), copies[key]):
                assert got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes(), key


def test_an_empty_batch_list_and_a_batch_without_tensors_do_nothing():
    _core.adam_step([])
    _core.adam_step([dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], step=1, lr=0.1,
                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)])


# Sentinel: a quiet NaN with a payload no arithmetic produces, compared as bits.
SENTINEL = np.array([0x7FC0DEAD], dtype=np.uint32).view(np.float32)[0]
PAD = 37


@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset={o}")
@pytest.mark.parametrize("n", [17, 1009], ids=lambda n: f"n={n}")
def test_slices_of_larger_buffers_are_updated_without_touching_their_borders(n, offset, rng):
    # Each buffer is a view into an array padded on both sides; offsets 1 and
    # 3 also leave the view unaligned to any vector width.
    def guarded(values):
        big = np.full(offset + n + PAD, SENTINEL, dtype=np.float32)
        big[offset:offset + n] = values
        return big, big[offset:offset + n]

    pair = Pair([n], rng, amsgrad=True)
    bigs = {}
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        bigs[key], view = guarded(getattr(pair, key)[0])
        getattr(pair, key)[0] = view
    for t in range(1, STEPS + 1):
        grads = pair.new_grads()
        big_grad, grad_view = guarded(grads)
        big_grad.flags.writeable = False  # grads are only read: a read-only buffer is fine
        before = big_grad.copy()
        batch = pair.batch(grads, t, FULL)
        batch["grads"] = [grad_view]
        _core.adam_step([batch])
        assert big_grad.view(np.uint32).tobytes() == before.view(np.uint32).tobytes()
        pair.reference(grads, t, FULL)
    sentinel_bits = SENTINEL.view(np.uint32)
    for key, big in bigs.items():
        bits = big.view(np.uint32)
        assert (bits[:offset] == sentinel_bits).all(), f"{key}: border before the slice was written"
        assert (bits[offset + n:] == sentinel_bits).all(), f"{key}: border after the slice was written"
    pair.check()
