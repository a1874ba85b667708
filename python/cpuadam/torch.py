# SPDX-License-Identifier: MIT
"""torch.optim drop-ins (Adam, AdamW, SGD) stepped by one fused cpuadam call over NumPy views."""

from __future__ import annotations

import math
from operator import is_
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from cpuadam import _core
from cpuadam.optim import ADAM_RECURRENCE

__all__ = ["Adam", "AdamW", "SGD", "StepInBackward", "step_in_backward"]

_EPS_MODES = ("torch", "keras")
_DECAY_MODES = ("lr", "independent")
# Our options live in a param group only when set away from their default, so that
# by default a group has exactly torch's keys and checkpoints interchange unchanged.
_EXTRA_DEFAULTS = {"eps_mode": "torch", "decay_mode": "lr"}


def _param_name(group: int, index: int) -> str:
    return f"params[{index}] in group {group}"


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps 'step' in float64 only when that is the default dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_param(p: torch.Tensor, name: str) -> None:
    """Raises unless the kernel can update p in place through a NumPy view."""
    if p.device.type != "cpu":
        raise ValueError(f"{name} is on device '{p.device}'; cpuadam.torch updates CPU tensors "
                         "only (keep the model on the CPU, or use torch.optim for other devices)")
    if p.layout != torch.strided:
        raise TypeError(f"{name} has layout {p.layout}; cpuadam.torch updates dense tensors only")
    if p.dtype != torch.float32:
        raise TypeError(f"{name} is {p.dtype}; cpuadam.torch supports float32 params only "
                        "(bfloat16 and float16 params are not supported yet)")
    if not p.is_contiguous():
        raise ValueError(f"{name} is not contiguous (shape {tuple(p.shape)}, strides "
                         f"{tuple(p.stride())}); cpuadam.torch updates contiguous params only: "
                         "make the weight contiguous (for example, no channels_last)")


def _checked_grad(p: torch.Tensor, name: str) -> torch.Tensor:
    """p.grad checked against p; a dense non-contiguous grad is copied (it is only read)."""
    grad = p.grad
    if grad.layout != torch.strided:
        raise TypeError(f"grad of {name} is a sparse tensor ({grad.layout}); cpuadam.torch "
                        "needs dense grads (use torch.optim.SparseAdam for sparse ones)")
    if grad.device.type != "cpu":
        raise ValueError(f"grad of {name} is on device '{grad.device}'; expected a CPU tensor")
    if grad.dtype != p.dtype:
        raise TypeError(f"grad of {name} is {grad.dtype}; expected {p.dtype}, its param's dtype")
    if grad.shape != p.shape:
        raise ValueError(f"grad of {name} has shape {tuple(grad.shape)}; expected "
                         f"{tuple(p.shape)}, its param's shape")
    if not grad.is_contiguous():
        grad = grad.contiguous()
    return grad


def _view(t: torch.Tensor, what: str):
    """A NumPy array over t's memory (no copy); what names t in errors."""
    if t.device.type != "cpu" or t.layout != torch.strided:
        raise ValueError(f"{what} is a {t.layout} tensor on device '{t.device}'; expected a "
                         "dense CPU tensor")
    if t.dtype != torch.float32:
        raise TypeError(f"{what} is {t.dtype}; expected torch.float32")
    return t.detach().numpy()


def _check_disjoint(groups: list[dict]) -> None:
    """No two params may share memory: a step writes every one of them."""
    extents = []
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if p.numel() == 0 or p.device.type != "cpu":
                continue
            lo = p.data_ptr()
            extents.append((lo, lo + p.numel() * p.element_size(), _param_name(gi, pi)))
    extents.sort(key=lambda e: e[0])
    for (_, hi0, n0), (lo1, _, n1) in zip(extents, extents[1:]):
        if lo1 < hi0:
            raise ValueError(f"{n1} shares memory with {n0} (the same tensor twice, or views "
                             "into one another); each optimized param must be its own buffer")


def _check_real(value: Any, name: str, high: float = math.inf, low: float = 0.0) -> None:
    """torch.optim's hyperparameter checks: low <= value (< high), with its messages."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: expected a real number, got {type(value).__name__}")
    if not (low <= value < high) or math.isinf(value):
        raise ValueError(f"Invalid {name}: {value}")


def _check_flags(group: dict, where: str) -> None:
    """Refuses the torch options the fused CPU step cannot honour."""
    for key in ("capturable", "differentiable"):
        if group.get(key):
            raise ValueError(f"{key}=True is not supported by cpuadam.torch{where}: its step runs "
                             "on the CPU in C++, outside CUDA graphs and autograd")
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def _check_adam_group(group: dict, where: str) -> None:
    """Checks a group's hyperparameters; where names the group in messages ('' or ' in group 1')."""
    _check_real(group["lr"], "learning rate" + where)
    _check_real(group["eps"], "epsilon value" + where)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas{where}: expected a pair (beta1, beta2), got {betas!r}")
    _check_real(betas[0], "beta parameter at index 0" + where, 1.0)
    _check_real(betas[1], "beta parameter at index 1" + where, 1.0)
    _check_real(group["weight_decay"], "weight_decay value" + where)
    _check_flags(group, where)
    for key, choices in (("eps_mode", _EPS_MODES), ("decay_mode", _DECAY_MODES)):
        value = group.get(key, _EXTRA_DEFAULTS[key])
        if value not in choices:
            listed = ", ".join(repr(c) for c in choices)
            raise ValueError(f"Invalid {key}{where}: {value!r} (expected one of {listed})")
    if group.get("decay_mode", "lr") != "lr" and not group["decoupled_weight_decay"]:
        raise ValueError(f"decay_mode{where} applies to decoupled weight decay only (AdamW, or "
                         "Adam with decoupled_weight_decay=True)")


def _check_sgd_group(group: dict, where: str) -> None:
    """torch.optim.SGD's checks (and a finite dampening); where as in _check_adam_group."""
    _check_real(group["lr"], "learning rate" + where)
    _check_real(group["momentum"], "momentum value" + where)
    _check_real(group["dampening"], "dampening value" + where, low=-math.inf)
    _check_real(group["weight_decay"], "weight_decay value" + where)
    _check_flags(group, where)
    # torch checks only the constructor's defaults. In a group, nesterov without
    # momentum changes nothing (there and here); with dampening the kernel refuses it.
    if where:
        refused = group["momentum"] != 0 and group["dampening"] != 0
    else:
        refused = group["momentum"] <= 0 or group["dampening"] != 0
    if group["nesterov"] and refused:
        raise ValueError(f"Nesterov momentum{where} requires a momentum and zero dampening")


def _new_state(p: torch.Tensor, amsgrad: bool) -> dict:
    """A param's state before its first step, laid out as torch.optim.Adam's."""
    state = {
        "step": torch.tensor(0.0, dtype=_scalar_dtype()),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


# The state tensors a step updates, by state key; the core's batch lists are the plurals.
_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_AMSGRAD_KEYS = _ADAM_KEYS + ("max_exp_avg_sq",)
_MOMENTUM_KEYS = ("momentum_buffer",)
# What a param without state is viewed with: SGD without momentum keeps none, as torch.
_NO_STATE: dict = {}


class _CoreOptimizer(Optimizer):
    """Shared machinery: checks, lazy state, one core call per step.

    A subclass names its core function and checks, the state tensors a group
    updates, how a param's state starts, and what splits a group into batches
    (Adam: the step count; SGD: whether the momentum buffer is new).
    """

    _CORE_STEP = ""  # the name of the _core function, looked up at each call
    _COUNTS_STEPS = False  # whether each param's state holds a 'step' tensor
    _STATE_TENSORS: tuple[str, ...] = ()
    # Group keys that checkpoints written by older torch releases may lack.
    _GROUP_DEFAULTS: dict = {}

    _check_group = staticmethod(_check_flags)

    def __init__(self, params: Any, defaults: dict):
        self._check_group(defaults, "")
        self._views: dict[int, _Views] = {}
        self._plan: _Plan | None = None
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._views = {}
        self._plan = None
        for group in self.param_groups:
            for key, value in self._GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then cpuadam's checks; a rejected group is not added."""
        super().add_param_group(param_group)
        self._plan = None
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            self._check_group(group, f" in group {index}")
            for pi, p in enumerate(group["params"]):
                _check_param(p, _param_name(index, pi))
            _check_disjoint(self.param_groups)
        except Exception:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict; loaded buffers are made contiguous for the kernel.

        Groups are taken as saved: a checkpoint written with ``capturable=True``
        (a CUDA-graph setting) loads and the flag is ignored here, while one
        with ``differentiable=True`` is refused at the next step.
        """
        super().load_state_dict(state_dict)
        self._plan = None
        for p_state in self.state.values():
            for key in self._STATE_TENSORS:
                buf = p_state.get(key)
                if isinstance(buf, torch.Tensor) and not buf.is_contiguous():
                    p_state[key] = buf.contiguous()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Updates every param whose grad is not None, in one fused call.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.

        Raises:
            TypeError, ValueError: a param, grad or state buffer the kernel cannot
                update in place (wrong device, dtype, shape, layout; overlapping
                memory) or a bad hyperparameter; the message names the param.
                Nothing is changed by a rejected step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key = self._plan_key()
        if self._plan is None or self._plan.key != key or not self._step_planned(self._plan):
            self._update([(gi, pi, p) for gi, group in enumerate(self.param_groups)
                          for pi, p in enumerate(group["params"]) if p.grad is not None],
                         every_param=True, plan_key=key)
        return loss

    # --- what a subclass defines -----------------------------------------------------------

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        """The state tensors a step of this group reads and writes."""
        raise NotImplementedError

    def _state_of(self, p: torch.Tensor, group: dict, keys: tuple[str, ...]) -> tuple[dict, bool]:
        """p's state holding every key, and whether it is new (committed only after the step)."""
        raise NotImplementedError

    def _batch_key(self, views: "_Views", fresh: bool) -> Any:
        """What must be equal for params of one group to share a core batch."""
        raise NotImplementedError

    def _next_key(self, key: Any) -> Any:
        """A planned batch's key at the next step."""
        raise NotImplementedError

    def _batch_scalars(self, group: dict, gi: int, key: Any) -> dict:
        """A core batch's hyperparameters."""
        raise NotImplementedError

    def _preallocate(self, p: torch.Tensor, group: dict) -> None:
        """Makes p's state before its first step where that changes no result (step_in_backward)."""

    # --- the step ------------------------------------------------------------------------------

    def _plan_key(self) -> tuple:
        return (tuple(p.grad is None for group in self.param_groups for p in group["params"]),
                tuple((id(g["params"]), len(g["params"]), self._state_keys(g))
                      for g in self.param_groups))

    @torch._disable_dynamo
    def _step_planned(self, plan: "_Plan") -> bool:
        """The step along a plan made by an earlier step: the same params, grads
        present, batch keys, state tensors and memory. Returns False, having changed nothing,
        when anything differs or is not plainly valid; the checked path then
        takes over and names any problem."""
        batches = []
        for pb in plan.batches:
            group = self.param_groups[pb.group]
            if group.get("differentiable"):
                return False
            try:
                grads = [p.grad.numpy() for p in pb.tensors]
            except (RuntimeError, TypeError):  # a grad needing detach, sparse, or off the CPU
                return False
            if [t.data_ptr() for t in pb.watched] != pb.ptrs:
                return False  # .data of a param or state tensor was swapped
            if not pb.same_state(self.state):
                return False
            batch = self._batch_scalars(group, pb.group, self._next_key(pb.key))
            batch.update(pb.buffers)
            batch["grads"] = grads
            batches.append(batch)
        # For Adam the core also writes each param's new count into its 'step' tensor.
        try:
            getattr(_core, self._CORE_STEP)(batches)
        except (TypeError, ValueError):
            return False  # rejected before any write; the checked path words the error

        for pb in plan.batches:
            pb.key = self._next_key(pb.key)
        torch.autograd.graph.increment_version(plan.params)
        return True

    def _views_of(self, p: torch.Tensor, state: dict, keys: tuple[str, ...],
                  gi: int, pi: int) -> _Views:
        """NumPy views of p and its state, from the cache while they still describe them."""
        # Keyed by id: a tensor's own hash is a Python-level call. A recycled id
        # cannot match, since the cached entry keeps the old state dict alive.
        views = self._views.get(id(p))
        if (views is None or views.state is not state or views.keys != keys
                or views.ptr != p.data_ptr() or views.shape != p.shape
                or not views.matches(state)):
            views = _Views(p, state, keys, self._COUNTS_STEPS, _param_name(gi, pi))
        return views

    # Never traced by torch.compile: the NumPy views must stay views of the live
    # tensors. torch.optim.Optimizer guards its own state_dict and zero_grad the same
    # way; the wrapper imports torch._dynamo only when first called.
    @torch._disable_dynamo
    def _update(self, targets: list[tuple[int, int, torch.Tensor]],
                every_param: bool = False, plan_key: tuple | None = None) -> None:
        """One core call over the (group index, index in group, param) targets.

        Checks everything first; state, step counts and caches change only
        after the kernel has succeeded.
        """
        batches: dict[tuple[int, Any], dict] = {}
        members: dict[tuple[int, Any], list] = {}
        keys_of: dict[int, tuple[str, ...]] = {}
        fresh_states = []
        used = []
        for gi, pi, p in targets:
            group = self.param_groups[gi]
            if not (p.is_cpu and p.dtype is torch.float32 and p.layout is torch.strided
                    and p.is_contiguous()):
                _check_param(p, _param_name(gi, pi))
            grad = p.grad
            if not (grad.is_cpu and grad.dtype is p.dtype and grad.layout is torch.strided
                    and grad.shape == p.shape and grad.is_contiguous()):
                grad = _checked_grad(p, _param_name(gi, pi))
            keys = keys_of.get(gi)
            if keys is None:
                keys = keys_of[gi] = self._state_keys(group)
            state, fresh = self._state_of(p, group, keys)
            if fresh:
                fresh_states.append((p, state))
            views = self._views_of(p, state, keys, gi, pi)
            key = self._batch_key(views, fresh)
            batch = batches.get((gi, key))
            if batch is None:
                if group.get("differentiable"):
                    raise ValueError("differentiable=True is not supported by cpuadam.torch "
                                     f"in group {gi}")
                batch = batches[(gi, key)] = {
                    "params": [], "grads": [], "indices": [],
                    **{k + "s": [] for k in keys}, **self._batch_scalars(group, gi, key)}
            batch["params"].append(views.param)
            batch["grads"].append(grad.numpy() if not grad.requires_grad
                                  else grad.detach().numpy())
            for k, buf in zip(keys, views.buffers):
                batch[k + "s"].append(buf)
            batch["indices"].append(pi)
            used.append((p, views, key))
            members.setdefault((gi, key), []).append((p, views))
        if not used:
            return
        getattr(_core, self._CORE_STEP)(list(batches.values()))
        for p, state in fresh_states:
            self.state[p] = state
        cache = {} if every_param else self._views
        for p, views, key in used:
            if views.step is not None:
                views.step.fill(key)
            cache[id(p)] = views
        self._views = cache
        # The kernel writes memory autograd does not see; tell it, as an in-place op would.
        torch.autograd.graph.increment_version([p for p, _, _ in used])
        # A step that created no state can be repeated along the same plan.
        self._plan = None
        if plan_key is not None and not fresh_states:
            self._plan = _Plan(plan_key, batches, members)


class _AdamBase(_CoreOptimizer):
    """Adam and AdamW: batches by step count; state as torch.optim.Adam's."""

    _CORE_STEP = "adam_step"
    _COUNTS_STEPS = True
    _STATE_TENSORS = _AMSGRAD_KEYS
    _GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None,
                       "capturable": False, "differentiable": False, "fused": None,
                       "decoupled_weight_decay": False}

    _check_group = staticmethod(_check_adam_group)

    def __init__(self, params: Any, defaults: dict, eps_mode: str, decay_mode: str):
        for key, value in (("eps_mode", eps_mode), ("decay_mode", decay_mode)):
            if value != _EXTRA_DEFAULTS[key]:
                defaults[key] = value
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Checkpoints written by older torch releases may keep 'step' as a number.
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_scalar_dtype())

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return _AMSGRAD_KEYS if group["amsgrad"] else _ADAM_KEYS

    def _state_of(self, p: torch.Tensor, group: dict, keys: tuple[str, ...]) -> tuple[dict, bool]:
        state = self.state.get(p)
        if not state:
            return _new_state(p, keys is _AMSGRAD_KEYS), True
        if keys is _AMSGRAD_KEYS and "max_exp_avg_sq" not in state:
            # amsgrad switched on after some steps: its running max starts from zero.
            return dict(state, max_exp_avg_sq=torch.zeros_like(
                p, memory_format=torch.preserve_format)), True
        return state, False

    def _batch_key(self, views: "_Views", fresh: bool) -> int:
        return int(views.step.item()) + 1

    def _next_key(self, key: int) -> int:
        return key + 1

    def _batch_scalars(self, group: dict, gi: int, step: int) -> dict:
        beta1, beta2 = group["betas"]
        return {"group": gi, "step": step, "lr": float(group["lr"]), "beta1": float(beta1),
                "beta2": float(beta2), "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]), "amsgrad": bool(group["amsgrad"]),
                "maximize": bool(group["maximize"]),
                "decoupled": bool(group["decoupled_weight_decay"]),
                "decay_mode": group.get("decay_mode", "lr"),
                "eps_mode": group.get("eps_mode", "torch")}

    def _preallocate(self, p: torch.Tensor, group: dict) -> None:
        # Zeros, step 0: exactly what a first step would start from.
        if not self.state.get(p):
            self.state[p] = _new_state(p, bool(group["amsgrad"]))


class _PlannedBatch:
    """One core batch as the last step built it: its tensors, their state dicts
    and state tensors, their views and the addresses those views were made over."""

    __slots__ = ("group", "key", "tensors", "states", "state_tensors", "buffers", "watched",
                 "ptrs")

    def __init__(self, group: int, key: Any, batch: dict, members: list):
        self.group = group
        self.key = key
        self.tensors = [p for p, _ in members]
        # What optimizer.state.get(p) returned: None where the step used no state.
        self.states = [None if v.state is _NO_STATE else v.state for _, v in members]
        # The members of a batch share their state keys: one column of tensors per key.
        keys = members[0][1].watched_keys
        self.state_tensors = [(k, [v.tensors[i] for _, v in members]) for i, k in enumerate(keys)]
        self.buffers = {k: v for k, v in batch.items() if isinstance(v, list) and k != "grads"}
        step_views = [v.step for _, v in members if v.step is not None]
        if step_views:
            self.buffers["step_buffers"] = step_views
        # Every tensor a view was made over, 'step' included.
        self.watched = self.tensors + [t for _, v in members for t in v.tensors]
        self.ptrs = [t.data_ptr() for t in self.watched]

    def same_state(self, state: dict) -> bool:
        """Whether optimizer.state still holds the dicts and tensors the views were made of."""
        if not all(map(is_, map(state.get, self.tensors), self.states)):
            return False  # state cleared, or a param's dict replaced
        return all(all(map(is_, [s.get(k) for s in self.states], column))
                   for k, column in self.state_tensors)


class _Plan:
    """What the last step did, reusable while the params with grads, their
    batch keys, state tensors and memory stay the same."""

    def __init__(self, key: tuple, batches: dict, members_of: dict):
        self.key = key
        self.batches = []
        self.params = []
        for (gi, batch_key), batch in batches.items():
            planned = _PlannedBatch(gi, batch_key, batch, members_of[(gi, batch_key)])
            self.batches.append(planned)
            self.params.extend(planned.tensors)


class _Views:
    """NumPy arrays over one param and the state tensors its step uses (no copies), checked once."""

    __slots__ = ("state", "keys", "watched_keys", "tensors", "ptrs", "ptr", "shape", "param",
                 "step", "buffers")

    def __init__(self, p: torch.Tensor, state: dict, keys: tuple[str, ...], counts_steps: bool,
                 name: str):
        self.state = state
        self.keys = keys
        self.watched_keys = (("step",) if counts_steps else ()) + keys
        self.tensors = tuple(state.get(k) for k in self.watched_keys)
        self.ptr = p.data_ptr()
        self.shape = p.shape
        self.param = p.detach().numpy()
        self.step = None
        if counts_steps:
            step = state["step"]
            if not (isinstance(step, torch.Tensor) and step.is_cpu and step.numel() == 1
                    and step.dtype in (torch.float32, torch.float64)):
                raise TypeError(f"step of {name}: expected a float32 CPU tensor holding the count")
            self.step = step.detach().numpy()
        self.buffers = tuple(_view(state[k], f"{k} of {name}") for k in keys)
        self.ptrs = tuple(t.data_ptr() for t in self.tensors)

    def matches(self, state: dict) -> bool:
        # The same tensor objects over the same memory: a replaced state tensor, or
        # one whose .data was swapped, must be viewed afresh.
        for key, t, ptr in zip(self.watched_keys, self.tensors, self.ptrs):
            if state.get(key) is not t or t.data_ptr() != ptr:
                return False
        return True


_MATH = ADAM_RECURRENCE + r"""
    as in torch.optim. Bias corrections and step size are computed once per step
    in double; the element arithmetic is float32 in one fused pass over every
    param of every group, reached zero-copy through NumPy views of the tensors.
    Results agree with torch.optim to float32 rounding, not bitwise.

    Differences from torch.optim: params must be dense, contiguous float32 CPU
    tensors (checked when added and at each step); ``capturable=True`` and
    ``differentiable=True`` raise ValueError; ``foreach`` and ``fused`` are
    accepted and kept in the param groups (so checkpoints say what the user
    asked for) but change nothing, since the step is always one fused call.
    ``eps_mode="keras"`` moves eps as Keras does:
    ``p - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)``.
    A non-default ``eps_mode``/``decay_mode`` is stored in the param groups;
    torch.optim ignores these keys if such a checkpoint is loaded there.
"""


class Adam(_AdamBase):
    __doc__ = """Adam (L2 weight decay) as torch.optim.Adam, stepped by cpuadam's fused kernel.
""" + _MATH.format(
        decay="g  = g + weight_decay * p        (decoupled_weight_decay=True: as AdamW)") + """
    Args:
        params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize,
        capturable, differentiable, fused, decoupled_weight_decay: as
            torch.optim.Adam.
        eps_mode: "torch" (default) or "keras".
        decay_mode: with decoupled_weight_decay, "lr" (default, torch) or
            "independent" (p -= weight_decay * p).

    Example:
        >>> import torch
        >>> from cpuadam.torch import Adam
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Adam(model.parameters(), lr=1e-2)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False, eps_mode: str = "torch",
                 decay_mode: str = "lr"):
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b
                          for b in betas)
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach,
            "capturable": capturable, "differentiable": differentiable, "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, eps_mode, decay_mode)


class AdamW(Adam):
    __doc__ = """AdamW (decoupled weight decay) as torch.optim.AdamW, by cpuadam's fused kernel.
""" + _MATH.format(
        decay="p  = p * (1 - lr * weight_decay)   "
              "(decay_mode='independent': 1 - weight_decay)") + """
    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach,
            capturable, differentiable, fused: as torch.optim.AdamW
            (weight_decay defaults to 1e-2, as there).
        eps_mode: "torch" (default) or "keras".
        decay_mode: "lr" (default; torch and Keras scale the decay by lr) or
            "independent" (p -= weight_decay * p, as written by Loshchilov &
            Hutter; weight_decay is then typically ~1e-4).

    Example:
        >>> import torch
        >>> from cpuadam.torch import AdamW
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(model.parameters(), lr=1e-2)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 eps_mode: str = "torch", decay_mode: str = "lr"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, eps_mode=eps_mode, decay_mode=decay_mode)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # As torch.optim.AdamW: whatever the checkpoint says, this class decays decoupled.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class SGD(_CoreOptimizer):
    """SGD with momentum as torch.optim.SGD, stepped by cpuadam's fused kernel.

    Per element, with ``b`` the param's momentum buffer::

        g  = -grad if maximize else grad
        g  = g + weight_decay * p
        b  = g  (first step)   or   b = momentum * b + (1 - dampening) * g
        g  = g + momentum * b  (nesterov)   or   g = b       (when momentum != 0)
        p  = p - lr * g

    as in torch.optim.SGD, in one float32 pass over every param of every group,
    reached zero-copy through NumPy views of the tensors. On the avx2 and avx512
    levels each multiply-add rounds once, as torch's CPU kernels do, and params
    and momentum buffers are bitwise equal to torch.optim.SGD's (its default
    for-loop implementation on the CPU; its ``fused=True`` kernel rounds
    differently); the baseline level rounds the product and the sum
    separately and agrees to float32 rounding.

    The state is torch's: ``state[p]['momentum_buffer']`` once p has stepped
    with a non-zero momentum, nothing otherwise, so checkpoints interchange
    with torch.optim.SGD both ways.

    Differences from torch.optim.SGD: params must be dense, contiguous float32
    CPU tensors (checked when added and at each step); ``differentiable=True``
    raises ValueError, and so does a param group with Nesterov momentum and a
    non-zero dampening (torch checks that only in its constructor); ``foreach``
    and ``fused`` are accepted and kept in the param groups but change nothing,
    since the step is always one fused call.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize,
            foreach, differentiable, fused: as torch.optim.SGD.

    Example:
        >>> import torch
        >>> from cpuadam.torch import SGD
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGD(model.parameters(), lr=1e-2, momentum=0.9)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step()
    """

    _CORE_STEP = "sgd_step"
    _STATE_TENSORS = _MOMENTUM_KEYS
    _GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None,
                       "differentiable": False, "fused": False}

    _check_group = staticmethod(_check_sgd_group)

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float | torch.Tensor = 0,
                 nesterov: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None):
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": dampening,
            "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
            "foreach": foreach, "differentiable": differentiable, "fused": fused,
        }
        super().__init__(params, defaults)

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return _MOMENTUM_KEYS if group["momentum"] != 0 else ()

    def _state_of(self, p: torch.Tensor, group: dict, keys: tuple[str, ...]) -> tuple[dict, bool]:
        state = self.state.get(p)
        if not keys:
            # torch neither reads nor makes state without momentum.
            return (_NO_STATE if state is None else state), False
        if state and state.get("momentum_buffer") is not None:
            return state, False
        # Left uninitialised: a batch marked momentum_first writes b = g without reading b.
        buf = torch.empty_like(p, memory_format=torch.preserve_format)
        return dict(state or {}, momentum_buffer=buf), True

    def _batch_key(self, views: "_Views", fresh: bool) -> bool:
        return fresh

    def _next_key(self, key: bool) -> bool:
        return False  # a buffer is new for one step only

    def _batch_scalars(self, group: dict, gi: int, first: bool) -> dict:
        momentum = float(group["momentum"])
        return {"group": gi, "lr": float(group["lr"]), "momentum": momentum,
                "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"]),
                # As in torch, nesterov means nothing without momentum.
                "nesterov": bool(group["nesterov"]) and momentum != 0,
                "maximize": bool(group["maximize"]), "momentum_first": first}


class StepInBackward:
    """Handle returned by :func:`step_in_backward`: the optimizer and its hooks.

    Attributes:
        optimizer: the cpuadam.torch optimizer that holds the hyperparameters and
            state; pass it to an lr scheduler, call its ``state_dict()``.
    """

    def __init__(self, optimizer: _CoreOptimizer, hooks: list):
        self.optimizer = optimizer
        self._hooks = hooks
        self._where: dict[torch.Tensor, tuple[int, int]] = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        """The optimizer's state_dict, in its torch.optim counterpart's format."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def remove(self) -> None:
        """Removes the hooks; grads then accumulate as usual and nothing steps."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __enter__(self) -> "StepInBackward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _locate(self, p: torch.Tensor) -> tuple[int, int]:
        where = self._where.get(p)
        groups = self.optimizer.param_groups
        if where is None or groups[where[0]]["params"][where[1]] is not p:
            self._where = {q: (gi, pi) for gi, g in enumerate(groups)
                           for pi, q in enumerate(g["params"])}
            where = self._where[p]
        return where

    def _hook(self, p: torch.Tensor) -> None:
        gi, pi = self._locate(p)
        with torch.no_grad():
            self.optimizer._update([(gi, pi, p)])
        p.grad = None
        # torch's lr schedulers warn unless they saw optimizer.step() run; this is its step.
        self.optimizer._opt_called = True


def step_in_backward(model_or_params: Any, optimizer_class: type = AdamW,
                     **hparams: Any) -> StepInBackward:
    """Steps each param during backward, as soon as its grad is ready, then frees the grad.

    Uses ``Tensor.register_post_accumulate_grad_hook``: peak memory drops by about
    the size of the grads, since at most a few exist at once. The weights equal
    those of the ordinary ``backward(); opt.step(); opt.zero_grad()`` loop.

    Args:
        model_or_params: an ``nn.Module`` (its params that require grad), or
            params / param groups as an optimizer takes them.
        optimizer_class: :class:`AdamW` (default), :class:`Adam` or :class:`SGD`.
        **hparams: the optimizer's keyword arguments (lr, weight_decay, ...).

    Returns:
        A :class:`StepInBackward`; ``handle.optimizer`` goes to lr schedulers
        (call ``scheduler.step()`` after each backward) and checkpoints.

    With Adam and AdamW the state of every param is allocated when the handle
    is made (with ``step`` 0), not at its first update; SGD's momentum buffers
    are made at each param's first update, as torch's are. Each backward is one step, so grads
    cannot be accumulated over several backward passes, and the optimizer's
    step hooks do not fire. Not for use
    under DistributedDataParallel, whose grads are averaged after this hook.

    Example:
        >>> import torch
        >>> from cpuadam.torch import step_in_backward
        >>> model = torch.nn.Linear(4, 2)
        >>> handle = step_in_backward(model, lr=1e-2)
        >>> model(torch.ones(3, 4)).sum().backward()   # params updated, grads freed
        >>> model.weight.grad is None
        True
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, _CoreOptimizer)):
        raise TypeError("optimizer_class must be cpuadam.torch.AdamW, cpuadam.torch.Adam or "
                        f"cpuadam.torch.SGD, got {optimizer_class!r}")
    if isinstance(model_or_params, torch.nn.Module):
        params: Any = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = model_or_params
    optimizer = optimizer_class(params, **hparams)
    handle = StepInBackward(optimizer, [])
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                # State up front (as a first step would make it): allocated during the
                # first backward instead, between short-lived grads, it leaves the
                # allocator's heap fragmented and the freed grads stay resident.
                optimizer._preallocate(p, group)
                handle._hooks.append(p.register_post_accumulate_grad_hook(handle._hook))
    return handle
