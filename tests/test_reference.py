# SPDX-License-Identifier: MIT
"""The fp64 oracle checked against the first two steps worked out by hand.

Each expected value is written as the arithmetic one would do on paper (with
the bias corrections simplified where that is how one works it out), not by
calling anything that shares code with the oracle.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import adam_step

# Two steps on one element: p0 = 0.5, grads 0.2 then -0.4, lr 0.1, betas
# (0.9, 0.999). After step 1: m = 0.02, v = 4e-5, bc1 = 0.1, bc2 = 0.001.
# After step 2: m = 0.9*0.02 + 0.1*(-0.4) = -0.022,
# v = 0.999*4e-5 + 0.001*0.16 = 1.9996e-4, bc1 = 0.19, bc2 = 0.001999.
P0, G1, G2, LR = 0.5, 0.2, -0.4, 0.1
EPS = 1e-8
REL = 1e-12


def run_two_steps(grads=(G1, G2), p0=P0, **kwargs):
    """Runs the oracle for len(grads) steps; returns params and states after each."""
    param = np.array([p0], dtype=np.float64)
    state: dict = {}
    history = []
    for step, g in enumerate(grads, start=1):
        adam_step(param, np.array([g]), state, step=step, lr=LR, **kwargs)
        history.append((param[0], {k: v[0] for k, v in state.items()}))
    return history


def close(a, b):
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-15)


def test_first_adam_step_moves_by_lr_times_the_sign_of_the_grad():
    (p1, s1), (p2, s2) = run_two_steps()
    # Step 1: m/bc1 = g and sqrt(v/bc2) = |g|, so the step is lr * g / (|g| + eps).
    assert close(p1, 0.5 - 0.1 * 0.2 / (0.2 + EPS))
    assert close(s1["exp_avg"], 0.02)
    assert close(s1["exp_avg_sq"], 4e-5)
    assert close(s2["exp_avg"], -0.022)
    assert close(s2["exp_avg_sq"], 1.9996e-4)
    m_hat, v_hat = -0.022 / 0.19, 1.9996e-4 / 0.001999
    assert close(p2, p1 - 0.1 * m_hat / (math.sqrt(v_hat) + EPS))


@pytest.mark.parametrize("decay_mode, factor", [("lr", 1 - 0.1 * 0.1), ("independent", 1 - 0.1)],
                         ids=["decay_mode=lr", "decay_mode=independent"])
def test_adamw_shrinks_the_param_before_the_adam_step(decay_mode, factor):
    (p1, s1), (p2, s2) = run_two_steps(weight_decay=0.1, decoupled=True, decay_mode=decay_mode)
    assert close(p1, 0.5 * factor - 0.1 * 0.2 / (0.2 + EPS))
    # Decoupled decay never reaches the moments.
    assert close(s2["exp_avg"], -0.022)
    assert close(s2["exp_avg_sq"], 1.9996e-4)
    m_hat, v_hat = -0.022 / 0.19, 1.9996e-4 / 0.001999
    assert close(p2, p1 * factor - 0.1 * m_hat / (math.sqrt(v_hat) + EPS))


def test_adam_l2_adds_the_decay_to_the_grad():
    (p1, s1), (p2, s2) = run_two_steps(weight_decay=0.1)
    g1 = 0.2 + 0.1 * 0.5  # 0.25
    assert close(s1["exp_avg"], 0.1 * g1)
    assert close(s1["exp_avg_sq"], 0.001 * g1 * g1)
    assert close(p1, 0.5 - 0.1 * g1 / (g1 + EPS))
    g2 = -0.4 + 0.1 * p1
    m2 = 0.9 * 0.025 + 0.1 * g2
    v2 = 0.999 * 6.25e-5 + 0.001 * g2 * g2
    assert close(s2["exp_avg"], m2)
    assert close(s2["exp_avg_sq"], v2)
    assert close(p2, p1 - 0.1 * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + EPS))


def test_amsgrad_keeps_the_largest_second_moment():
    # Grads 1.0 then 0.01: v1 = 1e-3, v2 = 0.999e-3 + 1e-7 = 9.991e-4 < v1.
    (p1, s1), (p2, s2) = run_two_steps(grads=(1.0, 0.01), amsgrad=True)
    assert close(p1, 0.5 - 0.1 * 1.0 / (1.0 + EPS))
    assert close(s1["max_exp_avg_sq"], 1e-3)
    assert close(s2["exp_avg_sq"], 9.991e-4)
    assert close(s2["max_exp_avg_sq"], 1e-3)
    m2 = 0.9 * 0.1 + 0.1 * 0.01  # 0.091
    assert close(s2["exp_avg"], m2)
    assert close(p2, p1 - 0.1 * (m2 / 0.19) / (math.sqrt(1e-3 / 0.001999) + EPS))


def test_amsgrad_equals_adam_while_the_second_moment_grows():
    plain = run_two_steps()
    ams = run_two_steps(amsgrad=True)
    for (pa, _), (pb, sb) in zip(plain, ams):
        assert pa == pb
        assert sb["max_exp_avg_sq"] == sb["exp_avg_sq"]


def test_keras_eps_mode_adds_eps_to_the_raw_second_moment():
    eps = 1e-3  # large enough that where it sits changes the result visibly
    (p1, _), (p2, _) = run_two_steps(eps=eps, eps_mode="keras")
    # Kingma & Ba: lr_t = lr * sqrt(bc2) / bc1, p -= lr_t * m / (sqrt(v) + eps).
    assert close(p1, 0.5 - (0.1 * math.sqrt(0.001) / 0.1) * 0.02 / (math.sqrt(4e-5) + eps))
    assert close(p2, p1 - (0.1 * math.sqrt(0.001999) / 0.19) * -0.022 / (math.sqrt(1.9996e-4) + eps))
    (t1, _), _ = run_two_steps(eps=eps)
    assert not close(p1, t1)


def test_maximize_mirrors_every_update():
    (p1, s1), (p2, s2) = run_two_steps(maximize=True)
    assert close(p1, 0.5 + 0.1 * 0.2 / (0.2 + EPS))
    assert close(s2["exp_avg"], 0.022)
    assert close(s2["exp_avg_sq"], 1.9996e-4)
    _, (q2, _) = run_two_steps()
    # Each update has its sign flipped, so p2 - p0 flips too.
    assert close(p2 - 0.5, -(q2 - 0.5))


def test_grad_scale_multiplies_the_grad_before_everything_else():
    eps = 0.01  # Adam is invariant to grad scale except through eps and L2 decay
    (p1, s1), _ = run_two_steps(grads=(G1, G2), eps=eps, grad_scale=0.5)
    assert close(s1["exp_avg"], 0.1 * 0.1)
    assert close(s1["exp_avg_sq"], 0.001 * 0.01)
    assert close(p1, 0.5 - 0.1 * 0.1 / (0.1 + eps))


def test_reference_leaves_the_grad_untouched():
    grad = np.array([0.2, -0.3])
    param = np.array([1.0, 2.0])
    adam_step(param, grad, {}, step=1, lr=0.1, maximize=True, grad_scale=3.0, weight_decay=0.5)
    assert grad.tolist() == [0.2, -0.3]
