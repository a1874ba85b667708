# SPDX-License-Identifier: MIT
"""Random inputs at the NumPy and torch boundaries: each call matches the fp64 oracle or is refused with nothing written."""

from __future__ import annotations

import math
import os
import pickle
import signal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import adam_step as reference_adam_step

import cpuadam
from cpuadam import _core

EPS32 = float(np.finfo(np.float32).eps)
# One step's error against the oracle, per element: a few float32 roundings of
# the param and of the update (see the derivation in test_kernel.py, k = 1).
C = 4.0

# Sizes around the lane counts (4, 8, 16 float32), odd primes, 0 and 1.
SIZES = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 101, 257]
BAD_DTYPES = ["float64", "int32", "complex64", "bool", "float16", "uint16"]
# Layouts of one buffer; "plain" is a fresh C-contiguous float32 array.
LAYOUTS = ["plain", "fortran", "strided", "negative_stride", "broadcast", "read_only", "unaligned",
           "view_of_shared_base", "big_endian"]
ALIASES = ["none", "param_is_grad", "exp_avg_is_param", "same_param_twice", "state_overlaps_other_param",
           "same_grad_twice"]
# Hyperparameters the binding must refuse (ValueError), whatever the rest.
BAD_SCALARS = {"lr": [-1.0, -1e-300, math.inf, math.nan], "eps": [-1e-8, math.inf, math.nan],
               "beta1": [-0.1, 1.0, 1.5, math.nan], "beta2": [1.0, -0.5, math.inf],
               "weight_decay": [-0.01, math.inf, math.nan]}
GOOD_LR = [0.0, -0.0, 5e-324, 1e-45, 1e-3, 0.1, 3.0]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def in_child(fn):
    """Runs fn() in a forked child; returns its result, or re-raises its TypeError/ValueError.

    A crash (a signal, or any other exit) fails the test instead of killing the
    interpreter running the suite.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_fd)
        try:
            try:
                payload = ("ok", fn())
            except (TypeError, ValueError) as e:
                payload = (type(e).__name__, str(e), getattr(e, "after", None))
            with os.fdopen(write_fd, "wb") as f:
                pickle.dump(payload, f)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the call crashed the process: {signal.Signals(os.WTERMSIG(status)).name}")
    assert os.WEXITSTATUS(status) == 0 and data, "the child died without a result"
    payload = pickle.loads(data)
    if payload[0] == "ok":
        return payload[1]
    err = {"TypeError": TypeError, "ValueError": ValueError}[payload[0]](payload[1])
    err.after = payload[2]
    raise err


def make_layout(values: np.ndarray, layout: str, shared: list) -> np.ndarray:
    """A float32 array holding ``values`` (or an unusable stand-in) in the given layout."""
    if layout == "fortran":
        return np.asfortranarray(values.reshape(values.shape[0], -1) if values.ndim else values)
    if layout == "strided":
        big = np.zeros(values.size * 2, np.float32)
        big[::2] = values.ravel()
        return big[::2].reshape(values.shape)
    if layout == "negative_stride":
        return np.ascontiguousarray(values.ravel()[::-1])[::-1].reshape(values.shape)
    if layout == "broadcast":
        return np.broadcast_to(values.ravel()[:1] if values.size else values, values.shape)
    if layout == "read_only":
        out = values.copy()
        out.flags.writeable = False
        return out
    if layout == "unaligned":
        raw = np.zeros(values.nbytes + 1, np.uint8)
        out = raw[1:].view(np.float32).reshape(values.shape)
        out[...] = values
        return out
    if layout == "view_of_shared_base":
        # Disjoint views into one base, cut at an odd offset after the previous.
        base = shared[0]
        start = shared[1] + 3
        shared[1] = start + values.size
        out = base[start:start + values.size].reshape(values.shape)
        out[...] = values
        return out
    if layout == "big_endian":
        return values.astype(">f4")
    return values.copy()


def extent(a: np.ndarray) -> tuple[int, int]:
    """The bytes the binding treats as the buffer: [data, data + nbytes)."""
    lo = a.__array_interface__["data"][0]
    return lo, lo + a.nbytes


def expected_refusal(lists: dict, written: tuple) -> type | None:
    """What the binding must raise for these buffers, from their properties alone."""
    n = len(lists["params"])
    if any(len(v) != n for v in lists.values()):
        return ValueError
    value_error = False
    for key, arrays in lists.items():
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.dtype.isnative:
                return TypeError
            if (not a.flags.c_contiguous or a.__array_interface__["data"][0] % 4
                    or (key in written and not a.flags.writeable) or a.shape != lists["params"][i].shape):
                value_error = True
    if value_error:
        return ValueError
    w = sorted(extent(a) for k in written if k in lists for a in lists[k] if a.size)
    if any(b[0] < a[1] for a, b in zip(w, w[1:])):
        return ValueError
    for g in lists["grads"]:
        lo, hi = extent(g)
        if g.size and any(lo < b and a < hi for a, b in w):
            return ValueError
    return None


FAULTS = ["none", "dtype", "layout", "alias", "length", "scalar"]


@st.composite
def adam_cases(draw, fault):
    count = draw(st.integers(1, 4))
    sizes = [draw(st.sampled_from(SIZES)) for _ in range(count)]
    # One 2-D tensor, so that Fortran order is a different layout.
    shapes = [(s,) for s in sizes] + ([(3, 5)] if draw(st.booleans()) else [])
    case = {
        "shapes": shapes, "fault": fault,
        "amsgrad": draw(st.booleans()), "maximize": draw(st.booleans()),
        "decoupled": draw(st.booleans()), "decay_mode": draw(st.sampled_from(["lr", "independent"])),
        "eps_mode": draw(st.sampled_from(["torch", "keras"])),
        "lr": draw(st.sampled_from(GOOD_LR)), "beta1": draw(st.sampled_from([0.0, 0.5, 0.9])),
        "beta2": draw(st.sampled_from([0.0, 0.9, 0.999])), "eps": draw(st.sampled_from([1e-8, 1e-3, 1e-45])),
        "weight_decay": draw(st.sampled_from([0.0, -0.0, 0.01, 0.5])),
        "grad_scale": draw(st.sampled_from([1.0, 0.5, -2.0, 0.0])),
        "step": draw(st.sampled_from([1, 2, 10, 10**6])),
        "buffer": draw(st.sampled_from(["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])),
        "tensor": draw(st.integers(0, len(shapes) - 1)),
        "dtype": draw(st.sampled_from(BAD_DTYPES)), "layout": draw(st.sampled_from(LAYOUTS)),
        "alias": draw(st.sampled_from(ALIASES)),
        "length_key": draw(st.sampled_from(["grads", "exp_avgs", "exp_avg_sqs"])),
        "scalar": draw(st.sampled_from([(k, v) for k, vs in BAD_SCALARS.items() for v in vs])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    return case


ADAM_WRITTEN = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def build_adam(case):
    """The batch of a case, and the float64 values it was made of."""
    rng = np.random.default_rng(case["seed"])
    shapes = case["shapes"]
    values = {
        "params": [rng.standard_normal(s).astype(np.float32) for s in shapes],
        "grads": [rng.standard_normal(s).astype(np.float32) for s in shapes],
        "exp_avgs": [(0.1 * rng.standard_normal(s)).astype(np.float32) for s in shapes],
        "exp_avg_sqs": [rng.uniform(0.0, 1.0, s).astype(np.float32) for s in shapes],
        "max_exp_avg_sqs": [rng.uniform(0.5, 1.5, s).astype(np.float32) for s in shapes],
    }
    keys = ("params", "grads", "exp_avgs", "exp_avg_sqs") + (("max_exp_avg_sqs",) if case["amsgrad"] else ())
    lists = {k: [a.copy() for a in values[k]] for k in keys}
    hyper = {k: case[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
                                  "decoupled", "decay_mode", "eps_mode", "grad_scale", "step")}
    key, i, fault = case["buffer"] if case["buffer"] in lists else "params", case["tensor"], case["fault"]
    if fault == "dtype":
        lists[key][i] = lists[key][i].astype(case["dtype"])
    elif fault == "layout":
        total = sum(int(np.prod(s)) + 3 for s in shapes) + 8
        lists[key][i] = make_layout(lists[key][i], case["layout"], [np.zeros(total, np.float32), 0])
    elif fault == "alias":
        a = case["alias"]
        if a == "param_is_grad":
            lists["grads"][i] = lists["params"][i]
        elif a == "exp_avg_is_param":
            lists["exp_avgs"][i] = lists["params"][i]
        elif a == "same_param_twice":
            lists["params"].append(lists["params"][i])
            lists["grads"].append(lists["grads"][i].copy())
            for k in keys[2:]:
                lists[k].append(lists[k][i].copy())
        elif a == "state_overlaps_other_param" and len(shapes) > 1:
            j = (i + 1) % len(shapes)
            if lists["params"][j].size and lists["exp_avg_sqs"][i].size:
                flat = lists["params"][j].reshape(-1)
                n = lists["exp_avg_sqs"][i].size
                if flat.size >= n:
                    lists["exp_avg_sqs"][i] = flat[:n].reshape(shapes[i])
        elif a == "same_grad_twice" and len(shapes) > 1:
            j = (i + 1) % len(shapes)
            if shapes[j] == shapes[i]:
                lists["grads"][j] = lists["grads"][i]
    elif fault == "length":
        lists[case["length_key"]] = lists[case["length_key"]][:-1] or [np.zeros(1, np.float32)] * 2
    elif fault == "scalar":
        name, value = case["scalar"]
        hyper[name] = value
    return dict(lists, **hyper), lists


def scalar_refusal(batch) -> type | None:
    ok = (math.isfinite(batch["lr"]) and batch["lr"] >= 0 and math.isfinite(batch["eps"]) and batch["eps"] >= 0
          and 0 <= batch["beta1"] < 1 and 0 <= batch["beta2"] < 1
          and math.isfinite(batch["weight_decay"]) and batch["weight_decay"] >= 0)
    return None if ok else ValueError


def check_against_reference(batch: dict, before: dict, after: dict) -> None:
    hyper = {k: batch[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
                                   "decoupled", "decay_mode", "eps_mode", "grad_scale")}
    for i in range(len(before["params"])):
        p = before["params"][i].astype(np.float64)
        state = {"exp_avg": before["exp_avgs"][i].astype(np.float64),
                 "exp_avg_sq": before["exp_avg_sqs"][i].astype(np.float64)}
        if batch["amsgrad"]:
            state["max_exp_avg_sq"] = before["max_exp_avg_sqs"][i].astype(np.float64)
        old_p = p.copy()
        reference_adam_step(p, before["grads"][i].astype(np.float64), state, step=batch["step"], **hyper)
        g = np.abs(before["grads"][i].astype(np.float64)) * abs(hyper["grad_scale"])
        if not hyper["decoupled"]:
            g = g + hyper["weight_decay"] * np.abs(old_p)
        scales = {"params": np.abs(old_p) + np.abs(p) + hyper["lr"],
                  "exp_avgs": np.abs(state["exp_avg"]) + np.abs(before["exp_avgs"][i]) + g,
                  "exp_avg_sqs": state["exp_avg_sq"] + before["exp_avg_sqs"][i] + g * g}
        wants = {"params": p, "exp_avgs": state["exp_avg"], "exp_avg_sqs": state["exp_avg_sq"]}
        if batch["amsgrad"]:
            scales["max_exp_avg_sqs"] = scales["exp_avg_sqs"] + before["max_exp_avg_sqs"][i]
            wants["max_exp_avg_sqs"] = state["max_exp_avg_sq"]
        for key, want in wants.items():
            got = after[key][i].astype(np.float64)
            err = np.abs(got - want)
            ok = (err <= C * EPS32 * scales[key]) | (got == want) | (np.isnan(got) & np.isnan(want))
            assert ok.all(), f"{key}[{i}]: {got[~ok][:4]} vs {want[~ok][:4]}"


def snapshot(lists: dict) -> list[bytes]:
    return [a.tobytes() for v in lists.values() for a in v if isinstance(a, np.ndarray)]


@pytest.mark.parametrize("fault", FAULTS)
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_core_adam_step_matches_the_reference_or_refuses_and_writes_nothing(fault, data):
    case = data.draw(adam_cases(fault), label="case")
    batch, lists = build_adam(case)
    expected = expected_refusal(lists, ADAM_WRITTEN) or scalar_refusal(batch)
    before = {k: [np.array(a, copy=True) for a in v] for k, v in lists.items()}
    before_bytes = snapshot(lists)

    def call():
        try:
            _core.adam_step([batch])
        except (TypeError, ValueError) as e:
            e.after = snapshot(lists)
            raise
        return {k: [np.array(a, copy=True) for a in v] for k, v in lists.items()}

    if expected is None:
        after = in_child(call)
        check_against_reference(batch, before, after)
    else:
        with pytest.raises(expected) as info:
            in_child(call)
        assert info.value.after == before_bytes, f"{expected.__name__} raised after writing: {case}"


@st.composite
def accumulate_cases(draw):
    sizes = [draw(st.sampled_from(SIZES)) for _ in range(draw(st.integers(1, 4)))]
    return {"sizes": sizes, "layout": draw(st.sampled_from(LAYOUTS)), "which": draw(st.sampled_from(
        ["grads", "grad_accums"])), "tensor": draw(st.integers(0, len(sizes) - 1)),
        "dtype": draw(st.sampled_from([None] + BAD_DTYPES)), "seed": draw(st.integers(0, 2**32 - 1))}


@given(accumulate_cases())
def test_core_accumulate_adds_exactly_or_refuses_and_writes_nothing(case):
    rng = np.random.default_rng(case["seed"])
    lists = {"params": [rng.standard_normal(n).astype(np.float32) for n in case["sizes"]],
             "grads": [rng.standard_normal(n).astype(np.float32) for n in case["sizes"]]}
    key = "params" if case["which"] == "grad_accums" else "grads"
    i = case["tensor"]
    if case["dtype"] is not None:
        lists[key][i] = lists[key][i].astype(case["dtype"])
    else:
        lists[key][i] = make_layout(lists[key][i], case["layout"],
                                    [np.zeros(sum(case["sizes"]) * 2 + 16, np.float32), 0])
    expected = expected_refusal(lists, ("params",))
    want = [a.astype(np.float64) + g.astype(np.float64) for a, g in zip(lists["params"], lists["grads"])
            if expected is None]
    before_bytes = snapshot(lists)

    def call():
        try:
            _core.accumulate([{"grads": lists["grads"], "grad_accums": lists["params"]}])
        except (TypeError, ValueError) as e:
            e.after = snapshot(lists)
            raise
        return [np.array(a) for a in lists["params"]]

    if expected is None:
        got = in_child(call)
        for g, w in zip(got, want):
            # One float32 rounding of an exact sum.
            assert (g == w.astype(np.float32)).all()
    else:
        with pytest.raises(expected) as info:
            in_child(call)
        assert info.value.after == before_bytes


# --------------------------------------------------------------------------
# The public NumPy classes: bad grads refused with params, state and the
# state_dict unchanged; good ones stepped as the oracle steps.


def state_dict_bytes(opt) -> bytes:
    return pickle.dumps(opt.state_dict())


@st.composite
def public_cases(draw):
    sizes = [draw(st.sampled_from(SIZES)) for _ in range(draw(st.integers(1, 3)))]
    return {"sizes": sizes, "cls": draw(st.sampled_from(["AdamW", "Adam", "SGD"])),
            "fault": draw(st.sampled_from(["none", "dtype", "layout", "length", "none_grad"])),
            "dtype": draw(st.sampled_from(BAD_DTYPES)), "layout": draw(st.sampled_from(LAYOUTS)),
            "tensor": draw(st.integers(0, len(sizes) - 1)), "amsgrad": draw(st.booleans()),
            "maximize": draw(st.booleans()), "warm": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**32 - 1))}


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(public_cases())
def test_public_numpy_optimizers_step_or_refuse_with_everything_unchanged(case):
    rng = np.random.default_rng(case["seed"])
    params = [rng.standard_normal(n).astype(np.float32) for n in case["sizes"]]
    cls = getattr(cpuadam, case["cls"])
    kwargs = dict(lr=1e-2, maximize=case["maximize"])
    if case["cls"] != "SGD":
        kwargs["amsgrad"] = case["amsgrad"]
    else:
        kwargs["momentum"] = 0.9
    opt = cls(params, **kwargs)
    if case["warm"]:
        opt.step([rng.standard_normal(n).astype(np.float32) for n in case["sizes"]])
    grads = [rng.standard_normal(n).astype(np.float32) for n in case["sizes"]]
    i, fault = case["tensor"], case["fault"]
    if fault == "dtype":
        grads[i] = grads[i].astype(case["dtype"])
    elif fault == "layout":
        grads[i] = make_layout(grads[i], case["layout"], [np.zeros(sum(case["sizes"]) * 2 + 16, np.float32), 0])
    elif fault == "length":
        grads = grads[:-1]
    elif fault == "none_grad":
        grads[i] = None
    before_params = [p.tobytes() for p in params]
    before_state = state_dict_bytes(opt)

    def call():
        try:
            opt.step(grads)
        except (TypeError, ValueError) as e:
            e.after = ([p.tobytes() for p in params], state_dict_bytes(opt))
            raise
        return [p.copy() for p in params]

    try:
        after = in_child(call)
    except (TypeError, ValueError) as e:
        # Refusals are for grads the core cannot read as they are.
        assert fault in ("dtype", "layout", "length"), f"refused a valid step: {e}"
        assert e.after == (before_params, before_state), f"refused after writing: {case}"
        return
    if fault == "length":
        pytest.fail("a wrong number of grads was accepted")
    for j, (p, g) in enumerate(zip(after, grads)):
        if g is None:
            assert p.tobytes() == before_params[j]
        else:
            assert np.isfinite(p).all()


# --------------------------------------------------------------------------
# Hyperparameters finite in float64 but not in float32, and NaN ones: refused by
# the binding and by the front-ends, naming the option.

OVERFLOW = [
    pytest.param("lr", 1e39, id="lr=1e39"),
    pytest.param("lr", 1e300, id="lr=1e300"),
    pytest.param("weight_decay", 1e39, id="weight_decay=1e39"),
    pytest.param("grad_scale", 1e39, id="grad_scale=1e39"),
]


@pytest.mark.parametrize(("key", "value"), OVERFLOW)
def test_core_refuses_hyperparameters_that_overflow_float32(key, value):
    batch = dict(params=[np.ones(5, np.float32)], grads=[np.ones(5, np.float32)],
                 exp_avgs=[np.zeros(5, np.float32)], exp_avg_sqs=[np.zeros(5, np.float32)], step=1,
                 lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
    batch[key] = value
    with pytest.raises(ValueError, match=key):
        _core.adam_step([batch])


def test_core_refuses_or_honours_an_eps_that_underflows_float32():
    param = np.ones(4, np.float32)
    batch = dict(params=[param], grads=[np.zeros(4, np.float32)], exp_avgs=[np.zeros(4, np.float32)],
                 exp_avg_sqs=[np.zeros(4, np.float32)], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=5e-324,
                 weight_decay=0.0)
    try:
        _core.adam_step([batch])
    except ValueError:
        assert (param == 1).all()
    else:
        assert (param == 1).all(), param


@pytest.mark.parametrize("cls", ["AdamW", "Adam", "SGD"])
@pytest.mark.parametrize("lr", [1e39, 1e300], ids=lambda v: f"lr={v:g}")
def test_public_optimizers_refuse_an_lr_that_overflows_float32(cls, lr):
    params = [np.ones(5, np.float32)]
    with pytest.raises(ValueError, match="overflow"):
        getattr(cpuadam, cls)(params, lr=lr)
    opt = getattr(cpuadam, cls)(params, lr=0.1)
    opt.param_groups[0]["lr"] = lr  # set between steps: refused by the step
    with pytest.raises(ValueError, match="overflow"):
        opt.step([np.ones(5, np.float32)])
    assert (params[0] == 1).all()


@pytest.mark.parametrize("cls", ["AdamW", "Adam", "SGD"])
@pytest.mark.parametrize("key", ["lr", "eps", "betas", "weight_decay", "momentum"])
def test_public_optimizers_refuse_a_nan_hyperparameter_edited_into_a_group(cls, key):
    if (key in ("eps", "betas")) == (cls == "SGD") and key not in ("lr", "weight_decay"):
        pytest.skip(f"{cls} has no {key}")
    params = [np.ones(5, np.float32)]
    opt = getattr(cpuadam, cls)(params, lr=1e-3)
    opt.param_groups[0][key] = (math.nan, 0.9) if key == "betas" else math.nan
    before = state_dict_bytes(opt)
    with pytest.raises(ValueError):
        opt.step([np.ones(5, np.float32)])
    assert (params[0] == 1).all()
    assert state_dict_bytes(opt) == before


# --------------------------------------------------------------------------
# The torch drop-ins over random shapes, dtypes and layouts: parity with
# torch.optim on the same inputs (the fused path, and its fallbacks).


@st.composite
def torch_cases(draw):
    sizes = [draw(st.sampled_from(SIZES)) for _ in range(draw(st.integers(1, 3)))]
    return {"sizes": sizes, "cls": draw(st.sampled_from(["AdamW", "Adam", "SGD"])),
            "dtype": "float32", "layout": "contiguous",
            "amsgrad": draw(st.booleans()), "maximize": draw(st.booleans()),
            "weight_decay": draw(st.sampled_from([0.0, 0.01])), "seed": draw(st.integers(0, 2**31 - 1))}


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(torch_cases())
def test_torch_optimizers_match_torch_optim_on_random_tensors(case):
    torch = pytest.importorskip("torch")
    import cpuadam.torch as ct

    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])

    def make(n):
        if case["layout"] == "transposed" and n > 1:
            return torch.randn(2, n, generator=gen, dtype=dtype).t()
        if case["layout"] == "strided" and n > 1:
            return torch.randn(2 * n, generator=gen, dtype=dtype)[::2]
        return torch.randn(n, generator=gen, dtype=dtype)

    ours = [make(n) for n in case["sizes"]]
    theirs = [p.clone() for p in ours]
    kwargs = dict(lr=1e-2, weight_decay=case["weight_decay"], maximize=case["maximize"])
    if case["cls"] == "SGD":
        kwargs["momentum"] = 0.9
    else:
        kwargs["amsgrad"] = case["amsgrad"]
    mine = getattr(ct, case["cls"])(ours, **kwargs)
    ref = getattr(torch.optim, case["cls"])(theirs, foreach=False, **kwargs)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen, dtype=dtype)
            a.grad, b.grad = g.clone(), g.clone()
        mine.step()
        ref.step()
    for a, b in zip(ours, theirs):
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize(("dtype", "layout"), [("float64", "contiguous"), ("float32", "transposed"),
                                               ("float32", "strided")])
def test_torch_optimizers_step_params_the_fused_kernel_does_not_cover(dtype, layout):
    torch = pytest.importorskip("torch")
    import cpuadam.torch as ct

    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 17, generator=gen, dtype=getattr(torch, dtype))
    param = {"contiguous": base, "transposed": base.t(), "strided": base[:, ::2]}[layout]
    twin = param.clone()
    mine, ref = ct.AdamW([param], lr=1e-2), torch.optim.AdamW([twin], lr=1e-2, foreach=False)
    g = torch.randn(param.shape, generator=gen, dtype=param.dtype)
    param.grad, twin.grad = g.clone(), g.clone()
    mine.step()
    ref.step()
    torch.testing.assert_close(param, twin)
