# SPDX-License-Identifier: MIT
"""The one engine under both front-ends: options in cpuadam.torch, live plans, torch.optim's own
path, meta params, GradScaler, checkpoint faults, concurrency."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest

import cpuadam

torch = pytest.importorskip("torch")
import cpuadam.torch as ct  # noqa: E402

SHAPES = [(5, 3), (7,), (33,), (2, 2, 2)]

OPTIONS = {
    "clipnorm": dict(clipnorm=0.5),
    "clipvalue": dict(clipvalue=0.05),
    "global_clipnorm": dict(global_clipnorm=0.7),
    "loss_scale": dict(loss_scale_factor=512.0),
    "dynamic_loss_scale": dict(loss_scale_factor="dynamic"),
    "accumulation": dict(gradient_accumulation_steps=3),
    "ema": dict(use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=4),
    "skip_nonfinite": dict(skip_nonfinite=True),
    "mask": dict(weight_decay_mask=[True, False, True, False]),
    "exclude": dict(exclude_from_weight_decay=["b1", "b3"]),
    "schedule": dict(lr=cpuadam.schedules.cosine(0.05, 2, 9)),
}


def options(name: str) -> dict:
    kw = dict(OPTIONS[name])
    if kw.get("loss_scale_factor") == "dynamic":
        kw["loss_scale_factor"] = cpuadam.DynamicLossScale(2.0**6, growth_interval=2)
    return kw


def grads_for(rng, step: int, scale: float = 1.0):
    out = [np.float32(scale) * rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    if step == 3:
        out[1] = None  # a param without a grad on one step
    if step == 5:
        out[0][0] = np.inf  # a non-finite step
    return out


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam", "SGD"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_gives_cpuadam_torch_the_numpy_classes_bits(name, cls_name):
    """The NumPy classes are checked against float64 references (test_features.py); the
    torch classes run the same engine, so they must give the same bytes."""
    rng_values = np.random.default_rng(0).standard_normal
    init = [rng_values(s).astype(np.float32) for s in SHAPES]
    names = ["w0", "b1", "w2", "b3"]
    kw = options(name)
    hyper = dict(lr=kw.pop("lr", 0.01), weight_decay=0.1)
    if cls_name == "SGD":
        hyper["momentum"] = 0.9
    arrays = [p.copy() for p in init]
    tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
    np_opt = getattr(cpuadam, cls_name)(list(zip(names, arrays)), **hyper, **kw)
    kw = options(name)
    kw.pop("lr", None)
    t_opt = getattr(ct, cls_name)(list(zip(names, tensors)), **hyper, **kw)
    rng = np.random.default_rng(1)
    scale = 512.0 if "loss_scale" in name else 1.0
    for step in range(9):
        grads = grads_for(rng, step, scale)
        if name not in ("skip_nonfinite", "dynamic_loss_scale") and step == 5:
            grads[0][0] = 0.5
        np_opt.step([None if g is None else g.copy() for g in grads])
        for t, g in zip(tensors, grads):
            t.grad = None if g is None else torch.from_numpy(g.copy())
        t_opt.step()
        for a, t in zip(arrays, tensors):
            assert a.tobytes() == t.detach().numpy().tobytes(), (name, step)
    assert np_opt.iterations == t_opt.iterations
    if "ema" in name:
        for a, t in zip(np_opt.ema_params(), t_opt.ema_params()):
            assert a.tobytes() == t.numpy().tobytes()


@pytest.mark.parametrize("name", ["ema", "accumulation", "dynamic_loss_scale", "mask"])
def test_a_checkpoint_with_options_resumes_bitwise_and_loads_into_torch_optim(name):
    def make():
        ps = [torch.nn.Parameter(torch.ones(s)) for s in SHAPES]
        return ps, ct.AdamW(list(zip(["w0", "b1", "w2", "b3"], ps)), lr=0.01, **options(name))

    rng = np.random.default_rng(2)
    grads = [[torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
             for _ in range(6)]
    ps, opt = make()
    for k in range(6):
        if k == 3:
            ckpt = copy.deepcopy(opt.state_dict())
            saved = [p.detach().clone() for p in ps]
        for p, g in zip(ps, grads[k]):
            p.grad = g.clone()
        opt.step()
    ps2, opt2 = make()
    with torch.no_grad():
        for p, s in zip(ps2, saved):
            p.copy_(s)
    opt2.load_state_dict(ckpt)
    for k in range(3, 6):
        for p, g in zip(ps2, grads[k]):
            p.grad = g.clone()
        opt2.step()
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(s)) for s in SHAPES], lr=0.01)
    plain.load_state_dict(copy.deepcopy(ckpt))  # torch.optim ignores what it does not know
    assert plain.state_dict()["param_groups"][0]["lr"] == 0.01


# --- plans follow the live state ---------------------------------------------------------

def _torch_pair(cls=ct.AdamW, ref=torch.optim.AdamW, **kw):
    a = [torch.nn.Parameter(torch.ones(s)) for s in SHAPES]
    b = [torch.nn.Parameter(torch.ones(s)) for s in SHAPES]
    return a, cls(a, **kw), b, ref(b, **kw)


def _lockstep(a, oa, b, ob, rng, steps=1):
    for _ in range(steps):
        gs = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()


EDITS = {
    "step_in_place": lambda o: [s["step"].fill_(0) for s in o.state.values()],
    "step_replaced": lambda o: [s.__setitem__("step", torch.tensor(1.0)) for s in o.state.values()],
    "moment_replaced": lambda o: [s.__setitem__("exp_avg", torch.zeros_like(s["exp_avg"]))
                                  for s in o.state.values()],
    "moment_data_swapped": lambda o: [setattr(s["exp_avg_sq"], "data", s["exp_avg_sq"].clone())
                                      for s in o.state.values()],
    "cleared": lambda o: o.state.clear(),
    "loaded": lambda o: o.load_state_dict(copy.deepcopy(o.state_dict())),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_state_edited_between_steps_is_followed_as_torch_optim_follows_it(edit):
    a, oa, b, ob = _torch_pair(lr=0.05)
    rng = np.random.default_rng(3)
    _lockstep(a, oa, b, ob, rng, 3)
    EDITS[edit](oa)
    EDITS[edit](ob)
    _lockstep(a, oa, b, ob, rng, 2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(a, b):
        assert float(oa.state[p]["step"]) == float(ob.state[q]["step"])


def test_numpy_step_count_edited_in_place_restarts_the_bias_correction():
    rng = np.random.default_rng(4)
    p, q = np.ones(9, np.float32), np.ones(9, np.float32)
    oa, ob = cpuadam.AdamW([p], lr=0.1), cpuadam.AdamW([q], lr=0.1)
    for _ in range(3):
        g = rng.standard_normal(9).astype(np.float32)
        oa.step([g])
        ob.step([g.copy()])
    oa.state[0]["step"] = 0
    fresh = cpuadam.AdamW([q.copy()], lr=0.1)
    g = rng.standard_normal(9).astype(np.float32)
    oa.step([g])
    assert oa.state[0]["step"] == 1
    # With step 1 the update is lr * sign-like; against a plan that kept step 4 it differs.
    ob.step([g.copy()])
    assert p.tobytes() != q.tobytes()
    assert fresh is not None


def test_a_load_state_dict_post_hook_may_put_anything_into_state():
    a, oa, _, _ = _torch_pair(lr=0.05)
    _lockstep(a, oa, a, torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), np.random.default_rng(0))

    def hook(opt):
        opt.state["flag"] = True
        opt.state[a[0]]["note"] = "kept"

    oa.register_load_state_dict_post_hook(hook)
    oa.load_state_dict(oa.state_dict())
    for p in a:
        p.grad = torch.ones_like(p)
    oa.step()
    assert oa.state["flag"] is True and oa.state[a[0]]["note"] == "kept"


# --- torch.optim's own path ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["float64", "complex64", "non_contiguous"])
@pytest.mark.parametrize("cls_name", ["AdamW", "Adam", "SGD"])
def test_params_the_kernel_does_not_cover_take_torch_optims_path_bitwise(kind, cls_name):
    def make():
        if kind == "float64":
            t = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
        elif kind == "complex64":
            t = torch.complex(torch.linspace(-1, 1, 12), torch.linspace(1, 2, 12)).reshape(3, 4)
        else:
            t = torch.linspace(-1, 1, 12).reshape(4, 3).t()
        return [torch.nn.Parameter(t.clone() if kind != "non_contiguous" else t),
                torch.nn.Parameter(torch.ones(5))]

    kw = dict(lr=0.05, momentum=0.9) if cls_name == "SGD" else dict(lr=0.05, amsgrad=True)
    a, b = make(), make()
    oa, ob = getattr(ct, cls_name)(a, **kw), getattr(torch.optim, cls_name)(b, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a[0], b[0])
    assert list(oa.torch_path) == ["params[0] in group 0"]
    for key, value in ob.state[b[0]].items():
        assert torch.equal(oa.state[a[0]][key], value), key


def test_differentiable_groups_take_torch_optims_path():
    w0 = torch.randn(4, requires_grad=True)
    results = []
    for cls in (ct.SGD, torch.optim.SGD):
        w = w0.clone()  # non-leaf: torch's differentiable step needs it
        opt = cls([w], lr=0.1, momentum=0.9, differentiable=True)
        w.grad = torch.ones(4)
        opt.step()
        results.append(w)
    assert torch.equal(results[0], results[1])


def test_sgd_sparse_grads_take_torch_optims_path():
    a, b = torch.nn.Parameter(torch.ones(6, 2)), torch.nn.Parameter(torch.ones(6, 2))
    oa, ob = ct.SGD([a], lr=0.1), torch.optim.SGD([b], lr=0.1)
    g = torch.sparse_coo_tensor([[1, 4]], torch.ones(2, 2), (6, 2), check_invariants=True)
    a.grad, b.grad = g.clone(), g.clone()
    oa.step()
    ob.step()
    assert torch.equal(a, b) and "sparse grad" in oa.torch_path.values()


# --- meta params, GradScaler ------------------------------------------------------------------

def test_meta_params_are_accepted_until_materialised_by_to_empty():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = ct.AdamW(model.parameters(), lr=0.01)
    model.weight.grad = torch.zeros(3, 4, device="meta")
    with pytest.raises(ValueError, match=r"params\[0\] in group 0 .* device 'meta'"):
        opt.step()
    # Swapping keeps the Parameter objects the optimizer holds (without it, to_empty makes
    # new ones and the optimizer is built afterwards, as with torch.optim).
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert opt.param_groups[0]["params"][0] is model.weight
    model.zero_grad()
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ref = torch.nn.Linear(4, 3)
    with torch.no_grad():
        ref.weight.fill_(1.0)
        ref.bias.fill_(0.0)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    for m in (model, ref):
        m(torch.ones(2, 4)).sum().backward()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(model.weight, ref.weight, rtol=1e-6, atol=1e-7)


def test_a_grad_scaler_loop_matches_torch_fused_adamw_including_an_inf_step():
    def run(cls, **kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = cls(model.parameters(), lr=0.01, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        gen = torch.Generator().manual_seed(1)
        for k in range(8):
            x = torch.randn(5, 6, generator=gen)
            loss = model(x).pow(2).sum()
            if k == 4:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return model, scaler.get_scale()

    ours, s1 = run(ct.AdamW)
    ref, s2 = run(torch.optim.AdamW, fused=True)
    assert s1 == s2
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)


# --- checkpoint faults, bad hyperparameters, concurrency ------------------------------------

def _trained_numpy():
    p = [np.ones(4, np.float32), np.ones(3, np.float32)]
    opt = cpuadam.AdamW(p, lr=0.01)
    opt.step([np.ones(4, np.float32), np.ones(3, np.float32)])
    return opt


FAULTS = {
    "sgd_state": (lambda d: d["state"].update({0: {"momentum_buffer": np.zeros(4, np.float32)}}),
                  "cannot be loaded into Adam"),
    "fractional_step": (lambda d: d["state"][0].update(step=2.7), r"'step' of param 0 is 2.7"),
    "nan_step": (lambda d: d["state"][0].update(step=float("nan")), r"'step' of param 0 is nan"),
    "huge_step": (lambda d: d["state"][0].update(step=2**63), r"'step' of param 0"),
    "negative_scale": (lambda d: d.update(loss_scale={"scale": -4.0}), "loss_scale"),
    "one_moment": (lambda d: d["state"][0].pop("exp_avg_sq"), "only one of"),
    "decay_mask": (lambda d: d["param_groups"][0].update(decay_mask=[True]), "'decay_mask' in group 0"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_malformed_checkpoint_is_refused_at_load_and_nothing_changes(fault):
    opt = _trained_numpy()
    opt_ls = cpuadam.AdamW([np.ones(4, np.float32), np.ones(3, np.float32)],
                           loss_scale_factor=cpuadam.DynamicLossScale())
    target = opt_ls if fault == "negative_scale" else opt
    bad = copy.deepcopy(opt.state_dict())
    FAULTS[fault][0](bad)
    import pickle
    before = pickle.dumps(target.state_dict())
    with pytest.raises(ValueError, match=FAULTS[fault][1]):
        target.load_state_dict(bad)
    assert pickle.dumps(target.state_dict()) == before


def test_a_malformed_torch_checkpoint_is_refused_and_the_optimizer_is_unchanged():
    a, oa, _, _ = _torch_pair(lr=0.05)
    for p in a:
        p.grad = torch.ones_like(p)
    oa.step()
    bad = copy.deepcopy(oa.state_dict())
    bad["state"][1]["step"] = torch.tensor(float("nan"))
    before = copy.deepcopy(oa.state_dict())
    with pytest.raises(ValueError, match=r"'step' of param 1 is nan"):
        oa.load_state_dict(bad)
    after = oa.state_dict()
    for k, st in before["state"].items():
        for key, value in st.items():
            assert torch.equal(after["state"][k][key], value)


@pytest.mark.parametrize("make", [
    lambda: cpuadam.AdamW([np.ones(3, np.float32)], lr=1e300),
    lambda: ct.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e39),
    lambda: cpuadam.SGD([np.ones(3, np.float32)], lr=0.1, momentum=1e40),
], ids=["numpy-lr", "torch-lr", "momentum"])
def test_hyperparameters_that_overflow_float32_are_refused_naming_them(make):
    with pytest.raises(ValueError, match="cannot be converted to float32 without overflow"):
        make()


def test_two_threads_stepping_one_optimizer_never_corrupt_it():
    n = 1 << 20
    p = np.zeros(n, np.float32)
    opt = cpuadam.SGD([p], lr=1.0)
    g = np.ones(n, np.float32)
    errors, done = [], []

    def worker():
        for _ in range(30):
            try:
                opt.step([g])
                done.append(1)
            except RuntimeError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("already stepping in another thread" in e for e in errors)
    # Every applied step moved every element by exactly lr * g.
    assert np.all(p == -float(len(done)))


# --- freed storage, step in backward ------------------------------------------------------

@pytest.mark.parametrize("which", ["param", "grad"])
def test_a_freed_torch_storage_is_refused_and_nothing_changes(which):
    # (A storage cpuadam has viewed is no longer resizable: torch refuses resize_ on it.)
    a, oa, _, _ = _torch_pair(lr=0.05)
    for p in a:
        p.grad = torch.ones_like(p)
    target = a[2] if which == "param" else a[2].grad
    before = [p.detach().clone() for p in a if p is not a[2]]
    target.untyped_storage().resize_(0)  # as FSDP frees a sharded param's storage
    with pytest.raises(ValueError, match=r"storage holds 0 bytes but the tensor needs 132"):
        oa.step()
    assert len(oa.state) == 0
    assert all(torch.equal(p, q) for p, q in zip([p for p in a if p is not a[2]], before))


def test_step_in_backward_with_a_bad_group_steps_nothing():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    handle = ct.step_in_backward([{"params": model[0].parameters()},
                                  {"params": model[1].parameters()}], lr=0.01)
    handle.optimizer.param_groups[0]["lr"] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="Invalid learning rate in group 0: nan"):
        model(torch.ones(2, 3)).sum().backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(float(s["step"]) == 0 for s in handle.optimizer.state.values())


def test_step_in_backward_advances_a_schedule_once_per_backward():
    model = torch.nn.Linear(3, 2)
    sched = cpuadam.schedules.linear_warmup_decay(0.1, 2, 6)
    handle = ct.step_in_backward(model, lr=sched)
    for _ in range(3):
        model(torch.ones(2, 3)).sum().backward()
    assert handle.optimizer.iterations == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"betas": (torch.tensor(0.9), 0.999)}, "betas must be either both floats or both Tensors"),
    ({"lr": torch.tensor([1e-3, 2e-3])}, "Tensor lr must be 1-element"),
])
def test_the_same_misuse_gets_torchs_words(kwargs, message):
    for cls in (ct.AdamW, torch.optim.AdamW):
        with pytest.raises(ValueError, match=message):
            cls([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_tensor_betas_step_like_float_betas():
    a, b = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    oa = ct.AdamW([a], betas=(torch.tensor(0.8), torch.tensor(0.99)))
    ob = ct.AdamW([b], betas=(0.8, 0.99))
    for opt, p in ((oa, a), (ob, b)):
        p.grad = torch.linspace(-1, 1, 5)
        opt.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize("frontend", ["numpy", "torch"])
@pytest.mark.parametrize("option", [("state_dtype", "8bit"), ("param_update", "stochastic"),
                                    ("clipnorm", 1.0), ("min_8bit_size", 1), ("use_ema", True)])
def test_an_optimizer_wide_option_in_a_param_group_is_refused_not_ignored(frontend, option):
    """torch keeps unknown group keys silently; a cpuadam option there would silently do nothing
    (state_dtype="8bit" in one group and float32 states everywhere), so it is refused, in the
    constructor's groups and in add_param_group, and the optimizer stays as it was."""
    key, value = option
    if frontend == "numpy":
        make = lambda groups: cpuadam.AdamW(groups, lr=1e-3)
        param = lambda: np.zeros(5, np.float32)
    else:
        make = lambda groups: ct.AdamW(groups, lr=1e-3)
        param = lambda: torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=f"{key} in group 1 is an option of the whole optimizer"):
        make([{"params": [param()]}, {"params": [param()], key: value}])
    opt = make([{"params": [param()]}])
    with pytest.raises(ValueError, match=f"{key} in group 1 is an option of the whole optimizer"):
        opt.add_param_group({"params": [param()], key: value})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("saved", ["float64", "float16", "bfloat16", "bfloat16 bits"])
def test_numpy_moments_of_another_dtype_load_in_the_dtype_the_step_uses(saved):
    # As the torch front-end loads them: cast to the optimizer's state dtype, then the
    # steps go on as from those cast values. 16-bit integers are bfloat16 bits, as a
    # torch bfloat16 tensor's NumPy view holds them.
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if saved.startswith("bfloat16") else np.dtype(saved)
    rng = np.random.default_rng(21)
    p = rng.standard_normal(50).astype(np.float32)
    sd = {"state": {0: {"step": 3, "exp_avg": (0.1 * rng.standard_normal(50)).astype(dtype),
                        "exp_avg_sq": (0.01 * rng.random(50)).astype(dtype)}},
          "param_groups": [{"params": [0], "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
                            "weight_decay": 0.01, "amsgrad": False, "maximize": False}]}
    cast = copy.deepcopy(sd)
    for key in ("exp_avg", "exp_avg_sq"):
        cast["state"][0][key] = cast["state"][0][key].astype(np.float32)
        if saved == "bfloat16 bits":
            sd["state"][0][key] = sd["state"][0][key].view(np.uint16)
    a, b = p.copy(), p.copy()
    oa, ob = cpuadam.AdamW([a]), cpuadam.AdamW([b])
    oa.load_state_dict(sd)
    ob.load_state_dict(cast)
    assert oa.state[0]["exp_avg"].dtype == np.float32
    for _ in range(2):
        g = rng.standard_normal(50).astype(np.float32)
        oa.step([g])
        ob.step([g])
    assert a.tobytes() == b.tobytes()


def test_an_accumulated_grad_of_a_bad_dtype_is_named_as_without_accumulation():
    for k in (1, 3):
        params = [np.ones(4, np.float32), np.ones(4, np.float32)]
        opt = cpuadam.AdamW(params, gradient_accumulation_steps=k)
        with pytest.raises(TypeError, match=r"^grad of params\[1\] in group 0: expected a float32 "
                                            r"array, got float64$"):
            opt.step([np.ones(4, np.float32), np.ones(4, np.float64)])
        assert all(np.all(p == 1) for p in params)


@pytest.mark.parametrize("front", ["numpy", "torch"])
@pytest.mark.parametrize("edit,match", [
    (lambda st: st.__setitem__("step", -1), r"'step' of params\[0\] in group 0 is -1"),
    (lambda st: st.__setitem__("step", 2.5), r"'step' of params\[0\] in group 0 is 2.5"),
    (lambda st: st.pop("exp_avg_sq"), r"state for params\[0\] in group 0 has only one of"),
])
def test_live_state_a_checkpoint_could_not_hold_is_refused_by_the_step(front, edit, match):
    if front == "numpy":
        p = np.ones(4, np.float32)
        opt = cpuadam.AdamW([p], lr=0.1)
        step = lambda: opt.step([np.ones(4, np.float32)])  # noqa: E731
    else:
        p = torch.nn.Parameter(torch.ones(4))
        opt = ct.AdamW([p], lr=0.1)

        def step():
            p.grad = torch.ones(4)
            opt.step()
    for _ in range(2):
        step()
    st = opt.state[0] if front == "numpy" else opt.state[p]
    if front == "torch" and "step" in match:
        edit = (lambda st, v=(-1.0 if "-1" in match else 2.5): st.__setitem__("step", torch.tensor(v)))
    edit(st)
    values = (lambda: p.detach().numpy().copy()) if front == "torch" else (lambda: p.copy())
    before = values()
    with pytest.raises(ValueError, match=match):
        step()
    assert np.array_equal(values(), before)


def test_a_misspelled_option_names_the_optimizer():
    for make in (lambda: cpuadam.AdamW([np.ones(3, np.float32)], clip_norm=1.0),
                 lambda: cpuadam.SGD([np.ones(3, np.float32)], clip_norm=1.0),
                 lambda: ct.AdamW([torch.nn.Parameter(torch.ones(3))], clip_norm=1.0)):
        with pytest.raises(TypeError, match=r"^(AdamW|SGD)\(\) got an unexpected keyword argument "
                                            r"'clip_norm'$"):
            make()


def test_a_schedule_is_asked_once_per_step_even_when_the_step_is_planned_again():
    calls = []

    def schedule(step):
        calls.append(step)
        return 1e-2

    p = np.ones(8, np.float32)
    opt = cpuadam.AdamW([p], lr=schedule)
    opt.step([np.ones(8, np.float32)])
    opt.step([np.ones(8, np.float16)])  # the reused plan's grad dtype no longer fits
    assert calls == [1, 2]


def test_a_float64_param_beside_the_fused_ones_steps_with_use_ema():
    # The engine's EMA state for a param torch.optim steps must not stop torch's step.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(4))
    ref = torch.nn.Parameter(p.detach().clone())
    opt, ref_opt = ct.AdamW([p, q], lr=1e-2, use_ema=True), torch.optim.AdamW([ref], lr=1e-2)
    for _ in range(2):
        p.grad, q.grad, ref.grad = torch.ones(4, dtype=torch.float64), torch.ones(4), \
            torch.ones(4, dtype=torch.float64)
        opt.step()
        ref_opt.step()
    assert torch.equal(p, ref)
