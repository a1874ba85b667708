# SPDX-License-Identifier: MIT
"""cpuadam.torch.SGD against torch.optim.SGD: parity, checkpoints both ways, schedulers, errors."""

from __future__ import annotations

import copy
import inspect

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import cpuadam  # noqa: E402
import cpuadam.torch as ct  # noqa: E402
from torch_models import backward, batches, make_model, save_and_load, two_groups  # noqa: E402


def lockstep(ours_model, ours_opt, ref_model, ref_opt, steps, data, schedulers=(),
             drop_grads=None):
    """Trains both on the grads of our model's backward, copied to the reference.

    The same grads on both sides isolate the optimizers from float32 rounding in
    the forward pass. drop_grads(step, index) -> True leaves that param's grad None.
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


def bitwise_expected() -> bool:
    """torch's CPU kernels round a + alpha * b once (FMA) whenever they vectorise, and so
    does cpuadam on every level but baseline: only then can the two agree to the bit."""
    return (cpuadam.build_info()["isa_selected"] != "baseline"
            and torch.backends.cpu.get_cpu_capability() != "DEFAULT")


def assert_same(actual, expected, what):
    """Bitwise where both sides fuse multiply-adds; else rtol 1e-5 with an absolute floor of
    1e-6 of the tensor's largest value (elements passing through zero are all rounding)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if bitwise_expected():
        differ = actual.view(torch.int32) != expected.view(torch.int32)
        assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} elements "
                                  "differ from torch.optim.SGD's bits")
    else:
        scale = expected.abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale + 1e-30,
                                   msg=lambda m: f"{what}: {m}")


def assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt):
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.isfinite(q).all(), f"{name}: the run diverged, proving nothing"
        assert_same(p.detach(), q.detach(), name)
    ours_sd, ref_sd = ours_opt.state_dict(), ref_opt.state_dict()
    assert ours_sd["param_groups"] == ref_sd["param_groups"]
    assert ours_sd["state"].keys() == ref_sd["state"].keys()
    for index, ref_entry in ref_sd["state"].items():
        assert ours_sd["state"][index].keys() == ref_entry.keys() == {"momentum_buffer"}
        assert_same(ours_sd["state"][index]["momentum_buffer"], ref_entry["momentum_buffer"],
                    f"state[{index}]['momentum_buffer']")


def pair(params_of=lambda m: m.parameters(), **kwargs):
    """Two copies of the model, one under cpuadam.torch.SGD and one under torch.optim.SGD."""
    ours_model, ref_model = make_model(), make_model()
    return (ours_model, ct.SGD(params_of(ours_model), **kwargs),
            ref_model, torch.optim.SGD(params_of(ref_model), **kwargs))


CONFIGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "dampening": {"momentum": 0.9, "dampening": 0.3},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"weight_decay": 0.05},
    "momentum_weight_decay": {"momentum": 0.9, "weight_decay": 0.05},
    # Maximizing the loss diverges: a smaller lr keeps 100 steps finite.
    "maximize": {"lr": 5e-3, "momentum": 0.8, "maximize": True},
    "every_option": {"lr": 5e-3, "momentum": 0.7, "nesterov": True, "weight_decay": 0.02,
                     "maximize": True},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_hundred_steps_match_torch_optim(config):
    kwargs = {"lr": 5e-2, **CONFIGS[config]}
    ours_model, ours_opt, ref_model, ref_opt = pair(**kwargs)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 100, batches(1))
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)
    # torch keeps no state at all without momentum; neither do we.
    assert (len(ours_opt.state) == 0) == (kwargs.get("momentum", 0) == 0)


def test_two_param_groups_match_torch_optim():
    # One group plain, the other with Nesterov momentum and decay: two batches of one core call.
    first = {"lr": 2e-2, "momentum": 0.0}
    ours_model, ours_opt, ref_model, ref_opt = pair(
        lambda m: two_groups(m, **first), lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 100, batches(2))
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)
    assert len(ours_opt.state) == len(two_groups(ours_model)[1]["params"])


def test_params_skipped_on_some_steps_match_torch_optim():
    # Params whose grads are sometimes None start their momentum buffers on later
    # steps, so one step mixes new buffers (b = g) with running ones.
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2, momentum=0.9, dampening=0.1)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 40, batches(3),
             drop_grads=lambda step, i: step < i or step % (i + 2) == 1)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_momentum_switched_on_off_and_on_between_steps_matches_torch_optim():
    # Switched on: the buffer starts from the step's grad. Switched off: the buffer
    # is kept and ignored. Back on: it continues from where it stopped.
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2)
    data = batches(4)
    for momentum in (0.0, 0.9, 0.0, 0.5):
        for opt in (ours_opt, ref_opt):
            opt.param_groups[0]["momentum"] = momentum
        lockstep(ours_model, ours_opt, ref_model, ref_opt, 5, data)
        assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_a_tensor_learning_rate_matches_torch_optim():
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=torch.tensor(5e-2), momentum=0.9)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9) for o in (ours_opt, ref_opt)]
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 20, batches(5), schedulers)
    assert isinstance(ours_opt.param_groups[0]["lr"], torch.Tensor)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=30, cycle_momentum=False),
    "OneCycleLR_cycling_momentum": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=30),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_schedulers_give_torchs_sequence_and_weights(name):
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2, momentum=0.9)
    ours_sched, ref_sched = SCHEDULERS[name](ours_opt), SCHEDULERS[name](ref_opt)
    ours_seen, ref_seen = [], []
    data = batches(6)
    for _ in range(30):
        lockstep(ours_model, ours_opt, ref_model, ref_opt, 1, data, (ours_sched, ref_sched))
        ours_seen.append((ours_opt.param_groups[0]["lr"], ours_opt.param_groups[0]["momentum"]))
        ref_seen.append((ref_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["momentum"]))
    assert ours_seen == ref_seen
    assert len({lr for lr, _ in ref_seen}) > 1
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_constructor_signature_and_defaults_are_torchs():
    ours = inspect.signature(ct.SGD).parameters
    ref = inspect.signature(torch.optim.SGD).parameters
    assert list(ours) == list(ref) + ["options"]  # cpuadam's options, keyword-only
    for name, param in ref.items():
        assert (ours[name].default, ours[name].kind) == (param.default, param.kind), name


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_has_torchs_layout(momentum):
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2, momentum=momentum)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 2, batches(7))
    ours_sd, ref_sd = ours_opt.state_dict(), ref_opt.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    assert ours_sd["param_groups"] == ref_sd["param_groups"]
    assert ours_sd["state"].keys() == ref_sd["state"].keys()
    for index, entry in ref_sd["state"].items():
        mine = ours_sd["state"][index]["momentum_buffer"]
        value = entry["momentum_buffer"]
        assert (type(mine), mine.dtype, mine.shape) == (type(value), value.dtype, value.shape)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_params_on_torchs_path_keep_torchs_state_entries(momentum):
    # A float64 param and a sparse grad take torch.optim's own SGD; without momentum it
    # keeps no state for them, and neither do we.
    states = []
    for cls in (torch.optim.SGD, ct.SGD):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        emb = torch.nn.Embedding(5, 2, sparse=True)
        opt = cls([p, *emb.parameters()], lr=0.1, momentum=momentum)
        (p.sum() + emb(torch.tensor([1])).sum()).backward()
        opt.step()
        states.append(opt.state_dict()["state"])
    assert states[1].keys() == states[0].keys()
    for index, entry in states[0].items():
        assert states[1][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(states[1][index][key].to_dense(), value.to_dense())


@pytest.mark.parametrize("direction", ["torch_to_cpuadam", "cpuadam_to_torch"])
def test_checkpoints_load_across_and_training_continues_identically(direction):
    to_cpuadam = direction == "torch_to_cpuadam"
    writer_cls, reader_cls = (torch.optim.SGD, ct.SGD) if to_cpuadam else (ct.SGD, torch.optim.SGD)
    kwargs = {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    model = make_model()
    writer = writer_cls(model.parameters(), **kwargs)
    data = batches(8)
    for _ in range(10):
        writer.zero_grad()
        backward(model, next(data))
        writer.step()
    model_ckpt = save_and_load(model.state_dict())
    opt_ckpt = save_and_load(writer.state_dict())

    # The reader starts with other hyperparameters: the checkpoint's must win.
    resumed = make_model(seed=1)
    resumed.load_state_dict(model_ckpt)
    reader = reader_cls(resumed.parameters(), lr=0.5, momentum=0.5)
    reader.load_state_dict(opt_ckpt)
    assert (reader.param_groups[0]["lr"], reader.param_groups[0]["nesterov"]) == (5e-2, True)
    if to_cpuadam:
        lockstep(resumed, reader, model, writer, 20, data)
        assert_same_training_state(resumed, reader, model, writer)
    else:
        lockstep(model, writer, resumed, reader, 20, data)
        assert_same_training_state(model, writer, resumed, reader)


def test_a_checkpoint_with_strided_momentum_loads_and_training_continues_identically():
    # torch.save keeps strides; the kernel wants contiguous buffers, so loading copies once.
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2, momentum=0.9)
    data = batches(9)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 3, data)
    ckpt = copy.deepcopy(ref_opt.state_dict())
    weight = ckpt["state"][1]["momentum_buffer"]  # fc1.weight's, a matrix
    ckpt["state"][1]["momentum_buffer"] = weight.t().contiguous().t()
    assert not ckpt["state"][1]["momentum_buffer"].is_contiguous()
    ours_opt.load_state_dict(save_and_load(ckpt))
    assert all(s["momentum_buffer"].is_contiguous() for s in ours_opt.state.values())
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 5, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_an_old_checkpoint_without_the_newer_group_keys_loads():
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2, momentum=0.9)
    data = batches(10)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 3, data)
    old = copy.deepcopy(ref_opt.state_dict())
    for group in old["param_groups"]:
        for key in ("nesterov", "maximize", "foreach", "differentiable", "fused"):
            del group[key]
    # Each loads its own copy: load_state_dict keeps tensors that need no conversion.
    ours_opt.load_state_dict(copy.deepcopy(old))
    assert ours_opt.param_groups[0]["fused"] is False  # torch.optim.SGD's fill-in, not None
    ref_opt.load_state_dict(copy.deepcopy(old))
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 3, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


def test_zero_grad_and_add_param_group_behave_as_in_torch():
    late = ("fc2.weight", "fc2.bias")
    ours_model, ours_opt, ref_model, ref_opt = pair(
        lambda m: [p for n, p in m.named_parameters() if n not in late], lr=5e-2, momentum=0.9)
    named_ours, named_ref = dict(ours_model.named_parameters()), dict(ref_model.named_parameters())
    data = batches(11)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 5, data)
    for opt, named in ((ours_opt, named_ours), (ref_opt, named_ref)):
        opt.add_param_group({"params": [named[n] for n in late], "lr": 3e-2, "nesterov": True})
        named["fc2.weight"].grad = None
    # zero_grad(set_to_none=False) keeps zero grads: a step still moves the params
    # through their momentum, as torch's does.
    ours_opt.zero_grad(set_to_none=False)
    ref_opt.zero_grad(set_to_none=False)
    assert named_ours["fc2.weight"].grad is None  # never given one: skipped, as in torch
    ours_opt.step()
    ref_opt.step()
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 5, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)
    ours_opt.zero_grad()
    assert all(p.grad is None for g in ours_opt.param_groups for p in g["params"])


# foreach/fused kept and ignored: test_torch.py covers SGD too.


def test_step_hooks_fire_and_a_pre_hook_sees_the_closure():
    model = make_model()
    opt = ct.SGD(model.parameters(), lr=5e-2, momentum=0.9)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o, kwargs)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o, kwargs)))
    batch = next(batches(13))

    def closure():
        opt.zero_grad()
        assert torch.is_grad_enabled()
        return backward(model, batch)

    loss = opt.step(closure=closure)
    assert isinstance(loss, float)
    assert [c[0] for c in calls] == ["pre", "post"]
    assert all(c[1] is opt and c[2] == {"closure": closure} for c in calls)


def test_one_core_call_updates_each_tensors_own_memory_in_place(monkeypatch):
    model = make_model()
    opt = ct.SGD(two_groups(model, momentum=0.0), lr=5e-2, momentum=0.9)
    params = [p for g in opt.param_groups for p in g["params"]]
    ptrs = [p.data_ptr() for p in params]
    calls = []

    def spy(batches, **kwargs):
        calls.append(batches)
        return real(batches, **kwargs)

    real = ct._core.sgd_step
    monkeypatch.setattr(ct._core, "sgd_step", spy)
    data = batches(14)
    address = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    for _ in range(3):
        opt.zero_grad()
        backward(model, next(data))
        before = [p.detach().clone() for p in params]
        opt.step()
        assert [p.data_ptr() for p in params] == ptrs
        assert all(not torch.equal(p, b) for p, b in zip(params, before))
        seen = [(b["group"], address(a), address(g)) for b in calls[-1]
                for a, g in zip(b["params"], b["grads"])]
        assert sorted(seen) == sorted((gi, p.data_ptr(), p.grad.data_ptr())
                                      for gi, g in enumerate(opt.param_groups)
                                      for p in g["params"])
        buffers = [address(a) for b in calls[-1] for a in b.get("momentum_buffers", [])]
        assert buffers == [opt.state[p]["momentum_buffer"].data_ptr()
                           for p in opt.param_groups[1]["params"]]
    assert len(calls) == 3  # one core call per step, both groups in it


def test_memory_swapped_under_a_param_or_its_momentum_is_what_gets_updated():
    # Libraries move tensors by assigning .data; the next step must follow.
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2, momentum=0.9)
    data = batches(15)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 2, data)
    for model, opt in ((ours_model, ours_opt), (ref_model, ref_opt)):
        model.fc1.weight.data = model.fc1.weight.data.clone()
        buf = opt.state[model.fc2.weight]["momentum_buffer"]
        buf.data = buf.data.clone()
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 2, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


STATE_EDITS = {
    "cleared": lambda opt, model: opt.state.clear(),
    "param_entry_replaced": lambda opt, model: opt.state.__setitem__(model.fc1.weight, {}),
    "buffer_replaced": lambda opt, model: opt.state[model.fc2.bias].__setitem__(
        "momentum_buffer", torch.zeros(7)),
}


@pytest.mark.parametrize("edit", STATE_EDITS)
def test_state_edited_between_steps_is_what_the_next_step_uses(edit):
    # The step after is not taken along the previous step's plan, which was made
    # over the old buffers: cleared state restarts momentum, as in torch.
    ours_model, ours_opt, ref_model, ref_opt = pair(lr=5e-2, momentum=0.9)
    data = batches(20)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 3, data)
    STATE_EDITS[edit](ours_opt, ours_model)
    STATE_EDITS[edit](ref_opt, ref_model)
    lockstep(ours_model, ours_opt, ref_model, ref_opt, 3, data)
    assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_step_marks_params_modified_for_autograd(momentum):
    model = make_model()
    opt = ct.SGD(model.parameters(), lr=5e-2, momentum=momentum)
    data = batches(16)
    for _ in range(2):  # the first step builds the plan, the second follows it
        tokens, labels = next(data)
        loss = F.cross_entropy(model(tokens), labels)
        loss.backward(retain_graph=True)
        versions = [p._version for p in model.parameters()]
        opt.step()
        assert all(p._version > v for p, v in zip(model.parameters(), versions))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# --- rejections: the exception, its message, and nothing changed --------------------------

def snapshot(model, opt):
    params = [p.detach().clone().view(torch.int32) for p in model.parameters()]
    state = {id(p): {k: v.detach().clone().view(torch.int32) for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def assert_unchanged(model, opt, before):
    params, state = before
    for p, saved in zip(model.parameters(), params):
        assert torch.equal(p.detach().view(torch.int32), saved)
    assert {id(p) for p in opt.state} == set(state)
    for p, entry in opt.state.items():
        assert entry.keys() == state[id(p)].keys()
        for k, v in entry.items():
            assert torch.equal(v.view(torch.int32), state[id(p)][k])


def trained(steps: int = 2):
    """A model and SGD with momentum after a few steps (so a step plan exists), grads ready."""
    model = make_model()
    opt = ct.SGD(model.parameters(), lr=5e-2, momentum=0.9, weight_decay=0.01)
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


def spoil_grad_dtype(model):
    model.norm.bias.grad_dtype = None  # torch itself refuses such a grad unless asked
    model.norm.bias.grad = model.norm.bias.grad.double()


def spoil_grad_shape(model):
    model.fc2.bias.grad.data = torch.zeros(3)


def spoil_param_dtype(model):
    model.fc1.bias.data = model.fc1.bias.data.bfloat16()


def spoil_param_overlap(model):
    model.fc1.bias.data = model.fc1.weight.data.view(-1)[8:40]


REJECTED_STEPS = {
    "grad_dtype": (spoil_grad_dtype, TypeError,
                   r"grad of params\[4\] in group 0 is torch.float64; expected torch.float32"),
    "grad_shape": (spoil_grad_shape, ValueError,
                   r"grad of params\[6\] in group 0 has shape \(3,\); expected \(7,\)"),
    "overlapping_params": (spoil_param_overlap, ValueError,
                           r"params\[2\] in group 0 shares memory with params\[1\] in group 0"),
}


@pytest.mark.parametrize("case", REJECTED_STEPS)
def test_a_step_the_kernel_cannot_take_is_rejected_and_nothing_changes(case):
    spoil, error, match = REJECTED_STEPS[case]
    model, opt = trained()
    spoil(model)
    rejected_step(model, opt, error, match)


def test_a_param_on_another_device_is_rejected_and_nothing_changes():
    model, opt = trained()
    ghost = nn.Parameter(torch.zeros(3, device="meta"))
    ghost.grad = torch.zeros(3, device="meta")
    opt.param_groups[0]["params"].append(ghost)  # past add_param_group's check
    rejected_step(model, opt, ValueError, r"params\[7\] in group 0 is a torch.strided tensor on "
                  r"device 'meta'; expected a dense CPU tensor")


@pytest.mark.parametrize("key, value, match", [
    ("lr", float("nan"), r"Invalid learning rate in group 0: nan"),
    ("momentum", -0.5, r"Invalid momentum value in group 0: -0.5"),
    ("nesterov", True, r"Nesterov momentum in group 0 requires a momentum and zero dampening"),
])
def test_a_bad_hyperparameter_set_between_steps_is_rejected_and_nothing_changes(key, value,
                                                                                  match):
    model, opt = trained()
    opt.param_groups[0][key] = value
    if key == "nesterov":
        opt.param_groups[0]["dampening"] = 0.5
    rejected_step(model, opt, ValueError, match)


def test_a_first_step_that_is_rejected_creates_no_momentum_buffers():
    model = make_model()
    opt = ct.SGD(model.parameters(), lr=5e-2, momentum=0.9)
    backward(model, next(batches(18)))
    model.fc2.bias.grad.data = torch.zeros(2)
    rejected_step(model, opt, ValueError, r"grad of params\[6\] in group 0 has shape")
    assert len(opt.state) == 0


# Params refused when added (device, dtype, layout, overlap): test_torch.py covers SGD too.


def test_a_rejected_param_group_is_not_added():
    model = make_model()
    opt = ct.SGD([model.fc1.weight], momentum=0.9)
    with pytest.raises(ValueError, match=r"params\[0\] in group 1 shares memory with"):
        opt.add_param_group({"params": [model.fc1.weight.detach()[:2]]})
    with pytest.raises(ValueError, match="Nesterov momentum in group 1 requires a momentum and "
                                         "zero dampening"):
        opt.add_param_group({"params": [model.fc1.bias], "nesterov": True, "dampening": 0.1})
    with pytest.raises(ValueError, match="Invalid momentum value in group 1: -1"):
        opt.add_param_group({"params": [model.fc1.bias], "momentum": -1.0})
    assert len(opt.param_groups) == 1
    # Without momentum, nesterov and dampening change nothing: accepted, as by torch.
    opt.add_param_group({"params": [model.fc1.bias], "momentum": 0.0, "nesterov": True,
                         "dampening": 0.1})
    torch.optim.SGD([model.fc2.weight], momentum=0.9).add_param_group(
        {"params": [model.fc2.bias], "momentum": 0.0, "nesterov": True, "dampening": 0.1})


# torch.optim.SGD raises the same for these (checked below); the rest are cpuadam's own.
BAD_OPTIONS = {
    "negative_lr": ({"lr": -1e-3}, ValueError, "Invalid learning rate: -0.001", True),
    "negative_momentum": ({"momentum": -0.1}, ValueError, "Invalid momentum value: -0.1", True),
    "negative_weight_decay": ({"weight_decay": -0.1}, ValueError,
                              "Invalid weight_decay value: -0.1", True),
    "nesterov_without_momentum": ({"nesterov": True}, ValueError,
                                  "Nesterov momentum requires a momentum and zero dampening",
                                  True),
    "nesterov_with_dampening": ({"nesterov": True, "momentum": 0.9, "dampening": 0.1},
                                ValueError,
                                "Nesterov momentum requires a momentum and zero dampening", True),
    "fused_and_foreach": ({"fused": True, "foreach": True}, RuntimeError,
                          "`fused` and `foreach` cannot be `True` together", True),
    "nan_dampening": ({"momentum": 0.9, "dampening": float("nan")}, ValueError,
                      "Invalid dampening value: nan", False),
    "two_element_lr": ({"lr": torch.tensor([1e-3, 2e-3])}, ValueError,
                       "Tensor lr must be 1-element", False),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_unsupported_options_and_bad_hyperparameters_are_rejected(case):
    kwargs, error, match, torch_too = BAD_OPTIONS[case]
    with pytest.raises(error, match=match):
        ct.SGD(make_model().parameters(), **kwargs)
    if torch_too:
        with pytest.raises(error, match=match):
            torch.optim.SGD(make_model().parameters(), **kwargs)


# --- step in backward ---------------------------------------------------------------------

def test_step_in_backward_gives_the_weights_of_the_ordinary_loop():
    ordinary_model, hooked_model = make_model(), make_model()
    kwargs = {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    ordinary = torch.optim.SGD(ordinary_model.parameters(), **kwargs)
    handle = ct.step_in_backward(hooked_model, optimizer_class=ct.SGD, **kwargs)
    # As torch's, momentum buffers appear at each param's first update, not before.
    assert len(handle.optimizer.state) == 0
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5)
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
    # Each param's update reads only its own grad and state: no reason to differ.
    assert_same_training_state(hooked_model, handle.optimizer, ordinary_model, ordinary)
