# SPDX-License-Identifier: MIT
"""NumPy optimizers (Adam, AdamW, SGD): param groups, state and state_dict over the step engine."""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from cpuadam._engine import (Adapter, DynamicLossScale, Engine, EngineUser, Options,
                             check_step_value, make_options)
from cpuadam._groups import (
    buffer_like,
    check_disjoint,
    check_param_array,
    normalise_groups,
    numpy_dtype,
    param_name,
    split_names,
)

__all__ = ["SGD", "Adam", "AdamW", "DynamicLossScale", "Optimizer"]


class _NumpyAdapter(Adapter):
    """NumPy arrays are their own buffers; state is keyed by flat param index."""

    grads_as_given = True

    def __init__(self, counts_steps: bool):
        self.counts_steps = counts_steps

    def view(self, obj: Any, name: str) -> np.ndarray:
        return obj


    def dtype_name(self, obj: Any) -> str:
        dtype = getattr(obj, "dtype", None)
        return dtype.name if isinstance(dtype, np.dtype) else "float32"

    def new_buffer(self, param: np.ndarray, dtype: str | None, fill: Any = None) -> np.ndarray:
        out = buffer_like(param, dtype=dtype)
        if fill is not None:
            out[...] = fill.astype(out.dtype) if fill.dtype != out.dtype else fill
        return out

    def new_state(self) -> dict:
        return {"step": 0} if self.counts_steps else {}

    def float32_of(self, obj: np.ndarray) -> np.ndarray:
        return obj.astype(np.float32)

    def from_numpy(self, arr: np.ndarray) -> np.ndarray:
        return np.array(arr, order="C")

    def state_keys(self, groups: list[dict]) -> list[int]:
        return list(range(sum(len(g["params"]) for g in groups)))

    def assign(self, param: np.ndarray, avg: np.ndarray) -> None:
        np.copyto(param, avg.astype(param.dtype) if avg.dtype != param.dtype else avg)

    def swap(self, param: np.ndarray, avg: np.ndarray) -> None:
        tmp = param.astype(avg.dtype)
        self.assign(param, avg)
        np.copyto(avg, tmp)


class Optimizer:
    """Base of the NumPy optimizers: param groups, per-param state, state_dict.

    Params are writeable C-contiguous NumPy arrays updated in place. State is
    keyed by each param's position in the flattened groups
    (``[p for g in opt.param_groups for p in g['params']]``), as in the
    ``state`` of torch's state_dict. Params may be given as (name, array)
    pairs, as torch's ``named_parameters()`` gives them; the names land in
    ``group['param_names']`` and can select params for weight decay.
    """

    _RULE = "adam"

    def __init__(self, params: Any, defaults: dict, options: Options | None = None):
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        self._engine = Engine(self._RULE, options or Options(),
                              _NumpyAdapter(self._RULE == "adam"))
        self._engine.check_group(self.defaults, "")
        for group in normalise_groups(params):
            self.add_param_group(group)
        self._engine.check_mask_length()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k not in ("params", "param_names", "decay_mask")):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group of params with its own hyperparameters (defaults fill the rest)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group must have a 'params' entry")
        index = len(self.param_groups)
        group = dict(param_group)
        split_names(group)
        for i, p in enumerate(group["params"]):
            check_param_array(p, param_name(index, i))
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._engine.check_group(group, f" in group {index}")
        named = [(param_name(gi, i), p) for gi, g in enumerate(self.param_groups + [group])
                 for i, p in enumerate(g["params"])]
        check_disjoint(named)
        self._engine.init_group(group, index)
        self.param_groups.append(group)

    def _flat_params(self) -> list[np.ndarray]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """torch's layout: ``{'state': {index: {...}}, 'param_groups': [...]}``.

        Arrays are the optimizer's own buffers (as torch returns its tensors);
        deep-copy or pickle the dict to keep a snapshot while training goes on.
        """
        groups = []
        start = 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state = {k: dict(v) for k, v in self.state.items()}
        return {"state": state, "param_groups": groups, **self._engine.extra_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores state and hyperparameters; arrays are copied into new buffers.

        Everything is checked first: raises ValueError (and changes nothing) if the
        groups, sizes, shapes, dtypes, step counts or optimizer-wide entries do not
        fit this optimizer.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, dict) and "params" in g for g in saved_groups):
            raise ValueError("loaded state dict has invalid 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if not isinstance(state_dict["state"], dict):
            raise ValueError("loaded state dict has an invalid 'state' (expected a dict)")
        index_map: dict[Any, int] = {}
        start = 0
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(f"loaded state dict contains a parameter group {gi} that doesn't "
                                 "match the size of optimizer's group")
            for offset, saved_id in enumerate(saved["params"]):
                index_map[saved_id] = start + offset
            start += len(mine["params"])
        flat = self._flat_params()
        new_state: dict[int, dict] = {}
        for saved_id, entry in state_dict["state"].items():
            if saved_id not in index_map:
                raise ValueError(f"loaded state dict has state for unknown param id {saved_id!r}")
            k = index_map[saved_id]
            self._engine.check_param_state(entry, f"param {k}", flat[k].shape, np.asarray)
            new_state[k] = self._load_param_state(entry, flat[k])
        new_groups = []
        for gi, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            group["params"] = mine["params"]
            for key, value in mine.items():  # e.g. a torch checkpoint has no decay_mask
                group.setdefault(key, value)
            mask = group.get("decay_mask")
            if mask is not None and (not isinstance(mask, (list, tuple)) or len(mask) != len(mine["params"])):
                raise ValueError(f"loaded state dict has a 'decay_mask' in group {gi} that does not "
                                 f"have one entry per param ({len(mine['params'])})")
            self._engine.check_group(group, f" in group {gi}")
            new_groups.append(group)
        apply_extra = self._engine.load_extra_state(state_dict)
        self.param_groups = new_groups
        self.state = new_state
        apply_extra()

    def _load_param_state(self, entry: dict, param: np.ndarray) -> dict:
        out: dict = {}
        pdtype = self._engine.adapter.dtype_name(param)
        for key, value in entry.items():
            if key == "step":
                out[key] = check_step_value(value, "'step'")
            elif value is not None:
                arr = np.asarray(value)
                if key.endswith(("_absmax", "_qmap")):  # 8-bit states: not of the param's shape
                    out[key] = np.array(arr, dtype=np.float32, order="C")
                else:  # in the dtype the step uses it in, as the torch front-end loads it
                    if arr.dtype.kind in "ui" and arr.itemsize == 2:  # bfloat16 bits
                        arr = arr.view(numpy_dtype("bfloat16", arr.dtype))
                    dtype = self._engine.loaded_dtype(key, arr.dtype.name, pdtype)
                    out[key] = buffer_like(param, arr, dtype=dtype)
        return out


class _FusedOptimizer(EngineUser, Optimizer):
    """The NumPy side of the engine: grads in, one engine step per call."""

    def __init__(self, params: Any, defaults: dict, **options: Any):
        super().__init__(params, defaults, make_options(type(self).__name__, options))

    def step(self, grads: Iterable[np.ndarray | None]) -> None:
        """Applies one update to every param whose grad is not None.

        Args:
            grads: one array per param (same shape and dtype), in the order of
                ``[p for g in opt.param_groups for p in g['params']]``; None
                skips that param, as a None ``.grad`` does in torch.

        With ``gradient_accumulation_steps=k`` the first k-1 calls only add
        the grads to accumulators; the k-th applies the update to their mean
        (every accumulator restarts after it, as in Keras). With
        ``skip_nonfinite`` a step whose grads hold inf or NaN changes nothing
        but ``skipped_steps`` (and an accumulation window restarts).

        Raises:
            TypeError, ValueError: on a bad grad, buffer or hyperparameter; the
                message names the param. Nothing is changed by a rejected step.
            RuntimeError: another thread is stepping this optimizer.
        """
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError(f"step() expects a list of arrays, got {type(grads).__name__}") from None
        n = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != n:
            raise ValueError(f"step() got {len(grads)} grads for {n} params")
        self._engine.step(self.param_groups, self.state, grads, range(n))


class _AdamBase(_FusedOptimizer):
    _decoupled = False

    def __init__(self, params: Any, lr: float | Callable[[int], float], betas: Sequence[float],
                 eps: float, weight_decay: float, amsgrad: bool, maximize: bool, *,
                 eps_mode: str = "torch", decay_mode: str = "lr", **options: Any):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, eps_mode=eps_mode, decay_mode=decay_mode)
        if self._decoupled:
            defaults["decoupled_weight_decay"] = True
        super().__init__(params, defaults, **options)


# The Adam recurrence as the docstrings show it (cpuadam.torch uses it too).
ADAM_RECURRENCE = r"""
    Per element, with ``t`` the param's step count (from 1)::

        g  = -grad if maximize else grad
        {decay}
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g**2          (v = max(vmax, v) with amsgrad)
        p  = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
"""

_MATH = ADAM_RECURRENCE + r"""
    With ``eps_mode="keras"`` the last line is Keras's (Kingma & Ba, section 2)::

        p  = p - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)

    which differs from torch's only in where eps sits. Scalars are computed in
    double once per step; the element arithmetic is float32, fused in one pass.
"""

_OPTIONS = """
    Options (keyword-only, shared by every cpuadam optimizer):
        clipnorm, clipvalue, global_clipnorm: Keras's gradient clipping (per
            tensor norm, per element value, norm over all grads of the step);
            at most one. The global norm is computed in float64, the same bits
            for any thread count.
        loss_scale_factor: grads are divided by it (a float, or a
            DynamicLossScale that adapts after overflow).
        gradient_accumulation_steps: k; calls 1..k-1 accumulate, call k
            updates with the mean of the k grads.
        use_ema, ema_momentum, ema_overwrite_frequency: an exponential moving
            average of the params, updated in the same pass (``ema_params()``,
            ``finalize()``, ``swap_ema()``).
        skip_nonfinite: a step whose grads hold inf/NaN changes nothing and is
            counted in ``skipped_steps`` (default: on when a loss scale is set).
        state_dtype: "float32", "bfloat16", "float16" (float32 or float16
            grads only) or "8bit" storage of the moments (NumPy classes:
            "float32" by default; cpuadam.torch: the param's dtype).
        param_update: how a bfloat16/float16 param takes its update: "nearest"
            (round to nearest even), "stochastic" (stochastic rounding keyed by
            ``seed``, the step and the element), "kahan" (a compensation buffer)
            or "master" (a float32 master copy in the state).
        state_rounding: how new 8-bit codes and bfloat16/float16 moments are
            chosen: "nearest" (default; for 8-bit, the published scheme) or
            "stochastic" (one of the two values around the float32 moment,
            unbiased, keyed by ``seed``, the step, the element and the state).
            Not with state_dtype="float32", which has nothing to round.
        seed: int in [0, 2**31) for "stochastic" rounding.
        weight_decay_mask: callable(name, param) -> bool, or one bool per
            param: False excludes that param from weight decay.
        exclude_from_weight_decay: patterns searched in param names, as
            Keras does (a plain substring like "bias" works); params given as
            (name, array) pairs whose name matches one are not decayed.
    ``lr`` may be a float or a callable of the step number (1 for the first
    update), e.g. from ``cpuadam.schedules``.
"""


class Adam(_AdamBase):
    __doc__ = """Adam with L2 weight decay (torch.optim.Adam's math), in place on NumPy arrays.
""" + _MATH.format(decay="g  = g + weight_decay * p") + """
    Args:
        params: writeable C-contiguous float32 arrays, (name, array) pairs, or
            dicts of param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam.
        eps_mode: "torch" (default) or "keras".
""" + _OPTIONS + """
    Example:
        >>> import numpy as np, cpuadam
        >>> w = np.ones(4, dtype=np.float32)
        >>> opt = cpuadam.Adam([w], lr=0.1)
        >>> opt.step([np.full(4, 0.5, dtype=np.float32)])
        >>> float(w[0])  # doctest: +ELLIPSIS
        0.9000000...
    """

    def __init__(self, params: Any, lr: float | Callable[[int], float] = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False, *,
                 eps_mode: str = "torch", **options: Any):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize,
                         eps_mode=eps_mode, **options)


class AdamW(_AdamBase):
    __doc__ = """AdamW, decoupled weight decay (torch.optim.AdamW's math), in place on NumPy arrays.
""" + _MATH.format(decay="p  = p * (1 - lr * weight_decay)    (decay_mode='independent': 1 - weight_decay)") + """
    Args:
        params: writeable C-contiguous float32 arrays, (name, array) pairs, or
            dicts of param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW
            (weight_decay defaults to 1e-2, as there; Keras's AdamW uses 0.004
            and epsilon 1e-7).
        eps_mode: "torch" (default) or "keras".
        decay_mode: "lr" (default; torch and Keras scale the decay by lr) or
            "independent" (p -= weight_decay * p, as written by Loshchilov &
            Hutter); with "independent", weight_decay is typically ~1e-4.
""" + _OPTIONS + """
    Example:
        >>> import numpy as np, cpuadam
        >>> w = np.ones(4, dtype=np.float32)
        >>> opt = cpuadam.AdamW([w], lr=0.1, weight_decay=0.0)
        >>> opt.step([np.full(4, 0.5, dtype=np.float32)])
        >>> float(w[0])  # doctest: +ELLIPSIS
        0.9000000...
    """

    _decoupled = True

    def __init__(self, params: Any, lr: float | Callable[[int], float] = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False, *,
                 eps_mode: str = "torch", decay_mode: str = "lr", **options: Any):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize,
                         eps_mode=eps_mode, decay_mode=decay_mode, **options)


class SGD(_FusedOptimizer):
    __doc__ = """SGD with momentum, dampening and Nesterov momentum (torch.optim.SGD's math), in place.

    Per element, with b the momentum buffer::

        g = -grad if maximize else grad
        g = g + weight_decay * p
        b = g  (first step)   or   b = momentum * b + (1 - dampening) * g
        g = g + momentum * b  (nesterov)   or   g = b      (when momentum != 0)
        p = p - lr * g

    Args:
        params: writeable C-contiguous float32 arrays, (name, array) pairs, or
            dicts of param groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD.
""" + _OPTIONS + """
    Example:
        >>> import numpy as np, cpuadam
        >>> w = np.ones(2, dtype=np.float32)
        >>> opt = cpuadam.SGD([w], lr=0.5, momentum=0.9)
        >>> opt.step([np.ones(2, dtype=np.float32)])
        >>> w.tolist()
        [0.5, 0.5]
    """

    _RULE = "sgd"

    def __init__(self, params: Any, lr: float | Callable[[int], float] = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, **options: Any):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, **options)

