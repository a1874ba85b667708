# SPDX-License-Identifier: MIT
"""Float64 NumPy transcription of DESIGN.md's arithmetic: the independent oracle.

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
