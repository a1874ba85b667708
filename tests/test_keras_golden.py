# SPDX-License-Identifier: MIT
"""Keras's own optimizer test values (golden trajectories, single steps, decay, EMA) reproduced by cpuadam."""

from __future__ import annotations

import numpy as np
import pytest

import cpuadam

# Keras's defaults where its tests rely on them (keras/src/optimizers/adam.py).
KERAS_EPSILON = 1e-7
KERAS_ADAMW_WEIGHT_DECAY = 0.004

# keras-team/keras, keras/src/optimizers/adam_test.py, test_correctness_with_golden:
# Adam(amsgrad=True) on ten ones; every row is one value repeated over the ten elements.
ADAM_AMSGRAD_GOLDEN = np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10))

# keras-team/keras, keras/src/optimizers/adamw_test.py, test_correctness_with_golden:
# AdamW(learning_rate=1.0, weight_decay=0.5, epsilon=2) on ten ones.
ADAMW_GOLDEN = np.array([
    [0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998, 0.4998],
    [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
    [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
    [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
    [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159],
])

# Both golden tests compare with assertAllClose(rtol=5e-4, atol=5e-4).
GOLDEN_TOL = dict(rtol=5e-4, atol=5e-4)


def golden_trajectory(make_optimizer) -> list[np.ndarray]:
    """Keras's golden loop: x = ten ones, one step with grads 0.01, then steps with
    0.1, 0.2, ..., 1.0; x is recorded after each of the first five steps."""
    x = np.ones(10, dtype=np.float32)
    opt = make_optimizer([x])
    opt.step([np.full(10, 0.01, dtype=np.float32)])
    grads = np.arange(0.1, 1.1, 0.1).astype(np.float32)
    seen = []
    for _ in range(5):
        seen.append(x.copy())
        opt.step([grads.copy()])
    return seen


def assert_matches_golden(seen, golden) -> None:
    for i, (x, want) in enumerate(zip(seen, golden)):
        np.testing.assert_allclose(x, want, err_msg=f"after step {i + 1}", **GOLDEN_TOL)


def test_adam_with_amsgrad_reproduces_keras_golden_values():
    seen = golden_trajectory(lambda ps: cpuadam.Adam(ps, lr=1e-3, eps=KERAS_EPSILON, amsgrad=True,
                                                     eps_mode="keras"))
    assert_matches_golden(seen, ADAM_AMSGRAD_GOLDEN)


def make_keras_adamw(ps, eps_mode="keras"):
    # Keras decays decoupled, scaled by the learning rate: cpuadam.AdamW with decay_mode="lr".
    return cpuadam.AdamW(ps, lr=1.0, weight_decay=0.5, eps=2.0, eps_mode=eps_mode, decay_mode="lr")


def test_adamw_reproduces_keras_golden_values():
    assert_matches_golden(golden_trajectory(make_keras_adamw), ADAMW_GOLDEN)


def test_adamw_golden_values_tell_torchs_eps_placement_apart():
    seen = golden_trajectory(lambda ps: make_keras_adamw(ps, eps_mode="torch"))
    with pytest.raises(AssertionError):
        assert_matches_golden(seen, ADAMW_GOLDEN)


def test_adamw_golden_values_tell_coupled_l2_decay_apart():
    # cpuadam.Adam decays as torch does (L2, through the grad), unlike Keras's Adam.
    seen = golden_trajectory(lambda ps: cpuadam.Adam(ps, lr=1.0, weight_decay=0.5, eps=2.0,
                                                     eps_mode="keras"))
    with pytest.raises(AssertionError):
        assert_matches_golden(seen, ADAMW_GOLDEN)


def test_adam_single_step_matches_keras():
    # keras-team/keras, keras/src/optimizers/adam_test.py, test_single_step:
    # Adam(learning_rate=0.5), grads [1, 6, 7, 2] on [1, 2, 3, 4] -> x - 0.5 (rtol=atol=1e-4).
    x = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    opt = cpuadam.Adam([x], lr=0.5, eps=KERAS_EPSILON, eps_mode="keras")
    opt.step([np.array([1.0, 6.0, 7.0, 2.0], dtype=np.float32)])
    np.testing.assert_allclose(x, [0.5, 1.5, 2.5, 3.5], rtol=1e-4, atol=1e-4)


def test_adamw_single_step_with_keras_defaults_matches_keras():
    # keras-team/keras, keras/src/optimizers/adamw_test.py, test_single_step:
    # AdamW(learning_rate=0.5) (weight_decay 0.004), grads [1, 6, 7, 2] on [1, 2, 3, 4]
    # -> [0.4980, 1.4960, 2.494, 3.492] (rtol=atol=1e-4).
    x = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    opt = cpuadam.AdamW([x], lr=0.5, eps=KERAS_EPSILON, weight_decay=KERAS_ADAMW_WEIGHT_DECAY,
                        eps_mode="keras")
    opt.step([np.array([1.0, 6.0, 7.0, 2.0], dtype=np.float32)])
    np.testing.assert_allclose(x, [0.4980, 1.4960, 2.494, 3.492], rtol=1e-4, atol=1e-4)


def test_weight_decay_exclusion_by_name_matches_keras():
    # keras-team/keras, keras/src/optimizers/adamw_test.py, test_weight_decay:
    # learning_rate 1, weight_decay 0.004, zero grads, variables at 2.0, three steps:
    # a decayed variable ends at 2 * 0.996**3 = 1.9760959; one excluded by name stays 2.0.
    decayed = np.array([2.0], dtype=np.float32)
    excluded = np.array([2.0], dtype=np.float32)
    opt = cpuadam.AdamW([("weights", decayed), ("exclude", excluded)], lr=1.0,
                        weight_decay=KERAS_ADAMW_WEIGHT_DECAY, eps=KERAS_EPSILON, eps_mode="keras",
                        exclude_from_weight_decay=["exclude"])
    for _ in range(3):
        opt.step([np.zeros(1, dtype=np.float32), np.zeros(1, dtype=np.float32)])
    np.testing.assert_allclose(decayed, [1.9760959], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(excluded, [2.0])


def test_ema_with_overwrite_matches_keras_worked_example():
    # keras-team/keras, keras/src/optimizers/optimizer_test.py, test_ema: SGD(learning_rate=1),
    # use_ema, ema_momentum 0.9, ema_overwrite_frequency 3, grads of ones on [[3, 4], [5, 6]].
    # After step 1 x = [[2, 3], [4, 5]] and the average equals it; after step 2 x = [[1, 2], [3, 4]]
    # and the average is [[1.9, 2.9], [3.9, 4.9]]; step 3 moves x to [[0, 1], [2, 3]], the average
    # to [[1.71, 2.71], [3.71, 4.71]], and the overwrite copies the average into x.
    x = np.array([[3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    opt = cpuadam.SGD([x], lr=1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
    ones = np.ones((2, 2), dtype=np.float32)
    tol = dict(rtol=1e-6, atol=1e-6)
    opt.step([ones])
    np.testing.assert_array_equal(x, [[2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_allclose(opt.ema_params()[0], [[2.0, 3.0], [4.0, 5.0]], **tol)
    opt.step([ones])
    np.testing.assert_array_equal(x, [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(opt.ema_params()[0], [[1.9, 2.9], [3.9, 4.9]], **tol)
    opt.step([ones])
    np.testing.assert_allclose(x, [[1.71, 2.71], [3.71, 4.71]], **tol)
    np.testing.assert_allclose(opt.ema_params()[0], [[1.71, 2.71], [3.71, 4.71]], **tol)


def test_gradient_accumulation_matches_keras_worked_example():
    # keras-team/keras, keras/src/optimizers/optimizer_test.py, test_gradient_accumulation:
    # SGD(learning_rate=1), gradient_accumulation_steps 3, grads of ones on ones: the first two
    # calls leave the variable at 1, the third applies the mean (1) and moves it to 0.
    x = np.ones((2, 2), dtype=np.float32)
    opt = cpuadam.SGD([x], lr=1.0, gradient_accumulation_steps=3)
    ones = np.ones((2, 2), dtype=np.float32)
    for _ in range(2):
        opt.step([ones])
        np.testing.assert_array_equal(x, np.ones((2, 2)))
    opt.step([ones])
    np.testing.assert_array_equal(x, np.zeros((2, 2)))
