# SPDX-License-Identifier: MIT
"""cpuadam's 8-bit states beside bitsandbytes' AdamW8bit on CPU: the maps, the block layout, one
step from the same state, and bitsandbytes' state loaded into cpuadam's keys (skipped without
bitsandbytes).

What bitsandbytes does on CPU (read from its 0.50 source; each point is asserted below):
- AdamW8bit keeps, per param of at least min_8bit_size (4096) elements, `state1` / `state2`
  (uint8 codes of the param's shape), `absmax1` / `absmax2` (float32, one per block of 256
  consecutive elements of the flattened param) and `qmap1` / `qmap2`, its signed and unsigned
  dynamic maps (`create_dynamic_map`); smaller params keep float32 `state1` / `state2`. That is
  cpuadam's layout, key for key: exp_avg / exp_avg_sq, their _absmax and _qmap.
- A step dequantizes (qmap[code] * absmax), takes torch.optim's AdamW arithmetic in float32
  (decay p *= 1 - lr * wd, then p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)) with the param
  updated from the exact new moments, and quantizes the new moments. Deterministic: no
  stochastic rounding on CPU.
- The maps hold the same 256 values in the same order as cpuadam's, but are computed in float32
  (torch.linspace, then means), so 72 signed and 100 unsigned entries sit 1 or 2 ulp away from
  the correctly rounded values cpuadam stores.
- The quantizer is not a nearest-code search: x = value * (1 / absmax) is first rounded to the
  nearest of 65536 evenly spaced points of [-1, 1] (spacing 2 / 65535, about 3.05e-5), and the
  code is the one nearest that point (a 65536-entry table). Near absmax the map's codes are
  further apart than the grid's points and this is the nearest code, or its neighbour; below
  about 1e-4 the map is finer than the grid and the code can be several away. Every |x| under
  1.5e-5 lands on one point, so no nonzero block ever stores code 0: a zero or tiny exp_avg_sq
  becomes 1.5625e-5 * absmax (unsigned code 7), a zero exp_avg 2.125e-5 * absmax.
So the codes and absmax of the two map onto each other directly (same maps up to those ulps,
same blocks); the stored codes after a step differ where bitsandbytes' grid moves a value off
its nearest code.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from reference import QUANT_BLOCK, adam_step, quantize_blockwise

torch = pytest.importorskip("torch")
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its import may warn about missing GPU libraries
        import bitsandbytes as bnb
        from bitsandbytes.functional import create_dynamic_map
except ImportError as exc:  # not installed, or its native library does not load here
    pytest.skip(f"bitsandbytes is not importable: {exc}", allow_module_level=True)

import cpuadam  # noqa: E402
import cpuadam.torch as ctorch  # noqa: E402
from cpuadam import _core  # noqa: E402

MAPS = {"exp_avg": "signed", "exp_avg_sq": "unsigned"}
THEIR_KEYS = {"exp_avg": ("state1", "absmax1", "qmap1"), "exp_avg_sq": ("state2", "absmax2", "qmap2")}
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
GRID = 2.0 / 65535  # spacing of the uniform grid bitsandbytes rounds x to before picking a code


def exact_map(signed: bool) -> np.ndarray:
    """The dynamic map's 256 values in float64, ascending (Dettmers et al. 2022): decade 10**-d
    (d = 6..0) holds the centres of 2**(6-d) (signed, both signs) or 2**(7-d) equal parts of
    [0.1, 1]; 0 and 1 complete it."""
    values = {0.0, 1.0}
    for i in range(7):
        parts = 2**i if signed else 2 ** (i + 1)
        for k in range(parts):
            x = (0.1 + 0.9 * (2 * k + 1) / (2.0 * parts)) / 10.0 ** (6 - i)
            values.update((x, -x) if signed else (x,))
    return np.array(sorted(values))


def their_map(key: str) -> np.ndarray:
    return create_dynamic_map(signed=MAPS[key] == "signed").numpy()


def log_spread(rng, n, lo, hi) -> np.ndarray:
    """Values whose magnitudes span many decades, as moments do."""
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(lo, hi, n)).astype(np.float32)


def grid_codes(values: np.ndarray, qmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A description of bitsandbytes' CPU quantizer in NumPy float32: per block of 256, absmax
    = max |value|; x = value * (1 / absmax), clamped to [-1, 1]; i = the grid point nearest x,
    floor((x + 1) / 2 * 65535 + 0.5); the code = the number of map midpoints (computed as
    0.5 * (a + b) in float32) below the grid value -1 + 2 * i / 65535. All-zero block: code 0."""
    f = np.float32
    mids = f(0.5) * (qmap[:-1] + qmap[1:])
    grid = f(-1) + (f(2) * np.arange(65536, dtype=f)) / f(65535)
    table = np.searchsorted(mids, grid, side="left").astype(np.uint8)
    flat = values.astype(f).reshape(-1)
    codes = np.zeros(flat.size, np.uint8)
    absmax = np.zeros(-(-flat.size // QUANT_BLOCK), f)
    for b in range(absmax.size):
        v = flat[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK]
        absmax[b] = np.abs(v).max()
        if absmax[b] > 0:
            x = np.clip(v * (f(1) / absmax[b]), f(-1), f(1))
            i = ((x + f(1)) * f(0.5) * f(65535) + f(0.5)).astype(np.int64)
            codes[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK] = table[i]
    return codes, absmax


def their_quantize(values: np.ndarray, qmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' own blockwise quantizer, the one its CPU optimizer step calls."""
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise(
        torch.from_numpy(values.copy()), torch.from_numpy(qmap.copy()), QUANT_BLOCK)
    return codes.numpy(), absmax.numpy()


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 steps between two arrays of the same sign."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


# --- maps and quantizer ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_the_maps_are_the_same_values_within_two_ulp_and_ours_are_correctly_rounded(key):
    ours, theirs = _core.qmap(MAPS[key]), their_map(key)
    exact = exact_map(MAPS[key] == "signed")
    assert theirs.dtype == np.float32 and theirs.shape == (256,) and np.all(np.diff(theirs) > 0)
    assert np.all(ulps(ours, theirs) <= 2)
    differ = ours != theirs
    # Theirs comes from float32 arithmetic; every entry where the two differ, ours is nearer.
    assert differ.sum() == {"exp_avg": 72, "exp_avg_sq": 100}[key]
    np.testing.assert_array_equal(ours, exact.astype(np.float32))
    assert np.all(np.abs(ours[differ] - exact[differ]) < np.abs(theirs[differ] - exact[differ]))


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_their_quantizer_picks_the_code_of_a_uniform_grid_point_not_the_nearest_code(key, rng):
    qmap = their_map(key)
    n = 200 * QUANT_BLOCK
    values = log_spread(rng, n, -9, 0)
    if key == "exp_avg_sq":
        values = np.abs(values)
    values[:QUANT_BLOCK] = 0.0  # an all-zero block
    values[QUANT_BLOCK:2 * QUANT_BLOCK:3] = 0.0  # zeros in a nonzero block
    codes, absmax = their_quantize(values, qmap)
    model_codes, model_absmax = grid_codes(values, qmap)
    np.testing.assert_array_equal(absmax, model_absmax)
    np.testing.assert_array_equal(codes, model_codes)
    # cpuadam: the nearest code (ties down), the same absmax.
    ours, ours_absmax = _core.quantize_blockwise(values, MAPS[key])
    want, _ = quantize_blockwise(values, _core.qmap(MAPS[key]))
    np.testing.assert_array_equal(ours, want)
    np.testing.assert_array_equal(ours_absmax, absmax)
    # Where theirs is not the nearest code, its error exceeds the nearest's by at most one grid
    # spacing (x moves by half a spacing to its grid point, the code is nearest that point).
    # Such codes are common where the map is finer than the grid (|x| below 1e-4) and rare
    # above 1e-3, where only an x within half a spacing of a midpoint can be moved across.
    x = values.astype(np.float64) / np.repeat(np.where(absmax > 0, absmax, 1), QUANT_BLOCK).astype(np.float64)
    q = qmap.astype(np.float64)
    wrong = (codes != ours) & (np.repeat(absmax, QUANT_BLOCK) > 0)
    assert 0.05 < wrong.mean() < 0.9
    excess = np.abs(q[codes] - x) - np.abs(q[ours] - x)
    assert np.all(excess[wrong] > -1e-9) and np.all(excess[wrong] <= GRID + 1e-7)
    tiny = (x != 0) & (np.abs(x) < 1e-5)
    assert tiny.sum() > 1000 and np.all(wrong[tiny])
    assert wrong[np.abs(x) > 0.1].mean() < 0.01
    # Zeros in a nonzero block: never code 0, but the code nearest the grid point 1/32767.5.
    zeros = values[QUANT_BLOCK:2 * QUANT_BLOCK] == 0
    zero_code = codes[QUANT_BLOCK:2 * QUANT_BLOCK][zeros]
    assert np.all(zero_code == zero_code[0]) and qmap[zero_code[0]] == pytest.approx(
        {"exp_avg": 2.125e-5, "exp_avg_sq": 1.5625e-5}[key], rel=1e-6)
    assert np.all(ours[QUANT_BLOCK:2 * QUANT_BLOCK][zeros] == np.flatnonzero(_core.qmap(MAPS[key]) == 0)[0])
    # An all-zero block: absmax 0 in both; code 0 in theirs, the code of 0 in ours.
    assert absmax[0] == 0 and np.all(codes[:QUANT_BLOCK] == 0)


# --- optimizers -----------------------------------------------------------------------------------

SHAPES = [(70, 90), (3, 1000), (100,), (4096,)]  # over, with a short last block, under, at min_8bit_size


def test_both_keep_the_same_state_layout_block_for_block():
    torch.manual_seed(0)
    pb = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    pc = [torch.nn.Parameter(p.detach().clone()) for p in pb]
    theirs = bnb.optim.AdamW8bit(pb, **HYPER)
    ours = ctorch.AdamW(pc, state_dtype="8bit", **HYPER)
    for a, b in zip(pb, pc):
        a.grad = torch.randn(a.shape)
        b.grad = a.grad.clone()
    theirs.step()
    ours.step()
    for shape, a, b in zip(SHAPES, pb, pc):
        st, sc = theirs.state[a], ours.state[b]
        numel = int(np.prod(shape))
        for key, (codes, absmax, qmap) in THEIR_KEYS.items():
            if numel < 4096:
                assert st[codes].dtype == sc[key].dtype == torch.float32
                assert absmax not in st and key + "_absmax" not in sc
                continue
            assert st[codes].dtype == sc[key].dtype == torch.uint8
            assert st[codes].shape == sc[key].shape == shape
            assert st[absmax].dtype == sc[key + "_absmax"].dtype == torch.float32
            assert st[absmax].shape == sc[key + "_absmax"].shape == (-(-numel // QUANT_BLOCK),)
            np.testing.assert_array_equal(st[qmap].numpy(), their_map(key))
            np.testing.assert_array_equal(sc[key + "_qmap"].numpy(), _core.qmap(MAPS[key]))


def warm_state(rng, n: int) -> dict:
    """Codes and absmax of moments spread over many decades (valid in both maps)."""
    m = log_spread(rng, n, -6, -1)
    v = log_spread(rng, n, -6, -1) ** 2
    out = {}
    for key, values in (("exp_avg", m), ("exp_avg_sq", v)):
        out[key], out[key + "_absmax"] = _core.quantize_blockwise(values, MAPS[key])
    return out


def bnb_with_state(param: np.ndarray, state: dict, step: int, qmaps: dict | None = None):
    """A bitsandbytes AdamW8bit whose one param holds `state` (codes, absmax; qmaps if given)
    after `step` steps."""
    p = torch.nn.Parameter(torch.from_numpy(param.copy()))
    opt = bnb.optim.AdamW8bit([p], **HYPER)
    p.grad = torch.zeros_like(p)
    opt.step()  # creates the state
    st = opt.state[p]
    st["step"] = step
    for key, (codes, absmax, qmap) in THEIR_KEYS.items():
        st[codes].copy_(torch.from_numpy(state[key]))
        st[absmax].copy_(torch.from_numpy(state[key + "_absmax"]))
        if qmaps is not None:
            st[qmap] = torch.from_numpy(qmaps[key].copy())
    with torch.no_grad():
        p.copy_(torch.from_numpy(param))
    return opt, p


def cpuadam_with_state(param: np.ndarray, state: dict, step: int):
    """A cpuadam.torch.AdamW (8-bit states) loaded with `state` after `step` steps."""
    p = torch.nn.Parameter(torch.from_numpy(param.copy()))
    opt = ctorch.AdamW([p], state_dtype="8bit", **HYPER)
    sd = opt.state_dict()
    entry = {"step": torch.tensor(float(step))}
    for key in MAPS:
        entry[key] = torch.from_numpy(state[key].copy())
        entry[key + "_absmax"] = torch.from_numpy(state[key + "_absmax"].copy())
        entry[key + "_qmap"] = torch.from_numpy(_core.qmap(MAPS[key]))
    sd["state"] = {0: entry}
    opt.load_state_dict(sd)
    return opt, p


def step_both(opt_b, p_b, opt_c, p_c, grad: np.ndarray) -> None:
    for opt, p in ((opt_b, p_b), (opt_c, p_c)):
        p.grad = torch.from_numpy(grad.copy())
        opt.step()


def reference_step(param, state, qmaps: dict, grad, step: int) -> tuple[np.ndarray, dict, np.ndarray]:
    """The float64 AdamW step from the old state as dequantized with `qmaps`: the new param, the
    new moments, and each element's rounding scale (see param_error)."""
    m = {key: (qmaps[key][state[key]].astype(np.float32)
               * np.repeat(state[key + "_absmax"], QUANT_BLOCK)[:param.size]).astype(np.float64)
         for key in MAPS}
    (beta1, beta2), lr = HYPER["betas"], HYPER["lr"]
    terms = beta1 * np.abs(m["exp_avg"]) + (1 - beta1) * np.abs(grad.astype(np.float64))
    p64 = param.astype(np.float64)
    adam_step(p64, grad, m, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=HYPER["eps"],
              weight_decay=HYPER["weight_decay"], decoupled=True)
    denom = np.sqrt(m["exp_avg_sq"]) / np.sqrt(1 - beta2**step) + HYPER["eps"]
    scale = np.maximum(np.abs(param.astype(np.float64)), lr / (1 - beta1**step) * terms / denom)
    return p64, m, scale


def param_error(p: np.ndarray, want: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|p - want| in float32 steps of the element's rounding scale: the larger of |old param|
    and the update the moment's two terms would give without cancelling (m = beta1 * m + (1 -
    beta1) * g can cancel, and a param can cancel its update: ulps of the results overstate
    a rounding there)."""
    return np.abs(p.astype(np.float64) - want) / np.spacing(scale.astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("maps", ["their maps", "cpuadam's maps in both"])
def test_one_step_from_the_same_state(maps, rng):
    n = 40 * QUANT_BLOCK + 77
    step = 5
    state = warm_state(rng, n)
    param, grad = log_spread(rng, n, -2, 0), log_spread(rng, n, -5, -1)
    ours_maps = {key: _core.qmap(MAPS[key]) for key in MAPS}
    theirs_maps = ours_maps if maps != "their maps" else {key: their_map(key) for key in MAPS}
    opt_b, p_b = bnb_with_state(param, state, step - 1, ours_maps if maps != "their maps" else None)
    opt_c, p_c = cpuadam_with_state(param, state, step - 1)
    step_both(opt_b, p_b, opt_c, p_c, grad)
    st_b, st_c = opt_b.state[p_b], opt_c.state[p_c]
    assert st_b["step"] == step and int(st_c["step"]) == step

    # Params: each within a few float32 steps of the float64 step from its own dequantized state
    # (bitsandbytes fuses m * beta1 + (1 - beta1) * g into one rounding, cpuadam rounds each
    # product; both divide and scale in float32), so within a few steps of each other too.
    pb, pc = p_b.detach().numpy(), p_c.detach().numpy()
    p64_b, exact_b, scale = reference_step(param, state, theirs_maps, grad, step)
    p64_c, exact_c, _ = reference_step(param, state, ours_maps, grad, step)
    assert param_error(pc, p64_c, scale).max() <= 6
    assert param_error(pb, p64_b, scale).max() <= 6
    if maps != "their maps":
        assert param_error(pb, pc.astype(np.float64), scale).max() <= 8

    for key, (codes_key, absmax_key, _) in THEIR_KEYS.items():
        qmap = theirs_maps[key].astype(np.float64)
        codes_b, absmax_b = st_b[codes_key].numpy(), st_b[absmax_key].numpy()
        codes_c, absmax_c = st_c[key].numpy(), st_c[key + "_absmax"].numpy()
        # absmax: the block's largest |new moment| in both; the moments agree within an ulp.
        assert ulps(absmax_b, absmax_c).max() <= 1
        # Codes: cpuadam's are the nearest codes of the exact moments (a few sit within float32
        # rounding of a midpoint and may take either neighbour); bitsandbytes' follow its grid.
        exact = exact_c[key]
        nearest, _ = quantize_blockwise(exact.astype(np.float32), ours_maps[key])
        off = codes_c != nearest
        assert off.sum() <= n // 1000 and np.all(np.abs(codes_c[off].astype(int) - nearest[off]) == 1)
        x = exact_b[key] / np.repeat(absmax_b.astype(np.float64), QUANT_BLOCK)[:n]
        excess = np.abs(qmap[codes_b] - x) - np.abs(qmap[nearest] - x)
        assert np.all(excess <= GRID + 1e-6)
        agree = (codes_b == codes_c).mean()
        if key == "exp_avg":
            assert agree > 0.9  # most m lie where the map is coarser than the grid
        else:
            # v = m**2 spans twice the decades: most sit below 1e-4 of absmax, under the grid.
            assert agree < 0.6
            assert np.all(codes_b > 0) and np.any(codes_c == 0)


def test_their_state_loads_into_cpuadams_keys_and_both_step_alike(rng):
    """The direct mapping: bitsandbytes' state1/absmax1/state2/absmax2 become exp_avg/_absmax/
    exp_avg_sq/_absmax with cpuadam's map (their own map is refused: its values differ by up to
    2 ulp, and cpuadam.dequantize_state is the lossless route for a foreign map); one more step
    of each then agrees to rounding. And back: cpuadam's codes into their keys."""
    n = 30 * QUANT_BLOCK + 5
    param = log_spread(rng, n, -2, 0)
    p_b = torch.nn.Parameter(torch.from_numpy(param.copy()))
    opt_b = bnb.optim.AdamW8bit([p_b], **HYPER)
    for _ in range(4):
        p_b.grad = torch.from_numpy(log_spread(rng, n, -5, -1))
        opt_b.step()
    st_b = opt_b.state[p_b]
    state = {}
    for key, (codes, absmax, qmap) in THEIR_KEYS.items():
        state[key] = st_b[codes].numpy().copy()
        state[key + "_absmax"] = st_b[absmax].numpy().copy()
    param_now = p_b.detach().numpy().copy()

    # Their map in cpuadam's qmap key is refused, with the way out named.
    p_try = torch.nn.Parameter(torch.from_numpy(param_now.copy()))
    opt_try = ctorch.AdamW([p_try], state_dtype="8bit", **HYPER)
    sd = opt_try.state_dict()
    entry = {"step": torch.tensor(4.0)}
    for key, (codes, absmax, qmap) in THEIR_KEYS.items():
        entry[key], entry[key + "_absmax"], entry[key + "_qmap"] = st_b[codes], st_b[absmax], st_b[qmap]
    sd["state"] = {0: entry}
    with pytest.raises(ValueError, match="exp_avg.*_qmap.*dequantize_state"):
        opt_try.load_state_dict(sd)
    # ... and dequantize_state reads their codes with their map: bitwise their own dequantization.
    flat = cpuadam.dequantize_state(sd)["state"][0]
    for key, (codes, absmax, qmap) in THEIR_KEYS.items():
        want = torch.ops.bitsandbytes.dequantize_blockwise(st_b[codes], st_b[absmax], st_b[qmap],
                                                           QUANT_BLOCK, torch.float32)
        assert torch.equal(flat[key], want)

    # The direct mapping with cpuadam's map: the old moments move by at most 2 ulp per entry.
    opt_c, p_c = cpuadam_with_state(param_now, state, 4)
    grad = log_spread(rng, n, -5, -1)
    step_both(opt_b, p_b, opt_c, p_c, grad)
    pb, pc = p_b.detach().numpy(), p_c.detach().numpy()
    ours_maps = {key: _core.qmap(MAPS[key]) for key in MAPS}
    _, _, scale = reference_step(param_now, state, ours_maps, grad, 5)
    assert param_error(pb, pc.astype(np.float64), scale).max() <= 12
    st_c = opt_c.state[p_c]
    assert int(st_c["step"]) == st_b["step"] == 5
    for key, (codes, absmax, _) in THEIR_KEYS.items():
        assert ulps(st_b[absmax].numpy(), st_c[key + "_absmax"].numpy()).max() <= 4

    # Back: cpuadam's state into their keys; one more step each, the same agreement.
    back = {}
    for key in MAPS:
        back[key] = st_c[key].numpy().copy()
        back[key + "_absmax"] = st_c[key + "_absmax"].numpy().copy()
    param_now = pc.copy()
    opt_b2, p_b2 = bnb_with_state(param_now, back, 5)
    grad = log_spread(rng, n, -5, -1)
    step_both(opt_b2, p_b2, opt_c, p_c, grad)
    _, _, scale = reference_step(param_now, back, ours_maps, grad, 6)
    error = param_error(p_b2.detach().numpy(), p_c.detach().numpy().astype(np.float64), scale)
    assert error.max() <= 12


# --- the converters: cpuadam.from_bitsandbytes / cpuadam.to_bitsandbytes --------------------------

def _two_layer(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # 64x128 (8-bit in both: 32 blocks), 64 and 8x64 and 8 (float32 in both: under 4096).
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _train(model, opt, x, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _one_more_step_agrees(model_b, opt_b, model_c, opt_c, x) -> None:
    """One more step each: the params agree to rounding (the maps differ by up to 2 ulp, and
    their quantizer's grid moves some codes; both step from the exact new moments)."""
    _train(model_b, opt_b, x, 1)
    _train(model_c, opt_c, x, 1)
    for p_b, p_c in zip(model_b.parameters(), model_c.parameters()):
        torch.testing.assert_close(p_c, p_b, rtol=1e-5, atol=1e-6)


def test_their_checkpoint_converts_loads_and_steps_alike():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    model_b = _two_layer()
    opt_b = bnb.optim.AdamW8bit(model_b.parameters(), **HYPER)
    _train(model_b, opt_b, x, 4)
    theirs = opt_b.state_dict()
    sd = cpuadam.from_bitsandbytes(theirs)
    model_c = _two_layer()
    model_c.load_state_dict(model_b.state_dict())
    opt_c = ctorch.AdamW(model_c.parameters(), state_dtype="8bit", **HYPER)
    opt_c.load_state_dict(sd)
    loaded = opt_c.state_dict()["state"]
    for i, p in enumerate(model_b.parameters()):
        st_b, st_c = opt_b.state[p], loaded[i]
        assert int(st_c["step"]) == st_b["step"] == 4
        for key, (codes, absmax, _) in THEIR_KEYS.items():
            if st_b[codes].dtype == torch.uint8:  # their codes and absmax, bit for bit, with our map
                assert torch.equal(st_c[key], st_b[codes]) and torch.equal(st_c[key + "_absmax"], st_b[absmax])
                assert torch.equal(st_c[key + "_qmap"], torch.from_numpy(_core.qmap(MAPS[key])))
            else:  # float32 moments of the small tensors, as they are
                assert torch.equal(st_c[key], st_b[codes])
    _one_more_step_agrees(model_b, opt_b, model_c, opt_c, x)


def test_our_checkpoint_converts_loads_into_theirs_and_steps_alike():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    model_c = _two_layer(3)
    opt_c = ctorch.AdamW(model_c.parameters(), state_dtype="8bit", **HYPER)
    _train(model_c, opt_c, x, 4)
    theirs = cpuadam.to_bitsandbytes(opt_c.state_dict())
    model_b = _two_layer(3)
    model_b.load_state_dict(model_c.state_dict())
    opt_b = bnb.optim.AdamW8bit(model_b.parameters(), **HYPER)
    opt_b.load_state_dict(theirs)
    for i, p in enumerate(model_b.parameters()):
        st_b, st_c = opt_b.state[p], opt_c.state_dict()["state"][i]
        assert st_b["step"] == 4
        for key, (codes, absmax, _) in THEIR_KEYS.items():
            if st_c[key].dtype == torch.uint8:
                assert torch.equal(st_b[codes], st_c[key]) and torch.equal(st_b[absmax], st_c[key + "_absmax"])
            else:
                assert torch.equal(st_b[codes], st_c[key])
    _one_more_step_agrees(model_b, opt_b, model_c, opt_c, x)
    # And back again: the same state, bit for bit.
    again = cpuadam.from_bitsandbytes(cpuadam.to_bitsandbytes(opt_c.state_dict()))
    for i, entry in opt_c.state_dict()["state"].items():
        assert entry.keys() == again["state"][i].keys()
        for k, v in entry.items():
            assert torch.equal(v, again["state"][i][k]), k


def test_their_sgd_momentum_converts_and_steps_alike():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    hyper = dict(lr=1e-2, momentum=0.9, weight_decay=0.0)
    model_b = _two_layer(5)
    opt_b = bnb.optim.SGD8bit(model_b.parameters(), **hyper)
    _train(model_b, opt_b, x, 3)
    sd = cpuadam.from_bitsandbytes(opt_b.state_dict())
    model_c = _two_layer(5)
    model_c.load_state_dict(model_b.state_dict())
    opt_c = ctorch.SGD(model_c.parameters(), state_dtype="8bit", **hyper)
    opt_c.load_state_dict(sd)
    big = next(model_b.parameters())
    assert torch.equal(opt_c.state_dict()["state"][0]["momentum_buffer"], opt_b.state[big]["state1"])
    _one_more_step_agrees(model_b, opt_b, model_c, opt_c, x)


def test_our_sgd_momentum_converts_into_their_sgd8bit_and_steps_alike():
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    hyper = dict(lr=1e-2, momentum=0.9, weight_decay=0.0)
    model_c = _two_layer(7)
    opt_c = ctorch.SGD(model_c.parameters(), state_dtype="8bit", **hyper)
    _train(model_c, opt_c, x, 3)
    model_b = _two_layer(7)
    model_b.load_state_dict(model_c.state_dict())
    opt_b = bnb.optim.SGD8bit(model_b.parameters(), **hyper)
    opt_b.load_state_dict(cpuadam.to_bitsandbytes(opt_c.state_dict()))
    _one_more_step_agrees(model_b, opt_b, model_c, opt_c, x)
