# SPDX-License-Identifier: MIT
"""Every rejection at the boundary: exception type and message, and nothing written after it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import cpuadam
from cpuadam import _core

# Shapes of the two params in every group: a vector and a matrix, so that
# shape messages show both the one-element tuple form and the general one.
SHAPES = [(5,), (3, 4)]
BUFFERS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
WRITTEN = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
# Buffers a batch carries only with gradient accumulation or an EMA.
EXTRA_BUFFERS = ("grad_accums", "emas")
# How the binding names each buffer of params[1] in group 1.
NAME = {
    "params": r"params\[1\] in group 1",
    "grads": r"grad of params\[1\] in group 1",
    "exp_avgs": r"exp_avg of params\[1\] in group 1",
    "exp_avg_sqs": r"exp_avg_sq of params\[1\] in group 1",
    "max_exp_avg_sqs": r"max_exp_avg_sq of params\[1\] in group 1",
    "grad_accums": r"grad_accum of params\[1\] in group 1",
    "emas": r"ema of params\[1\] in group 1",
}


def f32(x) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def misaligned_like(a: np.ndarray) -> np.ndarray:
    """A writeable float32 copy of ``a`` whose data starts one byte past an element boundary."""
    raw = bytearray(a.nbytes + 1)
    out = np.frombuffer(raw, dtype=np.float32, offset=1, count=a.size).reshape(a.shape)
    out[...] = a
    return out


def read_only_like(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out.flags.writeable = False
    return out


def shares(a: str, b: str) -> str:
    """Either order: the binding names the two buffers in address order."""
    return rf"({a} shares memory with {b}|{b} shares memory with {a})"


def all_arrays(obj, found=None) -> list[np.ndarray]:
    """Every array reachable from lists and dicts, with the arrays views are cut from."""
    found = [] if found is None else found
    if isinstance(obj, np.ndarray):
        found.append(obj)
        if isinstance(obj.base, np.ndarray):
            all_arrays(obj.base, found)
    elif isinstance(obj, dict):
        for v in obj.values():
            all_arrays(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            all_arrays(v, found)
    return found


def snapshot_bytes(obj) -> list[bytes]:
    return [a.tobytes() for a in all_arrays(obj)]


# --------------------------------------------------------------------------
# _core.adam_step directly: two batches (groups 0 and 1), every buffer filled
# with nonzero values so that any write shows up in the bytes.


def core_batches(amsgrad: bool = True) -> list[dict]:
    rng = np.random.default_rng(20240601)
    batches = []
    for group in (0, 1):
        params = [f32(rng.standard_normal(s)) for s in SHAPES]
        batches.append({
            "params": params,
            "grads": [f32(rng.standard_normal(s)) for s in SHAPES],
            "exp_avgs": [f32(rng.standard_normal(s)) for s in SHAPES],
            "exp_avg_sqs": [f32(rng.uniform(0.5, 1.0, s)) for s in SHAPES],
            "max_exp_avg_sqs": [f32(rng.uniform(1.0, 2.0, s)) for s in SHAPES],
            "step": 3, "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "weight_decay": 1e-2, "amsgrad": amsgrad, "maximize": False, "decoupled": True,
            "decay_mode": "lr", "eps_mode": "torch", "grad_scale": 1.0,
            "group": group, "indices": [0, 1],
        })
    return batches


def add_extras(batches) -> None:
    """Gives every batch grad accumulators and EMA buffers (filled, so writes show)."""
    rng = np.random.default_rng(7)
    for b in batches:
        b["grad_accums"] = [f32(rng.standard_normal(s)) for s in SHAPES]
        b["emas"] = [f32(rng.standard_normal(s)) for s in SHAPES]
        b["ema_momentum"] = 0.99


def replace_buffer(field: str, make):
    """A mutation that swaps the buffer ``field`` of params[1] in group 1 for ``make(it)``."""
    def mutate(batches):
        if field in EXTRA_BUFFERS:
            add_extras(batches)
        batches[1][field][1] = make(batches[1][field][1])
    return mutate


def set_scalar(key: str, value, batch: int = 1):
    def mutate(batches):
        batches[batch][key] = value
    return mutate


def core_cases():
    cases = []
    for field in BUFFERS + EXTRA_BUFFERS:
        for dtype in ("float64", "int32", "float16"):
            cases.append(pytest.param(
                replace_buffer(field, lambda a, d=dtype: a.astype(d)), TypeError,
                rf"^{NAME[field]}: expected a float32 array, got {dtype}$",
                id=f"{field}-{dtype}"))
        cases.append(pytest.param(
            replace_buffer(field, lambda a: a.tolist()), TypeError,
            rf"^{NAME[field]}: expected a numpy.ndarray, got list$", id=f"{field}-list"))
        cases.append(pytest.param(
            replace_buffer(field, lambda a: a[0, 0]), TypeError,
            rf"^{NAME[field]}: expected a numpy.ndarray, got float32$", id=f"{field}-numpy-scalar"))
        cases.append(pytest.param(
            replace_buffer(field, lambda a: np.ascontiguousarray(a.T).T), ValueError,
            rf"^{NAME[field]}: expected a C-contiguous array$", id=f"{field}-transposed"))
        cases.append(pytest.param(
            replace_buffer(field, lambda a: np.repeat(a, 2, axis=1)[:, ::2]), ValueError,
            rf"^{NAME[field]}: expected a C-contiguous array$", id=f"{field}-strided"))
        cases.append(pytest.param(
            replace_buffer(field, misaligned_like), ValueError,
            rf"^{NAME[field]}: data is not aligned to its element size$", id=f"{field}-misaligned"))
        if field != "params":
            # A param of another shape is reported as its grad's mismatch, covered here.
            cases.append(pytest.param(
                replace_buffer(field, lambda a: np.zeros((4, 3), np.float32)), ValueError,
                rf"^{NAME[field]}: shape \(4, 3\) does not match params\[1\] in group 1's "
                r"shape \(3, 4\)$", id=f"{field}-transposed-shape"))
            cases.append(pytest.param(
                replace_buffer(field, lambda a: np.zeros(12, np.float32)), ValueError,
                rf"^{NAME[field]}: shape \(12,\) does not match params\[1\] in group 1's "
                r"shape \(3, 4\)$", id=f"{field}-flattened-shape"))
    for field in WRITTEN + EXTRA_BUFFERS:
        cases.append(pytest.param(
            replace_buffer(field, read_only_like), ValueError,
            rf"^{NAME[field]}: expected a writeable array, got a read-only one$",
            id=f"{field}-read-only"))

    for field in ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        def drop_last(batches, field=field):
            batches[1][field] = batches[1][field][:1]
        cases.append(pytest.param(drop_last, ValueError,
                                  rf"^{field} has 1 entries but params has 2$", id=f"{field}-short-list"))

    def extra_grad(batches):
        batches[1]["grads"].append(f32(np.zeros(3)))
    cases.append(pytest.param(extra_grad, ValueError, r"^grads has 3 entries but params has 2$",
                              id="grads-long-list"))
    cases.append(pytest.param(set_scalar("indices", [0]), ValueError,
                              r"^indices has 1 entries but params has 2$", id="indices-short-list"))
    cases.append(pytest.param(set_scalar("grads", (np.zeros(5, np.float32),)), ValueError,
                              r"^grads has 1 entries but params has 2$", id="grads-short-tuple"))
    cases.append(pytest.param(set_scalar("params", {"a": 1}), TypeError,
                              r"^params: expected a list of arrays$", id="params-dict"))
    cases.append(pytest.param(set_scalar("max_exp_avg_sqs", None), TypeError,
                              r"^max_exp_avg_sqs: expected a list of arrays$",
                              id="max_exp_avg_sqs-none-with-amsgrad"))

    def missing(key):
        def mutate(batches):
            del batches[1][key]
        return mutate
    for key in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "lr", "beta1",
                "beta2", "eps", "weight_decay"):
        cases.append(pytest.param(missing(key), ValueError, rf"^batch is missing '{key}'$",
                                  id=f"missing-{key}"))

    finite_in = {"lr": r"\[0.0, inf\)", "eps": r"\[0.0, inf\)", "weight_decay": r"\[0.0, inf\)",
                 "beta1": r"\[0.0, 1.0\)", "beta2": r"\[0.0, 1.0\)"}
    bad_values = {
        "lr": [math.nan, math.inf, -math.inf, -1e-3],
        "eps": [math.nan, math.inf, -1e-8],
        "weight_decay": [math.nan, math.inf, -0.01],
        "beta1": [1.0, 1.5, -0.1, math.nan],
        "beta2": [1.0, -1e-9, math.inf],
    }
    for key, values in bad_values.items():
        for value in values:
            for batch in (0, 1):
                cases.append(pytest.param(
                    set_scalar(key, value, batch), ValueError,
                    rf"^invalid {key} in group {batch}: {re_float(value)} "
                    rf"\(expected a finite value in {finite_in[key]}\)$",
                    id=f"{key}-{value}-group{batch}"))
        cases.append(pytest.param(set_scalar(key, "0.1"), TypeError,
                                  rf"^{key}: expected a real number, got str$", id=f"{key}-str"))
        cases.append(pytest.param(set_scalar(key, None), TypeError,
                                  rf"^{key}: expected a real number, got NoneType$", id=f"{key}-none"))
    cases.append(pytest.param(set_scalar("lr", True), TypeError,
                              r"^lr: expected a real number, got bool$", id="lr-bool"))
    for value in (math.nan, math.inf, -math.inf):
        cases.append(pytest.param(
            set_scalar("grad_scale", value), ValueError,
            rf"^invalid grad_scale in group 1: {re_float(value)} \(expected a finite value\)$",
            id=f"grad_scale-{value}"))
    for key in ("clipnorm", "clipvalue"):
        for value in (0.0, -1.0, math.nan, math.inf):
            cases.append(pytest.param(
                set_scalar(key, value), ValueError,
                rf"^invalid {key} in group 1: {re_float(value)} "
                r"\(expected a finite value in \(0.0, inf\)\)$", id=f"{key}-{value}"))

    def ema_momentum(value):
        def mutate(batches):
            add_extras(batches)
            batches[1]["ema_momentum"] = value
        return mutate
    for value in (1.5, -0.1, math.nan):
        cases.append(pytest.param(
            ema_momentum(value), ValueError,
            rf"^invalid ema_momentum in group 1: {re_float(value)} "
            r"\(expected a finite value in \[0.0, 1.0\]\)$", id=f"ema_momentum-{value}"))

    def ema_is_param(batches):
        add_extras(batches)
        batches[1]["emas"][0] = batches[1]["params"][0]
    cases.append(pytest.param(ema_is_param, ValueError,
                              "^" + shares(r"ema of params\[0\] in group 1", r"params\[0\] in group 1"),
                              id="ema-is-its-param"))

    def grad_is_grad_accum(batches):
        add_extras(batches)
        batches[0]["grads"][1] = batches[1]["grad_accums"][1]
    cases.append(pytest.param(grad_is_grad_accum, ValueError,
                              r"^grad of params\[1\] in group 0 shares memory with grad_accum of "
                              r"params\[1\] in group 1, which the step writes$",
                              id="grad-aliases-grad_accum-of-another-batch"))

    for step in (0, -1):
        for batch in (0, 1):
            cases.append(pytest.param(
                set_scalar("step", step, batch), ValueError,
                rf"^invalid step in group {batch}: {step} \(steps count from 1\)$",
                id=f"step-{step}-group{batch}"))
    cases.append(pytest.param(set_scalar("eps_mode", "tf"), ValueError,
                              r"^invalid eps_mode in group 1: 'tf' \(expected 'torch' or 'keras'\)$",
                              id="eps_mode-tf"))
    cases.append(pytest.param(set_scalar("decay_mode", "decoupled"), ValueError,
                              r"^invalid decay_mode in group 1: 'decoupled' \(expected 'lr' or 'independent'\)$",
                              id="decay_mode-decoupled"))

    # Overlaps among written buffers, and between grads and written buffers.
    def same_param_twice(batches):
        for field in BUFFERS:
            batches[1][field][1] = batches[1][field][0].copy()
        batches[1]["params"][1] = batches[1]["params"][0]
    cases.append(pytest.param(same_param_twice, ValueError,
                              shares(r"params\[1\] in group 1", r"params\[0\] in group 1") +
                              "; buffers written by a step must not overlap$", id="same-param-twice"))

    def overlapping_views(batches):
        big = f32(np.ones(20))
        batches[1]["params"][0] = big[:5]
        batches[1]["params"][1] = big[4:16].reshape(3, 4)
    cases.append(pytest.param(overlapping_views, ValueError,
                              r"^params\[1\] in group 1 shares memory with params\[0\] in group 1; "
                              r"buffers written by a step must not overlap$", id="overlapping-param-views"))

    def grad_is_param(batches):
        batches[1]["grads"][1] = batches[1]["params"][1]
    cases.append(pytest.param(grad_is_param, ValueError,
                              r"^grad of params\[1\] in group 1 shares memory with params\[1\] in "
                              r"group 1, which the step writes$", id="grad-aliases-its-param"))

    def grad_views_param(batches):
        batches[1]["grads"][0] = batches[1]["params"][1].reshape(-1)[7:]
    cases.append(pytest.param(grad_views_param, ValueError,
                              r"^grad of params\[0\] in group 1 shares memory with params\[1\] in "
                              r"group 1, which the step writes$", id="grad-views-another-param"))

    def grad_is_exp_avg_sq(batches):
        batches[1]["grads"][1] = batches[1]["exp_avg_sqs"][1]
    cases.append(pytest.param(grad_is_exp_avg_sq, ValueError,
                              r"^grad of params\[1\] in group 1 shares memory with exp_avg_sq of "
                              r"params\[1\] in group 1, which the step writes$",
                              id="grad-aliases-exp_avg_sq"))

    def shared_exp_avg(batches):
        buf = f32(np.zeros(12))
        batches[1]["exp_avgs"][0] = buf[:5]
        batches[1]["exp_avgs"][1] = buf.reshape(3, 4)
    cases.append(pytest.param(shared_exp_avg, ValueError,
                              r"^exp_avg of params\[1\] in group 1 shares memory with exp_avg of "
                              r"params\[0\] in group 1; buffers written by a step must not overlap$",
                              id="exp_avgs-of-two-params-share-memory"))

    def exp_avg_is_other_param(batches):
        batches[1]["exp_avgs"][1] = batches[1]["params"][1]
    cases.append(pytest.param(exp_avg_is_other_param, ValueError,
                              "^" + shares(r"exp_avg of params\[1\] in group 1", r"params\[1\] in group 1"),
                              id="exp_avg-is-its-param"))

    def max_is_exp_avg_sq(batches):
        batches[1]["max_exp_avg_sqs"][0] = batches[1]["exp_avg_sqs"][0]
    cases.append(pytest.param(max_is_exp_avg_sq, ValueError,
                              "^" + shares(r"max_exp_avg_sq of params\[0\] in group 1",
                                           r"exp_avg_sq of params\[0\] in group 1"),
                              id="max_exp_avg_sq-is-exp_avg_sq"))

    def across_batches_param(batches):
        batches[1]["params"][0] = batches[0]["params"][0]
    cases.append(pytest.param(across_batches_param, ValueError,
                              "^" + shares(r"params\[0\] in group 1", r"params\[0\] in group 0"),
                              id="same-param-in-two-batches"))

    def across_batches_exp_avg(batches):
        batches[1]["exp_avgs"][1] = batches[0]["exp_avgs"][1]
    cases.append(pytest.param(across_batches_exp_avg, ValueError,
                              "^" + shares(r"exp_avg of params\[1\] in group 1",
                                           r"exp_avg of params\[1\] in group 0"),
                              id="exp_avg-shared-across-batches"))

    def across_batches_grad(batches):
        batches[1]["grads"][1] = batches[0]["exp_avg_sqs"][1]
    cases.append(pytest.param(across_batches_grad, ValueError,
                              r"^grad of params\[1\] in group 1 shares memory with exp_avg_sq of "
                              r"params\[1\] in group 0, which the step writes$",
                              id="grad-aliases-state-of-another-batch"))
    return cases


def re_float(value: float) -> str:
    """How the binding prints a float (Python's repr), escaped for a regex."""
    return re.escape(repr(float(value)))


@pytest.mark.parametrize(("mutate", "exc", "message"), core_cases())
def test_core_rejects_bad_batch_and_writes_nothing(mutate, exc, message):
    batches = core_batches()
    mutate(batches)
    before = snapshot_bytes(batches)
    with pytest.raises(exc, match=message):
        _core.adam_step(batches)
    assert snapshot_bytes(batches) == before


@pytest.mark.parametrize(("key", "value"), [("step", 1.5), ("step", True), ("group", "a"),
                                            ("indices", [0.5, 1]), ("amsgrad", "yes")])
def test_core_rejects_a_wrongly_typed_batch_entry_with_type_error(key, value):
    batches = core_batches()
    batches[1][key] = value
    before = snapshot_bytes(batches)
    with pytest.raises(TypeError, match=key):
        _core.adam_step(batches)
    assert snapshot_bytes(batches) == before


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_core_rejects_a_bad_global_clipnorm_and_writes_nothing(value):
    batches = core_batches()
    before = snapshot_bytes(batches)
    with pytest.raises(ValueError, match=rf"^invalid global_clipnorm: {re_float(value)} "
                                         r"\(expected a finite value in \(0.0, inf\)\)$"):
        _core.adam_step(batches, global_clipnorm=value)
    assert snapshot_bytes(batches) == before


def test_valid_batches_change_every_written_buffer():
    # The control for the test above: the same batches, unmutated, are written.
    batches = core_batches()
    before = {name: [a.copy() for a in batches[g][name]] for g in (0, 1) for name in WRITTEN}
    grads = [a.copy() for b in batches for a in b["grads"]]
    _core.adam_step(batches)
    for g in (0, 1):
        for name in ("params", "exp_avgs", "exp_avg_sqs"):
            for old, new in zip(before[name], batches[g][name]):
                assert not np.array_equal(old, new), name
    assert all(np.array_equal(a, b) for a, b in zip(grads, (a for b in batches for a in b["grads"])))


def test_core_rejects_a_batch_list_that_is_not_a_list():
    batches = core_batches()
    before = snapshot_bytes(batches)
    with pytest.raises(TypeError, match=r"^adam_step: expected a list of batch dicts$"):
        _core.adam_step(batches[0])
    with pytest.raises(TypeError, match=r"^adam_step: each batch must be a dict$"):
        _core.adam_step([batches[0], list(batches[1].items())])
    assert snapshot_bytes(batches) == before


def test_core_accepts_read_only_grads_and_the_same_grad_for_two_params():
    # Grads are only read, so neither is an overlap or a writeability error.
    batches = core_batches()
    expected = core_batches()
    shared = batches[1]["grads"][0].copy()
    shared.flags.writeable = False
    batches[1]["grads"][1] = expected[1]["grads"][1] = np.resize(shared, (3, 4)).copy()
    batches[1]["grads"][1].flags.writeable = False
    batches[0]["grads"][0] = batches[1]["grads"][0] = shared
    expected[0]["grads"][0] = expected[1]["grads"][0] = shared.copy()
    _core.adam_step(batches)
    _core.adam_step(expected)
    for b, e in zip(batches, expected):
        for name in WRITTEN:
            for x, y in zip(b[name], e[name]):
                assert x.tobytes() == y.tobytes()


def test_core_ignores_max_exp_avg_sqs_without_amsgrad():
    batches = core_batches(amsgrad=False)
    for b in batches:
        del b["max_exp_avg_sqs"]
    _core.adam_step(batches)


# --------------------------------------------------------------------------
# The NumPy classes: constructor checks, step() checks, bad edits of
# param_groups between steps. Every rejected step must leave params, state and
# step counts as they were, in every group.


def make_opt(cls=cpuadam.AdamW, amsgrad=True, seed=0):
    rng = np.random.default_rng(seed)
    groups = [
        {"params": [f32(rng.standard_normal(s)) for s in SHAPES]},
        {"params": [f32(rng.standard_normal(s)) for s in SHAPES], "lr": 1e-2},
    ]
    return cls(groups, lr=1e-3, weight_decay=0.01, amsgrad=amsgrad)


def good_grads(opt, seed):
    rng = np.random.default_rng(seed)
    return [f32(rng.standard_normal(p.shape)) for g in opt.param_groups for p in g["params"]]


def opt_snapshot(opt):
    params = [p.tobytes() for g in opt.param_groups for p in g["params"]]
    state = {k: {key: v.tobytes() if isinstance(v, np.ndarray) else v for key, v in s.items()}
             for k, s in opt.state.items()}
    return params, state


def assert_still_steps_like_a_twin(opt, twin, seed=99):
    """After a rejection the optimizer goes on exactly as one that never saw it."""
    opt.step(good_grads(opt, seed))
    twin.step(good_grads(twin, seed))
    assert opt_snapshot(opt) == opt_snapshot(twin)


def grad_case(make, exc, message, id, at=3):
    """A step whose grad for flat param ``at`` (params[1] in group 1 by default) is ``make(grads, opt)``."""
    def run(opt, grads):
        grads[at] = make(grads, opt)
        return grads
    return pytest.param(run, exc, message, id=id)


GRAD_CASES = [
    grad_case(lambda g, o: g[3].astype(np.float64), TypeError,
              r"^grad of params\[1\] in group 1: expected a float32 array, got float64$", id="grad-float64"),
    grad_case(lambda g, o: g[3].astype(np.int32), TypeError,
              r"^grad of params\[1\] in group 1: expected a float32 array, got int32$", id="grad-int32"),
    grad_case(lambda g, o: g[3].tolist(), TypeError,
              r"^grad of params\[1\] in group 1: expected a numpy.ndarray, got list$", id="grad-list"),
    grad_case(lambda g, o: g[3].reshape(4, 3), ValueError,
              r"^grad of params\[1\] in group 1: shape \(4, 3\) does not match "
              r"params\[1\] in group 1's shape \(3, 4\)$", id="grad-shape"),
    grad_case(lambda g, o: np.ascontiguousarray(g[3].T).T, ValueError,
              r"^grad of params\[1\] in group 1: expected a C-contiguous array$", id="grad-transposed"),
    grad_case(lambda g, o: misaligned_like(g[3]), ValueError,
              r"^grad of params\[1\] in group 1: data is not aligned to its element size$",
              id="grad-misaligned"),
    grad_case(lambda g, o: o.param_groups[1]["params"][1], ValueError,
              r"^grad of params\[1\] in group 1 shares memory with params\[1\] in group 1, "
              r"which the step writes$", id="grad-is-its-param"),
    grad_case(lambda g, o: o.param_groups[0]["params"][0], ValueError,
              r"^grad of params\[0\] in group 1 shares memory with params\[0\] in group 0, "
              r"which the step writes$", at=2, id="grad-is-a-param-of-group-0"),
]


@pytest.mark.parametrize("warm_steps", [0, 2], ids=["first-step", "after-two-steps"])
@pytest.mark.parametrize(("make_grads", "exc", "message"), GRAD_CASES)
def test_step_rejects_bad_grad_in_group_1_and_changes_nothing(make_grads, exc, message, warm_steps):
    opt, twin = make_opt(), make_opt()
    for k in range(warm_steps):
        opt.step(good_grads(opt, k))
        twin.step(good_grads(twin, k))
    before = opt_snapshot(opt)
    with pytest.raises(exc, match=message):
        opt.step(make_grads(opt, good_grads(opt, 50)))
    assert opt_snapshot(opt) == before
    if warm_steps == 0:
        assert opt.state == {}
    assert_still_steps_like_a_twin(opt, twin)


@pytest.mark.parametrize("warm_steps", [0, 2], ids=["first-step", "after-two-steps"])
def test_step_rejects_a_grad_that_is_the_optimizers_own_state(warm_steps):
    opt, twin = make_opt(), make_opt()
    opt.step(good_grads(opt, 0))
    twin.step(good_grads(twin, 0))
    for k in range(1, warm_steps):
        opt.step(good_grads(opt, k))
        twin.step(good_grads(twin, k))
    grads = good_grads(opt, 50)
    grads[2] = opt.state[0]["exp_avg"]
    before = opt_snapshot(opt)
    with pytest.raises(ValueError, match=r"^grad of params\[0\] in group 1 shares memory with "
                                         r"exp_avg of params\[0\] in group 0, which the step writes$"):
        opt.step(grads)
    assert opt_snapshot(opt) == before
    assert_still_steps_like_a_twin(opt, twin)


@pytest.mark.parametrize(("grads", "exc", "message"), [
    pytest.param(lambda g: g[:3], ValueError, r"^step\(\) got 3 grads for 4 params$", id="too-few"),
    pytest.param(lambda g: g + [g[0]], ValueError, r"^step\(\) got 5 grads for 4 params$", id="too-many"),
    pytest.param(lambda g: [], ValueError, r"^step\(\) got 0 grads for 4 params$", id="none"),
    pytest.param(lambda g: 5, TypeError, r"^step\(\) expects a list of arrays, got int$", id="not-iterable"),
])
def test_step_rejects_the_wrong_number_of_grads(grads, exc, message):
    opt, twin = make_opt(), make_opt()
    opt.step(good_grads(opt, 0))
    twin.step(good_grads(twin, 0))
    before = opt_snapshot(opt)
    with pytest.raises(exc, match=message):
        opt.step(grads(good_grads(opt, 1)))
    assert opt_snapshot(opt) == before
    assert_still_steps_like_a_twin(opt, twin)


def _wrong_shape(opt):
    opt.state[3]["exp_avg"] = f32(np.zeros(12))


def _read_only(opt):
    opt.state[3]["exp_avg_sq"].flags.writeable = False


def _float64(opt):
    opt.state[3]["max_exp_avg_sq"] = opt.state[3]["max_exp_avg_sq"].astype(np.float64)


def _shared_across_groups(opt):
    opt.state[3]["exp_avg"] = opt.state[1]["exp_avg"]


def _shared_in_group(opt):
    opt.state[0]["exp_avg_sq"] = opt.state[1]["exp_avg_sq"].reshape(-1)[:5]


TAMPERED_STATE = {
    "wrong-shape": (_wrong_shape, ValueError,
                    r"^exp_avg of params\[1\] in group 1: shape \(12,\) does not match "
                    r"params\[1\] in group 1's shape \(3, 4\)$"),
    "read-only": (_read_only, ValueError,
                  r"^exp_avg_sq of params\[1\] in group 1: expected a writeable array, got a read-only one$"),
    "float64": (_float64, TypeError,
                r"^max_exp_avg_sq of params\[1\] in group 1: expected a float32 array, got float64$"),
    "shared-across-groups": (_shared_across_groups, ValueError,
                             "^" + shares(r"exp_avg of params\[1\] in group 1",
                                          r"exp_avg of params\[1\] in group 0")),
    "shared-in-a-group": (_shared_in_group, ValueError,
                          "^" + shares(r"exp_avg_sq of params\[0\] in group 0",
                                       r"exp_avg_sq of params\[1\] in group 0")),
}


@pytest.mark.parametrize("case", list(TAMPERED_STATE))
def test_step_rejects_state_buffers_replaced_by_bad_ones(case):
    opt = make_opt()
    opt.step(good_grads(opt, 0))
    tamper, exc, message = TAMPERED_STATE[case]
    tamper(opt)
    before = opt_snapshot(opt)
    with pytest.raises(exc, match=message):
        opt.step(good_grads(opt, 1))
    assert opt_snapshot(opt) == before


def test_step_rejects_a_param_made_read_only_after_construction():
    opt, twin = make_opt(), make_opt()
    opt.step(good_grads(opt, 0))
    twin.step(good_grads(twin, 0))
    opt.param_groups[1]["params"][1].flags.writeable = False
    before = opt_snapshot(opt)
    with pytest.raises(ValueError, match=r"^params\[1\] in group 1: expected a writeable array, "
                                         r"got a read-only one$"):
        opt.step(good_grads(opt, 1))
    assert opt_snapshot(opt) == before
    opt.param_groups[1]["params"][1].flags.writeable = True
    assert_still_steps_like_a_twin(opt, twin)


BAD_GROUP_EDITS = [
    ("lr", math.nan, ValueError, r"Invalid learning rate in group {g}: nan"),
    ("lr", math.inf, ValueError, r"Invalid learning rate in group {g}: inf"),
    ("lr", -1e-3, ValueError, r"Invalid learning rate in group {g}: -0.001"),
    ("lr", "0.1", TypeError, r"Invalid learning rate in group {g}: expected a real number, got str"),
    ("lr", True, TypeError, r"Invalid learning rate in group {g}: expected a real number, got bool"),
    ("betas", (1.0, 0.999), ValueError, r"Invalid beta parameter at index 0 in group {g}: 1.0"),
    ("betas", (-0.1, 0.999), ValueError, r"Invalid beta parameter at index 0 in group {g}: -0.1"),
    ("betas", (0.9, 1.0), ValueError, r"Invalid beta parameter at index 1 in group {g}: 1.0"),
    ("betas", (0.9, math.nan), ValueError, r"Invalid beta parameter at index 1 in group {g}: nan"),
    ("betas", (0.9,), ValueError,
     r"Invalid betas in group {g}: expected a pair \(beta1, beta2\), got \(0.9,\)"),
    ("eps", -1e-8, ValueError, r"Invalid epsilon value in group {g}: -1e-08"),
    ("eps", math.nan, ValueError, r"Invalid epsilon value in group {g}: nan"),
    ("weight_decay", -0.01, ValueError, r"Invalid weight_decay value in group {g}: -0.01"),
    ("weight_decay", math.inf, ValueError, r"Invalid weight_decay value in group {g}: inf"),
    ("eps_mode", "tf", ValueError,
     r"Invalid eps_mode in group {g}: 'tf' \(expected one of 'torch', 'keras'\)"),
    ("decay_mode", "l2", ValueError,
     r"Invalid decay_mode in group {g}: 'l2' \(expected one of 'lr', 'independent'\)"),
]


@pytest.mark.parametrize("group", [0, 1])
@pytest.mark.parametrize(("key", "value", "exc", "message"), BAD_GROUP_EDITS,
                         ids=[f"{k}-{v}" for k, v, _, _ in BAD_GROUP_EDITS])
def test_bad_hyperparameter_edited_into_a_group_rejects_the_step(key, value, exc, message, group):
    opt, twin = make_opt(), make_opt()
    opt.step(good_grads(opt, 0))
    twin.step(good_grads(twin, 0))
    good = opt.param_groups[group][key]
    opt.param_groups[group][key] = value
    before = opt_snapshot(opt)
    with pytest.raises(exc, match="^" + message.format(g=group) + "$"):
        opt.step(good_grads(opt, 1))
    assert opt_snapshot(opt) == before
    opt.param_groups[group][key] = good
    assert_still_steps_like_a_twin(opt, twin)


def test_amsgrad_switched_on_in_a_rejected_step_creates_no_state():
    opt, twin = make_opt(amsgrad=False), make_opt(amsgrad=False)
    opt.step(good_grads(opt, 0))
    twin.step(good_grads(twin, 0))
    opt.param_groups[0]["amsgrad"] = True
    opt.param_groups[1]["lr"] = -1.0
    before = opt_snapshot(opt)
    with pytest.raises(ValueError, match=r"^Invalid learning rate in group 1: -1.0$"):
        opt.step(good_grads(opt, 1))
    assert opt_snapshot(opt) == before
    assert all("max_exp_avg_sq" not in s for s in opt.state.values())
    opt.param_groups[0]["amsgrad"] = False
    opt.param_groups[1]["lr"] = 1e-2
    assert_still_steps_like_a_twin(opt, twin)


CONSTRUCTOR_CASES = [
    ({"lr": -1.0}, ValueError, r"^Invalid learning rate: -1.0$"),
    ({"lr": math.nan}, ValueError, r"^Invalid learning rate: nan$"),
    ({"lr": math.inf}, ValueError, r"^Invalid learning rate: inf$"),
    ({"lr": "fast"}, TypeError, r"^Invalid learning rate: expected a real number, got str$"),
    ({"betas": (1.0, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: 1.0$"),
    ({"betas": (-0.5, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: -0.5$"),
    ({"betas": (0.9, 1.0)}, ValueError, r"^Invalid beta parameter at index 1: 1.0$"),
    ({"betas": (0.9, -1e-3)}, ValueError, r"^Invalid beta parameter at index 1: -0.001$"),
    ({"betas": (0.9, 0.99, 0.999)}, ValueError, r"^Invalid betas: expected a pair \(beta1, beta2\)"),
    ({"eps": -1e-8}, ValueError, r"^Invalid epsilon value: -1e-08$"),
    ({"eps": math.nan}, ValueError, r"^Invalid epsilon value: nan$"),
    ({"weight_decay": -0.1}, ValueError, r"^Invalid weight_decay value: -0.1$"),
    ({"weight_decay": math.inf}, ValueError, r"^Invalid weight_decay value: inf$"),
    ({"eps_mode": "tf"}, ValueError, r"^Invalid eps_mode: 'tf' \(expected one of 'torch', 'keras'\)$"),
]


@pytest.mark.parametrize("cls", [cpuadam.AdamW, cpuadam.Adam], ids=["AdamW", "Adam"])
@pytest.mark.parametrize(("kwargs", "exc", "message"), CONSTRUCTOR_CASES,
                         ids=[f"{k}={v}" for kw, _, _ in CONSTRUCTOR_CASES for k, v in kw.items()])
def test_constructor_rejects_bad_hyperparameter_with_torchs_wording(cls, kwargs, exc, message):
    p = f32(np.ones(3))
    with pytest.raises(exc, match=message):
        cls([p], **kwargs)
    assert p.tobytes() == f32(np.ones(3)).tobytes()


def test_adamw_rejects_an_unknown_decay_mode():
    message = r"^Invalid decay_mode: 'l2' \(expected one of 'lr', 'independent'\)$"
    with pytest.raises(ValueError, match=message):
        cpuadam.AdamW([f32(np.ones(3))], decay_mode="l2")


@pytest.mark.parametrize("cls", [cpuadam.AdamW, cpuadam.Adam], ids=["AdamW", "Adam"])
def test_constructor_names_the_group_with_the_bad_hyperparameter(cls):
    groups = [{"params": [f32(np.ones(3))]}, {"params": [f32(np.ones(2))], "betas": (0.9, 1.0)}]
    with pytest.raises(ValueError, match=r"^Invalid beta parameter at index 1 in group 1: 1.0$"):
        cls(groups)


def transposed(shape):
    return np.ascontiguousarray(np.ones(shape[::-1], np.float32)).T


SUPPORTED = r"float32, float16 or bfloat16 \(ml_dtypes\)"
PARAM_CASES = [
    pytest.param(lambda: np.ones(3), TypeError,
                 rf"^params\[1\] in group 0: expected a {SUPPORTED} array, got float64$", id="float64"),
    pytest.param(lambda: np.ones(3, np.int32), TypeError,
                 rf"^params\[1\] in group 0: expected a {SUPPORTED} array, got int32$", id="int32"),
    pytest.param(lambda: [1.0, 2.0], TypeError,
                 r"^params\[1\] in group 0: expected a numpy.ndarray, got list$", id="list"),
    pytest.param(lambda: np.float32(1.0), TypeError,
                 r"^params\[1\] in group 0: expected a numpy.ndarray, got float32$", id="numpy-scalar"),
    pytest.param(lambda: transposed((3, 4)), ValueError,
                 r"^params\[1\] in group 0: expected a C-contiguous array$", id="transposed"),
    pytest.param(lambda: f32(np.ones(8))[::2], ValueError,
                 r"^params\[1\] in group 0: expected a C-contiguous array$", id="strided"),
    pytest.param(lambda: read_only_like(f32(np.ones(3))), ValueError,
                 r"^params\[1\] in group 0: expected a writeable array, got a read-only one$",
                 id="read-only"),
    pytest.param(lambda: misaligned_like(f32(np.ones(3))), ValueError,
                 r"^params\[1\] in group 0: data is not aligned to its element size$", id="misaligned"),
]


@pytest.mark.parametrize("cls", [cpuadam.AdamW, cpuadam.Adam], ids=["AdamW", "Adam"])
@pytest.mark.parametrize(("make", "exc", "message"), PARAM_CASES)
def test_constructor_rejects_a_param_the_core_cannot_update(cls, make, exc, message):
    with pytest.raises(exc, match=message):
        cls([f32(np.ones(2)), make()])


def test_add_param_group_rejects_a_bad_param_and_keeps_the_groups():
    opt = make_opt()
    opt.step(good_grads(opt, 0))
    groups_before = [dict(g) for g in opt.param_groups]
    before = opt_snapshot(opt)
    with pytest.raises(TypeError, match=rf"^params\[0\] in group 2: expected a {SUPPORTED} array, got float64$"):
        opt.add_param_group({"params": [np.ones(3)]})
    with pytest.raises(ValueError, match=r"^Invalid learning rate in group 2: -1$"):
        opt.add_param_group({"params": [f32(np.ones(3))], "lr": -1})
    with pytest.raises(ValueError, match=r"^param_group must have a 'params' entry$"):
        opt.add_param_group({"lr": 0.1})
    with pytest.raises(TypeError, match=r"^param_group must be a dict, got list$"):
        opt.add_param_group([f32(np.ones(3))])
    assert len(opt.param_groups) == 2
    assert all(g == h for g, h in zip(opt.param_groups, groups_before))
    assert opt_snapshot(opt) == before


OVERLAP_CASES = [
    pytest.param(lambda a, b, c: [{"params": [a, b]}, {"params": [c, a]}],
                 r"^params\[1\] in group 1 shares memory with params\[0\] in group 0",
                 id="same-array-in-two-groups"),
    pytest.param(lambda a, b, c: [a, b, a],
                 r"^params\[2\] in group 0 shares memory with params\[0\] in group 0",
                 id="same-array-twice-in-one-group"),
    pytest.param(lambda a, b, c: [a[:4], a[3:]],
                 r"^params\[1\] in group 0 shares memory with params\[0\] in group 0",
                 id="overlapping-views"),
    pytest.param(lambda a, b, c: [a, a.reshape(2, 3)],
                 "^" + shares(r"params\[1\] in group 0", r"params\[0\] in group 0"),
                 id="reshaped-view"),
]


@pytest.mark.parametrize(("params", "message"), OVERLAP_CASES)
def test_constructor_rejects_params_that_share_memory(params, message):
    a, b, c = (f32(np.arange(6)) for _ in range(3))
    with pytest.raises(ValueError, match=message):
        cpuadam.AdamW(params(a, b, c))


def test_add_param_group_rejects_a_param_already_optimized():
    opt = make_opt()
    message = r"^params\[0\] in group 2 shares memory with params\[1\] in group 1"
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [opt.param_groups[1]["params"][1]]})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize(("params", "exc", "message"), [
    pytest.param([], ValueError, r"^optimizer got an empty parameter list$", id="empty"),
    pytest.param(f32(np.ones(3)), TypeError, r"iterable of arrays or dicts, but got ndarray$",
                 id="bare-array"),
    pytest.param({"params": []}, TypeError, r"iterable of arrays or dicts, but got dict$", id="bare-dict"),
    pytest.param(3, TypeError, r"iterable of arrays or dicts, but got int$", id="int"),
    pytest.param([f32(np.ones(3)), {"params": []}], TypeError, r"^params must be all arrays or all dicts",
                 id="mixed"),
    pytest.param([{"params": {f32(np.ones(1)).tobytes()}}], TypeError,
                 r"ordering of sets is not deterministic",
                 id="set-of-params"),
    pytest.param([{"lr": 0.1}], ValueError, r"^param_group must have a 'params' entry$",
                 id="group-without-params"),
])
def test_constructor_rejects_malformed_params(params, exc, message):
    with pytest.raises(exc, match=message):
        cpuadam.AdamW(params)


# --------------------------------------------------------------------------
# step_buffers: one-element arrays (torch's 'step' tensors) the core writes the
# batch's step count into after an applied update.


def test_step_buffers_receive_the_step_count_of_their_batch():
    batches = core_batches()
    steps = [[np.zeros((), np.float32), np.zeros(1, np.float64)] for _ in batches]
    for b, s in zip(batches, steps):
        b["step_buffers"] = s
    batches[1]["step"] = 7
    _core.adam_step(batches)
    assert [float(a.reshape(-1)[0]) for s in steps for a in s] == [3.0, 3.0, 7.0, 7.0]


@pytest.mark.parametrize(("bad", "exc", "message"), [
    (np.zeros((), np.int32), TypeError, r"^step_buffers\[1\] in group 1: expected a float32 or float64 array$"),
    (np.zeros(2, np.float32), ValueError, r"^step_buffers\[1\] in group 1: expected a writeable array of one element$"),
    (read_only_like(np.zeros((), np.float32)), ValueError,
     r"^step_buffers\[1\] in group 1: expected a writeable array of one element$"),
    ([0.0], TypeError, r"^step_buffers\[1\] in group 1: expected a numpy.ndarray$"),
], ids=["int32", "two-elements", "read-only", "not-an-array"])
def test_a_bad_step_buffer_is_rejected_and_nothing_is_written(bad, exc, message):
    batches = core_batches()
    for b in batches:
        b["step_buffers"] = [np.full((), 5.0, np.float32), np.full((), 5.0, np.float32)]
    batches[1]["step_buffers"][1] = bad
    before = snapshot_bytes(batches)
    with pytest.raises(exc, match=message):
        _core.adam_step(batches)
    assert snapshot_bytes(batches) == before


def test_step_buffers_are_left_alone_by_a_skipped_step():
    batches = core_batches()
    batches[0]["grads"][0][0] = np.inf
    for b in batches:
        b["step_buffers"] = [np.full((), 5.0, np.float32), np.full((), 5.0, np.float32)]
    before = snapshot_bytes(batches)
    result = _core.adam_step(batches, skip_nonfinite=True)
    assert result["applied"] is False
    assert snapshot_bytes(batches) == before
