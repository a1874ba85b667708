# SPDX-License-Identifier: MIT
"""bfloat16/float16 params, grads and states in _core: conversions, the four param updates, rejections."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import supported_levels
from reference import adam_step as reference_adam
from reference import bf16_round_nearest, bf16_to_float32, f16_round_nearest, sgd_step as reference_sgd, ulp
from test_isa import child_env

import cpuadam
from cpuadam import _core

EPS32 = float(np.finfo(np.float32).eps)
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 1000]
# (param, grad) dtype pairs; each runs with float32 and bfloat16 states.
PAIRS = [("float32", "float32"), ("float32", "bfloat16"), ("float32", "float16"), ("bfloat16", "bfloat16"),
         ("bfloat16", "float32"), ("float16", "float16"), ("float16", "float32"), ("bfloat16", "float16"),
         ("float16", "bfloat16")]
COMBOS = [(p, g, s) for p, g in PAIRS for s in ("float32", "bfloat16")] + [
    # float16 moments, as torch.optim keeps them for float16 params: float32 or float16 grads.
    (p, g, "float16") for p, g in PAIRS if g != "bfloat16"]
ADAM = {
    "adamw": dict(lr=1e-2, weight_decay=0.05, beta1=0.9, beta2=0.999, eps=1e-8, decoupled=True),
    "adam_l2_amsgrad": dict(lr=1e-2, weight_decay=0.05, beta1=0.9, beta2=0.99, eps=1e-6, amsgrad=True),
    "adam_scaled_maximize": dict(lr=3e-3, weight_decay=0.0, beta1=0.8, beta2=0.999, eps=1e-8,
                                 maximize=True, grad_scale=0.5, clipvalue=1.5),
}
SGD = {
    "momentum": dict(lr=1e-2, weight_decay=0.01, momentum=0.9, dampening=0.1),
    "nesterov": dict(lr=1e-2, weight_decay=0.0, momentum=0.9, nesterov=True),
    "plain": dict(lr=1e-2, weight_decay=0.01),
}


def encode(x, dtype: str) -> np.ndarray:
    """float32 values as an array of `dtype` (bfloat16 as uint16 bits), rounded to nearest even."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "bfloat16":
        return bf16_round_nearest(x)
    return f16_round_nearest(x).view(np.float16)


def decode(a: np.ndarray, dtype: str) -> np.ndarray:
    # Widening a signalling NaN raises the invalid flag; it stays a NaN.
    with np.errstate(invalid="ignore"):
        if dtype == "bfloat16":
            return bf16_to_float32(a).astype(np.float64)
        return a.astype(np.float64)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)


def flat(arrays) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0)


def split(x: np.ndarray, sizes) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [x]


def fresh(x: np.ndarray, sizes, dtype: str) -> list[np.ndarray]:
    return [a.copy() for a in split(encode(x, dtype), sizes)]


class Case:
    """One batch of tensors in given dtypes, with states that are already warm."""

    def __init__(self, rng, sizes, pdt, gdt, sdt, optim="adam", amsgrad=False):
        self.sizes, self.pdt, self.gdt, self.sdt, self.optim = list(sizes), pdt, gdt, sdt, optim
        n = sum(self.sizes)
        self.params = fresh(rng.standard_normal(n), self.sizes, pdt)
        m = rng.standard_normal(n) * 0.1
        # v >= m^2 keeps |m| / sqrt(v) <= 1, so the update is at most about lr.
        v = m * m * rng.uniform(1, 4, n) + 1e-4
        self.states = {"exp_avgs": fresh(m, self.sizes, sdt)}
        if optim == "adam":
            self.states["exp_avg_sqs"] = fresh(v, self.sizes, sdt)
            if amsgrad:
                self.states["max_exp_avg_sqs"] = fresh(v * 1.5, self.sizes, sdt)
        else:
            self.states = {"momentum_buffers": self.states["exp_avgs"]}
        self.rng = rng

    def grads(self) -> list[np.ndarray]:
        n = sum(self.sizes)
        return fresh(self.rng.standard_normal(n) * 10.0 ** self.rng.uniform(-3, 0, n), self.sizes, self.gdt)

    def batch(self, grads, **extra) -> dict:
        return dict(params=self.params, grads=grads, param_dtype=self.pdt, grad_dtype=self.gdt,
                    state_dtype=self.sdt, **self.states, **extra)


def step(optim: str, batch: dict) -> dict:
    return (_core.adam_step if optim == "adam" else _core.sgd_step)([batch])


def assert_within_rounding(got, dtype, want, tol, what):
    """got (stored in dtype) is want rounded to dtype, give or take float32 error `tol`."""
    got_f = decode(got, dtype)
    half_ulp = 0.5 * (ulp(got, dtype) if dtype != "float32" else np.abs(got_f) * EPS32)
    err = np.abs(got_f - want)
    bad = np.flatnonzero(~(err <= half_ulp + tol))
    assert bad.size == 0, (f"{what}: {bad.size} of {err.size} outside rounding; first {bad[:3]}: "
                           f"got {got_f[bad[:3]]}, want {want[bad[:3]]}")


@pytest.mark.parametrize("pdt,gdt,sdt", COMBOS)
@pytest.mark.parametrize("name", list(ADAM))
def test_adam_step_in_every_dtype_is_the_reference_step_rounded_to_nearest(pdt, gdt, sdt, name, rng):
    hyper = dict(ADAM[name])
    amsgrad = hyper.pop("amsgrad", False)
    case = Case(rng, SIZES, pdt, gdt, sdt, "adam", amsgrad)
    for k in range(1, 4):
        grads = case.grads()
        # The reference starts each step from the stored (already rounded) values.
        p = decode(flat(case.params), pdt)
        state = {key[:-1]: decode(flat(v), sdt) for key, v in case.states.items()}
        g = decode(flat(grads), gdt)
        # The grad as the kernel forms it (sign, scale, clip), handed to the reference as is.
        limit = hyper.get("clipvalue", np.inf)
        sign = -1.0 if hyper.get("maximize") else 1.0
        g_eff = np.clip(sign * g * hyper.get("grad_scale", 1.0), -limit, limit)
        ref = {k2: v for k2, v in hyper.items() if k2 in ("lr", "weight_decay", "eps", "decoupled")}
        reference_adam(p, g_eff, state, step=10 + k, beta1=hyper["beta1"], beta2=hyper["beta2"], amsgrad=amsgrad,
                       **ref)
        step("adam", case.batch(grads, step=10 + k, amsgrad=amsgrad, **hyper))
        p_scale = np.abs(p) + 2 * hyper["lr"] / (1 - hyper["beta1"] ** (10 + k))
        gg = np.abs(g_eff) + hyper["weight_decay"] * np.abs(p)
        assert_within_rounding(flat(case.params), pdt, p, 8 * EPS32 * p_scale, "param")
        assert_within_rounding(flat(case.states["exp_avgs"]), sdt, state["exp_avg"],
                               8 * EPS32 * (np.abs(state["exp_avg"]) + gg), "exp_avg")
        assert_within_rounding(flat(case.states["exp_avg_sqs"]), sdt, state["exp_avg_sq"],
                               8 * EPS32 * (state["exp_avg_sq"] + gg * gg), "exp_avg_sq")
        if amsgrad:
            assert_within_rounding(flat(case.states["max_exp_avg_sqs"]), sdt, state["max_exp_avg_sq"],
                                   8 * EPS32 * (state["max_exp_avg_sq"] + gg * gg), "max_exp_avg_sq")


@pytest.mark.parametrize("pdt,gdt,sdt", COMBOS)
@pytest.mark.parametrize("name", list(SGD))
def test_sgd_step_in_every_dtype_is_the_reference_step_rounded_to_nearest(pdt, gdt, sdt, name, rng):
    hyper = SGD[name]
    case = Case(rng, SIZES, pdt, gdt, sdt, "sgd")
    if hyper.get("momentum", 0) == 0:
        case.states = {}
    for _ in range(3):
        grads = case.grads()
        p = decode(flat(case.params), pdt)
        state = {"momentum_buffer": decode(flat(case.states["momentum_buffers"]), sdt)} if case.states else {}
        reference_sgd(p, decode(flat(grads), gdt), state, **hyper)
        step("sgd", case.batch(grads, **hyper))
        assert_within_rounding(flat(case.params), pdt, p, 8 * EPS32 * (np.abs(p) + 0.1), "param")
        if case.states:
            b = state["momentum_buffer"]
            assert_within_rounding(flat(case.states["momentum_buffers"]), sdt, b, 8 * EPS32 * (np.abs(b) + 1),
                                   "momentum_buffer")


@pytest.mark.parametrize("pdt,gdt,sdt", COMBOS)
@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_a_16_bit_param_is_the_float32_param_step_rounded_to_nearest_bitwise(pdt, gdt, sdt, optim, rng):
    """The same step on a float32 copy of the param, rounded: the tile path adds nothing but the rounding."""
    case = Case(rng, SIZES, pdt, gdt, sdt, optim, amsgrad=optim == "adam")
    twin_params = [decode(p, pdt).astype(np.float32) for p in case.params]
    twin_states = {k: [a.copy() for a in v] for k, v in case.states.items()}
    grads = case.grads()
    hyper = dict(ADAM["adam_l2_amsgrad"], step=3) if optim == "adam" else dict(SGD["momentum"])
    step(optim, case.batch(grads, **hyper))
    step(optim, dict(case.batch(grads, **hyper), params=twin_params, param_dtype="float32", **twin_states))
    np.testing.assert_array_equal(bits(flat(case.params)), bits(flat([encode(p, pdt) for p in twin_params])))
    for key in case.states:
        np.testing.assert_array_equal(bits(flat(case.states[key])), bits(flat(twin_states[key])))


def special_floats(rng, n=100_000) -> np.ndarray:
    """Random float32 bit patterns plus the edges of both 16-bit formats."""
    edges = np.float32([0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, -65520, 65536,
                        2**-14, 2**-24, 2**-25, 3 * 2**-25, 1e-45, 1.17e-38, 3.3895314e38, 3.4e38, -3.4e38,
                        1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11])
    return np.concatenate([rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32),
                           edges])


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
def test_round_to_nearest_even_of_any_float32_matches_the_reference_bitwise(pdt, rng):
    """A master with lr = 0 is rounded into the param as it is: every float32, NaN and inf included."""
    masters = special_floats(rng)
    param = np.zeros(masters.size, np.uint16 if pdt == "bfloat16" else np.float16)
    _core.sgd_step([dict(params=[param], grads=[np.zeros(masters.size, np.float32)], lr=0.0, weight_decay=0.0,
                         param_dtype=pdt, param_update="master", masters=[masters.copy()])])
    want = bf16_round_nearest(masters) if pdt == "bfloat16" else f16_round_nearest(masters)
    nan = np.isnan(masters)
    np.testing.assert_array_equal(bits(param)[~nan], want[~nan])
    assert np.all(np.isnan(decode(param[nan], pdt)))


@pytest.mark.parametrize("gdt", ["bfloat16", "float16"])
def test_every_16_bit_grad_is_read_exactly(gdt):
    """SGD with lr = 1 from a zero param writes -grad in float32: all 65536 bit patterns."""
    pattern = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    grad = pattern if gdt == "bfloat16" else pattern.view(np.float16)
    param = np.zeros(pattern.size, np.float32)
    _core.sgd_step([dict(params=[param], grads=[grad], lr=1.0, weight_decay=0.0, grad_dtype=gdt)])
    want = -decode(grad, gdt)
    nan = np.isnan(want)
    np.testing.assert_array_equal(param[~nan], want[~nan].astype(np.float32))
    assert np.all(np.isnan(param[nan]))


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
def test_a_16_bit_param_that_takes_a_zero_update_keeps_its_bits(pdt):
    pattern = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    param = pattern.copy() if pdt == "bfloat16" else pattern.copy().view(np.float16)
    _core.sgd_step([dict(params=[param], grads=[np.zeros(param.size, np.float32)], lr=0.0, weight_decay=0.0,
                         param_dtype=pdt)])
    nan = np.isnan(decode(pattern if pdt == "bfloat16" else pattern.view(np.float16), pdt))
    np.testing.assert_array_equal(bits(param)[~nan], pattern[~nan])
    assert np.all(np.isnan(decode(param[nan], pdt)))


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
@pytest.mark.parametrize("gdt", ["float32", "bfloat16"])
def test_master_steps_like_a_float32_param_and_the_param_is_its_rounding(pdt, gdt, rng):
    n = 1000
    init = rng.standard_normal(n).astype(np.float32)
    masters, twin = [init.copy()], [init.copy()]
    params = [encode(init, pdt)]
    emas, twin_emas = [init.copy()], [init.copy()]
    states = {"exp_avgs": [np.zeros(n, np.float32)], "exp_avg_sqs": [np.zeros(n, np.float32)]}
    twin_states = {k: [a.copy() for a in v] for k, v in states.items()}
    hyper = dict(ADAM["adamw"], ema_momentum=0.9)
    for k in range(1, 21):
        grads = [encode(rng.standard_normal(n), gdt)]
        _core.adam_step([dict(params=params, grads=grads, masters=masters, param_dtype=pdt, grad_dtype=gdt,
                              param_update="master", step=k, emas=emas, **states, **hyper)])
        _core.adam_step([dict(params=twin, grads=grads, grad_dtype=gdt, step=k, emas=twin_emas, **twin_states,
                              **hyper)])
        np.testing.assert_array_equal(bits(masters[0]), bits(twin[0]))
        np.testing.assert_array_equal(bits(emas[0]), bits(twin_emas[0]))
        np.testing.assert_array_equal(bits(params[0]), bits(encode(masters[0], pdt)))


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
def test_kahan_follows_the_float32_trajectory_where_nearest_stands_still(pdt, rng):
    """Updates of about 1/50 of an ulp: nearest never moves, kahan stays within one ulp of float32."""
    n, steps = 4096, 300
    init = encode(1.0 + rng.uniform(0, 0.5, n), pdt)  # ulp 2^-7 (bf16) or 2^-10 (fp16)
    unit = 2.0**-7 if pdt == "bfloat16" else 2.0**-10
    kahan, comp, nearest = init.copy(), np.zeros_like(init), init.copy()
    float32 = decode(init, pdt).astype(np.float32)
    for k in range(steps):
        grad = (rng.uniform(0.5, 1.5, n) * unit / 50).astype(np.float32)
        common = dict(grads=[grad], lr=1.0, weight_decay=0.0)
        _core.sgd_step([dict(common, params=[kahan], param_dtype=pdt, param_update="kahan", kahan_comps=[comp])])
        _core.sgd_step([dict(common, params=[nearest], param_dtype=pdt)])
        _core.sgd_step([dict(common, params=[float32])])
        err = np.abs(decode(kahan, pdt) - float32)
        assert np.all(err <= ulp(kahan, pdt)), f"step {k}: {err.max() / unit} ulp"
    np.testing.assert_array_equal(bits(nearest), bits(init))
    moved = np.abs(decode(init, pdt) - float32)
    assert np.all(moved >= 4 * ulp(init, pdt))
    # With the compensation the float32 value is followed far more closely than one ulp.
    tracked = np.abs(decode(kahan, pdt) + decode(comp, pdt) - float32)
    assert np.max(tracked / ulp(kahan, pdt)) < 0.05


def stochastic_batch(param, grad, pdt, seed=7, rounding_step=1, stream_ids=(0,), **extra):
    return dict(params=[param], grads=[grad], lr=1.0, weight_decay=0.0, param_dtype=pdt,
                param_update="stochastic", seed=seed, rounding_step=rounding_step, stream_ids=list(stream_ids),
                **extra)


def neighbours(x32: np.ndarray, pdt: str):
    """The two values of pdt around each float32 (equal where x32 is representable).

    The nearest one, and the next one in magnitude on x32's side of it: adjacent
    encodings of the same sign are adjacent values, across binades too.
    """
    near = bits(encode(x32, pdt)).astype(np.int64)
    near_f = decode(encode(x32, pdt), pdt)
    x = np.abs(x32.astype(np.float64))
    other = np.where(x > np.abs(near_f), near + 1, np.where(x < np.abs(near_f), near - 1, near))
    other = other.astype(np.uint16)
    return near_f, decode(other if pdt == "bfloat16" else other.view(np.float16), pdt)


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
def test_stochastic_rounding_gives_one_of_the_two_neighbours(pdt, rng):
    n = 50_000
    scale = 10.0 ** rng.uniform(-9 if pdt == "float16" else -30, 4, n)  # float16 subnormals too
    start = (rng.standard_normal(n) * scale).astype(np.float32)
    grad = (rng.standard_normal(n) * scale * 0.3).astype(np.float32)
    param = encode(start, pdt)
    master = decode(param, pdt).astype(np.float32)
    twin = master.copy()
    _core.sgd_step([dict(params=[twin], grads=[grad], lr=1.0, weight_decay=0.0)])
    _core.sgd_step([stochastic_batch(param, grad, pdt)])
    near, other = neighbours(twin, pdt)
    got = decode(param, pdt)
    ok = (got == near) | (got == other)
    assert np.all(ok), f"{np.sum(~ok)} values are not a neighbour, e.g. {twin[~ok][:3]} -> {got[~ok][:3]}"
    assert 0.1 < np.mean((got == other) & (other != near)) < 0.5  # the farther one too, less often


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
def test_stochastic_rounding_is_unbiased_for_updates_far_below_one_ulp(pdt):
    n, steps = 200_000, 16
    unit = 2.0**-8 if pdt == "bfloat16" else 2.0**-11  # the spacing just below 1.0
    param = encode(np.ones(n), pdt)
    nearest = param.copy()
    grad = np.full(n, unit / 64, np.float32)
    for k in range(steps):
        _core.sgd_step([stochastic_batch(param, grad, pdt, rounding_step=k)])
        _core.sgd_step([dict(params=[nearest], grads=[grad], lr=1.0, weight_decay=0.0, param_dtype=pdt)])
    want = 1.0 - steps * unit / 64  # a quarter of a step below 1.0
    drift = decode(param, pdt) - 1.0
    # Each element moves by 0 or one step per rounding; the mean's standard error is under unit / 400.
    assert abs(np.mean(drift) - (want - 1.0)) < unit / 50
    np.testing.assert_array_equal(decode(nearest, pdt), 1.0)


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
def test_stochastic_rounding_depends_only_on_seed_step_stream_and_index(pdt, rng):
    n = 3000
    start = encode(rng.standard_normal(n), pdt)
    grad = (rng.standard_normal(n) * 1e-3).astype(np.float32)

    def run(**key):
        p = start.copy()
        _core.sgd_step([stochastic_batch(p, grad, pdt, **key)])
        return bits(p)

    base = run(seed=1, rounding_step=5, stream_ids=[3])
    np.testing.assert_array_equal(run(seed=1, rounding_step=5, stream_ids=[3]), base)
    for other in (dict(seed=2, rounding_step=5, stream_ids=[3]), dict(seed=1, rounding_step=6, stream_ids=[3]),
                  dict(seed=1, rounding_step=5, stream_ids=[4])):
        assert np.mean(run(**other) != base) > 0.2, other
    # Element i of a tensor is keyed by its own index: a slice of the tensor is no different.
    p = start.copy()
    _core.sgd_step([dict(stochastic_batch(p[:1000], grad[:1000], pdt, seed=1, rounding_step=5, stream_ids=[3]))])
    np.testing.assert_array_equal(bits(p[:1000]), base[:1000])


def test_stochastic_rounding_is_the_same_for_any_thread_count(rng):
    sizes = [300_001, 17, 65_536, 5]
    start = rng.standard_normal(sum(sizes))
    grad = split((rng.standard_normal(sum(sizes)) * 1e-3).astype(np.float32), sizes)
    results = []
    before = cpuadam.build_info()["num_threads"]
    try:
        for threads in (1, 2, 3):
            cpuadam.set_num_threads(threads)
            out = []
            for pdt in ("bfloat16", "float16"):
                params = fresh(start, sizes, pdt)
                _core.sgd_step([dict(params=params, grads=grad, lr=1.0, weight_decay=0.0, param_dtype=pdt,
                                     param_update="stochastic", seed=11, rounding_step=2, stream_ids=[0, 1, 2, 3])])
                out.append(bits(flat(params)))
            results.append(out)
    finally:
        cpuadam.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


# Runs in the child: each 16-bit path on the saved inputs, the resulting bytes saved.
CHILD = """
import sys
import numpy as np
from cpuadam import _core
d, out = np.load(sys.argv[1]), {}
for pdt, view, sdt in (("bfloat16", np.uint16, "bfloat16"), ("float16", np.float16, "bfloat16"),
                       ("float16", np.float16, "float16")):
    for update in ("nearest", "stochastic", "kahan", "master"):
        p = (d["bf16"] if pdt == "bfloat16" else d["f16"]).view(view).copy()
        extra = dict(seed=5, rounding_step=3, stream_ids=[0], kahan_comps=[np.zeros_like(p)],
                     masters=[d["masters"].copy()])
        buf = [d["m"].copy() if sdt == "bfloat16" else d["m16"].view(np.float16).copy()]
        _core.sgd_step([dict(params=[p], grads=[d["g16"].view(np.float16)], grad_dtype="float16", lr=1.0,
                             weight_decay=0.0, momentum=0.9, momentum_buffers=buf, param_dtype=pdt,
                             state_dtype=sdt, param_update=update, **extra)])
        out[f"{pdt}/{sdt}/{update}"] = p.view(np.uint16)
        out[f"{pdt}/{sdt}/{update}/momentum_buffer"] = buf[0].view(np.uint16)
# bfloat16 grads: the in-place path (sixteen and eight lanes where the level has them).
for update in ("nearest", "stochastic", "kahan", "master"):
    p = d["bf16"].copy()
    extra = dict(seed=5, rounding_step=3, stream_ids=[0], kahan_comps=[np.zeros_like(p)],
                 masters=[d["masters"].copy()])
    buf = [d["m"].copy()]
    _core.sgd_step([dict(params=[p], grads=[d["gbf"]], grad_dtype="bfloat16", lr=1.0, weight_decay=0.0,
                         momentum=0.9, momentum_buffers=buf, param_dtype="bfloat16", state_dtype="bfloat16",
                         param_update=update, **extra)])
    out[f"in-place/{update}"] = p
    out[f"in-place/{update}/momentum_buffer"] = buf[0]
    out[f"in-place/{update}/master"] = extra["masters"][0]
    out[f"in-place/{update}/kahan_comp"] = extra["kahan_comps"][0]
np.savez(sys.argv[2], **out)
"""


def test_every_level_gives_the_same_bits_for_16_bit_params_grads_and_states(tmp_path, rng):
    """The conversions and roundings agree bitwise between levels. The step is SGD with lr = 1
    and no dampening, whose float32 arithmetic rounds once at every level (with FMA or not),
    so any difference would come from a conversion or a rounding."""
    levels = supported_levels()
    n = 40_000
    x = special_floats(rng, n)
    x = np.where(np.isfinite(x), x, 1.0).astype(np.float32)  # finite starts, edges included
    small = (rng.standard_normal(x.size) * 10.0 ** rng.uniform(-9, 1, x.size)).astype(np.float32)
    np.savez(tmp_path / "in.npz", bf16=bf16_round_nearest(small), f16=f16_round_nearest(small),
             masters=x, m=bf16_round_nearest(small * 0.1), m16=f16_round_nearest(small * 0.1),
             g16=f16_round_nearest(small * 3), gbf=bf16_round_nearest(small * 3))
    outputs = {}
    for level in levels:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "in.npz"), str(tmp_path / f"{level}.npz")],
                              env=child_env(level), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs[level] = np.load(tmp_path / f"{level}.npz")
    first = outputs[levels[0]]
    for level in levels[1:]:
        for key in first.files:
            np.testing.assert_array_equal(outputs[level][key], first[key], err_msg=f"{key}: {level} vs {levels[0]}")


def test_bfloat16_arrives_as_uint16_int16_or_ml_dtypes_bits_alike(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    start = bf16_round_nearest(rng.standard_normal(100))
    grad = bf16_round_nearest(rng.standard_normal(100))
    results = []
    for view in (np.uint16, np.int16, ml_dtypes.bfloat16):
        p = start.copy().view(view)
        _core.sgd_step([dict(params=[p], grads=[grad.view(view)], lr=0.1, weight_decay=0.0,
                             param_dtype="bfloat16", grad_dtype="bfloat16")])
        results.append(p.view(np.uint16))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    # ml_dtypes' own rounding agrees with the reference's.
    x = special_floats(rng, 10_000)
    finite = ~np.isnan(x)
    with np.errstate(over="ignore", invalid="ignore"):
        theirs = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(bf16_round_nearest(x)[finite], theirs[finite])


def test_float32_params_accept_every_param_update_and_need_no_extra_buffers(rng):
    start = rng.standard_normal(50).astype(np.float32)
    grad = rng.standard_normal(50).astype(np.float32)
    plain = start.copy()
    _core.sgd_step([dict(params=[plain], grads=[grad], lr=0.1, weight_decay=0.0)])
    for update in ("nearest", "stochastic", "kahan", "master"):
        p = start.copy()
        _core.sgd_step([dict(params=[p], grads=[grad], lr=0.1, weight_decay=0.0, param_update=update)])
        np.testing.assert_array_equal(bits(p), bits(plain))


@pytest.mark.parametrize("gdt", ["bfloat16", "float16"])
def test_accumulate_and_sum_squares_read_16_bit_grads_into_float32(gdt, rng):
    g = [encode(rng.standard_normal(s), gdt) for s in (1, 17, 5000)]
    accums = [np.full(a.size, 0.5, np.float32) for a in g]
    _core.accumulate([dict(grads=g, grad_accums=accums, grad_dtype=gdt)])
    for a, acc in zip(g, accums):
        np.testing.assert_array_equal(acc, (decode(a, gdt) + 0.5).astype(np.float32))
    sums = _core.sum_squares(g, grad_dtype=gdt)
    np.testing.assert_allclose(sums, [np.sum(decode(a, gdt) ** 2) for a in g], rtol=1e-12)
    # A clipped step reads them through the same norm pass.
    p = [np.zeros(a.size, np.float32) for a in g]
    result = _core.sgd_step([dict(params=p, grads=g, grad_dtype=gdt, lr=1.0, weight_decay=0.0)],
                            global_clipnorm=1e9)
    assert result["global_norm"] == pytest.approx(np.sqrt(sum(sums)), rel=1e-12)


def rejection_cases():
    f32 = lambda n=4: np.zeros(n, np.float32)  # noqa: E731
    u16 = lambda n=4: np.zeros(n, np.uint16)  # noqa: E731
    adam = dict(lr=1e-3, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    base = lambda **kw: dict(dict(params=[u16()], grads=[u16()], exp_avgs=[f32()], exp_avg_sqs=[f32()],  # noqa: E731
                                  param_dtype="bfloat16", grad_dtype="bfloat16", **adam), **kw)
    bf16_msg = "expected a bfloat16 array (uint16/int16 bits or ml_dtypes.bfloat16), got float32"
    return [
        ("param", base(params=[f32()]), TypeError, f"params[0] in group 0: {bf16_msg}"),
        ("grad", base(grads=[f32()]), TypeError, f"grad of params[0] in group 0: {bf16_msg}"),
        ("grad_f16", base(grad_dtype="float16"), TypeError,
         "grad of params[0] in group 0: expected a float16 array, got uint16 "
         "(16-bit integers: how a bfloat16 tensor's bits arrive)"),
        ("state", base(state_dtype="bfloat16"), TypeError, f"exp_avg of params[0] in group 0: {bf16_msg}"),
        ("state_f32", base(exp_avg_sqs=[u16()]), TypeError,
         "exp_avg_sq of params[0] in group 0: expected a float32 array, got uint16 "
         "(16-bit integers: how a bfloat16 tensor's bits arrive)"),
        ("grad_accum", base(grad_accums=[u16()]), TypeError,
         "grad_accum of params[0] in group 0: expected a float32 array, got uint16 "
         "(16-bit integers: how a bfloat16 tensor's bits arrive)"),
        ("ema", base(emas=[u16()], ema_momentum=0.9), TypeError,
         "ema of params[0] in group 0: expected a float32 array, got uint16 "
         "(16-bit integers: how a bfloat16 tensor's bits arrive)"),
        ("master", base(param_update="master", masters=[u16()]), TypeError,
         "master of params[0] in group 0: expected a float32 array, got uint16 "
         "(16-bit integers: how a bfloat16 tensor's bits arrive)"),
        ("kahan_comp", base(param_update="kahan", kahan_comps=[f32()]), TypeError,
         f"kahan_comp of params[0] in group 0: {bf16_msg}"),
        ("unknown_param_dtype", base(param_dtype="bf16"), ValueError, "invalid param_dtype in group 0: 'bf16'"),
        ("unknown_grad_dtype", base(grad_dtype="half"), ValueError, "invalid grad_dtype in group 0: 'half'"),
        ("float16_state_bf16_grad", base(state_dtype="float16", grad_dtype="bfloat16"), ValueError,
         "invalid state_dtype in group 0: 'float16' with bfloat16 grads"),
        ("unknown_update", base(param_update="round"), ValueError, "invalid param_update in group 0: 'round'"),
        ("missing_masters", base(param_update="master"), ValueError, "batch is missing 'masters'"),
        ("missing_kahan", base(param_update="kahan"), ValueError, "batch is missing 'kahan_comps'"),
        ("missing_seed", base(param_update="stochastic", rounding_step=0, stream_ids=[0]), ValueError,
         "batch is missing 'seed'"),
        ("missing_rounding_step", base(param_update="stochastic", seed=0, stream_ids=[0]), ValueError,
         "batch is missing 'rounding_step'"),
        ("missing_stream_ids", base(param_update="stochastic", seed=0, rounding_step=0), ValueError,
         "batch is missing 'stream_ids'"),
        ("seed_range", base(param_update="stochastic", seed=2**31, rounding_step=0, stream_ids=[0]), ValueError,
         "invalid seed in group 0: 2147483648"),
        ("negative_step", base(param_update="stochastic", seed=1, rounding_step=-1, stream_ids=[0]), ValueError,
         "invalid rounding_step in group 0: -1"),
        ("stream_ids_length", base(param_update="stochastic", seed=1, rounding_step=0, stream_ids=[0, 1]),
         ValueError, "stream_ids has 2 entries but params has 1"),
    ]


@pytest.mark.parametrize("name,batch,error,message", rejection_cases(), ids=[c[0] for c in rejection_cases()])
def test_a_rejected_16_bit_step_names_the_problem_and_leaves_every_buffer_unchanged(name, batch, error, message):
    # A second, valid batch in the same call must not be stepped either.
    valid = dict(params=[np.ones(4, np.uint16)], grads=[np.ones(4, np.uint16)], exp_avgs=[np.zeros(4, np.float32)],
                 exp_avg_sqs=[np.zeros(4, np.float32)], param_dtype="bfloat16", grad_dtype="bfloat16", lr=1e-3,
                 weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    buffers = [a for b in (batch, valid) for v in b.values() if isinstance(v, list) for a in v
               if isinstance(a, np.ndarray)]
    for a in buffers:
        a.view(np.uint8)[:] = np.arange(a.nbytes, dtype=np.uint8) + 1
    before = [a.tobytes() for a in buffers]
    with pytest.raises(error) as info:
        _core.adam_step([valid, batch])
    assert str(info.value).startswith(message)
    assert [a.tobytes() for a in buffers] == before


def test_accumulate_and_sum_squares_reject_a_grad_of_the_wrong_dtype():
    accum = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"grad of params\[0\] in group 0: expected a float16 array, got uint16"):
        _core.accumulate([dict(grads=[np.zeros(4, np.uint16)], grad_accums=[accum], grad_dtype="float16")])
    with pytest.raises(TypeError, match="params\\[0\\] in group 0: expected a float32 array, got uint16"):
        _core.accumulate([dict(grads=[np.zeros(4, np.uint16)], grad_accums=[np.zeros(4, np.uint16)],
                               grad_dtype="bfloat16")])
    with pytest.raises(ValueError, match="invalid grad_dtype: 'int8'"):
        _core.sum_squares([accum], grad_dtype="int8")
    with pytest.raises(TypeError, match=r"grads\[0\]: expected a bfloat16 array"):
        _core.sum_squares([accum], grad_dtype="bfloat16")


@pytest.mark.parametrize("update", ["nearest", "stochastic", "kahan", "master"])
@pytest.mark.parametrize("sdt", ["bfloat16", "float32"])
@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_bfloat16_params_stepped_in_place_match_the_tiled_path_bitwise(update, sdt, optim, rng):
    """bfloat16 params with bfloat16 grads are stepped in place (sixteen or eight lanes and a
    remainder); the same values as float32 grads go through the float32 tile. Same bits."""
    sizes = [1, 7, 15, 16, 17, 33, 1000, 4099]
    case = Case(rng, sizes, "bfloat16", "bfloat16", sdt, optim, amsgrad=optim == "adam")
    twin_params = [p.copy() for p in case.params]
    twin_states = {k: [a.copy() for a in v] for k, v in case.states.items()}
    # Masters a little off their params, so that rounding them into the param shows.
    masters = [(decode(p, "bfloat16") * (1 + 1e-3)).astype(np.float32) for p in case.params]
    twin_masters = [m.copy() for m in masters]
    comps = [encode(decode(p, "bfloat16") * 1e-3, "bfloat16") for p in case.params]
    twin_comps = [c.copy() for c in comps]
    grads = case.grads()
    hyper = dict(ADAM["adam_l2_amsgrad"], step=3) if optim == "adam" else dict(SGD["momentum"])
    extra = dict(param_update=update, seed=11, rounding_step=3, stream_ids=list(range(len(sizes))))
    for threads in (1, 2):
        cpuadam.set_num_threads(threads)
        own = {"master": {"masters": masters}, "kahan": {"kahan_comps": comps}}.get(update, {})
        twin = {"master": {"masters": twin_masters}, "kahan": {"kahan_comps": twin_comps}}.get(update, {})
        step(optim, case.batch(grads, **hyper, **extra, **own))
        step(optim, dict(case.batch([decode(g, "bfloat16").astype(np.float32) for g in grads], **hyper, **extra,
                                    **twin),
                         params=twin_params, grad_dtype="float32", **twin_states))
        np.testing.assert_array_equal(bits(flat(case.params)), bits(flat(twin_params)))
        np.testing.assert_array_equal(bits(flat(masters)), bits(flat(twin_masters)))
        np.testing.assert_array_equal(bits(flat(comps)), bits(flat(twin_comps)))
        for key in case.states:
            np.testing.assert_array_equal(bits(flat(case.states[key])), bits(flat(twin_states[key])))
