# SPDX-License-Identifier: MIT
"""cpuadam.SGD against torch.optim.SGD: every option, groups, lr edits, None grads, state_dict, errors."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import cpuadam

torch = pytest.importorskip("torch")

EPS32 = float(np.finfo(np.float32).eps)
STEPS = 50
# Sizes around the vector widths (8 and 16 lanes) and one odd 2-D shape.
SHAPES = [(1,), (15,), (16,), (17,), (33,), (5, 7), (257,)]


def fused_on_both_sides() -> bool:
    """torch's CPU kernels fuse a + alpha * b into one FMA whenever they vectorise; cpuadam
    fuses on every level but baseline. Only then can the two agree to the bit."""
    return (cpuadam.build_info()["isa_selected"] != "baseline"
            and torch.backends.cpu.get_cpu_capability() != "DEFAULT")


def assert_same(ours: np.ndarray, theirs, what: str, steps: int = STEPS) -> None:
    """Bitwise where both sides fuse multiply-adds; otherwise within the rounding of `steps`
    updates, each a few float32 operations on values no larger than the buffer's largest."""
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    assert ours.shape == theirs.shape, what
    if fused_on_both_sides():
        diff = np.flatnonzero(ours.view(np.uint32) != theirs.view(np.uint32))
        assert diff.size == 0, (f"{what}: {diff.size} elements differ from torch, first at {diff[0]}: "
                                f"{ours.ravel()[diff[0]]!r} vs {theirs.ravel()[diff[0]]!r}")
    else:
        bound = 4 * EPS32 * steps * max(float(np.abs(theirs).max(initial=0.0)), 1.0)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=bound, err_msg=what)


class Twins:
    """The same float32 params in cpuadam.SGD and torch.optim.SGD, fed the same grads."""

    def __init__(self, rng, groups: list[dict], **options):
        self.rng = rng
        self.ours, self.theirs = [], []
        our_groups, their_groups = [], []
        for group in groups:
            ps = [rng.standard_normal(s).astype(np.float32) for s in group["shapes"]]
            ts = [torch.tensor(p.copy(), requires_grad=True) for p in ps]
            hyper = {k: v for k, v in group.items() if k != "shapes"}
            our_groups.append({"params": ps, **hyper})
            their_groups.append({"params": ts, **hyper})
            self.ours += ps
            self.theirs += ts
        self.opt = cpuadam.SGD(our_groups, **options)
        self.topt = torch.optim.SGD(their_groups, **options)

    def step(self, skip=()) -> None:
        grads = [None if k in skip else self.rng.standard_normal(p.shape).astype(np.float32)
                 for k, p in enumerate(self.ours)]
        for t, g in zip(self.theirs, grads):
            t.grad = None if g is None else torch.from_numpy(g.copy())
        self.topt.step()
        self.opt.step(grads)

    def set_lr(self, group: int, lr: float) -> None:
        self.opt.param_groups[group]["lr"] = lr
        self.topt.param_groups[group]["lr"] = lr

    def check(self, steps: int = STEPS) -> None:
        for k, (p, t) in enumerate(zip(self.ours, self.theirs)):
            assert_same(p, t, f"param {k}", steps)
            theirs = self.topt.state.get(t, {}).get("momentum_buffer")
            ours = self.opt.state.get(k, {}).get("momentum_buffer")
            assert (ours is None) == (theirs is None), f"momentum_buffer of param {k}: one side has none"
            if ours is not None:
                assert_same(ours, theirs, f"momentum_buffer of param {k}", steps)


CONFIGS = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9),
    "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.05, weight_decay=0.05),
    "momentum_weight_decay": dict(lr=0.05, momentum=0.8, weight_decay=0.05),
    "nesterov_weight_decay": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
    "maximize": dict(lr=0.05, momentum=0.9, maximize=True),
    "maximize_weight_decay_dampening": dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.02,
                                            maximize=True),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_each_option_steps_like_torch_for_fifty_steps(config, rng):
    twins = Twins(rng, [dict(shapes=SHAPES, **config)])
    for _ in range(STEPS):
        twins.step()
    twins.check()


def test_two_groups_with_their_own_hyperparameters_and_lr_edits_step_like_torch(rng):
    twins = Twins(rng, [dict(shapes=SHAPES[:4], lr=0.1, momentum=0.9, nesterov=True),
                        dict(shapes=SHAPES[4:], lr=0.02, momentum=0.5, dampening=0.1, weight_decay=0.01)])
    for t in range(STEPS):
        if t % 10 == 5:
            twins.set_lr(0, twins.opt.param_groups[0]["lr"] * 0.5)
            twins.set_lr(1, twins.opt.param_groups[1]["lr"] * 1.5)
        twins.step()
    twins.check()


def test_a_param_whose_first_grad_comes_late_starts_its_momentum_buffer_then(rng):
    # Param 1 has no grad for the first 7 steps; param 2 loses its grad now and then.
    twins = Twins(rng, [dict(shapes=[(9,), (17,), (33,)], lr=0.05, momentum=0.9, dampening=0.2,
                             weight_decay=0.01)])
    for t in range(STEPS):
        skip = ({1} if t < 7 else set()) | ({2} if t % 4 == 3 else set())
        twins.step(skip)
        if t < 7:
            assert "momentum_buffer" not in twins.opt.state.get(1, {})
    twins.check()


def test_a_grad_of_none_leaves_param_and_momentum_buffer_untouched(rng):
    twins = Twins(rng, [dict(shapes=[(9,), (17,)], lr=0.05, momentum=0.9)])
    twins.step()
    param = twins.ours[1].copy()
    buf = twins.opt.state[1]["momentum_buffer"].copy()
    twins.step(skip={1})
    assert twins.ours[1].tobytes() == param.tobytes()
    assert twins.opt.state[1]["momentum_buffer"].tobytes() == buf.tobytes()
    twins.check(steps=2)


def new_sgd(params, **kw):
    return cpuadam.SGD(params, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, **kw)


def test_state_dict_round_trip_through_pickle_continues_bitwise_identically(rng):
    shapes = [(7,), (3, 5), (40,)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(12)]
    ps = [p.copy() for p in start]
    straight = new_sgd(ps)
    for gs in grads:
        straight.step(gs)

    qs = [p.copy() for p in start]
    first = new_sgd(qs)
    for gs in grads[:6]:
        first.step(gs)
    saved = pickle.dumps(first.state_dict())
    del first
    resumed = new_sgd(qs)
    resumed.load_state_dict(pickle.loads(saved))
    for gs in grads[6:]:
        resumed.step(gs)
    for p, q in zip(ps, qs):
        assert p.tobytes() == q.tobytes()
    for k in range(len(shapes)):
        assert straight.state[k]["momentum_buffer"].tobytes() == resumed.state[k]["momentum_buffer"].tobytes()


def test_state_dict_saved_by_torch_loads_and_training_continues_like_torch(rng):
    twins = Twins(rng, [dict(shapes=[(9,), (17,)], lr=0.05, momentum=0.9, weight_decay=0.01)])
    for _ in range(5):
        twins.step()
    saved = copy.deepcopy(twins.topt.state_dict())
    for entry in saved["state"].values():
        entry["momentum_buffer"] = entry["momentum_buffer"].numpy()
    # A fresh cpuadam.SGD over params equal to torch's takes over torch's state.
    twins.ours = [t.detach().numpy().copy() for t in twins.theirs]
    twins.opt = cpuadam.SGD(twins.ours, lr=0.05, momentum=0.9, weight_decay=0.01)
    twins.opt.load_state_dict(saved)
    for _ in range(5):
        twins.step()
    twins.check(steps=10)


@pytest.mark.parametrize("kwargs", [
    dict(lr=-0.1),
    dict(lr=0.1, momentum=-0.5),
    dict(lr=0.1, weight_decay=-1e-3),
    dict(lr=0.1, nesterov=True),
    dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
], ids=["negative_lr", "negative_momentum", "negative_weight_decay", "nesterov_without_momentum",
        "nesterov_with_dampening"])
def test_constructor_rejects_what_torch_rejects_with_torchs_message(kwargs):
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD([torch.zeros(3, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError) as ours:
        cpuadam.SGD([np.zeros(3, dtype=np.float32)], **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_defaults_are_torchs():
    ours = cpuadam.SGD([np.zeros(3, dtype=np.float32)]).param_groups[0]
    theirs = torch.optim.SGD([torch.zeros(3, requires_grad=True)]).param_groups[0]
    for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
        assert ours[key] == theirs[key], key
