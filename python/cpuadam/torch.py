# SPDX-License-Identifier: MIT
"""torch.optim drop-ins (Adam, AdamW, SGD): the torch.optim protocol over the step engine."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from cpuadam import _core  # noqa: F401  (tests watch its calls)
from cpuadam._engine import (Adapter, Engine, EngineUser, check_step_value,
                             make_options, param_name)
from cpuadam.optim import ADAM_RECURRENCE, DynamicLossScale

__all__ = ["Adam", "AdamW", "SGD", "DynamicLossScale", "StepInBackward", "step_in_backward"]

# Our options live in a param group only when set away from their default, so that
# by default a group has exactly torch's keys and checkpoints interchange unchanged.
_EXTRA_DEFAULTS = {"eps_mode": "torch", "decay_mode": "lr"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
_TORCH_DTYPES["uint8"] = torch.uint8  # 8-bit states' codes
# State entries that are optimizer buffers (load_state_dict keeps their dtype).
_BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "master_param",
            "kahan_comp", "grad_accum", "ema")
# 8-bit states' companions: float32 whatever the param's dtype.
_QUANT_BUFFERS = tuple(f"{k}_{part}" for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq",
                                                "momentum_buffer") for part in ("absmax", "qmap"))


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps 'step' in float64 only when that is the default dtype.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_param(p: torch.Tensor, name: str) -> None:
    """Raises unless p is a tensor an optimizer can own (its step path is chosen later)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: optimizer can only optimize Tensors, got {type(p).__name__}")
    if p.device.type not in ("cpu", "meta"):
        raise ValueError(f"{name} is on device '{p.device}'; cpuadam.torch updates CPU tensors "
                         "only (keep the model on the CPU, or use torch.optim for other devices)")


def _torch_path_reason(p: torch.Tensor, grad: torch.Tensor, group: dict) -> str | None:
    """Why torch.optim's own implementation steps p (None: the fused kernel does)."""
    if group.get("differentiable"):
        return "differentiable=True"
    if p.dtype not in _DTYPE_NAMES:
        return f"dtype {p.dtype}"
    if p.layout is not torch.strided or not p.is_contiguous():
        return "non-contiguous param"
    if grad.is_sparse and group.get("momentum") is not None:
        return "sparse grad"  # SGD steps sparse grads; Adam refuses them, as torch.optim does
    return None


def _check_disjoint(groups: list[dict]) -> None:
    """No two params may share memory: a step writes every one of them."""
    extents = []
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            if p.numel() == 0 or p.device.type != "cpu":
                continue
            lo = p.data_ptr()
            extents.append((lo, lo + p.numel() * p.element_size(), param_name(gi, pi)))
    extents.sort(key=lambda e: e[0])
    for (_, hi0, n0), (lo1, _, n1) in zip(extents, extents[1:]):
        if lo1 < hi0:
            raise ValueError(f"{n1} shares memory with {n0} (the same tensor twice, or views "
                             "into one another); each optimized param must be its own buffer")


def _check_flags(group: dict, where: str) -> None:
    """torch's checks of the implementation flags."""
    if group.get("capturable"):
        raise ValueError(f"capturable=True is not supported by cpuadam.torch{where}: its step "
                         "runs on the CPU in C++, outside CUDA graphs")
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group.get("fused") and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")


def _check_betas(betas: Any) -> Any:
    """torch.optim.Adam's constructor checks of betas given as tensors."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        return betas
    both_floats = all(isinstance(b, (float, int)) and not isinstance(b, bool) for b in betas)
    both_tensors = all(isinstance(b, torch.Tensor) for b in betas)
    if not (both_floats or both_tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    if both_tensors:
        for i, b in enumerate(betas):
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        return tuple(float(b.item()) for b in betas)
    return tuple(betas)


class _TorchAdapter(Adapter):
    """Tensors become NumPy views (bfloat16 as int16 bits); state is keyed by param."""

    step_buffers = True
    marks_updates = True

    def __init__(self, counts_steps: bool):
        self.counts_steps = counts_steps

    def view(self, t: Any, name: str) -> np.ndarray:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}; expected a tensor")
        if t.device.type != "cpu" or t.layout is not torch.strided:
            raise ValueError(f"{name} is a {t.layout} tensor on device '{t.device}'; expected a "
                             "dense CPU tensor (a param on the meta device must be materialised, "
                             "e.g. with module.to_empty(device='cpu'), before a step)")
        if t.dtype is torch.bfloat16:
            t = t.view(torch.int16)
        elif t.dtype not in _DTYPE_NAMES and t.dtype is not torch.uint8:  # uint8: 8-bit codes
            raise TypeError(f"{name} is {t.dtype}; expected torch.float32, torch.bfloat16 or "
                            "torch.float16")
        self._check_storage(t, name)
        return t.detach().numpy()

    @staticmethod
    def _check_storage(t: torch.Tensor, name: Any) -> None:
        # A storage freed or shrunk under the tensor (FSDP's resize_(0)) would hand the
        # core memory the tensor does not own. name: a string, or (gi, pi) of a grad.
        needed = (t.storage_offset() + t.numel()) * t.element_size()
        if t.numel() and t.untyped_storage().nbytes() < needed:
            if isinstance(name, tuple):
                name = "grad of " + param_name(*name)
            raise ValueError(f"{name}: its storage holds {t.untyped_storage().nbytes()} bytes but "
                             f"the tensor needs {needed} (freed or resized storage)")

    def grad_view(self, grad: torch.Tensor, param: torch.Tensor, gi: int, pi: int) -> np.ndarray:
        # The common case in as few tensor calls as possible: .numpy() itself refuses a
        # grad off the CPU, sparse or requiring grad (then the checked path words it).
        dtype = grad.dtype
        if (dtype is torch.float32 or dtype is torch.float16) and grad.shape == param.shape \
                and grad.is_contiguous():
            try:
                view = grad.numpy()
            except (RuntimeError, TypeError):
                return self._checked_grad_view(grad, param, param_name(gi, pi))
            # A storage freed or shrunk under the grad: its memory is not the grad's.
            if grad.untyped_storage().nbytes() < view.nbytes + grad.storage_offset() * view.itemsize:
                self._check_storage(grad, (gi, pi))
            return view
        return self._checked_grad_view(grad, param, param_name(gi, pi))

    def _checked_grad_view(self, grad: torch.Tensor, param: torch.Tensor, name: str) -> np.ndarray:
        if not (grad.is_cpu and grad.layout is torch.strided and grad.shape == param.shape):
            if grad.layout is not torch.strided:
                raise TypeError(f"grad of {name} is a sparse tensor ({grad.layout}); expected a "
                                "dense grad")
            if not grad.is_cpu:
                raise ValueError(f"grad of {name} is on device '{grad.device}'; expected a CPU "
                                 "tensor")
            raise ValueError(f"grad of {name} has shape {tuple(grad.shape)}; expected "
                             f"{tuple(param.shape)}, its param's shape")
        if not grad.is_contiguous():
            grad = grad.contiguous()  # only read: a contiguous copy is exact
        if grad.dtype is torch.bfloat16:
            grad = grad.view(torch.int16)
        elif grad.dtype not in _DTYPE_NAMES:
            raise TypeError(f"grad of {name} is {grad.dtype}; expected torch.float32, "
                            "torch.bfloat16 or torch.float16")
        if grad.requires_grad:
            grad = grad.detach()
        self._check_storage(grad, "grad of " + name)
        try:
            return grad.numpy()
        except RuntimeError as e:  # e.g. a tensor subclass
            raise TypeError(f"grad of {name}: {e}") from None

    ptr = staticmethod(torch.Tensor.data_ptr)

    def dtype_name(self, t: Any) -> str:
        dtype = getattr(t, "dtype", None)
        return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))

    def new_buffer(self, param: torch.Tensor, dtype: str | None, fill: Any = None) -> torch.Tensor:
        torch_dtype = param.dtype if dtype is None else _TORCH_DTYPES[dtype]
        if fill is not None:
            return fill.detach().to(dtype=torch_dtype, copy=True).contiguous()
        return torch.zeros_like(param, dtype=torch_dtype, memory_format=torch.contiguous_format)

    def new_state(self) -> dict:
        return {"step": torch.tensor(0.0, dtype=_scalar_dtype())} if self.counts_steps else {}

    def step_view(self, state: dict, name: str) -> np.ndarray:
        step = state.get("step")
        if not (isinstance(step, torch.Tensor) and step.is_cpu and step.numel() == 1
                and step.dtype in (torch.float32, torch.float64)):
            raise TypeError(f"step of {name}: expected a float32 CPU tensor holding the count")
        return step.detach().numpy()

    def get_step(self, state: dict) -> int:
        return int(state["step"])

    def float32_of(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().float().numpy()

    def from_numpy(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(arr, order="C"))

    def state_keys(self, groups: list[dict]) -> list:
        return [p for g in groups for p in g["params"]]

    def assign(self, param: torch.Tensor, avg: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(avg)

    def swap(self, param: torch.Tensor, avg: torch.Tensor) -> None:
        with torch.no_grad():
            tmp = param.detach().to(avg.dtype, copy=True)
            param.copy_(avg)
            avg.copy_(tmp)

    def mark_updated(self, params: list) -> None:
        # The kernel writes memory autograd does not see; tell it, as an in-place op would.
        torch.autograd.graph.increment_version(params)


class _CoreOptimizer(EngineUser, Optimizer):
    """The torch.optim protocol over the engine: groups, hooks, state_dict, closures, AMP.

    Params the fused kernel does not cover (float64 and complex params, non-contiguous
    params, sparse grads, ``differentiable=True`` groups) are stepped by torch.optim's own
    implementation; ``torch_path`` names them and says why.
    """

    _RULE = "adam"
    # Group keys that checkpoints written by older torch releases may lack.
    _GROUP_DEFAULTS: dict = {}
    #: GradScaler passes grad_scale/found_inf to this step instead of unscaling the grads.
    _step_supports_amp_scaling = True

    def __init__(self, params: Any, defaults: dict, options: dict):
        _check_flags(defaults, "")
        opts = make_options(type(self).__name__, {"state_dtype": None, **options})
        self._engine = Engine(self._RULE, opts, _TorchAdapter(self._RULE == "adam"))
        #: Params stepped by torch.optim's implementation at the last step, with the reason.
        self.torch_path: dict[str, str] = {}
        lr = defaults.get("lr")
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        self._engine.check_group(defaults, "")
        super().__init__(params, defaults)
        self._engine.check_mask_length()

    def __getstate__(self) -> dict:
        # torch.optim's copy keeps defaults, state and groups; the engine (options and
        # counters) comes along, so a deep copy or an unpickled optimizer steps on.
        out = super().__getstate__()
        out["_engine"] = self._engine
        out["torch_path"] = self.torch_path
        return out

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then cpuadam's checks; a rejected group is not added."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        try:
            where = f" in group {index}"
            _check_flags(group, where)
            self._engine.check_group(group, where)
            for pi, p in enumerate(group["params"]):
                _check_param(p, param_name(index, pi))
            _check_disjoint(self.param_groups)
            self._engine.init_group(group, index)
        except Exception:
            self.param_groups.pop()
            raise

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's state_dict; with a cpuadam option on, also the engine's counters."""
        out = super().state_dict()
        if not self._engine.options.is_default or self._engine.iterations and any(
                callable(g["lr"]) and not isinstance(g["lr"], torch.Tensor)
                for g in self.param_groups):
            out.update(self._engine.extra_state())
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, checked first: a malformed checkpoint raises ValueError
        naming the key and leaves the optimizer as it was.

        Groups are taken as saved: a checkpoint written with ``capturable=True``
        (a CUDA-graph setting) loads and the flag is ignored here. As in torch.optim,
        load_state_dict pre-hooks see the dict first (what they return is what loads) and
        post-hooks run once the optimizer holds the loaded state.
        """
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
            for hook in list(pre_hooks.values()):
                result = hook(self, state_dict)
                if result is not None:
                    state_dict = result
        if not isinstance(state_dict, dict) or "state" not in state_dict or \
                "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in saved_groups for i in g["params"]]
        if len(ids) != len(params) or any(len(s["params"]) != len(m["params"])
                                          for s, m in zip(saved_groups, self.param_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match "
                             "the size of optimizer's group")
        by_id = dict(zip(ids, params))
        for pid, entry in state_dict["state"].items():
            if pid not in by_id:
                raise ValueError(f"loaded state dict has state for unknown param id {pid!r}")
            p = by_id[pid]
            self._engine.check_param_state(entry, f"param {pid}", tuple(p.shape), _as_array)
        for gi, saved in enumerate(saved_groups):
            group = {**self._GROUP_DEFAULTS, **saved}
            group.setdefault("decoupled_weight_decay",
                             self.param_groups[gi].get("decoupled_weight_decay", False))
            self._engine.check_group(group, f" in group {gi}")
            mask = saved.get("decay_mask")
            if mask is not None and len(mask) != len(saved["params"]):
                raise ValueError(f"loaded state dict has a 'decay_mask' in group {gi} that does "
                                 f"not have one entry per param ({len(saved['params'])})")
        apply_extra = self._engine.load_extra_state(state_dict)
        old_state, old_groups = self.state, self.param_groups
        # torch's load below must not run the hooks again (the pre-hooks ran above; the
        # post-hooks run at the end, after the engine's casts).
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(state_dict)
        except Exception:
            self.state, self.param_groups = old_state, old_groups
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        # torch.optim casts every floating-point state tensor to its param's dtype; the
        # engine's buffers take the dtype it steps them in, cast from the saved values
        # (float32 moments or master copies of bfloat16 params keep their precision), and
        # contiguous for the kernel.
        engine = self._engine
        for pid, entry in state_dict["state"].items():
            p = by_id[pid]
            pdtype = _DTYPE_NAMES.get(p.dtype)
            if pdtype is None or not isinstance(entry, dict):
                continue
            p_state = self.state[p]
            for key in _BUFFERS + _QUANT_BUFFERS:
                value = entry.get(key)
                if isinstance(value, torch.Tensor):
                    saved = "uint8" if value.dtype is torch.uint8 else "float"
                    dtype = _TORCH_DTYPES[engine.loaded_dtype(key, saved, pdtype)]
                    p_state[key] = value.detach().to(device="cpu", dtype=dtype,
                                                     copy=True).contiguous()
        apply_extra()
        engine.forget_plans()
        for hook in list(post_hooks.values()):
            hook(self)

    # --- the step ---------------------------------------------------------------------------
    def _patch_step_function(self) -> None:
        # torch.optim wraps step() in a profiler range and its hook loop on every call
        # (~10 us); step() below takes that path only when a hook or the profiler is on.
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """Updates every param whose grad is not None, in one fused call.

        Args:
            closure: optional callable that re-evaluates the model and returns
                the loss (positional or keyword, as torch.optim takes it).

        Returns:
            The closure's loss, or None.

        Raises:
            TypeError, ValueError: a param, grad or state buffer the kernel cannot
                update in place (wrong device, dtype, shape, layout; overlapping
                memory) or a bad hyperparameter; the message names the param.
                Nothing is changed by a rejected step.
        """
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _global_optimizer_pre_hooks or _global_optimizer_post_hooks
                or torch.autograd.profiler._is_profiler_enabled):
            return _CoreOptimizer._hooked_step(self, *args, **kwargs)
        return self._step(*args, **kwargs)

    @torch._disable_dynamo
    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            self._step_no_grad()
        finally:
            torch.set_grad_enabled(grad_mode)
        return loss

    def _step_no_grad(self) -> None:
        amp_scale = None
        # GradScaler sets these attributes around the call (torch's fused optimizers read them).
        found_inf = self.__dict__.get("found_inf")
        grad_scale = self.__dict__.get("grad_scale")
        if found_inf is not None and float(found_inf) != 0.0:
            return  # GradScaler saw inf/NaN: torch's fused step changes nothing either
        if grad_scale is not None:
            amp_scale = float(grad_scale)
        groups = self.param_groups
        params = [p for g in groups for p in g["params"]]
        grads = [p.grad for p in params]
        torch_path = None
        for gi, group in enumerate(groups):
            if group.get("differentiable"):
                torch_path = {}
                break
        if torch_path is None:
            for p, g in zip(params, grads):
                if g is not None and not (p.dtype in _DTYPE_NAMES and p.is_contiguous()
                                          and not g.is_sparse):
                    torch_path = {}
                    break
        if torch_path is not None:
            grads = self._split_torch_path(grads, torch_path)
        self._engine.step(groups, self.state, grads, params, amp_scale=amp_scale)
        if torch_path:
            self._step_torch_path(torch_path, amp_scale)
        self.torch_path = {name: reason for name, (_, _, reason) in (torch_path or {}).items()}

    def _split_torch_path(self, grads: list, torch_path: dict) -> list:
        """Moves the params the fused kernel does not cover to torch_path; their grads become None."""
        out = list(grads)
        flat = 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                g = grads[flat]
                if g is not None:
                    reason = _torch_path_reason(p, g, group)
                    if reason is not None:
                        torch_path[param_name(gi, pi)] = (gi, p, reason)
                        out[flat] = None
                flat += 1
        return out

    def _step_torch_path(self, torch_path: dict, amp_scale: float | None) -> None:
        by_group: dict[int, list] = {}
        for gi, p, _ in torch_path.values():
            by_group.setdefault(gi, []).append(p)
        for gi, params in by_group.items():
            group = self.param_groups[gi]
            grads = [p.grad if amp_scale is None else p.grad / amp_scale for p in params]
            with torch.set_grad_enabled(bool(group.get("differentiable"))):
                self._torch_update(group, params, grads)

    def _torch_update(self, group: dict, params: list, grads: list) -> None:
        raise NotImplementedError

    _hooked_step = Optimizer.profile_hook_step(_step)

    def _preallocate(self, p: torch.Tensor, group: dict) -> None:
        """Makes p's state before its first step where that changes no result (step_in_backward)."""


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return np.empty(tuple(value.shape), dtype=np.float32) if value.is_floating_point() \
            else np.empty(tuple(value.shape), dtype=np.uint8)
    return np.asarray(value)


class _AdamBase(_CoreOptimizer):
    """Adam and AdamW: state as torch.optim.Adam's."""

    _RULE = "adam"
    _GROUP_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None,
                       "capturable": False, "differentiable": False, "fused": None,
                       "decoupled_weight_decay": False}

    def __init__(self, params: Any, defaults: dict, eps_mode: str, decay_mode: str,
                 options: dict):
        for key, value in (("eps_mode", eps_mode), ("decay_mode", decay_mode)):
            if value != _EXTRA_DEFAULTS[key]:
                defaults[key] = value
        super().__init__(params, defaults, options)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Checkpoints written by older torch releases may keep 'step' as a number.
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_scalar_dtype())

    def _preallocate(self, p: torch.Tensor, group: dict) -> None:
        # Zeros, step 0: exactly what a first step would start from.
        if not self.state.get(p):
            state = self._engine.adapter.new_state()
            sdtype = self._engine._state_dtype(self._engine.adapter.dtype_name(p), p.numel())
            if sdtype == "8bit":
                return  # codes, absmax and maps are made by the first step
            for key in self._engine.rule.state_keys(group):
                state[key] = self._engine.adapter.new_buffer(p, sdtype)
            self.state[p] = state

    def _torch_update(self, group: dict, params: list, grads: list) -> None:
        from torch.optim.adam import adam as torch_adam

        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:  # new, or holding only the engine's EMA
                state.setdefault("step", torch.tensor(0.0, dtype=_scalar_dtype()))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        torch_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                   foreach=False, capturable=False, differentiable=bool(group["differentiable"]),
                   fused=None, grad_scale=None, found_inf=None,
                   has_complex=any(torch.is_complex(p) for p in params),
                   decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                   amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                   weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=group["maximize"])


_MATH = ADAM_RECURRENCE + r"""
    as in torch.optim. Bias corrections and step size are computed once per step
    in double; the element arithmetic is float32 in one fused pass over every
    param of every group, reached zero-copy through NumPy views of the tensors.
    Results agree with torch.optim to float32 rounding, not bitwise.

    Differences from torch.optim: float32, bfloat16 and float16 CPU params take
    the fused step; float64 and complex params, non-contiguous params and
    ``differentiable=True`` groups are stepped by torch.optim's own
    implementation (``optimizer.torch_path`` names them after each step);
    ``capturable=True`` raises ValueError; ``foreach`` and ``fused`` are
    accepted and kept in the param groups (so checkpoints say what the user
    asked for) but change nothing. GradScaler hands this step its scale and
    inf flag (as to torch's fused optimizers): grads are unscaled inside the
    pass and a step with inf/NaN grads changes nothing.
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
        **options: cpuadam's options, as in cpuadam.Adam (clipnorm, clipvalue,
            global_clipnorm, loss_scale_factor, gradient_accumulation_steps,
            use_ema, ema_momentum, ema_overwrite_frequency, skip_nonfinite,
            weight_decay_mask, exclude_from_weight_decay, state_dtype,
            param_update, state_rounding, seed, min_8bit_size); ``lr`` may
            also be a schedule (a callable of the step, e.g. from
            cpuadam.schedules). state_dtype defaults to the param's dtype, as
            torch.optim keeps its moments.

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
                 decay_mode: str = "lr", **options: Any):
        if isinstance(lr, torch.Tensor):
            if foreach and not capturable:
                raise ValueError("lr as a Tensor is not supported for capturable=False and "
                                 "foreach=True")
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        betas = _check_betas(betas)
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
            "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach,
            "capturable": capturable, "differentiable": differentiable, "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults, eps_mode, decay_mode, options)


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
        **options: cpuadam's options, as in :class:`Adam`.

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
                 eps_mode: str = "torch", decay_mode: str = "lr", **options: Any):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, eps_mode=eps_mode, decay_mode=decay_mode,
                         **options)

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

    Differences from torch.optim.SGD: float64/complex/non-contiguous params,
    sparse grads and ``differentiable=True`` groups are stepped by
    torch.optim's own implementation (``optimizer.torch_path``); a param
    group with Nesterov momentum and a non-zero dampening raises ValueError
    (torch checks that only in its constructor); ``foreach`` and ``fused`` are
    accepted and kept in the param groups but change nothing.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize,
            foreach, differentiable, fused: as torch.optim.SGD.
        **options: cpuadam's options, as in :class:`Adam`.

    Example:
        >>> import torch
        >>> from cpuadam.torch import SGD
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SGD(model.parameters(), lr=1e-2, momentum=0.9)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step()
    """

    _RULE = "sgd"
    _GROUP_DEFAULTS = {"nesterov": False, "maximize": False, "foreach": None,
                       "differentiable": False, "fused": False}

    def __init__(self, params: Any, lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float | torch.Tensor = 0,
                 nesterov: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None, **options: Any):
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": dampening,
            "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
            "foreach": foreach, "differentiable": differentiable, "fused": fused,
        }
        super().__init__(params, defaults, options)

    def _torch_update(self, group: dict, params: list, grads: list) -> None:
        from torch.optim.sgd import sgd as torch_sgd

        # state.get: a defaultdict's [] would leave an empty entry torch.optim.SGD does not.
        momentum_buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
        torch_sgd(params, grads, momentum_buffers, weight_decay=group["weight_decay"],
                  momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                  nesterov=group["nesterov"], maximize=group["maximize"],
                  has_sparse_grad=any(g.is_sparse for g in grads), foreach=False, fused=None)
        if group["momentum"] != 0:
            for p, buf in zip(params, momentum_buffers):
                self.state[p]["momentum_buffer"] = buf


class StepInBackward:
    """Handle returned by :func:`step_in_backward`: the optimizer and its hooks.

    Attributes:
        optimizer: the cpuadam.torch optimizer that holds the hyperparameters and
            state; pass it to an lr scheduler, call its ``state_dict()``.
    """

    def __init__(self, optimizer: _CoreOptimizer, hooks: list):
        self.optimizer = optimizer
        self._hooks = hooks
        self._where: dict[torch.Tensor, int] = {}
        self._queued = False

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

    def _locate(self, p: torch.Tensor) -> int:
        flat = self._where.get(p)
        params = self.optimizer._skeys()
        if flat is None or flat >= len(params) or params[flat] is not p:
            self._where = {q: k for k, q in enumerate(params)}
            flat = self._where[p]
        return flat

    def _end_of_backward(self) -> None:
        self._queued = False
        self.optimizer._engine.iterations += 1

    def _hook(self, p: torch.Tensor) -> None:
        flat = self._locate(p)
        opt = self.optimizer
        with torch.no_grad():
            opt._engine.step(opt.param_groups, opt.state, {flat: p.grad}, {flat: p},
                             targets=[flat])
        p.grad = None
        if not self._queued:
            # One backward is one update: the schedule position advances when it ends.
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._queued = True
        # torch's lr schedulers warn unless they saw optimizer.step() run; this is its step.
        opt._opt_called = True


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
    under DistributedDataParallel, whose grads are averaged after this hook, nor
    with a GradScaler (the scale would not be divided out). Options that need
    every grad of a step at once (``global_clipnorm``, ``skip_nonfinite``,
    ``gradient_accumulation_steps``, a :class:`DynamicLossScale`) and params that
    would take torch.optim's own step (float64, complex, non-contiguous,
    ``differentiable=True``, and, given a module, the weights of its
    ``sparse=True`` embeddings) are refused with ValueError when the handle is made.

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
    sparse: set = set()  # params whose grads a module makes sparse (Embedding(sparse=True))
    if isinstance(model_or_params, torch.nn.Module):
        params: Any = [p for p in model_or_params.parameters() if p.requires_grad]
        sparse = {id(m.weight) for m in model_or_params.modules()
                  if getattr(m, "sparse", False) is True and isinstance(getattr(m, "weight", None),
                                                                        torch.Tensor)}
    else:
        params = model_or_params
    optimizer = optimizer_class(params, **hparams)
    optimizer._engine.check_stepwise()
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            reason = _torch_path_reason(p, p, group) if p.requires_grad else None
            if reason is None and id(p) in sparse:
                reason = "sparse grad"
            if reason is not None:
                raise ValueError(f"{param_name(gi, pi)} would take torch.optim's own step "
                                 f"({reason}), which step_in_backward does not run: give it to "
                                 "an ordinary optimizer")
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
