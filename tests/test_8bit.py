# SPDX-License-Identifier: MIT
"""8-bit block-wise states: the maps and quantizer against the float64 reference, the fused step
against the float32 step on the dequantized states, thread and level invariance, rejections."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import supported_levels
from reference import QUANT_BLOCK, dequantize_blockwise, dynamic_map, quantize_blockwise
from test_isa import child_env

import cpuadam
from cpuadam import _core

MAPS = {"exp_avg": "signed", "exp_avg_sq": "unsigned", "max_exp_avg_sq": "unsigned",
        "momentum_buffer": "signed"}
LISTS = {"exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs", "max_exp_avg_sq": "max_exp_avg_sqs",
         "momentum_buffer": "momentum_buffers"}
# Sizes around the block: short last blocks, a tensor of one element, many tensors per call.
SIZES = [1, 255, 256, 257, 1000, 3 * QUANT_BLOCK + 5, 5000]
ADAMW = dict(lr=1e-2, weight_decay=0.05, beta1=0.9, beta2=0.999, eps=1e-8, decoupled=True)


def log_spread(rng, n, lo=-7, hi=1):
    """Values whose magnitudes span many decades, as moments do."""
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(lo, hi, n)).astype(np.float32)


class State8:
    """Quantized states of tensors of the given sizes, warm (random codes from real values)."""

    def __init__(self, rng, sizes, keys):
        self.sizes, self.keys = list(sizes), list(keys)
        self.codes, self.absmax = {}, {}
        for key in keys:
            self.codes[key], self.absmax[key] = [], []
            for n in sizes:
                v = log_spread(rng, n, -6, -1)
                if MAPS[key] == "unsigned":
                    v = v * v + np.float32(1e-6)
                c, a = _core.quantize_blockwise(v, MAPS[key])
                self.codes[key].append(c)
                self.absmax[key].append(a)

    def lists(self) -> dict:
        out = {}
        for key in self.keys:
            out[LISTS[key]] = list(self.codes[key])
            out[key + "_absmaxs"] = list(self.absmax[key])
        return out

    def dequantized(self) -> dict:
        return {LISTS[key]: [_core.dequantize_blockwise(c, a, MAPS[key])
                             for c, a in zip(self.codes[key], self.absmax[key])] for key in self.keys}

    def copy(self) -> "State8":
        other = State8.__new__(State8)
        other.sizes, other.keys = self.sizes, self.keys
        other.codes = {k: [c.copy() for c in v] for k, v in self.codes.items()}
        other.absmax = {k: [a.copy() for a in v] for k, v in self.absmax.items()}
        return other


def twin_step(core_step, params, grads, state: State8, **scalars):
    """The float32 step on the dequantized states, then the host quantizer: what the 8-bit
    step must store, bitwise."""
    params = [p.copy() for p in params]
    f32 = state.dequantized()
    core_step([dict(params=params, grads=grads, **f32, **scalars)])
    want = {}
    for key in state.keys:
        want[key] = [_core.quantize_blockwise(v, MAPS[key]) for v in f32[LISTS[key]]]
    return params, want, f32


def eight_bit_step(core_step, params, grads, state: State8, **scalars):
    params = [p.copy() for p in params]
    st = state.copy()
    core_step([dict(params=params, grads=grads, state_dtype="8bit", **st.lists(), **scalars)])
    return params, st


def assert_same(params, st, want_params, want):
    for i, (p, q) in enumerate(zip(params, want_params)):
        np.testing.assert_array_equal(p.view(np.uint32), q.view(np.uint32), err_msg=f"param {i}")
    for key, per_tensor in want.items():
        for i, (codes, absmax) in enumerate(per_tensor):
            np.testing.assert_array_equal(st.codes[key][i], codes, err_msg=f"{key} codes of {i}")
            np.testing.assert_array_equal(st.absmax[key][i], absmax, err_msg=f"{key} absmax of {i}")


# --- the maps and the quantizer ------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_the_maps_are_the_dynamic_maps_of_the_reference(signed):
    ours = _core.qmap("signed" if signed else "unsigned")
    np.testing.assert_array_equal(ours, dynamic_map(signed))
    assert ours.dtype == np.float32 and np.all(np.diff(ours) > 0)
    assert ours[-1] == 1.0 and 0.0 in ours


def adversarial(rng, qmap):
    """Values that land exactly on representable midpoints, one float32 either side of
    every midpoint, on map values, zeros, and a spread over every decade; then, offset by
    offset, the floats 2 to 1024 ulps either side of every midpoint (blocks of one offset:
    the arithmetic code search keeps the far ones and hands the near ones to the exact
    search); each block holds a 1 so that value / absmax is the value itself."""
    q = qmap.astype(np.float64)
    mids = (q[:-1] + q[1:]) / 2
    m32 = mids.astype(np.float32)
    exact = m32[m32.astype(np.float64) == mids]
    near = np.concatenate([np.nextafter(m32, np.float32(2)), np.nextafter(m32, np.float32(-2))])
    spread = np.clip(log_spread(rng, 4000, -9, 0), -1, 1)
    if qmap[0] >= 0:
        spread = np.abs(spread)
    bits = m32.view(np.int32)
    offsets = [(bits + sign * k).view(np.float32) for k in (2, 3, 5, 8, 16, 64, 256, 1024) for sign in (1, -1)]
    off = np.clip(np.concatenate(offsets), -1, 1)
    values = np.concatenate([exact, near, qmap, np.zeros(7, np.float32), spread, off]).astype(np.float32)
    if qmap[0] >= 0:
        values = values[values >= 0]
    blocks = -(-values.size // (QUANT_BLOCK - 1))
    out = np.zeros(blocks * QUANT_BLOCK, np.float32)
    for b in range(blocks):
        chunk = values[b * (QUANT_BLOCK - 1):(b + 1) * (QUANT_BLOCK - 1)]
        out[b * QUANT_BLOCK:b * QUANT_BLOCK + chunk.size] = chunk
        out[b * QUANT_BLOCK + QUANT_BLOCK - 1] = 1.0
    return out, exact.size


@pytest.mark.parametrize("map_name", ["signed", "unsigned"])
def test_every_code_is_the_nearest_code_and_ties_go_down(map_name, rng):
    qmap = dynamic_map(map_name == "signed")
    values, ties = adversarial(rng, qmap)
    assert ties > 50  # the exact-midpoint cases really are there
    codes, absmax = _core.quantize_blockwise(values, map_name)
    want_codes, want_absmax = quantize_blockwise(values, qmap)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(absmax, want_absmax)
    back = _core.dequantize_blockwise(codes, absmax, map_name)
    np.testing.assert_array_equal(back, dequantize_blockwise(codes, absmax, qmap))


@pytest.mark.parametrize("map_name", ["signed", "unsigned"])
@pytest.mark.parametrize("scale", [2.0 ** -120, 2.0 ** -61, 2.0 ** 61, 2.0 ** 120])
def test_blocks_scaled_far_from_one_keep_their_codes(map_name, scale, rng):
    """Blocks whose absmax lies beyond 2^-60 or 2^60 are scaled by a power of two
    before the quotient: the adversarial values, scaled, keep the nearest codes."""
    qmap = dynamic_map(map_name == "signed")
    values, _ = adversarial(rng, qmap)
    values = (values.astype(np.float64) * scale).astype(np.float32)
    codes, absmax = _core.quantize_blockwise(values, map_name)
    want_codes, want_absmax = quantize_blockwise(values, qmap)
    np.testing.assert_array_equal(absmax, want_absmax)
    np.testing.assert_array_equal(codes, want_codes)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 10_000])
def test_quantizer_on_short_blocks_zeros_and_scales(n, rng):
    for map_name in ("signed", "unsigned"):
        qmap = dynamic_map(map_name == "signed")
        v = log_spread(rng, n, -30, 30)
        if map_name == "unsigned":
            v = np.abs(v)
        v[: n // 3] = 0.0  # whole zero blocks
        codes, absmax = _core.quantize_blockwise(v, map_name)
        want_codes, want_absmax = quantize_blockwise(v, qmap)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(absmax, want_absmax)
        assert absmax.shape == (-(-n // QUANT_BLOCK),)


# --- the fused step ---------------------------------------------------------------------------

@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("hyper", ["adamw", "adam_l2_scaled"])
def test_adam_8bit_is_the_float32_step_on_the_dequantized_state_then_quantized(amsgrad, hyper, rng):
    """The param steps from the exact float32 moments; the stored codes are the nearest codes
    of those moments and absmax their block maximum: bitwise, many tensors in one call."""
    scalars = dict(ADAMW) if hyper == "adamw" else dict(
        lr=3e-3, weight_decay=0.01, beta1=0.8, beta2=0.99, eps=1e-6, grad_scale=0.5, clipvalue=2.0)
    scalars.update(step=5, amsgrad=amsgrad)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    state = State8(rng, SIZES, keys)
    params = [log_spread(rng, n, -2, 0) for n in SIZES]
    grads = [log_spread(rng, n, -5, -1) for n in SIZES]
    want_params, want, _ = twin_step(_core.adam_step, params, grads, state, **scalars)
    got_params, st = eight_bit_step(_core.adam_step, params, grads, state, **scalars)
    assert_same(got_params, st, want_params, want)


def test_adam_8bit_codes_are_nearest_to_the_float64_reference_moments(rng):
    """Against the float64 reference: the moments from the dequantized old state, quantized by
    the reference quantizer. The kernel's float32 moments are within a few ulp of the float64
    ones, so a code may differ only where the moment sits that close to a midpoint."""
    n = 20 * QUANT_BLOCK + 77
    state = State8(rng, [n], ["exp_avg", "exp_avg_sq"])
    param, grad = log_spread(rng, n, -2, 0), log_spread(rng, n, -5, -1)
    b1, b2 = 0.9, 0.999
    m_old = dequantize_blockwise(state.codes["exp_avg"][0], state.absmax["exp_avg"][0], dynamic_map(True))
    v_old = dequantize_blockwise(state.codes["exp_avg_sq"][0], state.absmax["exp_avg_sq"][0], dynamic_map(False))
    g = grad.astype(np.float64)
    m = b1 * m_old + (1 - b1) * g
    v = b2 * v_old + (1 - b2) * g * g
    _, st = eight_bit_step(_core.adam_step, [param], [grad], state, step=3, **ADAMW)
    for key, exact, qmap in (("exp_avg", m, dynamic_map(True)), ("exp_avg_sq", v, dynamic_map(False))):
        want_codes, want_absmax = quantize_blockwise(exact.astype(np.float32), qmap)
        np.testing.assert_allclose(st.absmax[key][0], want_absmax, rtol=4e-7)
        codes = st.codes[key][0]
        differ = np.flatnonzero(codes != want_codes)
        # Each differing element: its normalised value is within 1e-6 of the midpoint between
        # the two codes, so either is nearest within the float32 error of the moment.
        x = exact / np.repeat(want_absmax.astype(np.float64), QUANT_BLOCK)[:n]
        q = qmap.astype(np.float64)
        mid = (q[codes[differ]] + q[want_codes[differ]]) / 2
        assert np.all(np.abs(codes[differ].astype(int) - want_codes[differ]) == 1)
        assert np.all(np.abs(x[differ] - mid) <= 1e-6 * np.maximum(np.abs(mid), 1e-3)), differ
        assert differ.size <= n // 1000


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_8bit_is_the_float32_step_then_quantized(nesterov, rng):
    state = State8(rng, SIZES, ["momentum_buffer"])
    params = [log_spread(rng, n, -2, 0) for n in SIZES]
    grads = [log_spread(rng, n, -5, -1) for n in SIZES]
    scalars = dict(lr=1e-2, weight_decay=0.01, momentum=0.9, dampening=0.0, nesterov=nesterov)
    want_params, want, _ = twin_step(_core.sgd_step, params, grads, state, **scalars)
    got_params, st = eight_bit_step(_core.sgd_step, params, grads, state, **scalars)
    assert_same(got_params, st, want_params, want)
    # The first step: the buffer is the grad, quantized exactly as the reference does.
    scalars["weight_decay"] = 0.0
    got_params, st = eight_bit_step(_core.sgd_step, params, grads, state, momentum_first=True, **scalars)
    for i, g in enumerate(grads):
        codes, absmax = quantize_blockwise(g, dynamic_map(True))
        np.testing.assert_array_equal(st.codes["momentum_buffer"][i], codes)
        np.testing.assert_array_equal(st.absmax["momentum_buffer"][i], absmax)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_the_same_bits_for_any_thread_count(rounding, rng):
    """Blocks straddling the even split of the range between threads are never cut; with
    stochastic codes (test_8bit_stochastic.py) each element draws the same bits whatever
    thread steps it."""
    sizes = [3, 1000, 2 * QUANT_BLOCK + 1, 40_000, 17, 70_001]
    keyed = {} if rounding == "nearest" else dict(state_rounding="stochastic", seed=7, rounding_step=2,
                                                  stream_ids=list(range(len(sizes))))
    state = State8(rng, sizes, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
    params = [log_spread(rng, n, -2, 0) for n in sizes]
    grads = [log_spread(rng, n, -5, -1) for n in sizes]
    results = []
    before = _core.get_num_threads()
    try:
        for threads in (1, 2, 3):
            _core.set_num_threads(threads)
            results.append(eight_bit_step(_core.adam_step, params, grads, state, step=2, amsgrad=True, **ADAMW,
                                          **keyed))
    finally:
        _core.set_num_threads(before)
    for got_params, st in results[1:]:
        assert_same(got_params, st, results[0][0],
                    {k: list(zip(results[0][1].codes[k], results[0][1].absmax[k])) for k in st.keys})


LEVEL_CHILD = r"""
import sys
import numpy as np
from cpuadam import _core
d = dict(np.load(sys.argv[1]))
out = {}
# Adam: the 8-bit step and the float32 step on the dequantized state agree at this level.
m = [d["m_codes"].copy()]; ma = [d["m_absmax"].copy()]
v = [d["v_codes"].copy()]; va = [d["v_absmax"].copy()]
p = [d["param"].copy()]
hyper = dict(lr=1e-2, weight_decay=0.05, beta1=0.9, beta2=0.999, eps=1e-8, decoupled=True, step=4)
_core.adam_step([dict(params=p, grads=[d["grad"]], state_dtype="8bit", exp_avgs=m, exp_avg_sqs=v,
                      exp_avg_absmaxs=ma, exp_avg_sq_absmaxs=va, **hyper)])
pf = [d["param"].copy()]
mf = [_core.dequantize_blockwise(d["m_codes"], d["m_absmax"], "signed")]
vf = [_core.dequantize_blockwise(d["v_codes"], d["v_absmax"], "unsigned")]
_core.adam_step([dict(params=pf, grads=[d["grad"]], exp_avgs=mf, exp_avg_sqs=vf, **hyper)])
assert np.array_equal(p[0].view(np.uint32), pf[0].view(np.uint32))
for codes, absmax, f, name in ((m, ma, mf, "signed"), (v, va, vf, "unsigned")):
    c, a = _core.quantize_blockwise(f[0], name)
    assert np.array_equal(codes[0], c) and np.array_equal(absmax[0], a)
# SGD's first momentum step stores the quantized grad: no arithmetic, the same bits everywhere.
b = [np.zeros(d["grad"].size, np.uint8)]; ba = [np.zeros(-(-d["grad"].size // 256), np.float32)]
q = [d["param"].copy()]
_core.sgd_step([dict(params=q, grads=[d["grad"]], lr=1.0, weight_decay=0.0, momentum=0.9,
                     momentum_first=True, state_dtype="8bit", momentum_buffers=b,
                     momentum_buffer_absmaxs=ba)])
# The level's quantizer on the adversarial values (ties, map values, block ends), and back.
adv = {}
for name in ("signed", "unsigned"):
    c, a = _core.quantize_blockwise(d["adv_" + name], name)
    adv[name + "_codes"], adv[name + "_absmax"] = c, a
    adv[name + "_back"] = _core.dequantize_blockwise(c, a, name)
    adv[name + "_inf_codes"], adv[name + "_inf_absmax"] = _core.quantize_blockwise(d["infs"], name)
np.savez(sys.argv[2], codes=b[0], absmax=ba[0], param=q[0], **adv)
"""


def test_every_level_quantizes_alike(tmp_path, rng):
    n = 50 * QUANT_BLOCK + 9
    state = State8(rng, [n], ["exp_avg", "exp_avg_sq"])
    adv = {name: adversarial(rng, dynamic_map(name == "signed"))[0] for name in ("signed", "unsigned")}
    # Infinite values: their blocks' finite values take the code of 0 and +-inf the
    # code of +-1 (the lowest code for -inf), the same at every level.
    infs = np.abs(log_spread(rng, 3 * QUANT_BLOCK + 40))
    infs[5], infs[300], infs[3 * QUANT_BLOCK + 7] = np.inf, -np.inf, np.inf
    np.savez(tmp_path / "in.npz", m_codes=state.codes["exp_avg"][0], m_absmax=state.absmax["exp_avg"][0],
             v_codes=state.codes["exp_avg_sq"][0], v_absmax=state.absmax["exp_avg_sq"][0],
             param=log_spread(rng, n, -2, 0), grad=log_spread(rng, n, -8, 2),
             adv_signed=adv["signed"], adv_unsigned=adv["unsigned"], infs=infs)
    outputs = {}
    for level in supported_levels():
        proc = subprocess.run([sys.executable, "-c", LEVEL_CHILD, str(tmp_path / "in.npz"),
                               str(tmp_path / f"{level}.npz")], env=child_env(level),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs[level] = np.load(tmp_path / f"{level}.npz")
    levels = list(outputs)
    for level in levels[1:]:
        for key in ("codes", "absmax", "param"):
            np.testing.assert_array_equal(outputs[level][key], outputs[levels[0]][key], err_msg=f"{key}: {level}")
    # Each level's vector quantizer (and the scalar one) against the float64 reference.
    for level in levels:
        for name in ("signed", "unsigned"):
            qmap = dynamic_map(name == "signed")
            want_codes, want_absmax = quantize_blockwise(adv[name], qmap)
            got = outputs[level]
            np.testing.assert_array_equal(got[name + "_codes"], want_codes, err_msg=f"{name} codes: {level}")
            np.testing.assert_array_equal(got[name + "_absmax"], want_absmax, err_msg=f"{name} absmax: {level}")
            np.testing.assert_array_equal(got[name + "_back"], dequantize_blockwise(want_codes, want_absmax, qmap),
                                          err_msg=f"{name} decode: {level}")
            with np.errstate(invalid="ignore"):  # inf / inf, overwritten below
                want_codes, want_absmax = quantize_blockwise(infs, qmap)
            zero = int(np.flatnonzero(qmap == 0)[0])
            for b in (0, 1, 3):
                want_codes[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK] = zero
            want_codes[[5, 300, 3 * QUANT_BLOCK + 7]] = [255, 0, 255]
            np.testing.assert_array_equal(got[name + "_inf_codes"], want_codes, err_msg=f"{name} infs: {level}")
            np.testing.assert_array_equal(got[name + "_inf_absmax"], want_absmax, err_msg=f"{name} infs: {level}")


# --- rejections ----------------------------------------------------------------------------------

def test_rejections_leave_every_buffer_unchanged(rng):
    sizes = [300, 1000]
    state = State8(rng, sizes, ["exp_avg", "exp_avg_sq"])
    params = [log_spread(rng, n, -2, 0) for n in sizes]
    grads = [log_spread(rng, n, -5, -1) for n in sizes]

    def attempt(change, error, match):
        st = state.copy()
        ps = [p.copy() for p in params]
        lists = st.lists()
        change(lists)
        with pytest.raises(error, match=match):
            _core.adam_step([dict(params=ps, grads=grads, state_dtype="8bit", step=1, **ADAMW, **lists)])
        for p, q in zip(ps, params):
            np.testing.assert_array_equal(p, q)
        for key in st.keys:
            for a, b in zip(st.codes[key], state.codes[key]):
                np.testing.assert_array_equal(a, b)
            for a, b in zip(st.absmax[key], state.absmax[key]):
                np.testing.assert_array_equal(a, b)

    def float_codes(lists):
        lists["exp_avg_sqs"][1] = lists["exp_avg_sqs"][1].astype(np.float32)

    def absmax_dtype(lists):
        lists["exp_avg_absmaxs"][1] = lists["exp_avg_absmaxs"][1].astype(np.float64)

    def absmax_short(lists):
        lists["exp_avg_sq_absmaxs"][1] = lists["exp_avg_sq_absmaxs"][1][:-1].copy()

    def absmax_missing(lists):
        del lists["exp_avg_absmaxs"]

    def absmax_aliases(lists):
        lists["exp_avg_sq_absmaxs"][0] = lists["exp_avg_absmaxs"][0]

    attempt(float_codes, TypeError, r"exp_avg_sq of params\[1\].*uint8")
    attempt(absmax_dtype, TypeError, r"exp_avg_absmax of params\[1\].*float32")
    attempt(absmax_short, ValueError, r"exp_avg_sq_absmax of params\[1\].*\(4,\)")
    attempt(absmax_missing, ValueError, "exp_avg_absmaxs")
    attempt(absmax_aliases, ValueError, "shares memory")


# --- the front-ends ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")
import cpuadam.torch as ctorch  # noqa: E402

SHAPES = [(100,), (70, 90), (4096,), (3, 1000)]  # under, over, at min_8bit_size; short last block


def numpy_run(shapes, steps, seed, opt=None, params=None, cls="AdamW", **options):
    rng = np.random.default_rng(seed)
    if params is None:
        params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if opt is None:
        opt = getattr(cpuadam, cls)(params, lr=1e-2, **options)
    for _ in range(steps):
        opt.step([rng.standard_normal(p.shape).astype(np.float32) * 0.1 for p in params])
    return opt, params


@pytest.mark.parametrize("cls,kw", [("AdamW", {}), ("AdamW", {"amsgrad": True}), ("Adam", {}),
                                    ("SGD", {"momentum": 0.9})])
def test_numpy_state_dict_layout_and_bitwise_resume(cls, kw):
    options = dict(state_dtype="8bit", min_8bit_size=4096, **kw)
    full, full_params = numpy_run(SHAPES, 6, 1, cls=cls, **options)
    half, half_params = numpy_run(SHAPES, 3, 1, cls=cls, **options)
    sd = half.state_dict()
    keys = ["momentum_buffer"] if cls == "SGD" else ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if kw else [])
    for i, shape in enumerate(SHAPES):
        entry = sd["state"][i]
        numel = int(np.prod(shape))
        for key in keys:
            if numel < 4096:
                assert entry[key].dtype == np.float32 and key + "_absmax" not in entry
            else:
                assert entry[key].dtype == np.uint8 and entry[key].shape == shape
                assert entry[key + "_absmax"].shape == (-(-numel // 256),)
                np.testing.assert_array_equal(entry[key + "_qmap"], _core.qmap(MAPS[key]))
    import pickle
    restored_params = [p.copy() for p in half_params]
    resumed = getattr(cpuadam, cls)(restored_params, lr=1e-2, **options)
    resumed.load_state_dict(pickle.loads(pickle.dumps(sd)))
    # The rest of the run, with the same grads the full run saw.
    rng = np.random.default_rng(1)
    [rng.standard_normal(s) for s in SHAPES]  # the params' draw
    for _ in range(3):
        [rng.standard_normal(p.shape) for p in full_params]
    for _ in range(3):
        resumed.step([rng.standard_normal(p.shape).astype(np.float32) * 0.1 for p in restored_params])
    for a, b in zip(restored_params, full_params):
        np.testing.assert_array_equal(a, b)
    for i in range(len(SHAPES)):
        for key, value in full.state_dict()["state"][i].items():
            np.testing.assert_array_equal(resumed.state_dict()["state"][i][key], value, err_msg=key)


@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16])
def test_torch_state_dict_round_trip_and_bitwise_resume(pdtype):
    def run(model_state, steps, sd=None, start=0):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s).to(pdtype)) for s in SHAPES]
        if model_state is not None:
            with torch.no_grad():
                for p, v in zip(params, model_state):
                    p.copy_(v)
        opt = ctorch.AdamW(params, lr=1e-2, amsgrad=True, state_dtype="8bit")
        if sd is not None:
            opt.load_state_dict(sd)
        gen = torch.Generator().manual_seed(5)
        for k in range(start + steps):
            grads = [torch.randn(p.shape, generator=gen).to(pdtype) for p in params]
            if k < start:
                continue
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        return params, opt

    full_params, full = run(None, 6)
    half_params, half = run(None, 3)
    sd = half.state_dict()
    entry = sd["state"][2]
    assert entry["exp_avg"].dtype == torch.uint8 and entry["exp_avg_absmax"].dtype == torch.float32
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    resumed_params, resumed = run([p.detach() for p in half_params], 3, sd=loaded, start=3)
    for a, b in zip(resumed_params, full_params):
        assert torch.equal(a, b)
    for p_full, p_res in zip(full.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        st_full, st_res = full.state[p_full], resumed.state[p_res]
        assert st_full.keys() == st_res.keys()
        for key in st_full:
            assert st_res[key].dtype == st_full[key].dtype, key
            assert torch.equal(st_res[key], st_full[key]), key


def test_min_8bit_size_and_its_validation():
    opt, _ = numpy_run([(10,), (300,)], 1, 0, state_dtype="8bit", min_8bit_size=300)
    sd = opt.state_dict()["state"]
    assert sd[0]["exp_avg"].dtype == np.float32 and sd[1]["exp_avg"].dtype == np.uint8
    opt, _ = numpy_run([(10,), (300,)], 1, 0, state_dtype="8bit", min_8bit_size=0)
    assert opt.state_dict()["state"][0]["exp_avg"].dtype == np.uint8
    for bad in (-1, 1.5, "4096", True):
        with pytest.raises(ValueError, match="min_8bit_size"):
            cpuadam.AdamW([np.zeros(3, np.float32)], state_dtype="8bit", min_8bit_size=bad)
    with pytest.raises(ValueError, match="min_8bit_size"):
        ctorch.AdamW([torch.nn.Parameter(torch.zeros(3))], state_dtype="8bit", min_8bit_size=-1)


def test_conversions_to_and_from_float32_states():
    opt, params = numpy_run(SHAPES, 3, 2, state_dtype="8bit")
    sd = opt.state_dict()
    flat = cpuadam.dequantize_state(sd)
    for i, shape in enumerate(SHAPES):
        entry = flat["state"][i]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["exp_avg"].dtype == np.float32 and entry["exp_avg"].shape == shape
        if np.prod(shape) >= 4096:
            want = dequantize_blockwise(sd["state"][i]["exp_avg"], sd["state"][i]["exp_avg_absmax"],
                                        dynamic_map(True))
            np.testing.assert_array_equal(entry["exp_avg"], want)
    # Back: the same layout, and values within one step of the map (the signed map has no -1,
    # so a block led by a negative value shrinks its absmax by 0.7% at each round trip).
    again = cpuadam.quantize_state(flat)
    for i in range(len(SHAPES)):
        assert again["state"][i].keys() == sd["state"][i].keys()
        back = cpuadam.dequantize_state(again)["state"][i]
        for key in ("exp_avg", "exp_avg_sq"):
            scale = np.abs(flat["state"][i][key]).max()
            np.testing.assert_allclose(back[key], flat["state"][i][key], rtol=0, atol=0.02 * scale)
    # A float32 optimizer takes the dequantized checkpoint, an 8-bit one the float32 checkpoint
    # (quantized at its next step), and an 8-bit checkpoint goes to torch.optim.AdamW.
    plain = cpuadam.AdamW([p.copy() for p in params], lr=1e-2)
    plain.load_state_dict(flat)
    eight = cpuadam.AdamW([p.copy() for p in params], lr=1e-2, state_dtype="8bit")
    eight.load_state_dict(flat)
    same = cpuadam.AdamW([p.copy() for p in params], lr=1e-2, state_dtype="8bit")
    same.load_state_dict(sd)
    grads = [np.full(p.shape, 0.01, np.float32) for p in params]
    eight.step(grads)
    same.step(grads)
    plain.step(grads)
    for i in range(len(SHAPES)):
        assert eight.state_dict()["state"][i].keys() == same.state_dict()["state"][i].keys()
        assert plain.state_dict()["state"][i]["exp_avg"].dtype == np.float32
    # The float32 checkpoint is re-quantized before the step, so the two differ by that rounding.
    for a, b, c in zip(eight.param_groups[0]["params"], same.param_groups[0]["params"],
                       plain.param_groups[0]["params"]):
        np.testing.assert_allclose(a, b, atol=2e-3)
        np.testing.assert_allclose(c, b, atol=2e-3)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    reference_opt = torch.optim.AdamW(tparams, lr=1e-2)
    tsd = {"state": {i: {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else torch.tensor(float(v))
                         for k, v in e.items()} for i, e in flat["state"].items()},
           "param_groups": [dict(flat["param_groups"][0], foreach=None, capturable=False, differentiable=False,
                                 fused=None, decoupled_weight_decay=True)]}
    reference_opt.load_state_dict(tsd)
    # torch tensors through the conversions keep being tensors.
    tq = cpuadam.quantize_state(tsd)
    assert tq["state"][2]["exp_avg"].dtype == torch.uint8
    back = cpuadam.dequantize_state(tq)
    want = tsd["state"][2]["exp_avg"]
    assert isinstance(back["state"][2]["exp_avg"], torch.Tensor) and "exp_avg_absmax" not in back["state"][2]
    assert torch.allclose(back["state"][2]["exp_avg"], want, rtol=0, atol=0.02 * float(want.abs().max()))


@pytest.mark.parametrize("frontend", ["numpy", "torch"])
def test_an_8bit_checkpoint_loads_into_a_float32_optimizer_as_its_dequantized_values(frontend):
    """Loading converts the moments (at the next step), bit for bit as dequantize_state does;
    and the reverse, a float32 checkpoint into an 8-bit optimizer, as quantize_state does."""
    opt, params = numpy_run(SHAPES, 3, 5, state_dtype="8bit")
    sd8 = opt.state_dict()
    sd32 = cpuadam.dequantize_state(sd8)
    grads = [np.full(p.shape, 0.01, np.float32) for p in params]

    def stepped(sd, **options):
        if frontend == "numpy":
            ps = [p.copy() for p in params]
            o = cpuadam.AdamW(ps, lr=1e-2, **options)
            o.load_state_dict(sd)
            o.step([g.copy() for g in grads])
            return [p.copy() for p in ps], o.state_dict()["state"]
        as_tensor = lambda v: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else torch.tensor(float(v))
        tsd = {"state": {i: {k: as_tensor(v) for k, v in e.items()} for i, e in sd["state"].items()},
               "param_groups": [dict(sd["param_groups"][0])]}
        ps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        o = ctorch.AdamW(ps, lr=1e-2, **options)
        o.load_state_dict(tsd)
        for p, g in zip(ps, grads):
            p.grad = torch.from_numpy(g.copy())
        o.step()
        return [p.detach().numpy().copy() for p in ps], {i: {k: np.asarray(v) for k, v in e.items()}
                                                          for i, e in o.state_dict()["state"].items()}

    for (a, sa), (b, sb) in ((stepped(sd8), stepped(sd32)),
                             (stepped(sd32, state_dtype="8bit"), stepped(cpuadam.quantize_state(sd32), state_dtype="8bit"))):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        for i in sa:
            assert sa[i].keys() == sb[i].keys()
            for k in sa[i]:
                np.testing.assert_array_equal(sa[i][k], sb[i][k], err_msg=k)
    assert stepped(sd8)[1][2]["exp_avg"].dtype == np.float32


def test_a_foreign_qmap_or_bad_absmax_is_refused_on_load():
    opt, params = numpy_run(SHAPES, 1, 3, state_dtype="8bit")
    sd = opt.state_dict()
    other = cpuadam.AdamW([p.copy() for p in params], state_dtype="8bit")
    bad = __import__("copy").deepcopy(sd)
    bad["state"][2]["exp_avg_qmap"] = bad["state"][2]["exp_avg_qmap"] * 2
    with pytest.raises(ValueError, match="exp_avg_qmap.*dequantize_state"):
        other.load_state_dict(bad)
    bad = __import__("copy").deepcopy(sd)
    bad["state"][2]["exp_avg_sq_absmax"] = bad["state"][2]["exp_avg_sq_absmax"][:-1]
    with pytest.raises(ValueError, match="exp_avg_sq_absmax"):
        other.load_state_dict(bad)
    bad = __import__("copy").deepcopy(sd)
    del bad["state"][2]["exp_avg_absmax"]
    with pytest.raises(ValueError, match="exp_avg"):
        other.load_state_dict(bad)


def test_a_replaced_qmap_is_refused_by_the_step_and_a_missing_one_restored(rng):
    """The step decodes with cpuadam's maps only: a state whose map was replaced by
    another is refused (nothing written), one whose map was removed gets it back."""
    p = rng.standard_normal(5000).astype(np.float32)
    opt = cpuadam.AdamW([p], lr=1e-2, state_dtype="8bit")
    for _ in range(2):
        opt.step([rng.standard_normal(5000).astype(np.float32)])
    st = opt.state[0]
    own = st["exp_avg_qmap"]
    for bad in (own * 2, np.zeros(256, np.float32), own[:100].copy()):
        st["exp_avg_qmap"] = bad
        before = (p.copy(), {k: np.array(v, copy=True) for k, v in st.items()})
        with pytest.raises(ValueError, match=r"exp_avg_qmap of params\[0\] in group 0 is not"):
            opt.step([rng.standard_normal(5000).astype(np.float32)])
        assert p.tobytes() == before[0].tobytes()
        for k, v in st.items():
            assert np.asarray(v).tobytes() == before[1][k].tobytes(), k
    del st["exp_avg_qmap"]
    opt.step([rng.standard_normal(5000).astype(np.float32)])
    np.testing.assert_array_equal(opt.state[0]["exp_avg_qmap"], _core.qmap("signed"))


@pytest.mark.parametrize("pdt", ["bfloat16", "float16"])
@pytest.mark.parametrize("update", ["nearest", "stochastic", "kahan", "master"])
def test_16_bit_params_in_every_update_mode_step_like_float32_states(pdt, update, rng):
    """A bfloat16/float16 param with 8-bit states takes the same update as with float32 states
    on the dequantized values: the param bitwise, the codes those of the float32 moments."""
    from test_precision import encode
    sizes = [300, 1000]
    state = State8(rng, sizes, ["exp_avg", "exp_avg_sq"])
    params = [encode(log_spread(rng, n, -2, 0), pdt) for n in sizes]
    grads = [log_spread(rng, n, -5, -1) for n in sizes]
    extra = dict(param_dtype=pdt, param_update=update, step=3, **ADAMW)
    if update == "stochastic":
        extra.update(seed=3, rounding_step=3, stream_ids=[0, 1])

    def buffers():
        if update == "master":
            return {"masters": [np.float32(log_spread(np.random.default_rng(1), n, -2, 0)) for n in sizes]}
        if update == "kahan":
            return {"kahan_comps": [np.zeros_like(p) for p in params]}
        return {}

    b32, b8 = buffers(), buffers()
    ps32, ps8 = [p.copy() for p in params], [p.copy() for p in params]
    f32 = state.dequantized()
    _core.adam_step([dict(params=ps32, grads=grads, **f32, **b32, **extra)])
    st = state.copy()
    _core.adam_step([dict(params=ps8, grads=grads, state_dtype="8bit", **st.lists(), **b8, **extra)])
    for a, b in zip(ps8, ps32):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    for key in b32:
        for a, b in zip(b8[key], b32[key]):
            np.testing.assert_array_equal(a, b)
    for key in st.keys:
        for i, v in enumerate(f32[LISTS[key]]):
            codes, absmax = _core.quantize_blockwise(v, MAPS[key])
            np.testing.assert_array_equal(st.codes[key][i], codes)
            np.testing.assert_array_equal(st.absmax[key][i], absmax)


def test_torch_sgd_momentum_8bit_state_dict():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    opt = ctorch.SGD([p], lr=0.1, momentum=0.9, state_dtype="8bit")
    for _ in range(2):
        p.grad = torch.randn(5000)
        opt.step()
    entry = opt.state_dict()["state"][0]
    assert entry["momentum_buffer"].dtype == torch.uint8
    assert entry["momentum_buffer_absmax"].shape == (20,)
    assert torch.equal(entry["momentum_buffer_qmap"], torch.from_numpy(_core.qmap("signed")))


# --- bitsandbytes' checkpoint layout, without bitsandbytes -----------------------------------------
# Their state_dict as their 0.50 source writes it: per param, `step` (an int) and one dict under
# "__bnb_optimizer_quant_state__" holding state1/absmax1/qmap1 (and state2/absmax2/qmap2), the
# maps computed in float32 (values up to 2 ulp from the correctly rounded ones).
BNB_WRAP = "__bnb_optimizer_quant_state__"


def their_layout(rng, n: int, foreign_map: bool = False) -> dict:
    quant = {}
    for i, key in enumerate(("exp_avg", "exp_avg_sq"), start=1):
        values = log_spread(rng, n)
        values = np.abs(values) if key == "exp_avg_sq" else values
        codes, absmax = _core.quantize_blockwise(values, MAPS[key])
        qmap = _core.qmap(MAPS[key]).copy()
        bits = qmap.view(np.int32)
        bits[1::7] += (qmap[1::7] != 0).astype(np.int32)  # 1 ulp further from 0
        bits[3::7] -= 2 * (np.abs(qmap[3::7]) > 1e-6).astype(np.int32)  # 2 ulp nearer 0
        if foreign_map:
            qmap = np.linspace(-1 if key == "exp_avg" else 0, 1, 256).astype(np.float32)
        quant.update({f"state{i}": codes, f"absmax{i}": absmax, f"qmap{i}": qmap})
    group = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, alpha=0.0, t_alpha=None,
                 t_beta3=None, params=[0])
    return {"state": {0: {"step": 7, BNB_WRAP: quant}}, "param_groups": [group]}


def test_from_bitsandbytes_keeps_their_codes_with_our_maps(rng):
    theirs = their_layout(rng, 20 * QUANT_BLOCK + 3)
    quant = theirs["state"][0][BNB_WRAP]
    sd = cpuadam.from_bitsandbytes(theirs)
    entry = sd["state"][0]
    assert BNB_WRAP not in entry and float(entry["step"]) == 7.0
    for i, key in enumerate(("exp_avg", "exp_avg_sq"), start=1):
        np.testing.assert_array_equal(entry[key], quant[f"state{i}"])
        np.testing.assert_array_equal(entry[key + "_absmax"], quant[f"absmax{i}"])
        np.testing.assert_array_equal(entry[key + "_qmap"], _core.qmap(MAPS[key]))
    assert sd["param_groups"][0] == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, params=[0])
    assert BNB_WRAP in theirs["state"][0]  # the input is not changed
    # An 8-bit optimizer loads it and steps; back to their layout gives their codes again.
    opt = cpuadam.AdamW([np.zeros(20 * QUANT_BLOCK + 3, np.float32)], state_dtype="8bit")
    opt.load_state_dict(sd)
    back = cpuadam.to_bitsandbytes(opt.state_dict())
    assert back["state"][0]["step"] == 7
    for i in (1, 2):
        np.testing.assert_array_equal(back["state"][0][BNB_WRAP][f"state{i}"], quant[f"state{i}"])
        np.testing.assert_array_equal(back["state"][0][BNB_WRAP][f"absmax{i}"], quant[f"absmax{i}"])
    assert back["param_groups"][0]["alpha"] == 0.0


def test_from_bitsandbytes_under_a_foreign_map_gives_the_exact_float32_moments(rng):
    theirs = their_layout(rng, 3 * QUANT_BLOCK, foreign_map=True)
    quant = theirs["state"][0][BNB_WRAP]
    entry = cpuadam.from_bitsandbytes(theirs)["state"][0]
    for i, key in enumerate(("exp_avg", "exp_avg_sq"), start=1):
        assert key + "_absmax" not in entry and entry[key].dtype == np.float32
        want = quant[f"qmap{i}"][quant[f"state{i}"]] * np.repeat(quant[f"absmax{i}"], QUANT_BLOCK)
        np.testing.assert_array_equal(entry[key], want.astype(np.float32))


def test_to_bitsandbytes_quantizes_large_float_moments_and_keeps_small_ones(rng):
    big, small = log_spread(rng, 5000), log_spread(rng, 100)
    sd = {"state": {0: {"step": np.float32(2), "exp_avg": big, "exp_avg_sq": np.abs(big)},
                    1: {"step": np.float32(2), "exp_avg": small, "exp_avg_sq": np.abs(small)}},
          "param_groups": [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, params=[0, 1])]}
    out = cpuadam.to_bitsandbytes(sd)
    q0, q1 = out["state"][0][BNB_WRAP], out["state"][1][BNB_WRAP]
    codes, absmax = quantize_blockwise(big, dynamic_map(True))
    np.testing.assert_array_equal(q0["state1"], codes)
    np.testing.assert_array_equal(q0["absmax1"], absmax)
    np.testing.assert_array_equal(q0["qmap2"], _core.qmap("unsigned"))
    assert q1.keys() == {"state1", "state2"}
    np.testing.assert_array_equal(q1["state1"], small)
    assert out["state"][0]["step"] == 2 and isinstance(out["state"][0]["step"], int)


def test_bitsandbytes_conversions_refuse_what_has_no_counterpart(rng):
    theirs = their_layout(rng, QUANT_BLOCK)
    theirs["state"][0][BNB_WRAP]["max1"] = np.ones(1, np.float32)
    with pytest.raises(ValueError, match="block_wise=False"):
        cpuadam.from_bitsandbytes(theirs)
    theirs = their_layout(rng, QUANT_BLOCK)
    theirs["param_groups"][0]["alpha"] = 5.0
    with pytest.raises(ValueError, match="AdEMAMix"):
        cpuadam.from_bitsandbytes(theirs)
    theirs = their_layout(rng, QUANT_BLOCK)
    theirs["state"][0][BNB_WRAP]["qmap2"] = np.linspace(0, 1, 16).astype(np.float32)  # a 4-bit map
    with pytest.raises(ValueError, match="qmap2 has 16 values"):
        cpuadam.from_bitsandbytes(theirs)
    lion = their_layout(rng, QUANT_BLOCK)  # one state with betas (0.9, 0.99): not SGD8bit
    for key in ("state2", "absmax2", "qmap2"):
        del lion["state"][0][BNB_WRAP][key]
    with pytest.raises(ValueError, match="SGD8bit"):
        cpuadam.from_bitsandbytes(lion)
    sgd = their_layout(rng, QUANT_BLOCK)
    for key in ("state2", "absmax2", "qmap2"):
        del sgd["state"][0][BNB_WRAP][key]
    sgd["param_groups"][0] = dict(lr=1e-2, betas=(0.9, 0), eps=0.0, weight_decay=0, params=[0])
    out = cpuadam.from_bitsandbytes(sgd)
    assert out["param_groups"][0]["momentum"] == 0.9 and "betas" not in out["param_groups"][0]
    assert "step" not in out["state"][0] and out["state"][0]["momentum_buffer"].dtype == np.uint8
    amsgrad = {"state": {0: {"step": np.float32(1), "exp_avg": np.zeros(10, np.float32),
                             "exp_avg_sq": np.zeros(10, np.float32),
                             "max_exp_avg_sq": np.zeros(10, np.float32)}},
               "param_groups": [dict(lr=1e-3, betas=(0.9, 0.999), params=[0])]}
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        cpuadam.to_bitsandbytes(amsgrad)
