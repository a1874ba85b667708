# SPDX-License-Identifier: MIT
"""The NumPy Adam/AdamW classes against the fp64 reference: defaults, groups, None grads, state_dict."""

from __future__ import annotations

import copy
import doctest
import pickle

import numpy as np
import pytest

import cpuadam
import cpuadam.optim
from reference import adam_step

EPS32 = float(np.finfo(np.float32).eps)

# torch.optim's documented defaults, which the classes keep.
TORCH_DEFAULTS = {
    "AdamW": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2,
              "amsgrad": False, "maximize": False},
    "Adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
             "amsgrad": False, "maximize": False},
}


def f32(x) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def random_params(rng, shapes):
    return [f32(rng.standard_normal(s)) for s in shapes]


def random_grads(rng, params):
    return [f32(rng.standard_normal(p.shape)) for p in params]


class Reference:
    """Float64 twins of the params, stepped by tests/reference.py with each param's own step count."""

    def __init__(self, params, decoupled: bool):
        self.params = [p.astype(np.float64) for p in params]
        self.state = [{} for _ in params]
        self.steps = [0] * len(params)
        self.decoupled = decoupled

    def step(self, grads, hypers):
        """hypers: one dict per param of adam_step keywords (lr, betas, eps, ...)."""
        for k, (g, h) in enumerate(zip(grads, hypers)):
            if g is None:
                continue
            self.steps[k] += 1
            h = dict(h)
            beta1, beta2 = h.pop("betas")
            adam_step(self.params[k], g, self.state[k], step=self.steps[k], beta1=beta1, beta2=beta2,
                      decoupled=self.decoupled, **h)


def assert_matches_reference(ours, ref: Reference, lr: float):
    """Element by element against float64.

    Each step rounds the param to float32 (half an ulp of |p|), may round the
    decay factor 1 - lr*wd (half an ulp of 1, times |p|) and computes the
    update to within a few ulps of its size (at most lr / (1 - beta1) with
    torch's default eps and moderately sized grads). Those errors add up at
    most linearly, so the bound is steps x 2 eps x (|p| + 4 lr); a wrong
    formula moves values by a sizeable fraction of lr per step.
    """
    for k, (a, r) in enumerate(zip(ours, ref.params)):
        steps = max(ref.steps[k], 1)
        bound = steps * 2 * EPS32 * (np.abs(r) + 4 * lr)
        err = np.abs(a.astype(np.float64) - r)
        assert np.all(err <= bound), (
            f"param {k}: max error {err.max():.3e} exceeds the float32 bound {bound.max():.3e}")


def hyper(cls_name: str, **overrides) -> dict:
    h = dict(TORCH_DEFAULTS[cls_name], **overrides)
    h.setdefault("eps_mode", "torch")
    h.setdefault("decay_mode", "lr")
    return h


def snapshot(opt):
    """Bytes of every param and state buffer, the step counts and the hyperparameters."""
    params = [p.tobytes() for g in opt.param_groups for p in g["params"]]
    state = {k: {key: v.tobytes() if isinstance(v, np.ndarray) else v for key, v in s.items()}
             for k, s in opt.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return params, state, groups


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
def test_constructor_defaults_are_torchs(cls_name):
    opt = getattr(cpuadam, cls_name)([f32(np.zeros(3))])
    for key, value in TORCH_DEFAULTS[cls_name].items():
        assert opt.param_groups[0][key] == value, key
        assert opt.defaults[key] == value, key
    assert opt.param_groups[0]["eps_mode"] == "torch"
    assert opt.param_groups[0]["decay_mode"] == "lr"


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
def test_default_arguments_step_like_the_reference_with_torchs_defaults(cls_name, rng):
    params = random_params(rng, [(7, 9), (33,)])
    ref = Reference(params, decoupled=cls_name == "AdamW")
    opt = getattr(cpuadam, cls_name)(params)
    h = hyper(cls_name)
    for _ in range(20):
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(grads, [h] * len(params))
    assert_matches_reference(params, ref, lr=h["lr"])


def test_adamw_default_weight_decay_really_decays():
    # With a zero grad the moments stay zero and only the decay acts:
    # p <- p * (1 - lr * weight_decay) per step, computed in float32.
    p = f32(np.full(4, 2.0))
    opt = cpuadam.AdamW([p])
    opt.step([f32(np.zeros(4))])
    assert np.all(p == np.float32(2.0) * np.float32(1 - 1e-3 * 1e-2))


# ---------------------------------------------------------------- param groups


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
def test_param_groups_use_their_own_hyperparameters(cls_name, rng):
    shapes = [(5, 6), (17,), (3,), (2, 2, 2)]
    params = random_params(rng, shapes)
    groups = [
        {"params": params[:2], "lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1},
        {"params": params[2:3], "eps": 1e-3, "amsgrad": True, "maximize": True},
        {"params": params[3:], "lr": 3e-3, "eps_mode": "keras"},
    ]
    opt = getattr(cpuadam, cls_name)(groups, lr=1e-3, weight_decay=0.01)
    base = dict(lr=1e-3, weight_decay=0.01)
    hypers = ([hyper(cls_name, **dict(base, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1))] * 2
              + [hyper(cls_name, **dict(base, eps=1e-3, amsgrad=True, maximize=True))]
              + [hyper(cls_name, **dict(base, lr=3e-3, eps_mode="keras"))])
    ref = Reference(params, decoupled=cls_name == "AdamW")
    for _ in range(15):
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(grads, hypers)
    assert_matches_reference(params, ref, lr=1e-2)
    assert "max_exp_avg_sq" in opt.state[2]
    assert all("max_exp_avg_sq" not in opt.state[k] for k in (0, 1, 3))


def test_editing_lr_between_steps_takes_effect_on_the_next_step(rng):
    params = random_params(rng, [(40,), (3, 5)])
    opt = cpuadam.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 5e-3}], lr=1e-2)
    ref = Reference(params, decoupled=True)
    for step in range(1, 13):
        lrs = [1e-2 * 0.8**step, 5e-3 if step < 6 else 2e-2]
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(grads, [hyper("AdamW", lr=lrs[0]), hyper("AdamW", lr=lrs[1])])
    assert_matches_reference(params, ref, lr=2e-2)


def test_editing_betas_and_weight_decay_between_steps_takes_effect(rng):
    params = random_params(rng, [(25,)])
    opt = cpuadam.Adam(params, lr=1e-2)
    ref = Reference(params, decoupled=False)
    for step in range(1, 9):
        h = hyper("Adam", lr=1e-2, betas=(0.9, 0.999) if step < 4 else (0.5, 0.9),
                  weight_decay=0.0 if step < 6 else 0.3)
        opt.param_groups[0]["betas"] = h["betas"]
        opt.param_groups[0]["weight_decay"] = h["weight_decay"]
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(grads, [h])
    assert_matches_reference(params, ref, lr=1e-2)


def test_add_param_group_fills_defaults_and_starts_its_own_step_count(rng):
    params = random_params(rng, [(6,), (4, 4)])
    opt = cpuadam.AdamW([{"params": params[:1], "lr": 1e-2, "weight_decay": 0.5}], weight_decay=0.05)
    ref = Reference(params, decoupled=True)
    h0 = hyper("AdamW", lr=1e-2, weight_decay=0.5)
    for _ in range(3):
        grads = random_grads(rng, params[:1])
        opt.step(grads)
        ref.step(grads + [None], [h0, None])
    opt.add_param_group({"params": [params[1]], "amsgrad": True})
    group = opt.param_groups[1]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.05 and group["amsgrad"] is True
    h1 = hyper("AdamW", weight_decay=0.05, amsgrad=True)
    for _ in range(4):
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(grads, [h0, h1])
    assert opt.state[0]["step"] == 7 and opt.state[1]["step"] == 4
    assert opt.state_dict()["param_groups"][1]["params"] == [1]
    assert_matches_reference(params, ref, lr=1e-2)


def test_a_param_in_two_groups_is_rejected():
    p = f32(np.ones(3))
    message = r"^params\[0\] in group 1 shares memory with params\[0\] in group 0"
    with pytest.raises(ValueError, match=message):
        cpuadam.AdamW([{"params": [p]}, {"params": [p], "lr": 0.1}])
    opt = cpuadam.Adam([p])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- None grads


def test_none_grad_skips_the_param_and_leaves_its_state_alone(rng):
    params = random_params(rng, [(8,), (8,), (2, 3)])
    untouched = params[2].copy()
    opt = cpuadam.AdamW(params, weight_decay=0.1)
    grads = random_grads(rng, params)
    opt.step([grads[0], grads[1], None])
    # Not even weight decay touches a param without a grad (as in torch).
    assert params[2].tobytes() == untouched.tobytes()
    assert 2 not in opt.state
    before = {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in opt.state[1].items()}
    p1 = params[1].copy()
    opt.step([random_grads(rng, params)[0], None, None])
    assert params[1].tobytes() == p1.tobytes()
    assert opt.state[1]["step"] == before["step"] == 1
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[1][key].tobytes() == before[key].tobytes()
    assert opt.state[0]["step"] == 2


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
def test_step_counts_diverge_and_each_param_uses_its_own_bias_correction(cls_name, rng):
    shapes = [(9,), (4, 3), (5,), ()]
    params = random_params(rng, shapes)
    opt = getattr(cpuadam, cls_name)([{"params": params[:3]}, {"params": params[3:], "amsgrad": True}],
                                     lr=1e-2, weight_decay=0.05)
    ref = Reference(params, decoupled=cls_name == "AdamW")
    hypers = [hyper(cls_name, lr=1e-2, weight_decay=0.05)] * 3 + \
        [hyper(cls_name, lr=1e-2, weight_decay=0.05, amsgrad=True)]
    # Param k gets a grad on the steps where (step + k) % (k + 2) != 0; the
    # first param always, the others on interleaved patterns, so the step
    # counts (and bias corrections) within one group differ.
    for step in range(12):
        grads = random_grads(rng, params)
        grads = [g if k == 0 or (step + k) % (k + 2) != 0 else None for k, g in enumerate(grads)]
        opt.step(grads)
        ref.step(grads, hypers)
    counts = [opt.state[k]["step"] for k in range(len(params))]
    assert counts == ref.steps
    assert len(set(counts)) >= 3, counts
    assert_matches_reference(params, ref, lr=1e-2)
    for k in range(len(params)):
        for key, value in ref.state[k].items():
            np.testing.assert_allclose(opt.state[k][key], value, rtol=1e-5, atol=1e-7, err_msg=f"{key} {k}")


# ---------------------------------------------------------------- options vs reference


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam"])
def test_keras_eps_mode_matches_the_reference_and_differs_from_torchs(cls_name, rng):
    # A large eps makes the two placements of eps visibly different.
    params = random_params(rng, [(30,)])
    torch_mode = [p.copy() for p in params]
    opt = getattr(cpuadam, cls_name)(params, lr=1e-2, eps=0.1, eps_mode="keras")
    other = getattr(cpuadam, cls_name)(torch_mode, lr=1e-2, eps=0.1)
    ref = Reference(params, decoupled=cls_name == "AdamW")
    for _ in range(10):
        grads = random_grads(rng, params)
        opt.step(grads)
        other.step(grads)
        ref.step(grads, [hyper(cls_name, lr=1e-2, eps=0.1, eps_mode="keras")])
    assert_matches_reference(params, ref, lr=1e-2)
    assert np.max(np.abs(params[0] - torch_mode[0])) > 1e-4


def test_independent_decay_mode_matches_the_reference_and_differs_from_lr_scaled(rng):
    params = random_params(rng, [(4, 7)])
    scaled = [p.copy() for p in params]
    opt = cpuadam.AdamW(params, lr=1e-3, weight_decay=1e-3, decay_mode="independent")
    other = cpuadam.AdamW(scaled, lr=1e-3, weight_decay=1e-3)
    ref = Reference(params, decoupled=True)
    for _ in range(10):
        grads = random_grads(rng, params)
        opt.step(grads)
        other.step(grads)
        ref.step(grads, [hyper("AdamW", weight_decay=1e-3, decay_mode="independent")])
    assert_matches_reference(params, ref, lr=1e-3)
    assert np.max(np.abs(params[0] - scaled[0])) > 1e-3


def test_amsgrad_switched_on_and_off_mid_training_matches_the_reference(rng):
    params = random_params(rng, [(11,), (2, 5)])
    opt = cpuadam.AdamW(params, lr=1e-2)
    ref = Reference(params, decoupled=True)
    schedule = [False] * 3 + [True] * 4 + [False] * 2 + [True] * 3
    for amsgrad in schedule:
        opt.param_groups[0]["amsgrad"] = amsgrad
        grads = random_grads(rng, params)
        # Shrinking grads make max_exp_avg_sq differ from exp_avg_sq.
        grads = [g * np.float32(0.5 ** len(ref.steps)) if amsgrad else g for g in grads]
        opt.step(grads)
        ref.step(grads, [hyper("AdamW", lr=1e-2, amsgrad=amsgrad)] * 2)
        assert ("max_exp_avg_sq" in opt.state[0]) == ("max_exp_avg_sq" in ref.state[0])
    assert_matches_reference(params, ref, lr=1e-2)
    np.testing.assert_allclose(opt.state[1]["max_exp_avg_sq"], ref.state[1]["max_exp_avg_sq"], rtol=1e-5)


def test_maximize_matches_the_reference(rng):
    params = random_params(rng, [(12,)])
    opt = cpuadam.Adam(params, lr=1e-2, weight_decay=0.1, maximize=True)
    ref = Reference(params, decoupled=False)
    for _ in range(10):
        grads = random_grads(rng, params)
        opt.step(grads)
        ref.step(grads, [hyper("Adam", lr=1e-2, weight_decay=0.1, maximize=True)])
    assert_matches_reference(params, ref, lr=1e-2)


def test_zero_dimensional_and_empty_params_step_like_the_rest(rng):
    params = [f32(rng.standard_normal()), f32(np.zeros((0,))), f32(np.zeros((3, 0))),
              f32(rng.standard_normal(4))]
    opt = cpuadam.AdamW(params, lr=1e-2)
    ref = Reference(params, decoupled=True)
    for _ in range(5):
        grads = [f32(rng.standard_normal(p.shape)) for p in params]
        opt.step(grads)
        ref.step(grads, [hyper("AdamW", lr=1e-2)] * 4)
    assert params[0].shape == () and params[1].shape == (0,) and params[2].shape == (3, 0)
    assert [opt.state[k]["step"] for k in range(4)] == [5] * 4
    assert opt.state[0]["exp_avg"].shape == () and opt.state[2]["exp_avg_sq"].shape == (3, 0)
    assert_matches_reference(params, ref, lr=1e-2)


# ---------------------------------------------------------------- state_dict


def trained_opt(rng, steps=3):
    params = random_params(rng, [(6,), (2, 3), (4,)])
    opt = cpuadam.AdamW([{"params": params[:2], "lr": 1e-2},
                         {"params": params[2:], "amsgrad": True, "betas": (0.8, 0.9)}])
    for _ in range(steps):
        opt.step(random_grads(rng, params))
    return opt, params


def test_state_dict_has_torchs_layout(rng):
    opt, params = trained_opt(rng)
    sd = opt.state_dict()
    assert {"state", "param_groups"} <= set(sd)
    assert sorted(sd["state"]) == [0, 1, 2]
    for k, p in enumerate(params):
        entry = sd["state"][k]
        expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if k == 2 else set())
        assert set(entry) == expected
        assert entry["step"] == 3
        for key in expected - {"step"}:
            assert entry[key].shape == p.shape and entry[key].dtype == np.float32
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    for saved, group in zip(sd["param_groups"], opt.param_groups):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
            assert saved[key] == group[key]
    assert sd["param_groups"][0]["lr"] == 1e-2 and sd["param_groups"][1]["betas"] == (0.8, 0.9)


def test_pickled_state_dict_is_a_snapshot(rng):
    opt, params = trained_opt(rng)
    blob = pickle.dumps(opt.state_dict())
    frozen = copy.deepcopy(opt.state_dict())
    opt.step(random_grads(rng, params))
    loaded = pickle.loads(blob)
    for k, entry in frozen["state"].items():
        assert loaded["state"][k]["step"] == entry["step"] == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert loaded["state"][k][key].tobytes() == entry[key].tobytes()
            assert loaded["state"][k][key].tobytes() != opt.state[k][key].tobytes()


def test_checkpoint_round_trip_continues_bitwise_identically(rng):
    params = random_params(rng, [(13,), (3, 7), (5,)])
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.2},  # noqa: E731
                         {"params": ps[2:], "amsgrad": True, "maximize": True}]
    opt = cpuadam.AdamW(groups(params), lr=3e-3)
    all_grads = [random_grads(rng, params) for _ in range(10)]
    for k in range(4):
        grads = list(all_grads[k])
        if k == 1:
            grads[1] = None  # step counts now differ inside group 0
        opt.step(grads)
    blob = pickle.dumps(opt.state_dict())
    saved_params = [p.copy() for p in params]
    for grads in all_grads[4:]:
        opt.step(grads)

    # A fresh optimizer with other hyperparameters takes them from the checkpoint.
    resumed = cpuadam.AdamW([{"params": saved_params[:2]}, {"params": saved_params[2:]}], lr=0.5)
    resumed.load_state_dict(pickle.loads(blob))
    assert resumed.param_groups[0]["lr"] == 1e-2 and resumed.param_groups[1]["amsgrad"] is True
    for grads in all_grads[4:]:
        resumed.step(grads)
    assert snapshot(resumed)[:2] == snapshot(opt)[:2]
    assert [p.tobytes() for p in saved_params] == [p.tobytes() for p in params]


def test_load_state_dict_copies_the_arrays(rng):
    opt, params = trained_opt(rng)
    sd = copy.deepcopy(opt.state_dict())
    other = cpuadam.AdamW([{"params": [p.copy() for p in params[:2]]}, {"params": [params[2].copy()]}])
    other.load_state_dict(sd)
    kept = other.state[0]["exp_avg"].copy()
    sd["state"][0]["exp_avg"][...] = 7.0
    assert other.state[0]["exp_avg"].tobytes() == kept.tobytes()
    assert other.state[0]["exp_avg"] is not opt.state[0]["exp_avg"]


def _one_group(d):
    d["param_groups"] = d["param_groups"][:1]


def _smaller_group(d):
    d["param_groups"][1]["params"] = []


def _larger_group(d):
    d["param_groups"][0]["params"] = [0, 1, 5]


def _transposed_state(d):
    d["state"][1]["exp_avg"] = d["state"][1]["exp_avg"].T.copy()


def _unknown_id(d):
    d["state"][9] = d["state"][0]


def _bad_lr(d):
    d["param_groups"][1]["lr"] = -1.0


def _no_param_groups(d):
    del d["param_groups"]


MISMATCHES = {
    "group-count": (_one_group, r"^loaded state dict has a different number of parameter groups$"),
    "group-smaller": (_smaller_group,
                      r"^loaded state dict contains a parameter group 1 that doesn't match the size"),
    "group-larger": (_larger_group,
                     r"^loaded state dict contains a parameter group 0 that doesn't match the size"),
    "state-shape": (_transposed_state,
                    r"^loaded state 'exp_avg' for param 1 has shape \(3, 2\), expected \(2, 3\)$"),
    "unknown-id": (_unknown_id, r"^loaded state dict has state for unknown param id 9$"),
    "bad-lr": (_bad_lr, r"^Invalid learning rate in group 1: -1.0$"),
    "no-param-groups": (_no_param_groups, r"^state_dict must be a dict with 'state' and 'param_groups'$"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_load_state_dict_rejects_a_mismatch_and_changes_nothing(case, rng):
    opt, _ = trained_opt(rng)
    target, _ = trained_opt(rng, steps=2)
    edit, message = MISMATCHES[case]
    bad = copy.deepcopy(opt.state_dict())
    edit(bad)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(bad)
    assert snapshot(target) == before
    assert all(s["step"] == 2 for s in target.state.values())


# ---------------------------------------------------------------- repr and docs


def test_repr_names_the_class_and_every_groups_hyperparameters():
    opt = cpuadam.AdamW([{"params": [f32(np.ones(2))]},
                         {"params": [f32(np.ones(3))], "lr": 0.25, "betas": (0.5, 0.75)}], eps=1e-6)
    text = repr(opt)
    assert text.startswith("AdamW (")
    body = text.split("Parameter Group 1")
    assert len(body) == 2 and "Parameter Group 0" in body[0]
    for part, group in zip(body, opt.param_groups):
        for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "eps_mode", "decay_mode"):
            assert f"{key}: {group[key]}" in part, key
    assert "lr: 0.25" in body[1] and "betas: (0.5, 0.75)" in body[1] and "eps: 1e-06" in body[1]
    assert repr(cpuadam.Adam([f32(np.ones(1))])).startswith("Adam (")


def test_docstring_examples_run_as_written():
    with_examples = {t.name for t in doctest.DocTestFinder().find(cpuadam.optim) if t.examples}
    assert {"cpuadam.optim.Adam", "cpuadam.optim.AdamW"} <= with_examples
    results = doctest.testmod(cpuadam.optim, optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.failed == 0 and results.attempted > 0


def test_state_buffers_share_the_params_offset_within_a_cache_line():
    # The core peels each run to a 64-byte line of the param; state allocated at
    # the same offset is then aligned with it (see _groups.buffer_like).
    raw = np.zeros(4 * 100 + 64, dtype=np.uint8)
    start = (20 - raw.__array_interface__["data"][0]) % 64  # a param 20 bytes into a line
    params = [np.ones(100, dtype=np.float32), raw[start:start + 4 * 100].view(np.float32)]
    opt = cpuadam.AdamW(params, amsgrad=True, use_ema=True, gradient_accumulation_steps=2)
    for _ in range(2):
        opt.step([np.ones_like(p) for p in params])
    for i, p in enumerate(params):
        offset = p.__array_interface__["data"][0] % 64
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ema", "grad_accum"):
            buf = opt.state[i][key]
            assert buf.__array_interface__["data"][0] % 64 == offset, (i, key)
            assert buf.flags.c_contiguous and buf.flags.writeable and buf.shape == p.shape
