# SPDX-License-Identifier: MIT
"""Float64 NumPy transcription of the arithmetic in ARCHITECTURE.md: the independent oracle.

Never imports cpuadam. Each function reads like one line of the math; buffers
are float64 arrays updated in place, so a test can run many steps cheaply.
"""

from __future__ import annotations

import numpy as np


def bias_correction(beta: float, step: int) -> float:
    return 1.0 - beta**step


def update_moment(moment: np.ndarray, g: np.ndarray, beta: float) -> None:
    """moment = beta * moment + (1 - beta) * g, in place."""
    moment *= beta
    moment += (1.0 - beta) * g


def adam_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: dict,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled: bool = False,
    decay_mode: str = "lr",
    eps_mode: str = "torch",
    grad_scale: float = 1.0,
) -> None:
    """One Adam (decoupled=False) or AdamW (decoupled=True) step on float64 buffers.

    ``state`` holds float64 'exp_avg', 'exp_avg_sq' (and 'max_exp_avg_sq' with
    amsgrad); missing entries start at zero. ``step`` counts from 1.
    """
    assert param.dtype == np.float64
    g = np.asarray(grad, dtype=np.float64)
    g = -g if maximize else g.copy()
    g *= grad_scale
    for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        state.setdefault(key, np.zeros_like(param))
    if weight_decay != 0.0:
        if decoupled:
            decay = lr * weight_decay if decay_mode == "lr" else weight_decay
            param *= 1.0 - decay
        else:
            g += weight_decay * param
    update_moment(state["exp_avg"], g, beta1)
    update_moment(state["exp_avg_sq"], g * g, beta2)
    v = state["exp_avg_sq"]
    if amsgrad:
        np.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        v = state["max_exp_avg_sq"]
    bc1 = bias_correction(beta1, step)
    bc2 = bias_correction(beta2, step)
    if eps_mode == "torch":
        param -= (lr / bc1) * state["exp_avg"] / (np.sqrt(v) / np.sqrt(bc2) + eps)
    elif eps_mode == "keras":
        param -= (lr * np.sqrt(bc2) / bc1) * state["exp_avg"] / (np.sqrt(v) + eps)
    else:
        raise ValueError(eps_mode)


def sgd_step(
    param: np.ndarray,
    grad: np.ndarray,
    state: dict,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """One torch.optim.SGD step on float64 buffers; state['momentum_buffer'] starts as the first d_p."""
    assert param.dtype == np.float64
    g = np.asarray(grad, dtype=np.float64)
    g = -g if maximize else g.copy()
    if weight_decay != 0.0:
        g += weight_decay * param
    if momentum != 0.0:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = g.copy()
        else:
            buf = state["momentum_buffer"]
            buf *= momentum
            buf += (1.0 - dampening) * g
        buf = state["momentum_buffer"]
        g = g + momentum * buf if nesterov else buf
    param -= lr * g


# Rounding to the 16-bit float formats, written with NumPy bit operations (not
# with ml_dtypes or a cast, so the tests can check those against it).


def bf16_round_nearest(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN -> a quiet NaN."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 0x0040, rounded).astype(np.uint16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16 or int16) -> float32, exact."""
    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f16_round_nearest(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 bits (uint16), round to nearest even, subnormals included.

    Written from the format: a float16 step is 2^(e - 10) for an exponent e >= -14,
    and 2^-24 below that; the value is rounded to a multiple of its step in float64.
    """
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    a = np.abs(np.where(finite, x, 0).astype(np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    step = 2.0 ** (np.maximum(e, -14) - 10)
    q = np.minimum(np.round(a / step) * step, 65536.0)  # np.round: half to even
    sign = np.signbit(x).astype(np.uint16) << 15
    exp_field = np.where(q >= 2.0**-14, np.floor(np.log2(np.where(q > 0, q, 1.0))) + 15, 0)
    mant = np.where(q >= 2.0**-14, q / 2.0 ** (exp_field - 15) - 1.0, q / 2.0**-24 / 1024.0) * 1024.0
    bits = (exp_field.astype(np.uint32) << 10) + np.round(mant).astype(np.uint32)
    bits = np.where((q >= 65520.0) | np.isinf(x), 0x7C00, bits)  # 65520 rounds to 2^16: inf
    bits = np.where(np.isnan(x), 0x7E00, bits)
    return (bits.astype(np.uint16) | sign).astype(np.uint16)


def ulp(bits: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of the 16-bit format at each stored value (bits as uint16), in float64."""
    b = np.asarray(bits).view(np.uint16).astype(np.int64)
    if dtype == "bfloat16":
        e = (b >> 7) & 0xFF
        return 2.0 ** (np.maximum(e, 1) - 127 - 7)
    e = (b >> 10) & 0x1F
    return 2.0 ** (np.maximum(e, 1) - 15 - 10)


# --- 8-bit block-wise dynamic quantization (Dettmers et al. 2022) ---------------------------

QUANT_BLOCK = 256


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 values of the dynamic code map, ascending, as float32.

    Decade 10**-d (d = 6..0) holds the centres of 2**(6-d) (signed, each with both signs) or
    2**(7-d) (unsigned) equal parts of [0.1, 1], times 10**-d; 0 and 1 complete the map.
    """
    values = {0.0, 1.0}
    for i in range(7):
        parts = 2**i if signed else 2 ** (i + 1)
        for k in range(parts):
            centre = (0.1 + 0.9 * (2 * k + 1) / (2.0 * parts)) / 10.0 ** (6 - i)
            values.add(centre)
            if signed:
                values.add(-centre)
    out = np.array(sorted(values), dtype=np.float32)
    assert out.size == 256 and np.all(np.diff(out.astype(np.float64)) > 0)
    return out


def quantize_blockwise(values: np.ndarray, qmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, absmax): absmax = the block's max |value|; code = the nearest qmap entry to
    value / absmax (that quotient rounded to float32, as the stored state defines it),
    found in float64 by distance; an exact tie goes to the lower code. All-zero block: the
    code of 0."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    n = flat.size
    blocks = -(-n // QUANT_BLOCK)
    codes = np.empty(n, dtype=np.uint8)
    absmax = np.empty(blocks, dtype=np.float32)
    q = qmap.astype(np.float64)
    for b in range(blocks):
        v = flat[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK]
        m = np.float32(np.max(np.abs(v))) if v.size else np.float32(0)
        absmax[b] = m
        x = (v / (m if m > 0 else np.float32(1))).astype(np.float32).astype(np.float64)
        dist = np.abs(x[:, None] - q[None, :])
        # argmin returns the first (lowest) index among equal distances: ties go down.
        codes[b * QUANT_BLOCK:(b + 1) * QUANT_BLOCK] = np.argmin(dist, axis=1)
    return codes.reshape(np.shape(values)), absmax


def dequantize_blockwise(codes: np.ndarray, absmax: np.ndarray, qmap: np.ndarray) -> np.ndarray:
    """qmap[code] * absmax of the element's block, rounded to float32 as stored."""
    flat = np.asarray(codes).reshape(-1)
    scale = np.repeat(np.asarray(absmax, dtype=np.float32), QUANT_BLOCK)[:flat.size]
    return (qmap[flat].astype(np.float32) * scale).astype(np.float32).reshape(np.shape(codes))
