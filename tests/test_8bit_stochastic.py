# SPDX-License-Identifier: MIT
"""state_rounding="stochastic": 8-bit state codes (and bfloat16/float16 states) rounded
stochastically.

The rule (quant.h): x = value / absmax goes to one of the two map values around it,
lo <= x < hi, the upper one when u * (hi - lo) < x - lo, u = (bits >> 8) * 2^-24, bits
the counter-based hash of the element's index under its state's key. The reference below
is that rule in NumPy, from the float64 reference quantizer's nearest code; the moments
come from the float32 step on the dequantized state (test_8bit's twin step), so the
stored codes are checked bit for bit. bfloat16/float16 states take the stochastic rounding of
param_update="stochastic" (16 or 13 random bits below the kept mantissa) under each state's key.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import supported_levels
from reference import QUANT_BLOCK, dequantize_blockwise, dynamic_map, quantize_blockwise
from test_8bit import ADAMW, LISTS, MAPS, SIZES, State8, eight_bit_step, log_spread, twin_step
from test_isa import child_env

import cpuadam
from cpuadam import _core

M64 = (1 << 64) - 1
STATE_TAG = 0x9E3779B97F4A7C15
# The key each state's codes are drawn with: 1, 2, 3 times the tag mixed into the tensor's key.
WHICH = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 3}


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def tensor_key(seed: int, step: int, stream: int) -> int:
    k = mix64((seed + 0x9E3779B97F4A7C15) & M64)
    k = mix64(k ^ step)
    return mix64(k ^ stream)


def mix32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def random_bits(n: int, key: int) -> np.ndarray:
    """The 32 random bits of elements 0..n-1 under a 64-bit key (n < 2^32)."""
    index = np.arange(n, dtype=np.uint32)
    return mix32(mix32(index ^ np.uint32(key & 0xFFFFFFFF)) + np.uint32(key >> 32))


def normalised(values: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """x = value / absmax of each element, the float32 quotient (0 in an all-zero block)."""
    scale = np.repeat(absmax, QUANT_BLOCK)[:values.size]
    scale = np.where(scale > 0, scale, np.float32(1))
    return (values.astype(np.float32) / scale).astype(np.float32)


def stochastic_codes(values: np.ndarray, qmap: np.ndarray, bits: np.ndarray):
    """(codes, absmax) of the rule, from the reference's nearest codes."""
    nearest, absmax = quantize_blockwise(values, qmap)
    x = normalised(values, absmax)
    q = nearest.astype(np.int64)
    vq = qmap[q]
    above = vq > x
    n = np.where(above, np.maximum(q - 1, 0), np.minimum(q + 1, 255))
    vn = qmap[n]
    lo, hi = np.where(above, vn, vq), np.where(above, vq, vn)
    u = (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    up = (u * (hi - lo)).astype(np.float32) < (x - lo).astype(np.float32)
    return np.where(up == above, q, n).astype(np.uint8), absmax


def keyed(seed: int, step: int, streams: list[int]) -> dict:
    return dict(state_rounding="stochastic", seed=seed, rounding_step=step, stream_ids=streams)


def expected_state(f32: dict, keys: list[str], seed: int, step: int, streams: list[int]) -> dict:
    want = {}
    for key in keys:
        want[key] = []
        for value, stream in zip(f32[LISTS[key]], streams):
            k = tensor_key(seed, step, stream) ^ ((STATE_TAG * WHICH[key]) & M64)
            want[key].append(stochastic_codes(value, dynamic_map(MAPS[key] == "signed"), random_bits(value.size, k)))
    return want


def assert_state(st: State8, want: dict) -> None:
    for key, per_tensor in want.items():
        for i, (codes, absmax) in enumerate(per_tensor):
            np.testing.assert_array_equal(st.codes[key][i], codes, err_msg=f"{key} codes of tensor {i}")
            np.testing.assert_array_equal(st.absmax[key][i], absmax, err_msg=f"{key} absmax of tensor {i}")


# --- the rule, bit for bit ------------------------------------------------------------------

@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("seed,step", [(0, 1), (12345, 7)])
def test_adam_codes_follow_the_stochastic_rule_bitwise(amsgrad, seed, step, rng):
    """Every stored code is the rule's choice for the exact float32 moment, every absmax the
    block maximum; the param steps from the exact moments, as with nearest codes."""
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    state = State8(rng, SIZES, keys)
    params = [log_spread(rng, n, -2, 0) for n in SIZES]
    grads = [log_spread(rng, n, -5, -1) for n in SIZES]
    scalars = dict(ADAMW, step=step, amsgrad=amsgrad)
    streams = [3 * i + 1 for i in range(len(SIZES))]
    want_params, _, f32 = twin_step(_core.adam_step, params, grads, state, **scalars)
    got_params, st = eight_bit_step(_core.adam_step, params, grads, state, **scalars,
                                    **keyed(seed, step, streams))
    for p, q in zip(got_params, want_params):
        np.testing.assert_array_equal(p.view(np.uint32), q.view(np.uint32))
    assert_state(st, expected_state(f32, keys, seed, step, streams))


@pytest.mark.parametrize("first", [False, True])
def test_sgd_momentum_codes_follow_the_stochastic_rule_bitwise(first, rng):
    state = State8(rng, SIZES, ["momentum_buffer"])
    params = [log_spread(rng, n, -2, 0) for n in SIZES]
    grads = [log_spread(rng, n, -5, -1) for n in SIZES]
    scalars = dict(lr=1e-2, weight_decay=0.0, momentum=0.9, dampening=0.1, momentum_first=first)
    streams = list(range(len(SIZES)))
    want_params, _, f32 = twin_step(_core.sgd_step, params, grads, state, **scalars)
    got_params, st = eight_bit_step(_core.sgd_step, params, grads, state, **scalars, **keyed(99, 4, streams))
    for p, q in zip(got_params, want_params):
        np.testing.assert_array_equal(p.view(np.uint32), q.view(np.uint32))
    assert_state(st, expected_state(f32, ["momentum_buffer"], 99, 4, streams))


# --- what the rule is for: unbiased codes ------------------------------------------------------

def test_codes_are_unbiased_and_round_up_as_often_as_the_distance_says(rng):
    """Over many elements, the fraction rounded up matches (x - lo) / (hi - lo) in every
    decile of that distance (5 standard deviations); nearest rounding would give 0 below
    the midpoint and 1 above it. Map values keep their code, and the stored values' summed
    error is within the rounding noise."""
    n = 400 * QUANT_BLOCK
    state = State8(rng, [n], ["exp_avg", "exp_avg_sq"])
    params, grads = [log_spread(rng, n, -2, 0)], [log_spread(rng, n, -5, -1)]
    _, _, f32 = twin_step(_core.adam_step, params, grads, state, step=3, **ADAMW)
    _, st = eight_bit_step(_core.adam_step, params, grads, state, step=3, **ADAMW, **keyed(5, 3, [0]))
    for key in ("exp_avg", "exp_avg_sq"):
        qmap = dynamic_map(MAPS[key] == "signed").astype(np.float64)
        absmax = st.absmax[key][0]
        x = normalised(f32[LISTS[key]][0], absmax).astype(np.float64)
        codes = st.codes[key][0].astype(np.int64)
        # x = -1 (a block whose largest magnitude is negative) lies below the signed map's
        # lowest value, -0.99297: its code is the lowest, as nearest rounding gives.
        below = x < qmap[0]
        assert np.all(codes[below] == 0)
        lo_code = np.maximum(np.searchsorted(qmap, x, side="right") - 1, 0)  # qmap[lo] <= x < qmap[lo + 1]
        exact = qmap[lo_code] == x
        assert np.all(codes[exact] == lo_code[exact])
        inner = ~exact & ~below
        lo, hi = qmap[lo_code[inner]], qmap[lo_code[inner] + 1]
        up = codes[inner] == lo_code[inner] + 1
        assert np.all(up | (codes[inner] == lo_code[inner])), "a code that is not a neighbour of x"
        f = (x[inner] - lo) / (hi - lo)
        assert inner.sum() > 0.9 * n
        for d in range(10):
            sel = (f >= d / 10) & (f < (d + 1) / 10)
            sd = np.sqrt(np.sum(f[sel] * (1 - f[sel])))
            assert abs(np.sum(up[sel]) - np.sum(f[sel])) <= 5 * sd + 1, (key, d)
        # The stored values' total error is the rounding noise, not a drift.
        stored = dequantize_blockwise(st.codes[key][0], absmax, qmap.astype(np.float32)).astype(np.float64)
        err = np.sum(stored - f32[LISTS[key]][0])
        noise = np.sqrt(np.sum(((hi - lo) * np.repeat(absmax, QUANT_BLOCK)[inner]) ** 2 * f * (1 - f)))
        assert abs(err) <= 5 * noise, key


def test_each_state_step_and_seed_draws_its_own_bits(rng):
    """The same moments under another seed or step round differently; the same seed and step
    give the same codes; m and v of one tensor do not share their draws."""
    n = 40 * QUANT_BLOCK
    state = State8(rng, [n], ["exp_avg", "exp_avg_sq"])
    params, grads = [log_spread(rng, n, -2, 0)], [log_spread(rng, n, -5, -1)]

    def codes(seed, rounding_step):
        _, st = eight_bit_step(_core.adam_step, params, grads, state, step=3, **ADAMW,
                               **keyed(seed, rounding_step, [0]))
        return st.codes["exp_avg"][0], st.codes["exp_avg_sq"][0]

    base = codes(1, 3)
    for m, v in (codes(2, 3), codes(1, 4)):
        # Independent draws differ where x is far enough from both neighbours (most of m's
        # elements; fewer of v's, whose small values sit next to a code).
        assert np.mean(m != base[0]) > 0.2 and np.mean(v != base[1]) > 0.05
    again = codes(1, 3)
    np.testing.assert_array_equal(again[0], base[0])
    np.testing.assert_array_equal(again[1], base[1])
    k = tensor_key(1, 3, 0)
    bits_m = random_bits(n, k ^ ((STATE_TAG * 1) & M64))
    bits_v = random_bits(n, k ^ ((STATE_TAG * 2) & M64))
    assert abs(np.corrcoef(bits_m.astype(np.float64), bits_v.astype(np.float64))[0, 1]) < 0.02


# --- levels (threads: test_8bit.py) ---------------------------------------------------------

LEVEL_CHILD = r"""
import sys
import numpy as np
from cpuadam import _core
d = dict(np.load(sys.argv[1]))
m = [d["m_codes"].copy()]; ma = [d["m_absmax"].copy()]
v = [d["v_codes"].copy()]; va = [d["v_absmax"].copy()]
p = [d["param"].copy()]
hyper = dict(lr=1e-2, weight_decay=0.05, beta1=0.9, beta2=0.999, eps=1e-8, decoupled=True, step=4)
keyed = dict(state_rounding="stochastic", seed=11, rounding_step=4, stream_ids=[2])
_core.adam_step([dict(params=p, grads=[d["grad"]], state_dtype="8bit", exp_avgs=m, exp_avg_sqs=v,
                      exp_avg_absmaxs=ma, exp_avg_sq_absmaxs=va, **hyper, **keyed)])
# The float32 step on the dequantized state, at this level.
pf = [d["param"].copy()]
mf = [_core.dequantize_blockwise(d["m_codes"], d["m_absmax"], "signed")]
vf = [_core.dequantize_blockwise(d["v_codes"], d["v_absmax"], "unsigned")]
_core.adam_step([dict(params=pf, grads=[d["grad"]], exp_avgs=mf, exp_avg_sqs=vf, **hyper)])
# SGD's first momentum step stores the grad: no arithmetic, the same codes at every level.
b = [np.zeros(d["grad"].size, np.uint8)]; ba = [np.zeros(-(-d["grad"].size // 256), np.float32)]
_core.sgd_step([dict(params=[d["param"].copy()], grads=[d["grad"]], lr=1.0, weight_decay=0.0,
                     momentum=0.9, momentum_first=True, state_dtype="8bit", momentum_buffers=b,
                     momentum_buffer_absmaxs=ba, **keyed)])
# bfloat16 states rounded stochastically: the float32 moments are mf and vf again.
mb = [(mf0.view(np.uint32) >> 16).astype(np.uint16) for mf0 in
      [_core.dequantize_blockwise(d["m_codes"], d["m_absmax"], "signed")]]
vb = [(vf0.view(np.uint32) >> 16).astype(np.uint16) for vf0 in
      [_core.dequantize_blockwise(d["v_codes"], d["v_absmax"], "unsigned")]]
mb0 = (mb[0].astype(np.uint32) << 16).view(np.float32).copy()
vb0 = (vb[0].astype(np.uint32) << 16).view(np.float32).copy()
_core.adam_step([dict(params=[d["param"].copy()], grads=[d["grad"]], state_dtype="bfloat16", exp_avgs=mb,
                      exp_avg_sqs=vb, **hyper, **keyed)])
_core.adam_step([dict(params=[d["param"].copy()], grads=[d["grad"]], exp_avgs=[mb0], exp_avg_sqs=[vb0], **hyper)])
np.savez(sys.argv[2], param=p[0], m=m[0], ma=ma[0], v=v[0], va=va[0], pf=pf[0], mf=mf[0], vf=vf[0],
         b=b[0], ba=ba[0], mb=mb[0], vb=vb[0], mb0=mb0, vb0=vb0)
"""


def test_every_level_follows_the_rule(tmp_path, rng):
    """At each level (its vector body and its scalar tail): the param is the float32 step's
    and the codes (and bfloat16 states) are the rule's for that level's float32 moments. SGD's first momentum
    step (the grad itself, no arithmetic) gives the same codes at every level."""
    n = 30 * QUANT_BLOCK + 13
    state = State8(rng, [n], ["exp_avg", "exp_avg_sq"])
    grad = log_spread(rng, n, -8, 2)
    np.savez(tmp_path / "in.npz", m_codes=state.codes["exp_avg"][0], m_absmax=state.absmax["exp_avg"][0],
             v_codes=state.codes["exp_avg_sq"][0], v_absmax=state.absmax["exp_avg_sq"][0],
             param=log_spread(rng, n, -2, 0), grad=grad)
    key = tensor_key(11, 4, 2)
    want_sgd = stochastic_codes(grad, dynamic_map(True), random_bits(n, key ^ STATE_TAG))
    for level in supported_levels():
        proc = subprocess.run([sys.executable, "-c", LEVEL_CHILD, str(tmp_path / "in.npz"),
                               str(tmp_path / f"{level}.npz")], env=child_env(level),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got = np.load(tmp_path / f"{level}.npz")
        np.testing.assert_array_equal(got["param"].view(np.uint32), got["pf"].view(np.uint32), err_msg=level)
        for name, f, signed, which in (("m", "mf", True, 1), ("v", "vf", False, 2)):
            codes, absmax = stochastic_codes(got[f], dynamic_map(signed),
                                             random_bits(n, key ^ ((STATE_TAG * which) & M64)))
            np.testing.assert_array_equal(got[name], codes, err_msg=f"{name} codes: {level}")
            np.testing.assert_array_equal(got[name + "a"], absmax, err_msg=f"{name} absmax: {level}")
        np.testing.assert_array_equal(got["b"], want_sgd[0], err_msg=f"SGD codes: {level}")
        np.testing.assert_array_equal(got["ba"], want_sgd[1], err_msg=f"SGD absmax: {level}")
        for name, f, which in (("mb", "mb0", 1), ("vb", "vb0", 2)):
            want = bf16_stochastic(got[f], random_bits(n, key ^ ((STATE_TAG * which) & M64)))
            np.testing.assert_array_equal(got[name], want, err_msg=f"bfloat16 {name}: {level}")


# --- the option -------------------------------------------------------------------------------

def test_the_option_is_checked_once_for_both_front_ends():
    for bad in ({"state_rounding": "stochastic"}, {"state_rounding": "stochastic", "state_dtype": "float32"}):
        with pytest.raises(ValueError, match="state_rounding='stochastic' .*8-bit"):
            cpuadam.AdamW([np.zeros(8, np.float32)], **bad)
    with pytest.raises(ValueError, match="Invalid state_rounding: 'up'"):
        cpuadam.AdamW([np.zeros(8, np.float32)], state_dtype="8bit", state_rounding="up")
    with pytest.raises(ValueError, match="state_rounding"):
        cpuadam.AdamW([{"params": [np.zeros(8, np.float32)], "state_rounding": "stochastic"}],
                      state_dtype="8bit")


def test_the_core_refuses_bad_rounding_batches_and_writes_nothing(rng):
    n = 3 * QUANT_BLOCK
    state = State8(rng, [n], ["exp_avg", "exp_avg_sq"])
    param, grad = log_spread(rng, n, -2, 0), log_spread(rng, n, -5, -1)
    m32, v32 = np.ones(n, np.float32), np.ones(n, np.float32)
    bad = [
        (dict(state_dtype="8bit", **state.lists(), **dict(keyed(1, 1, [0]), state_rounding="up")),
         "invalid state_rounding.*'up'"),
        (dict(exp_avgs=[m32], exp_avg_sqs=[v32], **keyed(1, 1, [0])), "'stochastic' rounds 8-bit, bfloat16 and float16 states"),
        (dict(state_dtype="8bit", **state.lists(), state_rounding="stochastic", rounding_step=1,
              stream_ids=[0]), "missing 'seed'"),
        (dict(state_dtype="8bit", **state.lists(), **keyed(1, 1, [0, 1])), "stream_ids has 2 entries"),
    ]
    for extra, message in bad:
        p = param.copy()
        before = [a.copy() for a in (p, m32, v32, *state.codes["exp_avg"], *state.codes["exp_avg_sq"],
                                     *state.absmax["exp_avg"], *state.absmax["exp_avg_sq"])]
        with pytest.raises(ValueError, match=message):
            _core.adam_step([dict(params=[p], grads=[grad], step=2, **ADAMW, **extra)])
        after = (p, m32, v32, *state.codes["exp_avg"], *state.codes["exp_avg_sq"],
                 *state.absmax["exp_avg"], *state.absmax["exp_avg_sq"])
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# --- the front-ends ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")
import cpuadam.torch as ctorch  # noqa: E402

SHAPES = [(100,), (70, 90), (4096,), (3, 1000)]
OPTIONS = dict(state_dtype="8bit", state_rounding="stochastic", seed=42)


def grads_for(step: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in SHAPES]


def start_params() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def test_numpy_and_torch_round_alike_and_resume_bitwise():
    """Both front-ends give the same bits; a state_dict carries the seed, so a run resumed
    from it (in an optimizer built with another seed) continues bit for bit."""
    def numpy_opt(params, seed=42):
        return cpuadam.AdamW(params, lr=1e-2, **dict(OPTIONS, seed=seed))

    full = start_params()
    opt = numpy_opt(full)
    for s in range(6):
        opt.step(grads_for(s))
    half = start_params()
    first = numpy_opt(half)
    for s in range(3):
        first.step(grads_for(s))
    sd = first.state_dict()
    assert sd["seed"] == 42
    resumed = numpy_opt(half, seed=1)
    resumed.load_state_dict(sd)
    for s in range(3, 6):
        resumed.step(grads_for(s))
    for a, b in zip(half, full):
        np.testing.assert_array_equal(a, b)

    tparams = [torch.nn.Parameter(torch.from_numpy(p)) for p in start_params()]
    topt = ctorch.AdamW(tparams, lr=1e-2, **OPTIONS)
    for s in range(3):
        for p, g in zip(tparams, grads_for(s)):
            p.grad = torch.from_numpy(g)
        topt.step()
    tsd = topt.state_dict()
    assert tsd["seed"] == 42
    for i in range(len(SHAPES)):
        for key, value in sd["state"][i].items():
            np.testing.assert_array_equal(np.asarray(tsd["state"][i][key]), np.asarray(value), err_msg=key)
    tresumed_params = [torch.nn.Parameter(p.detach().clone()) for p in tparams]
    tresumed = ctorch.AdamW(tresumed_params, lr=1e-2, **dict(OPTIONS, seed=3))
    tresumed.load_state_dict(tsd)
    for s in range(3, 6):
        for p, g in zip(tresumed_params, grads_for(s)):
            p.grad = torch.from_numpy(g)
        tresumed.step()
    for a, b in zip(tresumed_params, full):
        np.testing.assert_array_equal(a.detach().numpy(), b)


def test_nearest_is_the_default_and_stochastic_changes_only_the_codes():
    """With 8-bit states, nearest is the default (the published scheme); stochastic codes
    differ, but a param's first step (from zero moments) does not."""
    base, sr = start_params(), start_params()
    a = cpuadam.AdamW(base, lr=1e-2, state_dtype="8bit")
    b = cpuadam.AdamW(sr, lr=1e-2, **OPTIONS)
    a.step(grads_for(0))
    b.step(grads_for(0))
    for x, y in zip(base, sr):
        np.testing.assert_array_equal(x, y)
    big = [i for i, s in enumerate(SHAPES) if np.prod(s) >= 4096]
    assert big
    for i in big:
        assert np.mean(a.state_dict()["state"][i]["exp_avg_sq"] != b.state_dict()["state"][i]["exp_avg_sq"]) > 0.1
    assert "seed" not in a.state_dict()


# --- bfloat16 and float16 states --------------------------------------------------------------

def bf16_bits(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_stochastic(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The carry rule for finite values below the largest bfloat16 (all these tests use)."""
    u = x.view(np.uint32)
    assert np.all((u & np.uint32(0x7FFFFFFF)) <= np.uint32(0x7F7F0000))
    return ((u + (bits >> np.uint32(16))) >> np.uint32(16)).astype(np.uint16)


@pytest.mark.parametrize("pdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_bfloat16_states_follow_the_stochastic_rule_bitwise(pdtype, amsgrad, rng):
    """The param steps from the stored moments as with nearest-rounded states; each new moment
    is the float32 one rounded by the carry rule with its state's bits."""
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    params = [log_spread(rng, n, -2, 0) for n in SIZES]
    grads = [log_spread(rng, n, -5, -1) for n in SIZES]
    states = {k: [bf16_bits(log_spread(rng, n, -6, -1) ** (2 if k != "exp_avg" else 1)) for n in SIZES]
              for k in keys}
    streams = [2 * i + 5 for i in range(len(SIZES))]
    scalars = dict(ADAMW, step=6, amsgrad=amsgrad)
    if pdtype == "bfloat16":
        params = [bf16_bits(p) for p in params]
        scalars.update(param_dtype="bfloat16")
    got_params = [p.copy() for p in params]
    got = {LISTS[k]: [b.copy() for b in states[k]] for k in keys}
    _core.adam_step([dict(params=got_params, grads=grads, state_dtype="bfloat16", **got, **scalars,
                          **keyed(21, 6, streams))])
    want_params = [p.copy() for p in params]
    f32 = {LISTS[k]: [bf16_values(b).copy() for b in states[k]] for k in keys}
    _core.adam_step([dict(params=want_params, grads=grads, **f32, **scalars)])
    for p, q in zip(got_params, want_params):
        np.testing.assert_array_equal(p, q)
    for k in keys:
        for i, (value, stream) in enumerate(zip(f32[LISTS[k]], streams)):
            key = tensor_key(21, 6, stream) ^ ((STATE_TAG * WHICH[k]) & M64)
            want = bf16_stochastic(value, random_bits(value.size, key))
            np.testing.assert_array_equal(got[LISTS[k]][i], want, err_msg=f"{k} of tensor {i}")


def test_float16_states_round_to_a_neighbour_without_bias(rng):
    """float16 moments (a float16 model's): each stored value is one of the two float16
    neighbours of the float32 moment, the upper as often as its distance says."""
    n = 60_000
    param = (rng.standard_normal(n) * 0.5).astype(np.float16)
    grad = (rng.standard_normal(n) * 0.1).astype(np.float16)
    m = (rng.standard_normal(n) * 0.01).astype(np.float16)
    v = (m.astype(np.float32) ** 2 + np.float32(1e-4)).astype(np.float16)
    scalars = dict(ADAMW, step=4, param_dtype="float16", grad_dtype="float16")
    gm, gv = m.copy(), v.copy()
    _core.adam_step([dict(params=[param.copy()], grads=[grad], exp_avgs=[gm], exp_avg_sqs=[gv],
                          state_dtype="float16", **scalars, **keyed(8, 4, [0]))])
    fm, fv = m.astype(np.float32), v.astype(np.float32)
    _core.adam_step([dict(params=[param.copy()], grads=[grad], exp_avgs=[fm], exp_avg_sqs=[fv], **scalars)])
    for got, exact in ((gm, fm), (gv, fv)):
        lo = exact.astype(np.float16)  # nearest; the lower neighbour is below x
        lo = np.where(lo.astype(np.float32) > exact, np.nextafter(lo, np.float16(-np.inf)), lo)
        hi = np.nextafter(lo, np.float16(np.inf))
        assert np.all((got == lo) | (got == hi))
        inner = lo.astype(np.float32) != exact
        f = ((exact - lo.astype(np.float32)) / (hi.astype(np.float32) - lo.astype(np.float32)))[inner].astype(np.float64)
        up = (got == hi)[inner]
        assert np.all(got[~inner] == lo[~inner])
        for d in range(10):
            sel = (f >= d / 10) & (f < (d + 1) / 10)
            assert abs(np.sum(up[sel]) - np.sum(f[sel])) <= 5 * np.sqrt(np.sum(f[sel] * (1 - f[sel]))) + 1, d


def test_torch_bfloat16_model_rounds_its_moments_and_resumes_bitwise():
    """A bfloat16 model (moments in bfloat16, torch's arrangement) with stochastic rounding of
    the params and the moments: NumPy and torch agree bit for bit, and a resumed run continues
    bit for bit."""
    pytest.importorskip("ml_dtypes")
    import ml_dtypes

    options = dict(state_rounding="stochastic", param_update="stochastic", seed=5)

    def tparams():
        return [torch.nn.Parameter(torch.from_numpy(p).to(torch.bfloat16)) for p in start_params()]

    def tstep(opt, params, s):
        for p, g in zip(params, grads_for(s)):
            p.grad = torch.from_numpy(g).to(torch.bfloat16)
        opt.step()

    full = tparams()
    opt = ctorch.AdamW(full, lr=1e-2, **options)
    for s in range(6):
        tstep(opt, full, s)
    assert opt.state_dict()["state"][1]["exp_avg"].dtype == torch.bfloat16
    half = tparams()
    first = ctorch.AdamW(half, lr=1e-2, **options)
    for s in range(3):
        tstep(first, half, s)
    sd = first.state_dict()
    resumed = ctorch.AdamW(half, lr=1e-2, **dict(options, seed=0))
    resumed.load_state_dict(sd)
    for s in range(3, 6):
        tstep(resumed, half, s)
    for a, b in zip(half, full):
        assert torch.equal(a, b)

    nparams = [torch.from_numpy(p).to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
               for p in start_params()]
    nopt = cpuadam.AdamW(nparams, lr=1e-2, state_dtype="bfloat16", **options)
    for s in range(6):
        nopt.step([torch.from_numpy(g).to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                   for g in grads_for(s)])
    for a, b in zip(nparams, full):
        np.testing.assert_array_equal(a.view(np.uint16), b.detach().view(torch.int16).numpy().view(np.uint16))
    nearest = tparams()
    plain = ctorch.AdamW(nearest, lr=1e-2, param_update="stochastic", seed=5)
    for s in range(6):
        tstep(plain, nearest, s)
    assert not all(torch.equal(a, b) for a, b in zip(nearest, full))

