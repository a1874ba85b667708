# SPDX-License-Identifier: MIT
"""cpuadam.torch against torch.optim: parity, checkpoints both ways, schedulers, hooks, errors."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import cpuadam.torch as ct  # noqa: E402
from torch_models import backward, batches, make_model, save_and_load, two_groups  # noqa: E402
from reference import adam_step  # noqa: E402


def lockstep(ours_model, ours_opt, ref_model, ref_opt, steps, data, schedulers=(),
             drop_grads=None):
    """Trains both: grads come from our model's backward and are copied to the reference.

    Feeding the same grads isolates the optimizers; otherwise float32 rounding in
    the forward pass would make the two runs drift apart for reasons unrelated to
    the step. drop_grads(step, index) -> True leaves that param's grad as None.
    """
    for step in range(steps):
        ours_opt.zero_grad()
        ref_opt.zero_grad()
        backward(ours_model, next(data))
        for i, (p, q) in enumerate(zip(ours_model.parameters(), ref_model.parameters())):
            if drop_grads is not None and drop_grads(step, i):
                p.grad = None
            q.grad = None if p.grad is None else p.grad.clone()
        ours_opt.step()
        ref_opt.step()
        for s in schedulers:
            s.step()


def assert_close(actual, expected, what):
    """rtol 1e-5 elementwise, with an absolute floor of 1e-6 of the tensor's largest value.

    The floor keeps elements that pass through zero (where float32 rounding of a
    difference dominates any relative bound) from deciding the verdict.
    """
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale + 1e-30,
                               msg=lambda m: f"{what}: {m}")


def assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt):
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert_close(p.detach(), q.detach(), name)
    ours_state = ours_opt.state_dict()["state"]
    ref_state = ref_opt.state_dict()["state"]
    assert ours_state.keys() == ref_state.keys()
    for index, ref_entry in ref_state.items():
        assert ours_state[index].keys() == ref_entry.keys()
        for key, value in ref_entry.items():
            if key == "step":
                assert ours_state[index][key].item() == value.item()
                assert ours_state[index][key].dtype == value.dtype
            else:
                assert_close(ours_state[index][key], value, f"state[{index}][{key!r}]")


def snapshot(model, opt):
    """Bit patterns of every param and state tensor, to prove a rejected step changed nothing."""
    params = [p.detach().clone().view(torch.int32) for p in model.parameters()]
    state = {id(p): {k: v.detach().clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_unchanged(model, opt, before):
    params, state = before
    for p, saved in zip(model.parameters(), params):
        assert torch.equal(p.detach().view(torch.int32), saved)
    assert {id(p) for p in opt.state} == set(state)
    for p, entry in opt.state.items():
        assert entry.keys() == state[id(p)].keys()
        for k, v in entry.items():
            assert torch.equal(v, state[id(p)][k])


CONFIGS = {
    "defaults": {},
    "amsgrad": {"amsgrad": True},
    "maximize": {"maximize": True},
    "weight_decay": {"weight_decay": 0.1},
    "every_option": {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05,
                     "amsgrad": True, "maximize": True},
}
PAIRS = {"AdamW": (ct.AdamW, torch.optim.AdamW), "Adam": (ct.Adam, torch.optim.Adam)}


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("config", CONFIGS)
def test_hundred_steps_match_torch_optim(pair, config):
    ours_cls, ref_cls = PAIRS[pair]
    kwargs = {"lr": 1e-2, **CONFIGS[config]}
    ours_model, ref_model = make_model(), make_model()
    ours_opt = ours_cls(ours_model.parameters(), **kwargs)
    ref_opt = ref_cls(ref_model.parameters(), **kwargs)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 100, batches(1))
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


@pytest.mark.parametrize("pair", PAIRS)
def test_two_param_groups_match_torch_optim(pair):
    ours_cls, ref_cls = PAIRS[pair]
    ours_model, ref_model = make_model(), make_model()
    first = {"lr": 5e-3, "weight_decay": 0.0, "amsgrad": True}
    ours_opt = ours_cls(two_groups(ours_model, **first), lr=1e-2, weight_decay=0.02)
    ref_opt = ref_cls(two_groups(ref_model, **first), lr=1e-2, weight_decay=0.02)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 100, batches(2))
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_adam_with_decoupled_weight_decay_matches_torch_optim():
    ours_model, ref_model = make_model(), make_model()
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}
    ours_opt = ct.Adam(ours_model.parameters(), **kwargs)
    ref_opt = torch.optim.Adam(ref_model.parameters(), **kwargs)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 30, batches(3))
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_params_stepped_different_numbers_of_times_match_torch_optim():
    # Params whose grads are sometimes None end up on different step counts, which
    # the kernel call batches separately; torch simply skips them.
    ours_model, ref_model = make_model(), make_model()
    ours_opt = ct.AdamW(ours_model.parameters(), lr=1e-2, amsgrad=True)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, amsgrad=True)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 40, batches(4),
             drop_grads=lambda step, i: step % (i + 2) == 1)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)
    counts = {s["step"].item() for s in ours_opt.state.values()}
    assert len(counts) > 1


def test_a_tensor_learning_rate_matches_torch_optim():
    ours_model, ref_model = make_model(), make_model()
    ours_opt = ct.AdamW(ours_model.parameters(), lr=torch.tensor(1e-2))
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=torch.tensor(1e-2))
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9) for o in (ours_opt, ref_opt)]
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 20, batches(5), schedulers)
    assert isinstance(ours_opt.param_groups[0]["lr"], torch.Tensor)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_error_against_float64_is_no_larger_than_torchs():
    # The same grads go to cpuadam, torch.optim and the float64 oracle; the
    # oracle's params are the truth both float32 runs are measured against.
    ours_model, ref_model = make_model(), make_model()
    kwargs = {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}
    ours_opt = ct.AdamW(ours_model.parameters(), **kwargs)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), **kwargs)
    exact = [p.detach().double().numpy().copy() for p in ours_model.parameters()]
    states = [{} for _ in exact]
    data = batches(6)
    for step in range(1, 51):
        lockstep(ours_model, ours_opt, ref_model, ref_opt, 1, data)
        for p64, state, q in zip(exact, states, ref_model.parameters()):
            adam_step(p64, q.grad.double().numpy(), state, step=step, lr=1e-2,
                      weight_decay=0.05, amsgrad=True, decoupled=True)
    for p64, p, q in zip(exact, ours_model.parameters(), ref_model.parameters()):
        ours_err = np.abs(p.detach().double().numpy() - p64).max()
        torch_err = np.abs(q.detach().double().numpy() - p64).max()
        ulp = np.spacing(np.float32(np.abs(p64).max()))
        assert ours_err <= 1.5 * torch_err + 4 * ulp


def test_constructor_signatures_and_defaults_are_torchs():
    import inspect

    for ours_cls, ref_cls in PAIRS.values():
        ours = inspect.signature(ours_cls).parameters
        for name, ref in inspect.signature(ref_cls).parameters.items():
            assert name in ours, name
            assert ours[name].default == ref.default, name
            assert ours[name].kind == ref.kind, name
        extras = set(ours) - set(inspect.signature(ref_cls).parameters)
        assert extras == {"eps_mode", "decay_mode", "options"}
        assert ours["options"].kind == inspect.Parameter.VAR_KEYWORD
        assert all(ours[name].kind == inspect.Parameter.KEYWORD_ONLY for name in extras - {"options"})


@pytest.mark.parametrize("pair", PAIRS)
def test_state_dict_has_torchs_layout(pair):
    ours_cls, ref_cls = PAIRS[pair]
    ours_model, ref_model = make_model(), make_model()
    ours_opt = ours_cls(ours_model.parameters(), lr=1e-2, amsgrad=True)
    ref_opt = ref_cls(ref_model.parameters(), lr=1e-2, amsgrad=True)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 2, batches(7))
    ours_sd, ref_sd = ours_opt.state_dict(), ref_opt.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    assert ours_sd["param_groups"] == ref_sd["param_groups"]
    for index, entry in ref_sd["state"].items():
        for key, value in entry.items():
            mine = ours_sd["state"][index][key]
            assert (mine.dtype, mine.shape, mine.device) == (value.dtype, value.shape, value.device)


def test_options_away_from_default_are_kept_in_groups_and_ignored_by_torch():
    model = make_model()
    opt = ct.AdamW(model.parameters(), eps_mode="keras", decay_mode="independent",
                   weight_decay=1e-4)
    backward(model, next(batches(8)))
    opt.step()
    group = opt.state_dict()["param_groups"][0]
    assert (group["eps_mode"], group["decay_mode"]) == ("keras", "independent")
    ref = torch.optim.AdamW(make_model().parameters())
    ref.load_state_dict(opt.state_dict())
    assert ref.param_groups[0]["eps_mode"] == "keras"


def test_keras_eps_and_independent_decay_follow_the_float64_reference():
    torch.manual_seed(3)
    p = nn.Parameter(torch.randn(257))
    opt = ct.AdamW([p], lr=1e-2, weight_decay=1e-3, eps=1e-3, eps_mode="keras",
                   decay_mode="independent")
    p64, state = p.detach().double().numpy().copy(), {}
    for step in range(1, 21):
        p.grad = torch.randn(257)
        opt.step()
        adam_step(p64, p.grad.double().numpy(), state, step=step, lr=1e-2, weight_decay=1e-3,
                  eps=1e-3, decoupled=True, decay_mode="independent", eps_mode="keras")
    # The eps is large on purpose: with eps=1e-8 the two eps modes agree to rounding.
    np.testing.assert_allclose(p.detach().numpy(), p64, rtol=1e-5, atol=1e-6)
    torch_like = ct.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2, weight_decay=1e-3, eps=1e-3)
    assert "eps_mode" not in torch_like.param_groups[0]


@pytest.mark.parametrize("direction", ["torch_to_cpuadam", "cpuadam_to_torch"])
@pytest.mark.parametrize("pair", PAIRS)
def test_checkpoints_load_across_and_training_continues_identically(direction, pair):
    ours_cls, ref_cls = PAIRS[pair]
    to_cpuadam = direction == "torch_to_cpuadam"
    writer_cls, reader_cls = (ref_cls, ours_cls) if to_cpuadam else (ours_cls, ref_cls)
    kwargs = {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}
    model = make_model()
    writer = writer_cls(model.parameters(), **kwargs)
    data = batches(9)
    for _ in range(10):
        writer.zero_grad()
        backward(model, next(data))
        writer.step()
    model_ckpt = save_and_load(model.state_dict())
    opt_ckpt = save_and_load(writer.state_dict())

    # The reader starts with other hyperparameters: the checkpoint's must win.
    resumed = make_model(seed=1)
    resumed.load_state_dict(model_ckpt)
    reader = reader_cls(resumed.parameters(), lr=0.5, weight_decay=0.0)
    reader.load_state_dict(opt_ckpt)
    assert reader.param_groups[0]["lr"] == 1e-2
    if to_cpuadam:
        lockstep(resumed, reader, model, writer, 20, data)
        assert_same_training_state(resumed, reader, model, writer)
    else:
        lockstep(model, writer, resumed, reader, 20, data)
        assert_same_training_state(model, writer, resumed, reader)


def test_a_checkpoint_with_step_counts_as_numbers_still_loads():
    model = make_model()
    opt = ct.AdamW(model.parameters(), lr=1e-2)
    backward(model, next(batches(10)))
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    for entry in old["state"].values():
        entry["step"] = int(entry["step"].item())
    for group in old["param_groups"]:
        del group["foreach"], group["fused"]
    fresh = ct.AdamW(model.parameters())
    fresh.load_state_dict(old)
    step = next(iter(fresh.state.values()))["step"]
    assert isinstance(step, torch.Tensor) and step.item() == 1
    assert fresh.param_groups[0]["fused"] is None


def test_a_checkpoint_with_strided_state_loads_and_training_continues_identically():
    # torch.save keeps strides; the kernel wants contiguous buffers, so loading copies once.
    ours_model, ref_model = make_model(), make_model()
    ours_opt = ct.AdamW(ours_model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    data = batches(22)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 3, data)
    ckpt = copy.deepcopy(ref_opt.state_dict())
    weight = ckpt["state"][1]["exp_avg"]  # fc1.weight's, a matrix
    ckpt["state"][1]["exp_avg"] = weight.t().contiguous().t()
    assert not ckpt["state"][1]["exp_avg"].is_contiguous()
    ours_opt.load_state_dict(save_and_load(ckpt))
    assert all(t.is_contiguous() for s in ours_opt.state.values() for t in s.values())
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 5, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.9 ** s),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10,
                                                                              eta_min=1e-4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=30),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_schedulers_give_torchs_lr_sequence_and_weights(name):
    ours_model, ref_model = make_model(), make_model()
    ours_opt = ct.AdamW(ours_model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    ours_sched, ref_sched = SCHEDULERS[name](ours_opt), SCHEDULERS[name](ref_opt)
    ours_seen, ref_seen = [], []
    data = batches(11)
    for _ in range(30):
        lockstep(ours_model, ours_opt, ref_model, ref_opt, 1, data, (ours_sched, ref_sched))
        ours_seen.append((ours_opt.param_groups[0]["lr"], ours_opt.param_groups[0]["betas"]))
        ref_seen.append((ref_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["betas"]))
    assert ours_seen == ref_seen
    assert len({lr for lr, _ in ref_seen}) > 1
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_zero_grad_and_add_param_group_behave_as_in_torch():
    ours_model, ref_model = make_model(), make_model()
    named_ours, named_ref = dict(ours_model.named_parameters()), dict(ref_model.named_parameters())
    late = ("fc2.weight", "fc2.bias")
    ours_opt = ct.AdamW([p for n, p in named_ours.items() if n not in late], lr=1e-2)
    ref_opt = torch.optim.AdamW([p for n, p in named_ref.items() if n not in late], lr=1e-2)
    data = batches(12)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 5, data)
    for opt, named in ((ours_opt, named_ours), (ref_opt, named_ref)):
        opt.add_param_group({"params": [named[n] for n in late], "lr": 3e-3})
        named["fc2.weight"].grad = None
    # zero_grad(set_to_none=False) keeps zero grads: a step still moves the params
    # through their momentum, as torch's does.
    ours_opt.zero_grad(set_to_none=False)
    ref_opt.zero_grad(set_to_none=False)
    assert named_ours["fc2.weight"].grad is None  # never given one: skipped, as in torch
    assert all(not p.grad.any() for g in ours_opt.param_groups for p in g["params"]
               if p is not named_ours["fc2.weight"])
    ours_opt.step()
    ref_opt.step()
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 5, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)
    ours_opt.zero_grad()
    assert all(p.grad is None for g in ours_opt.param_groups for p in g["params"])


@pytest.mark.parametrize("optimizer_class, hyper", [
    (ct.AdamW, {"lr": 1e-2}), (ct.SGD, {"lr": 5e-2, "momentum": 0.9}),
], ids=["AdamW", "SGD"])
def test_fused_and_foreach_flags_are_kept_and_change_nothing(optimizer_class, hyper):
    results = []
    for flags in ({}, {"fused": True}, {"foreach": True}):
        model = make_model()
        opt = optimizer_class(model.parameters(), **hyper, **flags)
        data = batches(13)
        for _ in range(5):
            opt.zero_grad()
            backward(model, next(data))
            opt.step()
        for key, value in flags.items():
            assert opt.param_groups[0][key] is value
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_step_hooks_fire_and_a_pre_hook_sees_the_closure():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    model = make_model()
    opt = ct.AdamW(model.parameters())
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o, kwargs)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o, kwargs)))
    global_handle = register_optimizer_step_post_hook(
        lambda o, args, kwargs: calls.append(("global", o, kwargs)))
    try:
        batch = next(batches(14))

        def closure():
            opt.zero_grad()
            assert torch.is_grad_enabled()
            return backward(model, batch)

        loss = opt.step(closure=closure)
    finally:
        global_handle.remove()
    assert isinstance(loss, float)
    assert [c[0] for c in calls] == ["pre", "post", "global"]
    assert all(c[1] is opt and c[2] == {"closure": closure} for c in calls)


def test_load_state_dict_hooks_see_and_change_what_loads_as_in_torch():
    """A pre-hook's returned dict is what loads (moments included, checked after the
    hook); post-hooks run once, with the loaded state in place; both as torch.optim."""
    def run(cls):
        torch.manual_seed(0)
        model = make_model()
        opt = cls(model.parameters(), lr=1e-2)
        for batch in itertools.islice(batches(3), 2):
            opt.zero_grad()
            backward(model, batch)
            opt.step()
        sd = opt.state_dict()
        seen = []

        def pre(o, state_dict):
            out = copy.deepcopy(state_dict)
            for entry in out["state"].values():
                entry["exp_avg"].zero_()
            out["param_groups"][0]["lr"] = 0.5
            return out

        def post(o):
            seen.append(sum(float(s["exp_avg"].abs().sum()) for s in o.state.values()))

        opt.register_load_state_dict_pre_hook(pre)
        opt.register_load_state_dict_post_hook(post)
        opt.load_state_dict(sd)
        return opt, seen

    ours, seen_ours = run(ct.AdamW)
    ref, seen_ref = run(torch.optim.AdamW)
    assert seen_ours == seen_ref == [0.0]
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.5
    assert all(float(s["exp_avg"].abs().sum()) == 0 for s in ours.state.values())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("options", [{}, {"use_ema": True, "gradient_accumulation_steps": 2},
                                     {"state_dtype": "8bit", "min_8bit_size": 0}])
def test_a_copied_optimizer_steps_on_as_the_original(how, options):
    import pickle

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(600))
    opt = ct.AdamW([p], lr=1e-2, **options)
    for _ in range(3):
        p.grad = torch.randn(600)
        opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    q = twin.param_groups[0]["params"][0]
    assert q is not p and torch.equal(q, p)
    for _ in range(3):
        g = torch.randn(600)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
        assert torch.equal(p, q)
    assert twin.state_dict().keys() == opt.state_dict().keys()
    for key, value in opt.state[p].items():
        assert torch.equal(twin.state[q][key], value), key


def test_the_kernel_sees_the_tensors_own_memory(monkeypatch):
    model = make_model()
    opt = ct.AdamW(model.parameters(), amsgrad=True)
    seen = []

    def spy(batches, **kwargs):
        seen.extend(batches)
        return real(batches, **kwargs)

    real = ct._core.adam_step
    monkeypatch.setattr(ct._core, "adam_step", spy)
    data = batches(15)
    for _ in range(2):
        backward(model, next(data))
        opt.step()
    address = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    params = list(model.parameters())
    assert len(seen) == 2  # one batch per step: every param is on the same step count
    for batch in seen:
        assert [address(a) for a in batch["params"]] == [p.data_ptr() for p in params]
        assert [address(a) for a in batch["grads"]] == [p.grad.data_ptr() for p in params]
        for key, name in (("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq"),
                          ("max_exp_avg_sqs", "max_exp_avg_sq")):
            assert [address(a) for a in batch[key]] == [opt.state[p][name].data_ptr()
                                                       for p in params]


def test_memory_swapped_under_a_param_or_its_state_is_what_gets_updated():
    # Libraries move tensors by assigning .data; the next step must follow.
    ours_model, ref_model = make_model(), make_model()
    ours_opt = ct.AdamW(ours_model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    data = batches(23)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 2, data)
    for model, opt in ((ours_model, ours_opt), (ref_model, ref_opt)):
        model.fc1.weight.data = model.fc1.weight.data.clone()
        exp_avg = opt.state[model.fc2.weight]["exp_avg"]
        exp_avg.data = exp_avg.data.clone()
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 2, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_a_step_marks_params_modified_for_autograd():
    # As an in-place update would: a graph that saved the old weights must not
    # silently use the new ones.
    model = make_model()
    opt = ct.AdamW(model.parameters())
    tokens, labels = next(batches(16))
    loss = F.cross_entropy(model(tokens), labels)
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_importing_cpuadam_does_not_import_torch():
    code = "import sys, cpuadam; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- rejections: the exception, its message, and nothing changed --------------------------

def trained(steps: int = 2, **kwargs):
    model = make_model()
    opt = ct.AdamW(model.parameters(), lr=1e-2, amsgrad=True, **kwargs)
    data = batches(17)
    for _ in range(steps):
        opt.zero_grad()
        backward(model, next(data))
        opt.step()
    opt.zero_grad()
    backward(model, next(data))
    return model, opt


def rejected_step(model, opt, error, match):
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_unchanged(model, opt, before)


def test_a_sparse_grad_is_rejected_and_nothing_changes():
    model, opt = trained()
    model.fc1.weight.grad = model.fc1.weight.grad.to_sparse()
    rejected_step(model, opt, TypeError,
                  r"grad of params\[1\] in group 0 is a sparse tensor \(torch.sparse_coo\)")


def test_a_grad_of_another_dtype_is_rejected_and_nothing_changes():
    model, opt = trained()
    model.norm.bias.grad_dtype = None  # torch itself refuses such a grad unless asked
    model.norm.bias.grad = model.norm.bias.grad.double()
    rejected_step(model, opt, TypeError,
                  r"grad of params\[4\] in group 0 is torch.float64; expected torch.float32")


def test_a_grad_of_another_shape_is_rejected_and_nothing_changes():
    model, opt = trained()
    model.fc2.bias.grad.data = torch.zeros(3)
    rejected_step(model, opt, ValueError,
                  r"grad of params\[6\] in group 0 has shape \(3,\); expected \(7,\)")


def test_a_param_on_another_device_is_rejected_and_nothing_changes():
    model, opt = trained()
    ghost = nn.Parameter(torch.zeros(3, device="meta"))
    ghost.grad = torch.zeros(3, device="meta")
    opt.param_groups[0]["params"].append(ghost)  # past add_param_group's check
    rejected_step(model, opt, ValueError, r"params\[7\] in group 0 is a torch.strided tensor on "
                  r"device 'meta'; expected a dense CPU tensor")


def test_params_made_to_overlap_are_rejected_and_nothing_changes():
    model, opt = trained()
    model.fc1.bias.data = model.fc1.weight.data.view(-1)[8:40]
    rejected_step(model, opt, ValueError,
                  r"params\[2\] in group 0 shares memory with params\[1\] in group 0")


def test_a_bad_learning_rate_set_between_steps_is_rejected_and_nothing_changes():
    model, opt = trained()
    opt.param_groups[0]["lr"] = float("nan")
    rejected_step(model, opt, ValueError, r"Invalid learning rate in group 0: nan")


def test_a_first_step_that_is_rejected_creates_no_state():
    model = make_model()
    opt = ct.AdamW(model.parameters())
    backward(model, next(batches(18)))
    model.fc2.bias.grad.data = torch.zeros(2)
    rejected_step(model, opt, ValueError, r"grad of params\[6\] in group 0 has shape")
    assert len(opt.state) == 0


@pytest.mark.parametrize("optimizer_class", [ct.AdamW, ct.Adam, ct.SGD], ids=lambda c: c.__name__)
def test_a_param_on_a_non_cpu_device_is_rejected_when_added(optimizer_class):
    if not torch.cuda.is_available():
        pytest.skip("no second device here")
    with pytest.raises(ValueError, match=r"params\[0\] in group 0 is on device 'cuda"):
        optimizer_class([nn.Parameter(torch.zeros(3, device="cuda"))])


@pytest.mark.parametrize("optimizer_class", [ct.AdamW, ct.Adam, ct.SGD], ids=lambda c: c.__name__)
def test_views_into_one_another_are_rejected_when_added_naming_both(optimizer_class):
    base = torch.zeros(10)
    a = base[:6].requires_grad_()
    b = base[4:].requires_grad_()
    with pytest.raises(ValueError, match=r"params\[0\] in group 1 shares memory with "
                                         r"params\[0\] in group 0"):
        optimizer_class([{"params": [a]}, {"params": [b]}])


def test_a_rejected_param_group_is_not_added():
    model = make_model()
    opt = ct.AdamW([model.fc1.weight])
    with pytest.raises(ValueError, match=r"params\[0\] in group 1 shares memory with"):
        opt.add_param_group({"params": [model.fc1.weight.detach()[:2]]})
    with pytest.raises(ValueError, match="Invalid learning rate in group 1: -1"):
        opt.add_param_group({"params": [model.fc1.bias], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs, error, match", [
    ({"capturable": True}, ValueError, "capturable=True is not supported by cpuadam.torch"),
    ({"fused": True, "foreach": True}, RuntimeError, "`fused` and `foreach` cannot be `True`"),
    ({"lr": -1e-3}, ValueError, "Invalid learning rate: -0.001"),
    ({"lr": torch.tensor([1e-3, 2e-3])}, ValueError, "Tensor lr must be 1-element"),
    ({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
    ({"eps": -1.0}, ValueError, "Invalid epsilon value: -1.0"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    ({"eps_mode": "tf"}, ValueError,
     r"Invalid eps_mode: 'tf' \(expected one of 'torch', 'keras'\)"),
    ({"decay_mode": "l2"}, ValueError, "Invalid decay_mode: 'l2'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_options_and_bad_hyperparameters_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        ct.AdamW(make_model().parameters(), **kwargs)


def test_decay_mode_needs_decoupled_weight_decay():
    with pytest.raises(ValueError, match="decay_mode applies to decoupled weight decay only"):
        ct.Adam(make_model().parameters(), weight_decay=1e-4, decay_mode="independent")
    ct.Adam(make_model().parameters(), decoupled_weight_decay=True, decay_mode="independent")


# --- step in backward ---------------------------------------------------------------------

def test_step_in_backward_gives_the_weights_of_the_ordinary_loop():
    ordinary_model, hooked_model = make_model(), make_model()
    kwargs = {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True}
    ordinary = ct.AdamW(ordinary_model.parameters(), **kwargs)
    handle = ct.step_in_backward(hooked_model, **kwargs)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)
                  for o in (ordinary, handle.optimizer)]
    data = batches(19)
    for _ in range(20):
        batch = next(data)
        ordinary.zero_grad()
        backward(ordinary_model, batch)
        ordinary.step()
        backward(hooked_model, batch)
        assert all(p.grad is None for p in hooked_model.parameters())
        for s in schedulers:
            s.step()
    # Each param's update reads only its own grad and state, so the bytes agree.
    for p, q in zip(hooked_model.parameters(), ordinary_model.parameters()):
        assert torch.equal(p, q)
    ours, ref = handle.state_dict(), ordinary.state_dict()
    assert ours["param_groups"] == ref["param_groups"]
    for index, entry in ref["state"].items():
        assert all(torch.equal(v, ours["state"][index][k]) for k, v in entry.items())


def test_step_in_backward_stops_after_remove():
    model = make_model()
    with ct.step_in_backward(model.parameters(), optimizer_class=ct.Adam, lr=1e-2) as handle:
        backward(model, next(batches(20)))
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, next(batches(21)))
    assert all(torch.equal(p, b) and p.grad is not None
               for p, b in zip(model.parameters(), before))
    assert all(s["step"].item() == 1 for s in handle.optimizer.state.values())


@pytest.mark.parametrize("options,match", [
    ({"global_clipnorm": 1.0}, "global_clipnorm does not combine with stepping in backward"),
    ({"skip_nonfinite": True}, r"skip_nonfinite \(on by default with a loss_scale_factor\) does not"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps does not combine"),
    ({"loss_scale_factor": ct.DynamicLossScale()}, "DynamicLossScale loss_scale_factor does not"),
])
def test_step_in_backward_refuses_options_that_need_the_whole_step(options, match):
    with pytest.raises(ValueError, match=match):
        ct.step_in_backward(make_model(), **options)
    # A constant loss scale divides each grad on its own; its default skip must be off.
    with pytest.raises(ValueError, match=r"skip_nonfinite \(on by default with a loss_scale_factor\)"):
        ct.step_in_backward(make_model(), loss_scale_factor=4.0)
    ct.step_in_backward(make_model(), loss_scale_factor=4.0, skip_nonfinite=False).remove()


def test_step_in_backward_refuses_a_param_torch_would_step_before_any_backward():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2).double())
    with pytest.raises(ValueError, match=r"params\[2\] in group 0 would take torch.optim's own "
                                         r"step \(dtype torch.float64\)"):
        ct.step_in_backward(model)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None) is not None)
    for cls in (ct.AdamW, ct.SGD):
        with pytest.raises(ValueError, match=r"params\[0\] in group 0 would take torch.optim's "
                                             r"own step \(sparse grad\)"):
            ct.step_in_backward(torch.nn.Embedding(5, 2, sparse=True), optimizer_class=cls, lr=0.1)
    ct.step_in_backward(torch.nn.Embedding(5, 2), optimizer_class=ct.SGD, lr=0.1).remove()


def test_step_in_backward_needs_a_cpuadam_optimizer():
    with pytest.raises(TypeError, match="optimizer_class must be cpuadam.torch.AdamW"):
        ct.step_in_backward(make_model(), optimizer_class=torch.optim.AdamW)
