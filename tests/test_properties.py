# SPDX-License-Identifier: MIT
"""hypothesis over shapes, hyperparameters and step counts: parity with the oracle and equivalences."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from test_kernel import Pair, run_steps

import cpuadam
from cpuadam import _core

# Sizes around every vector width (4, 8, 16 float32 lanes) and odd primes.
SPECIAL_SIZES = [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 1009]

shapes = st.one_of(
    st.lists(st.sampled_from(SPECIAL_SIZES), min_size=1, max_size=3),
    st.lists(st.integers(0, 20), min_size=1, max_size=200),  # many tiny tensors
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(1, 5)), min_size=1, max_size=3),
)
seeds = st.integers(0, 2**32 - 1)
first_steps = st.one_of(st.just(1), st.integers(1, 10**6))
step_counts = st.integers(1, 6)

# The ranges test_kernel.py's tolerance was derived for.
hyperparameters = st.fixed_dictionaries({
    "lr": st.floats(1e-6, 1e-2),
    "beta1": st.one_of(st.just(0.0), st.floats(0.0, 0.999)),
    "beta2": st.floats(0.5, 0.99999),
    "eps": st.floats(1e-10, 1e-1),
    "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 0.1)),
    "maximize": st.booleans(),
    "decoupled": st.booleans(),
    "decay_mode": st.sampled_from(["lr", "independent"]),
    "eps_mode": st.sampled_from(["torch", "keras"]),
    "grad_scale": st.floats(0.01, 100.0),
})

BUFFERS = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def random_buffers(shapes_, seed: int) -> dict[str, list[np.ndarray]]:
    """Params and a non-zero optimizer state, as if some steps had already run."""
    rng = np.random.default_rng(seed)
    shapes_ = [s if isinstance(s, tuple) else (s,) for s in shapes_]
    scale = [10.0 ** rng.uniform(-4, 0, s) for s in shapes_]
    out = {
        "params": [rng.standard_normal(s).astype(np.float32) for s in shapes_],
        "exp_avgs": [(c * rng.standard_normal(s)).astype(np.float32) for s, c in zip(shapes_, scale)],
        "exp_avg_sqs": [(c * rng.standard_normal(s)).astype(np.float32) ** 2 for s, c in zip(shapes_, scale)],
    }
    out["max_exp_avg_sqs"] = [v * np.float32(1.5) for v in out["exp_avg_sqs"]]
    out["grads"] = [[(c * rng.standard_normal(s)).astype(np.float32) for s, c in zip(shapes_, scale)]
                    for _ in range(8)]
    return out


def clone(bufs: dict) -> dict:
    return {k: [a.copy() for a in bufs[k]] for k in BUFFERS}


def core_step(bufs: dict, grads: list, step: int, amsgrad: bool, **hyper) -> None:
    _core.adam_step([dict(params=bufs["params"], grads=grads, exp_avgs=bufs["exp_avgs"],
                          exp_avg_sqs=bufs["exp_avg_sqs"], max_exp_avg_sqs=bufs["max_exp_avg_sqs"],
                          step=step, amsgrad=amsgrad, **hyper)])


def assert_same_bytes(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.view(np.uint32).tobytes() == y.view(np.uint32).tobytes(), f"{what}[{i}] differs"


@given(shapes, hyperparameters, st.booleans(), first_steps, step_counts, st.integers(0, 2**32 - 1))
def test_core_matches_the_reference_for_any_hyperparameters(shapes_, hyper, amsgrad, first, steps, seed):
    pair = Pair(shapes_, np.random.default_rng(seed), amsgrad)
    run_steps(pair, hyper, steps, first).check()


@given(shapes, hyperparameters, st.booleans(), first_steps, step_counts, seeds)
def test_maximize_equals_minimizing_the_negated_grad(shapes_, hyper, amsgrad, first, steps, seed):
    data = random_buffers(shapes_, seed)
    up, down = clone(data), clone(data)
    for k in range(steps):
        grads = data["grads"][k]
        core_step(up, grads, first + k, amsgrad, **dict(hyper, maximize=True))
        core_step(down, [-g for g in grads], first + k, amsgrad, **dict(hyper, maximize=False))
    for key in BUFFERS:
        assert_same_bytes(up[key], down[key], key)


@given(shapes, hyperparameters, st.booleans(), step_counts, seeds)
def test_adam_and_adamw_agree_without_weight_decay(shapes_, hyper, amsgrad, steps, seed):
    data = random_buffers(shapes_, seed)
    kwargs = dict(lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                  weight_decay=0.0, amsgrad=amsgrad, maximize=hyper["maximize"], eps_mode=hyper["eps_mode"])
    adam_params = [p.copy() for p in data["params"]]
    adamw_params = [p.copy() for p in data["params"]]
    adam = cpuadam.Adam(adam_params, **kwargs)
    adamw = cpuadam.AdamW(adamw_params, decay_mode=hyper["decay_mode"], **kwargs)
    for k in range(steps):
        adam.step(data["grads"][k])
        adamw.step(data["grads"][k])
    assert_same_bytes(adam_params, adamw_params, "params")
    for i in adam.state:
        for key in adam.state[i]:
            if key != "step":
                assert_same_bytes([adam.state[i][key]], [adamw.state[i][key]], f"state[{i}][{key!r}]")


@given(shapes, hyperparameters, st.booleans(), first_steps, seeds)
def test_keras_eps_equals_torch_eps_divided_by_sqrt_of_bias_correction2(shapes_, hyper, amsgrad, step, seed):
    data = random_buffers(shapes_, seed)
    keras, torch_ = clone(data), clone(data)
    eps_torch = hyper["eps"] / math.sqrt(1.0 - hyper["beta2"] ** step)
    core_step(keras, data["grads"][0], step, amsgrad, **dict(hyper, eps_mode="keras"))
    core_step(torch_, data["grads"][0], step, amsgrad, **dict(hyper, eps_mode="torch", eps=eps_torch))
    for a, b in zip(keras["params"], torch_["params"]):
        np.testing.assert_array_max_ulp(a, b, maxulp=2)
    for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        assert_same_bytes(keras[key], torch_[key], key)


group_settings = st.fixed_dictionaries({
    "sizes": st.lists(st.sampled_from(SPECIAL_SIZES), min_size=1, max_size=4),
    "lr": st.floats(1e-6, 1e-2),
    "betas": st.tuples(st.floats(0.0, 0.999), st.floats(0.5, 0.99999)),
    "eps": st.floats(1e-10, 1e-1),
    "weight_decay": st.floats(0.0, 0.1),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
    "eps_mode": st.sampled_from(["torch", "keras"]),
    "decay_mode": st.sampled_from(["lr", "independent"]),
})


@given(st.sampled_from(["Adam", "AdamW"]), st.lists(group_settings, min_size=1, max_size=3), st.integers(1, 4),
       seeds)
def test_numpy_classes_match_the_core_bitwise(cls_name, groups, steps, seed):
    rng = np.random.default_rng(seed)
    decoupled = cls_name == "AdamW"
    param_groups, flat = [], []  # flat: (param owned by the class, our copy, group settings)
    for g in groups:
        ps = [rng.standard_normal(n).astype(np.float32) for n in g["sizes"]]
        group = {k: v for k, v in g.items() if k != "sizes" and (decoupled or k != "decay_mode")}
        param_groups.append(dict(group, params=ps))
        flat += [(p, p.copy(), g) for p in ps]
    opt = getattr(cpuadam, cls_name)(param_groups)
    ours = [{"step": 0, "exp_avgs": [np.zeros_like(q)], "exp_avg_sqs": [np.zeros_like(q)],
             "max_exp_avg_sqs": [np.zeros_like(q)]} for _, q, _ in flat]
    for _ in range(steps):
        # A None grad skips its param, whose step count then lags the others'.
        grads = [None if rng.random() < 0.25 else rng.standard_normal(p.shape).astype(np.float32)
                 for p, _, _ in flat]
        opt.step(grads)
        for (_, q, g), grad, mine in zip(flat, grads, ours):
            if grad is None:
                continue
            mine["step"] += 1
            _core.adam_step([dict(params=[q], grads=[grad], exp_avgs=mine["exp_avgs"],
                                  exp_avg_sqs=mine["exp_avg_sqs"], max_exp_avg_sqs=mine["max_exp_avg_sqs"],
                                  step=mine["step"], lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
                                  eps=g["eps"], weight_decay=g["weight_decay"], amsgrad=g["amsgrad"],
                                  maximize=g["maximize"], decoupled=decoupled,
                                  decay_mode=g["decay_mode"] if decoupled else "lr", eps_mode=g["eps_mode"])])
    for k, ((p, q, g), mine) in enumerate(zip(flat, ours)):
        assert_same_bytes([p], [q], f"param {k}")
        if mine["step"] == 0:
            assert k not in opt.state
            continue
        state = opt.state[k]
        assert state["step"] == mine["step"]
        assert_same_bytes([state["exp_avg"]], mine["exp_avgs"], f"exp_avg of param {k}")
        assert_same_bytes([state["exp_avg_sq"]], mine["exp_avg_sqs"], f"exp_avg_sq of param {k}")
        if g["amsgrad"]:
            assert_same_bytes([state["max_exp_avg_sq"]], mine["max_exp_avg_sqs"], f"max_exp_avg_sq of param {k}")
