# SPDX-License-Identifier: MIT
"""The options around the update (clipping, loss scale, non-finite steps, accumulation, EMA,
weight-decay masks, lr schedules) against float64 references written from their definitions."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from reference import adam_step

import cpuadam
from cpuadam import _core, schedules

EPS32 = float(np.finfo(np.float32).eps)
# Per-step error allowance in units of eps32 (see Fp64Adam.check): the same budget
# as tests/test_kernel.py, which measured at most 1.2 for the bare step.
C = 4.0

SHAPES = [(3,), (17,), (4, 5), (33,)]
ADAM_KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)


def f32(x) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def random_params(rng, shapes=SHAPES) -> list[np.ndarray]:
    return [f32(rng.standard_normal(s)) for s in shapes]


def random_grads(rng, params, scale: float = 1.0) -> list[np.ndarray]:
    return [f32(scale * rng.standard_normal(p.shape)) for p in params]


def copies(arrays) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


def assert_bitwise(got, want, what: str = "") -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.tobytes() == b.tobytes(), (
            f"{what}[{k}] differs: max |diff| {np.max(np.abs(a.astype(np.float64) - b), initial=0):.3g}")


def state_bytes(opt) -> bytes:
    """Every array and number of an optimizer's state_dict, as one byte string."""
    return pickle.dumps(opt.state_dict())


# --- float64 references ---------------------------------------------------------------

def keras_clipnorm(grads, clipnorm):
    """Keras's per-tensor clipping: g * c / max(||g||, c) (a zero grad stays zero)."""
    return [g * clipnorm / max(math.sqrt(float(np.sum(g * g))), clipnorm) for g in grads]


def keras_global_clipnorm(grads, clipnorm):
    """Keras's global clipping: every grad times min(1, c / sqrt(sum over tensors of ||g||^2))."""
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads if g is not None))
    scale = 1.0 if norm <= clipnorm else clipnorm / norm
    return [None if g is None else g * scale for g in grads]


def keras_clipvalue(grads, clipvalue):
    return [np.clip(g, -clipvalue, clipvalue) for g in grads]


class Fp64Adam:
    """Float64 twins of some params, stepped by tests/reference.py with per-param step counts.

    check() bounds each element's error by C * eps32 * steps * (largest |param| seen on the
    float64 trajectory + lr), the budget tests/test_kernel.py derives for the bare step.
    """

    def __init__(self, params, decoupled: bool = False, **hyper):
        self.params = [p.astype(np.float64) for p in params]
        self.state = [{} for _ in params]
        self.steps = [0] * len(params)
        self.p_scale = [np.abs(p) for p in self.params]
        self.decoupled = decoupled
        self.hyper = dict(hyper)
        self.lr_max = 0.0

    def step(self, grads, **override) -> None:
        """grads: float64 arrays (already scaled and clipped as the feature defines), None skips."""
        h = {**self.hyper, **override}
        beta1, beta2 = h.pop("betas", (0.9, 0.999))
        self.lr_max = max(self.lr_max, h["lr"])
        for k, g in enumerate(grads):
            if g is None:
                continue
            self.steps[k] += 1
            adam_step(self.params[k], g, self.state[k], step=self.steps[k], beta1=beta1, beta2=beta2,
                      decoupled=self.decoupled, **h)
            np.maximum(self.p_scale[k], np.abs(self.params[k]), out=self.p_scale[k])

    def check(self, params, ref=None) -> None:
        ref = self.params if ref is None else ref
        for k, (p, want) in enumerate(zip(params, ref)):
            bound = C * EPS32 * max(self.steps[k], 1) * (self.p_scale[k] + self.lr_max)
            err = np.abs(p - want)
            assert np.all(err <= bound), (f"param {k}: worst error {np.max(err / bound):.3g}x the "
                                          f"tolerance after {self.steps[k]} steps")


def as64(grads) -> list[np.ndarray | None]:
    return [None if g is None else g.astype(np.float64) for g in grads]


# --- clipping -------------------------------------------------------------------------

def mixed_grads(rng, params):
    """Grads whose norms straddle 1: some tensors get clipped by clipnorm=1, some do not."""
    scales = [0.01, 3.0, 0.05, 10.0]
    return [f32(s * rng.standard_normal(p.shape)) for s, p in zip(scales, params)]


@pytest.mark.parametrize("cls", [cpuadam.Adam, cpuadam.AdamW])
def test_clipnorm_clips_each_tensor_to_its_own_norm_like_keras(cls, rng):
    params = random_params(rng)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]
    opt = cls(groups, weight_decay=0.1, clipnorm=1.0, **ADAM_KW)
    ref = Fp64Adam(params, decoupled=cls is cpuadam.AdamW, weight_decay=0.1, **ADAM_KW)
    for _ in range(10):
        grads = mixed_grads(rng, params)
        clipped = keras_clipnorm(as64(grads), 1.0)
        ref.step(clipped[:2])
        ref.step([None, None] + clipped[2:], lr=3e-3)
        opt.step(grads)
    ref.check(params)


def test_clipnorm_leaves_grads_under_the_norm_and_zero_grads_exactly_alone(rng):
    params = random_params(rng)
    twin = copies(params)
    opt = cpuadam.AdamW(params, clipnorm=5.0, **ADAM_KW)
    plain = cpuadam.AdamW(twin, **ADAM_KW)
    for _ in range(5):
        grads = random_grads(rng, params, scale=0.1)
        grads[1][:] = 0.0  # a zero norm must not become 0/0
        opt.step(grads)
        plain.step(grads)
    assert all(np.all(np.isfinite(p)) for p in params)
    assert_bitwise(params, twin, "params")


@pytest.mark.parametrize("cls", [cpuadam.Adam, cpuadam.AdamW])
def test_global_clipnorm_scales_all_grads_by_one_factor_from_the_norm_over_all_groups(cls, rng):
    params = random_params(rng)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]
    opt = cls(groups, weight_decay=0.1, global_clipnorm=2.0, **ADAM_KW)
    ref = Fp64Adam(params, decoupled=cls is cpuadam.AdamW, weight_decay=0.1, **ADAM_KW)
    for t in range(10):
        grads = mixed_grads(rng, params)
        if t == 4:
            grads = [g * np.float32(1e-3) for g in grads]  # under the limit: no clipping
        if t % 3 == 1:
            grads[2] = None  # a missing grad takes no part in the norm
        clipped = keras_global_clipnorm(as64(grads), 2.0)
        ref.step(clipped[:2] + [None, None])
        ref.step([None, None] + clipped[2:], lr=3e-3)
        opt.step(grads)
    ref.check(params)


def test_global_clipnorm_with_all_grads_zero_steps_as_without_clipping(rng):
    params = random_params(rng)
    twin = copies(params)
    opt = cpuadam.AdamW(params, global_clipnorm=1.0, **ADAM_KW)
    plain = cpuadam.AdamW(twin, **ADAM_KW)
    grads = random_grads(rng, params, scale=1e-3)
    opt.step(grads)
    plain.step(grads)
    zeros = [np.zeros_like(p) for p in params]
    opt.step(zeros)
    plain.step(zeros)
    assert all(np.all(np.isfinite(p)) for p in params)
    assert_bitwise(params, twin, "params")


def test_clipvalue_clips_each_element_like_stepping_on_clipped_grads(rng):
    params = random_params(rng)
    twin = copies(params)
    ref = Fp64Adam(params, weight_decay=0.01, **ADAM_KW)
    opt = cpuadam.Adam(params, weight_decay=0.01, clipvalue=0.5, **ADAM_KW)
    plain = cpuadam.Adam(twin, weight_decay=0.01, **ADAM_KW)
    for _ in range(10):
        grads = random_grads(rng, params)
        opt.step(grads)
        plain.step(keras_clipvalue(grads, np.float32(0.5)))
        ref.step(keras_clipvalue(as64(grads), 0.5))
    assert_bitwise(params, twin, "params")
    ref.check(params)


def test_clipping_acts_on_the_grads_after_the_loss_scale_division(rng):
    params = random_params(rng)
    twin = copies(params)
    opt = cpuadam.AdamW(params, clipvalue=0.5, loss_scale_factor=1024.0, **ADAM_KW)
    plain = cpuadam.AdamW(twin, **ADAM_KW)
    for _ in range(5):
        grads = random_grads(rng, params)
        opt.step([g * np.float32(1024.0) for g in grads])
        plain.step(keras_clipvalue(grads, np.float32(0.5)))
    assert_bitwise(params, twin, "params")


def test_sgd_clips_with_the_same_rules(rng):
    params = random_params(rng)
    ref = [p.astype(np.float64) for p in params]
    opt = cpuadam.SGD(params, lr=0.1, global_clipnorm=1.0)
    for _ in range(10):
        grads = mixed_grads(rng, params)
        for r, g in zip(ref, keras_global_clipnorm(as64(grads), 1.0)):
            r -= 0.1 * g
        opt.step(grads)
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p, r, rtol=0, atol=C * EPS32 * 10 * (np.max(np.abs(r)) + 0.1))


@pytest.mark.parametrize("pair", [("clipnorm", "clipvalue"), ("clipnorm", "global_clipnorm"),
                                  ("clipvalue", "global_clipnorm")])
@pytest.mark.parametrize("cls", [cpuadam.Adam, cpuadam.AdamW, cpuadam.SGD])
def test_only_one_clipping_option_can_be_set(cls, pair):
    with pytest.raises(ValueError, match="Only one of clipnorm, clipvalue and global_clipnorm"):
        cls([np.zeros(3, dtype=np.float32)], **{name: 1.0 for name in pair})


# --- the global norm pass ---------------------------------------------------------------

@pytest.fixture
def restore_threads():
    before = cpuadam.get_num_threads()
    yield
    cpuadam.set_num_threads(before)


def many_tensors(rng) -> list[np.ndarray]:
    """Small and empty tensors, and some several 4096-element norm blocks long; about 400k
    elements in all, enough for the core to split a norm pass over three threads."""
    sizes = list(rng.integers(0, 300, 40)) + [0, 1, 4095, 4096, 4097, 5 * 4096 + 17, 9 * 4096 - 3,
                                               20 * 4096 + 1, 60 * 4096 + 5]
    rng.shuffle(sizes)
    return [f32(rng.standard_normal(int(n)) * 10.0 ** rng.uniform(-3, 3)) for n in sizes]


def test_sum_squares_matches_float64_numpy(rng):
    arrays = many_tensors(rng)
    got = _core.sum_squares(arrays)
    assert len(got) == len(arrays)
    for k, (s, a) in enumerate(zip(got, arrays)):
        want = float(np.sum(a.astype(np.float64) ** 2))
        assert abs(s - want) <= 1e-12 * want, f"tensor {k} of size {a.size}: {s!r} vs {want!r}"


def test_sum_squares_is_bitwise_identical_for_any_thread_count(rng, restore_threads):
    arrays = many_tensors(rng)
    results = []
    for n in (1, 2, 3):
        cpuadam.set_num_threads(n)
        results.append(np.array(_core.sum_squares(arrays)))
    for n, r in zip((2, 3), results[1:]):
        assert r.tobytes() == results[0].tobytes(), f"{n} threads differ from 1"


def test_global_norm_and_clipped_step_are_bitwise_identical_for_any_thread_count(rng, restore_threads):
    grads = many_tensors(rng)
    start = [f32(rng.standard_normal(g.shape)) for g in grads]
    norm64 = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    outcomes = []
    for n in (1, 2, 3):
        cpuadam.set_num_threads(n)
        params = copies(start)
        batch = dict(params=params, grads=grads, exp_avgs=[np.zeros_like(p) for p in params],
                     exp_avg_sqs=[np.zeros_like(p) for p in params], step=1, lr=1e-2, beta1=0.9,
                     beta2=0.999, eps=1e-8, weight_decay=0.0)
        result = _core.adam_step([batch], global_clipnorm=1.0)
        assert result["applied"] and result["finite"]
        assert abs(result["global_norm"] - norm64) <= 1e-12 * norm64
        outcomes.append((result["global_norm"], params))
    for n, (norm, params) in zip((2, 3), outcomes[1:]):
        assert norm == outcomes[0][0], f"{n} threads: another global norm"
        assert_bitwise(params, outcomes[0][1], f"params with {n} threads")


# --- loss scale -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [cpuadam.Adam, cpuadam.AdamW, cpuadam.SGD])
def test_a_power_of_two_loss_scale_steps_bitwise_as_the_unscaled_grads(cls, rng):
    params = random_params(rng)
    twin = copies(params)
    kw = dict(lr=0.01, weight_decay=0.01)
    opt = cls(params, loss_scale_factor=2.0**12, **kw)
    plain = cls(twin, **kw)
    for _ in range(5):
        grads = random_grads(rng, params)
        opt.step([g * np.float32(2.0**12) for g in grads])
        plain.step(grads)
    assert_bitwise(params, twin, "params")


def test_a_loss_scale_divides_the_grads_like_the_float64_reference(rng):
    # L2 decay adds weight_decay * p to the divided grad, so Adam's indifference to the
    # grads' scale cannot hide a missing or misplaced division.
    params = random_params(rng)
    ref = Fp64Adam(params, weight_decay=0.05, **ADAM_KW)
    opt = cpuadam.Adam(params, weight_decay=0.05, loss_scale_factor=1000.0, **ADAM_KW)
    for _ in range(10):
        grads = random_grads(rng, params, scale=1000.0)
        opt.step(grads)
        ref.step([g / 1000.0 for g in as64(grads)])
    ref.check(params)


def all_bytes(opt, params) -> bytes:
    """Params, every state buffer and step count; not the skip counter or the loss scale."""
    saved = opt.state_dict()
    kept = {key: saved[key] for key in ("state", "param_groups", "iterations", "accumulated_calls")}
    return b"".join(p.tobytes() for p in params) + pickle.dumps(kept)


@pytest.mark.parametrize("cls", [cpuadam.AdamW, cpuadam.SGD])
def test_dynamic_loss_scale_grows_after_n_finite_steps_and_halves_on_overflow(cls, rng):
    params = random_params(rng)
    twin = copies(params)
    kw = dict(lr=0.01, weight_decay=0.01) if cls is cpuadam.AdamW else dict(lr=0.01, momentum=0.9)
    scale = cpuadam.DynamicLossScale(initial_scale=2.0**8, growth_interval=3)
    opt = cls(params, loss_scale_factor=scale, **kw)
    plain = cls(twin, **kw)
    # finite steps grow the scale every third one; an overflow halves it and restarts the count
    pattern = "fffff" + "x" + "fff" + "xx" + "ff"
    want_scale, good = 2.0**8, 0
    for t, kind in enumerate(pattern):
        grads = random_grads(rng, params)
        scaled = [g * np.float32(scale.scale) for g in grads]
        if kind == "x":
            scaled[t % len(scaled)][1] = np.inf
            before = all_bytes(opt, params)
            steps = (opt.iterations, [s.get("step") for s in opt.state.values()])
            opt.step(scaled)
            assert all_bytes(opt, params) == before, f"call {t}: the skipped step changed something"
            assert (opt.iterations, [s.get("step") for s in opt.state.values()]) == steps
            want_scale, good = want_scale / 2, 0
        else:
            opt.step(scaled)
            plain.step(grads)
            good += 1
            if good == 3:
                want_scale, good = want_scale * 2, 0
        assert scale.scale == want_scale, f"after call {t}"
    assert opt.skipped_steps == pattern.count("x")
    assert opt.iterations == pattern.count("f")
    assert_bitwise(params, twin, "params")


def test_dynamic_loss_scale_position_is_part_of_the_state_dict(rng):
    params = random_params(rng)
    opt = cpuadam.AdamW(params, loss_scale_factor=cpuadam.DynamicLossScale(2.0**4, growth_interval=2))
    for _ in range(3):
        opt.step([g * np.float32(opt.loss_scale_factor.scale) for g in random_grads(rng, params)])
    bad = random_grads(rng, params)
    bad[0][0] = np.nan
    opt.step(bad)
    opt.step(random_grads(rng, params))
    saved = pickle.loads(pickle.dumps(opt.state_dict()))
    # Built with another initial scale: only the checkpoint can bring back 2**4.
    fresh = cpuadam.AdamW(copies(params),
                          loss_scale_factor=cpuadam.DynamicLossScale(2.0**10, growth_interval=2))
    fresh.load_state_dict(saved)
    assert fresh.loss_scale_factor.scale == opt.loss_scale_factor.scale == 2.0**4
    assert fresh.loss_scale_factor.good_steps == opt.loss_scale_factor.good_steps
    assert (fresh.skipped_steps, fresh.iterations) == (opt.skipped_steps, opt.iterations) == (1, 4)


# --- non-finite steps -----------------------------------------------------------------

OPTIMIZERS = {
    "adam_amsgrad": lambda ps, **kw: cpuadam.Adam(ps, amsgrad=True, weight_decay=0.01, **kw),
    "adamw_ema": lambda ps, **kw: cpuadam.AdamW(ps, use_ema=True, **kw),
    "adamw_global_clipnorm": lambda ps, **kw: cpuadam.AdamW(ps, global_clipnorm=1.0, **kw),
    "sgd_nesterov": lambda ps, **kw: cpuadam.SGD(ps, lr=0.01, momentum=0.9, nesterov=True, **kw),
}


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan], ids=["inf", "minus_inf", "nan"])
@pytest.mark.parametrize("make", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_a_step_with_a_non_finite_grad_changes_no_byte_and_is_counted(make, bad, rng):
    params = random_params(rng)
    groups = [{"params": params[:1]}, {"params": params[1:3]}, {"params": params[3:]}]
    opt = make(groups, skip_nonfinite=True)
    # Skipped on the very first call, before any state exists, and after a few steps.
    for good_steps in (0, 3):
        for _ in range(good_steps):
            opt.step(random_grads(rng, params))
        before = all_bytes(opt, params)
        grads = random_grads(rng, params)
        grads[2][1, 3] = bad
        skipped = opt.skipped_steps
        opt.step(grads)
        assert all_bytes(opt, params) == before
        assert opt.skipped_steps == skipped + 1
    assert opt.iterations == 3


def nan_positions(arrays) -> list[np.ndarray]:
    return [np.flatnonzero(np.isnan(a)) for a in arrays]


def test_without_a_loss_scale_non_finite_grads_propagate_as_in_the_reference(rng):
    params = random_params(rng)
    ref = Fp64Adam(params, **ADAM_KW)
    opt = cpuadam.Adam(params, **ADAM_KW)
    assert opt.skip_nonfinite is False
    grads = random_grads(rng, params)
    grads[1][4] = np.nan
    grads[3][0] = np.inf
    opt.step(grads)
    with np.errstate(invalid="ignore"):  # inf / inf in the update, as in the core
        ref.step(as64(grads))
    assert opt.skipped_steps == 0 and opt.iterations == 1
    for k, (got, want) in enumerate(zip(nan_positions(params), nan_positions(ref.params))):
        assert got.tolist() == want.tolist() and (k not in (1, 3) or got.size == 1), f"param {k}"
    for k, (p, r) in enumerate(zip(params, ref.params)):
        ok = ~np.isnan(r)
        bound = C * EPS32 * (np.abs(r[ok]) + ADAM_KW["lr"])
        assert np.all(np.abs(p[ok] - r[ok]) <= bound), f"finite elements of param {k}"


def test_a_loss_scale_turns_skipping_on_by_default_and_it_can_be_turned_off(rng):
    params = random_params(rng)
    on = cpuadam.AdamW(params, loss_scale_factor=1.0)
    assert on.skip_nonfinite is True
    before = all_bytes(on, params)
    grads = random_grads(rng, params)
    grads[0][0] = np.nan
    on.step(grads)
    assert all_bytes(on, params) == before and on.skipped_steps == 1

    off = cpuadam.AdamW(params, loss_scale_factor=1.0, skip_nonfinite=False)
    off.step(grads)
    assert off.skipped_steps == 0 and np.isnan(params[0][0])


def test_a_non_finite_grad_in_an_accumulation_window_restarts_the_window(rng):
    params = random_params(rng)
    twin = copies(params)
    opt = cpuadam.AdamW(params, gradient_accumulation_steps=2, skip_nonfinite=True, **ADAM_KW)
    plain = cpuadam.AdamW(twin, gradient_accumulation_steps=2, **ADAM_KW)
    bad = random_grads(rng, params)
    bad[1][2] = np.inf
    opt.step(bad)
    opt.step(random_grads(rng, params))
    assert opt.skipped_steps == 1 and opt.iterations == 0
    for _ in range(4):
        grads = random_grads(rng, params)
        opt.step(grads)
        plain.step(grads)
    assert opt.iterations == plain.iterations == 2
    assert_bitwise(params, twin, "params")


# --- gradient accumulation --------------------------------------------------------------

ACCUMULATING = {
    "adam_amsgrad": lambda ps, **kw: cpuadam.Adam(ps, amsgrad=True, weight_decay=0.01, **ADAM_KW, **kw),
    "adamw": lambda ps, **kw: cpuadam.AdamW(ps, weight_decay=0.05, **ADAM_KW, **kw),
    "sgd_momentum": lambda ps, **kw: cpuadam.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1, **kw),
}


def float32_mean(grads: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The mean of k grads per tensor, summed in call order in float32, then divided by k."""
    out = []
    for per_tensor in zip(*grads):
        total = np.zeros_like(per_tensor[0])
        for g in per_tensor:
            total = total + g
        out.append(total / np.float32(len(per_tensor)))
    return out


@pytest.mark.parametrize("make", list(ACCUMULATING.values()), ids=list(ACCUMULATING))
def test_four_accumulated_calls_equal_one_step_on_the_float32_mean_bitwise(make, rng):
    params = random_params(rng)
    twin = copies(params)
    opt = make([{"params": params[:2]}, {"params": params[2:]}], gradient_accumulation_steps=4)
    plain = make([{"params": twin[:2]}, {"params": twin[2:]}])
    for window in range(3):
        grads = [random_grads(rng, params) for _ in range(4)]
        for call, g in enumerate(grads):
            before = b"".join(p.tobytes() for p in params)
            opt.step(g)
            if call < 3:
                assert b"".join(p.tobytes() for p in params) == before, f"call {call} moved a param"
        plain.step(float32_mean(grads))
        assert_bitwise(params, twin, f"params after window {window}")
    for k in range(len(params)):
        for key, value in plain.state[k].items():
            assert np.asarray(opt.state[k][key]).tobytes() == np.asarray(value).tobytes(), (k, key)


def test_iterations_and_step_count_applied_updates_only(rng):
    params = random_params(rng)
    opt = cpuadam.AdamW(params, gradient_accumulation_steps=4)
    for call in range(1, 11):
        opt.step(random_grads(rng, params))
        assert opt.iterations == call // 4
    assert all(s["step"] == 2 for s in opt.state.values())
    saved = opt.state_dict()
    assert (saved["iterations"], saved["accumulated_calls"]) == (2, 2)


def test_an_lr_schedule_under_accumulation_sees_the_update_count(rng):
    schedule = schedules.linear_warmup_decay(0.05, warmup_steps=2, total_steps=5)
    params = random_params(rng)
    twin = copies(params)
    opt = cpuadam.AdamW(params, lr=schedule, gradient_accumulation_steps=4)
    plain = cpuadam.AdamW(twin, lr=0.0)
    for n in range(1, 6):
        grads = [random_grads(rng, params) for _ in range(4)]
        for g in grads:
            opt.step(g)
        plain.param_groups[0]["lr"] = schedule(n)
        plain.step(float32_mean(grads))
        assert_bitwise(params, twin, f"params after update {n}")


def test_accumulation_continues_across_a_state_dict_saved_mid_window(rng):
    start = random_params(rng)
    calls = [random_grads(rng, start) for _ in range(10)]
    straight_params = copies(start)
    straight = cpuadam.AdamW(straight_params, gradient_accumulation_steps=4, use_ema=True)
    for g in calls:
        straight.step(g)

    params = copies(start)
    first = cpuadam.AdamW(params, gradient_accumulation_steps=4, use_ema=True)
    for g in calls[:6]:  # one update, then two calls into the second window
        first.step(g)
    saved = pickle.dumps(first.state_dict())
    resumed = cpuadam.AdamW(params, gradient_accumulation_steps=4, use_ema=True)
    resumed.load_state_dict(pickle.loads(saved))
    for g in calls[6:]:
        resumed.step(g)
    assert resumed.iterations == straight.iterations == 2
    assert_bitwise(params, straight_params, "params")
    assert state_bytes(resumed) == state_bytes(straight)


def grads_of_norm(rng, params, norm: float) -> list[np.ndarray]:
    grads = random_grads(rng, params)
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    return [f32(g * (norm / total)) for g in grads]


def test_global_clipnorm_under_accumulation_clips_the_mean(rng):
    # Each grad's norm is over the limit, the mean's is over it in some windows and under
    # it in others; SGD (linear in the grad) shows any other order of mean and clip.
    params = random_params(rng)
    ref = [p.astype(np.float64) for p in params]
    opt = cpuadam.SGD(params, lr=0.1, global_clipnorm=1.0, gradient_accumulation_steps=2)
    for norm in (1.2, 1.5, 2.0, 3.0, 1.1, 2.5):
        g1, g2 = grads_of_norm(rng, params, norm), grads_of_norm(rng, params, norm)
        opt.step(g1)
        opt.step(g2)
        mean = [(a + b) / 2.0 for a, b in zip(as64(g1), as64(g2))]
        for r, g in zip(ref, keras_global_clipnorm(mean, 1.0)):
            r -= 0.1 * g
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p, r, rtol=0, atol=C * EPS32 * 6 * (np.max(np.abs(r)) + 0.1))


def test_a_param_without_a_grad_on_the_applying_call_carries_nothing_into_the_next_window():
    # Every update applies the mean of its own window's k grads, whatever happened to a
    # param's grads in earlier windows (Keras resets every accumulator on each update).
    a = np.zeros(2, dtype=np.float32)
    b = np.zeros(2, dtype=np.float32)
    opt = cpuadam.SGD([a, b], lr=1.0, gradient_accumulation_steps=2)
    ones = np.ones(2, dtype=np.float32)
    opt.step([ones, ones])
    opt.step([ones, None])  # b's first-window grad has no applying call
    b_after_first_window = b.copy()
    opt.step([ones, ones])
    opt.step([ones, ones])
    np.testing.assert_array_equal(a, [-2.0, -2.0])
    np.testing.assert_array_equal(b - b_after_first_window, [-1.0, -1.0])


# --- EMA ------------------------------------------------------------------------------

def test_ema_is_the_float64_average_of_the_params_after_each_update(rng):
    params = random_params(rng)
    ref = Fp64Adam(params, decoupled=True, weight_decay=0.01, **ADAM_KW)
    opt = cpuadam.AdamW(params, weight_decay=0.01, use_ema=True, ema_momentum=0.9, **ADAM_KW)
    assert opt.ema_params() == [None] * len(params)
    averages = None
    for t in range(12):
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(as64(grads))
        if averages is None:
            # The first update copies the weights.
            assert_bitwise(opt.ema_params(), params, "ema after the first update")
            averages = [p.astype(np.float64) for p in params]
        else:
            averages = [0.9 * a + 0.1 * p.astype(np.float64) for a, p in zip(averages, params)]
    ref.check(params)
    for k, (e, a) in enumerate(zip(opt.ema_params(), averages)):
        # Each update rounds the average a couple of times on top of what it carries.
        bound = C * EPS32 * 12 * np.max(np.abs(a))
        assert np.all(np.abs(e - a) <= bound), f"ema {k}"


def test_ema_overwrite_frequency_copies_the_average_into_the_params_every_n_updates(rng):
    params = random_params(rng)
    ref = Fp64Adam(params, **ADAM_KW)
    opt = cpuadam.Adam(params, use_ema=True, ema_momentum=0.8, ema_overwrite_frequency=3, **ADAM_KW)
    averages = None
    for t in range(1, 10):
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(as64(grads))
        new = ref.params
        averages = [p.copy() for p in new] if averages is None else \
            [0.8 * a + 0.2 * p for a, p in zip(averages, new)]
        if t % 3 == 0:
            for p, a in zip(ref.params, averages):
                p[...] = a
            assert_bitwise(params, opt.ema_params(), f"params after update {t}")
        elif t > 1:  # (the first update copies the params into the averages)
            assert not any(np.array_equal(p, e) for p, e in zip(params, opt.ema_params())), t
    ref.check(params)
    ref.check(opt.ema_params(), averages)


def test_finalize_copies_the_average_into_the_params_and_is_a_no_op_without_ema(rng):
    params = random_params(rng)
    opt = cpuadam.AdamW(params, use_ema=True, ema_momentum=0.5)
    for _ in range(3):
        opt.step(random_grads(rng, params))
    averages = copies(opt.ema_params())
    assert not any(np.array_equal(p, a) for p, a in zip(params, averages))
    opt.finalize()
    assert_bitwise(params, averages, "params after finalize")

    plain_params = random_params(rng)
    plain = cpuadam.AdamW(plain_params)
    plain.step(random_grads(rng, plain_params))
    before = copies(plain_params)
    plain.finalize()
    assert_bitwise(plain_params, before, "params after finalize without ema")
    with pytest.raises(RuntimeError):
        plain.ema_params()


def test_swap_ema_exchanges_params_and_averages_and_twice_is_the_identity(rng):
    params = random_params(rng)
    opt = cpuadam.SGD(params, lr=0.1, momentum=0.9, use_ema=True, ema_momentum=0.7)
    for _ in range(3):
        opt.step(random_grads(rng, params))
    p0, e0 = copies(params), copies(opt.ema_params())
    opt.swap_ema()
    assert_bitwise(params, e0, "params after one swap")
    assert_bitwise(opt.ema_params(), p0, "averages after one swap")
    opt.swap_ema()
    assert_bitwise(params, p0, "params after two swaps")
    assert_bitwise(opt.ema_params(), e0, "averages after two swaps")


def test_ema_averages_every_param_on_every_update_with_or_without_its_grad(rng):
    # Keras keeps an average of every variable and updates all of them on every step (the
    # first step copies the weights), so a param without a grad is averaged at its
    # unchanged value: here param 1 has no grad on updates 1 and 3.
    params = random_params(rng)
    opt = cpuadam.AdamW(params, use_ema=True, ema_momentum=0.9, **ADAM_KW)
    first = params[1].astype(np.float64)
    for t in range(1, 4):
        grads = random_grads(rng, params)
        if t != 2:
            grads[1] = None
        opt.step(grads)
        value = params[1].astype(np.float64)
        want = first if t == 1 else 0.9 * want + 0.1 * value
        got = opt.ema_params()[1]
        assert got is not None, f"no average of param 1 after update {t}"
        np.testing.assert_allclose(got, want, rtol=0, atol=C * EPS32 * t * np.max(np.abs(want)),
                                   err_msg=f"average of param 1 after update {t}")


# --- weight-decay masks -----------------------------------------------------------------

DECAYING = [cpuadam.Adam, cpuadam.AdamW, cpuadam.SGD]
NAMES = ["encoder.layer0.weight", "encoder.layer0.bias", "encoder.norm.weight", "head.weight"]
NAMED_SHAPES = [(4, 5), (5,), (5,), (5, 3)]


def decay_kw(cls) -> dict:
    return dict(lr=0.05, momentum=0.9, weight_decay=0.1) if cls is cpuadam.SGD else \
        dict(weight_decay=0.1, **ADAM_KW)


def run_masked(cls, rng, mask: list[bool], **options):
    """Steps an optimizer configured by `options` beside one whose params are split into a
    decayed group and a weight_decay=0 group by `mask`; returns both sets of params."""
    params = random_params(rng, NAMED_SHAPES)
    twin = copies(params)
    kw = decay_kw(cls)
    if "names" in options:
        given = list(zip(options.pop("names"), params))
    else:
        given = params
    opt = cls(given, **kw, **options)
    split = cls([{"params": [p for p, m in zip(twin, mask) if m]},
                 {"params": [p for p, m in zip(twin, mask) if not m], "weight_decay": 0.0}], **kw)
    for _ in range(5):
        grads = random_grads(rng, params)
        opt.step(grads)
        split.step([g for g, m in zip(grads, mask) if m] + [g for g, m in zip(grads, mask) if not m])
    return params, twin


@pytest.mark.parametrize("cls", DECAYING)
def test_a_mask_by_predicate_leaves_masked_params_exactly_undecayed(cls, rng):
    mask = [len(s) > 1 for s in NAMED_SHAPES]
    params, twin = run_masked(cls, rng, mask, weight_decay_mask=lambda name, p: p.ndim > 1)
    assert_bitwise(params, twin, "params")


@pytest.mark.parametrize("cls", DECAYING)
def test_a_mask_by_list_of_bools_leaves_masked_params_exactly_undecayed(cls, rng):
    mask = [True, False, True, False]
    params, twin = run_masked(cls, rng, mask, weight_decay_mask=mask)
    assert_bitwise(params, twin, "params")


@pytest.mark.parametrize("cls", DECAYING)
def test_exclusion_by_name_leaves_matching_params_exactly_undecayed(cls, rng):
    mask = ["layer0" not in n for n in NAMES]
    params, twin = run_masked(cls, rng, mask, names=NAMES, exclude_from_weight_decay=["layer0"])
    assert_bitwise(params, twin, "params")


def test_the_masked_split_really_differs_from_decaying_everything(rng):
    # The twin comparison above can only fail if a mask changes anything at all.
    params = random_params(rng, NAMED_SHAPES)
    twin = copies(params)
    masked = cpuadam.AdamW(params, weight_decay_mask=[False] * 4, weight_decay=0.1, **ADAM_KW)
    plain = cpuadam.AdamW(twin, weight_decay=0.1, **ADAM_KW)
    grads = random_grads(rng, params)
    masked.step(grads)
    plain.step(grads)
    assert all(not np.array_equal(p, q) for p, q in zip(params, twin))


def test_no_decay_on_biases_and_norm_weights_recipe(rng):
    # The README's recipe: decay the weight matrices, not biases or normalisation weights.
    # By name and by predicate it must decay the same params, as a two-group split would.
    mask = [True, False, False, True]
    by_name, split = run_masked(cpuadam.AdamW, rng, mask, names=NAMES,
                                exclude_from_weight_decay=["bias", "norm"])
    assert_bitwise(by_name, split, "params excluded by name")
    by_rank, split = run_masked(cpuadam.AdamW, rng, mask, weight_decay_mask=lambda name, p: p.ndim >= 2)
    assert_bitwise(by_rank, split, "params masked by rank")


def test_exclude_from_weight_decay_needs_named_params():
    with pytest.raises(ValueError, match="name"):
        cpuadam.AdamW([np.zeros(3, dtype=np.float32)], exclude_from_weight_decay=["bias"])


def test_a_mask_list_of_the_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="weight_decay_mask"):
        cpuadam.AdamW([np.zeros(3, dtype=np.float32)], weight_decay_mask=[True, False])


# --- lr schedules -----------------------------------------------------------------------

LR_SCHEDULES = {
    "cosine": schedules.cosine(0.05, warmup_steps=3, total_steps=12, end_lr=1e-3),
    "lambda": lambda step: 0.02 / step,
}


@pytest.mark.parametrize("cls", [cpuadam.AdamW, cpuadam.SGD])
@pytest.mark.parametrize("schedule", list(LR_SCHEDULES.values()), ids=list(LR_SCHEDULES))
def test_an_lr_callable_equals_setting_group_lr_by_hand_each_step(schedule, cls, rng):
    params = random_params(rng)
    twin = copies(params)
    kw = dict(momentum=0.9) if cls is cpuadam.SGD else {}
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": schedule}], lr=schedule, **kw)
    plain = cls([{"params": twin[:2]}, {"params": twin[2:]}], lr=0.0, **kw)
    for step in range(1, 15):
        for group in plain.param_groups:
            group["lr"] = schedule(step)
        grads = random_grads(rng, params)
        opt.step(grads)
        plain.step(grads)
    assert_bitwise(params, twin, "params")


def test_schedule_position_survives_state_dict_pickle_and_load(rng):
    schedule = schedules.linear_warmup_decay(0.05, warmup_steps=4, total_steps=12)
    start = random_params(rng)
    grads = [random_grads(rng, start) for _ in range(12)]
    straight_params = copies(start)
    straight = cpuadam.AdamW(straight_params, lr=schedule)
    for g in grads:
        straight.step(g)

    params = copies(start)
    first = cpuadam.AdamW(params, lr=schedule)
    for g in grads[:5]:
        first.step(g)
    saved = pickle.dumps(first.state_dict())
    # The resumed optimizer is built with another lr; the checkpoint brings the schedule back.
    resumed = cpuadam.AdamW(params, lr=1.0)
    resumed.load_state_dict(pickle.loads(saved))
    for g in grads[5:]:
        resumed.step(g)
    assert resumed.param_groups[0]["lr"] == schedule
    assert_bitwise(params, straight_params, "params")


# --- Keras's AdamW ------------------------------------------------------------------------

def keras_adamw_step(var, g, m, v, *, t, lr, beta1, beta2, epsilon, weight_decay):
    """Keras's AdamW (keras/src/optimizers/base_optimizer.py _apply_weight_decay, then
    adam.py update_step), in float64, in place: decay first, then the Adam update."""
    var -= var * weight_decay * lr
    alpha = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    m += (g - m) * (1 - beta1)
    v += (g * g - v) * (1 - beta2)
    var -= (m * alpha) / (np.sqrt(v) + epsilon)


@pytest.mark.parametrize("eps", [1e-7, 1e-2])
def test_keras_eps_mode_adamw_follows_a_transcription_of_keras_update(eps, rng):
    params = random_params(rng)
    hyper = dict(lr=0.02, beta1=0.9, beta2=0.99, epsilon=eps, weight_decay=0.1)
    opt = cpuadam.AdamW(params, lr=0.02, betas=(0.9, 0.99), eps=eps, weight_decay=0.1,
                        eps_mode="keras", decay_mode="lr")
    torch_eps = [p.copy() for p in params]
    other = cpuadam.AdamW(torch_eps, lr=0.02, betas=(0.9, 0.99), eps=eps, weight_decay=0.1)
    ref = [p.astype(np.float64) for p in params]
    moments = [(np.zeros_like(r), np.zeros_like(r)) for r in ref]
    scales = [np.abs(r) for r in ref]
    steps = 15
    for t in range(1, steps + 1):
        grads = random_grads(rng, params, scale=0.01)
        opt.step(grads)
        other.step(grads)
        for r, (m, v), g, s in zip(ref, moments, as64(grads), scales):
            keras_adamw_step(r, g, m, v, t=t, **hyper)
            np.maximum(s, np.abs(r), out=s)
    bounds = [C * EPS32 * steps * (s + 0.02) for s in scales]
    for k, (p, r, b) in enumerate(zip(params, ref, bounds)):
        assert np.all(np.abs(p - r) <= b), f"param {k}: {np.max(np.abs(p - r) / b):.3g}x the tolerance"
    if eps > 1e-3:
        # torch's eps placement lands outside the same tolerance: the check discriminates.
        assert any(np.any(np.abs(p - r) > b) for p, r, b in zip(torch_eps, ref, bounds))

