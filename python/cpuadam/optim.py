# SPDX-License-Identifier: MIT
"""NumPy Adam and AdamW: param groups, state and state_dict, one core call per step."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import numpy as np

from cpuadam import _core
from cpuadam._groups import (
    check_choice,
    check_disjoint,
    check_param_array,
    check_real,
    group_params,
    normalise_groups,
    param_name,
)

__all__ = ["Adam", "AdamW", "Optimizer"]

_EPS_MODES = ("torch", "keras")
_DECAY_MODES = ("lr", "independent")


class Optimizer:
    """Base of the NumPy optimizers: param groups, per-param state, state_dict.

    Params are writeable C-contiguous NumPy arrays updated in place. State is
    keyed by each param's position in the flattened groups
    (``[p for g in opt.param_groups for p in g['params']]``), as in the
    ``state`` of torch's state_dict.
    """

    def __init__(self, params: Any, defaults: dict):
        self.defaults = dict(defaults)
        self.param_groups: list[dict] = []
        self.state: dict[int, dict] = {}
        for group in normalise_groups(params):
            self.add_param_group(group)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    def _check_group(self, group: dict, index: int) -> None:
        """Hyperparameter checks for one group (subclasses extend)."""

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group of params with its own hyperparameters (defaults fill the rest)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("param_group must have a 'params' entry")
        index = len(self.param_groups)
        group = dict(param_group)
        group["params"] = group_params(group)
        for i, p in enumerate(group["params"]):
            check_param_array(p, param_name(index, i))
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_group(group, index)
        named = [(param_name(gi, i), p) for gi, g in enumerate(self.param_groups + [group])
                 for i, p in enumerate(g["params"])]
        check_disjoint(named)
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
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores state and hyperparameters; arrays are copied into new buffers.

        Raises ValueError (and changes nothing) if the groups, sizes, shapes or
        dtypes do not match this optimizer's params.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
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
            new_state[k] = self._load_param_state(entry, flat[k], k)
        new_groups = []
        for mine, saved in zip(self.param_groups, saved_groups):
            group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            group["params"] = mine["params"]
            new_groups.append(group)
        for gi, group in enumerate(new_groups):
            self._check_group(group, gi)
        self.param_groups = new_groups
        self.state = new_state

    def _load_param_state(self, entry: dict, param: np.ndarray, index: int) -> dict:
        out = {}
        for key, value in entry.items():
            if key == "step":
                out[key] = int(np.asarray(value).item())
                continue
            arr = np.asarray(value)
            if arr.shape != param.shape:
                raise ValueError(f"loaded state '{key}' for param {index} has shape {arr.shape}, "
                                 f"expected {param.shape}")
            out[key] = np.array(arr, dtype=param.dtype, order="C", copy=True)
        return out


class _AdamBase(Optimizer):
    _decoupled = False

    def __init__(self, params: Any, lr: float, betas: Sequence[float], eps: float,
                 weight_decay: float, amsgrad: bool, maximize: bool, *,
                 eps_mode: str = "torch", decay_mode: str = "lr"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, eps_mode=eps_mode, decay_mode=decay_mode)
        self._check_group(defaults, None)
        super().__init__(params, defaults)

    def _check_group(self, group: dict, index: int | None) -> None:
        where = "" if index is None else f" in group {index}"
        check_real(group["lr"], "learning rate" + where, 0.0)
        check_real(group["eps"], "epsilon value" + where, 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas{where}: expected a pair (beta1, beta2), got {betas!r}")
        check_real(betas[0], "beta parameter at index 0" + where, 0.0, 1.0, high_open=True)
        check_real(betas[1], "beta parameter at index 1" + where, 0.0, 1.0, high_open=True)
        check_real(group["weight_decay"], "weight_decay value" + where, 0.0)
        check_choice(group["eps_mode"], "eps_mode" + where, _EPS_MODES)
        check_choice(group["decay_mode"], "decay_mode" + where, _DECAY_MODES)

    def step(self, grads: Iterable[np.ndarray | None]) -> None:
        """Applies one update to every param whose grad is not None.

        Args:
            grads: one array per param (same shape and dtype), in the order of
                ``[p for g in opt.param_groups for p in g['params']]``; None
                skips that param, as a None ``.grad`` does in torch.

        Raises:
            TypeError, ValueError: on a bad grad, buffer or hyperparameter; the
                message names the param. Nothing is changed by a rejected step.
        """
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError(f"step() expects a list of arrays, got {type(grads).__name__}") from None
        n = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != n:
            raise ValueError(f"step() got {len(grads)} grads for {n} params")
        batches = []
        commits = []  # (flat index, state dict, new step): applied after the core succeeds
        k = 0
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            amsgrad = bool(group["amsgrad"])
            by_step: dict[int, dict] = {}
            for pi, p in enumerate(group["params"]):
                g, key = grads[k], k
                k += 1
                if g is None:
                    continue
                state = self.state.get(key)
                fresh = state is None
                if fresh:
                    state = {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
                if amsgrad and "max_exp_avg_sq" not in state:
                    state = dict(state, max_exp_avg_sq=np.zeros_like(p))
                    fresh = True
                new_step = state["step"] + 1
                batch = by_step.get(new_step)
                if batch is None:
                    beta1, beta2 = group["betas"]
                    batch = by_step[new_step] = {
                        "params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [],
                        "max_exp_avg_sqs": [], "indices": [], "group": gi, "step": new_step,
                        "lr": float(group["lr"]), "beta1": float(beta1), "beta2": float(beta2),
                        "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"]),
                        "amsgrad": amsgrad, "maximize": bool(group["maximize"]),
                        "decoupled": self._decoupled, "decay_mode": group["decay_mode"],
                        "eps_mode": group["eps_mode"],
                    }
                batch["params"].append(p)
                batch["grads"].append(g)
                batch["exp_avgs"].append(state["exp_avg"])
                batch["exp_avg_sqs"].append(state["exp_avg_sq"])
                if amsgrad:
                    batch["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
                batch["indices"].append(pi)
                commits.append((key, state if fresh else None, new_step))
            batches.extend(by_step.values())
        _core.adam_step(batches)
        for key, fresh_state, new_step in commits:
            if fresh_state is not None:
                self.state[key] = fresh_state
            self.state[key]["step"] = new_step


_MATH = r"""
    Per element, with ``t`` the param's step count (from 1)::

        g  = -grad if maximize else grad
        {decay}
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g**2          (v = max(vmax, v) with amsgrad)
        p  = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    With ``eps_mode="keras"`` the last line is Keras's (Kingma & Ba, section 2)::

        p  = p - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)

    which differs from torch's only in where eps sits. Scalars are computed in
    double once per step; the element arithmetic is float32, fused in one pass.
"""


class Adam(_AdamBase):
    __doc__ = """Adam with L2 weight decay (torch.optim.Adam's math), in place on NumPy arrays.
""" + _MATH.format(decay="g  = g + weight_decay * p") + """
    Args:
        params: writeable C-contiguous float32 arrays, or dicts of param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.Adam.
        eps_mode: "torch" (default) or "keras".

    Example:
        >>> import numpy as np, cpuadam
        >>> w = np.ones(4, dtype=np.float32)
        >>> opt = cpuadam.Adam([w], lr=0.1)
        >>> opt.step([np.full(4, 0.5, dtype=np.float32)])
        >>> float(w[0])  # doctest: +ELLIPSIS
        0.9000000...
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False, *, eps_mode: str = "torch"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, eps_mode=eps_mode)


class AdamW(_AdamBase):
    __doc__ = """AdamW, decoupled weight decay (torch.optim.AdamW's math), in place on NumPy arrays.
""" + _MATH.format(decay="p  = p * (1 - lr * weight_decay)    (decay_mode='independent': 1 - weight_decay)") + """
    Args:
        params: writeable C-contiguous float32 arrays, or dicts of param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW
            (weight_decay defaults to 1e-2, as there).
        eps_mode: "torch" (default) or "keras".
        decay_mode: "lr" (default; torch and Keras scale the decay by lr) or
            "independent" (p -= weight_decay * p, as written by Loshchilov &
            Hutter); with "independent", weight_decay is typically ~1e-4.

    Example:
        >>> import numpy as np, cpuadam
        >>> w = np.ones(4, dtype=np.float32)
        >>> opt = cpuadam.AdamW([w], lr=0.1, weight_decay=0.0)
        >>> opt.step([np.full(4, 0.5, dtype=np.float32)])
        >>> float(w[0])  # doctest: +ELLIPSIS
        0.9000000...
    """

    _decoupled = True

    def __init__(self, params: Any, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
                 maximize: bool = False, *, eps_mode: str = "torch", decay_mode: str = "lr"):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize,
                         eps_mode=eps_mode, decay_mode=decay_mode)
