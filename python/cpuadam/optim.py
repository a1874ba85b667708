# SPDX-License-Identifier: MIT
"""NumPy optimizers (Adam, AdamW, SGD): param groups, state, state_dict, one core call per step."""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from cpuadam import _core
from cpuadam._groups import (
    buffer_like,
    check_choice,
    check_disjoint,
    check_param_array,
    check_real,
    normalise_groups,
    param_name,
    split_names,
)

__all__ = ["SGD", "Adam", "AdamW", "DynamicLossScale", "Optimizer"]

_EPS_MODES = ("torch", "keras")
_DECAY_MODES = ("lr", "independent")


class DynamicLossScale:
    """A loss scale for float16 training that adapts to overflow.

    Multiply the loss by ``scale`` before computing gradients and pass this
    object as an optimizer's ``loss_scale_factor``: the optimizer divides the
    grads by the scale inside its fused pass, skips any step whose grads hold
    inf or NaN, halves the scale after such a step (``backoff_factor``) and
    doubles it (``growth_factor``) after ``growth_interval`` finite steps in a
    row, never going below ``min_scale``.
    """

    def __init__(self, initial_scale: float = 2.0**15, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, min_scale: float = 1.0):
        check_real(initial_scale, "initial_scale", 0.0)
        if initial_scale <= 0:
            raise ValueError(f"Invalid initial_scale: {initial_scale}")
        if not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"Invalid growth_interval: {growth_interval!r}")
        check_real(growth_factor, "growth_factor", 1.0)
        check_real(backoff_factor, "backoff_factor", 0.0, 1.0, high_open=True)
        check_real(min_scale, "min_scale", 0.0)
        self.scale = float(initial_scale)
        self.growth_interval = growth_interval
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.min_scale = float(min_scale)
        self.good_steps = 0

    def __repr__(self) -> str:
        return (f"DynamicLossScale(scale={self.scale}, growth_interval={self.growth_interval}, "
                f"good_steps={self.good_steps})")

    def update(self, finite: bool) -> None:
        """Adjusts the scale after a step whose grads were (not) all finite."""
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class Optimizer:
    """Base of the NumPy optimizers: param groups, per-param state, state_dict.

    Params are writeable C-contiguous NumPy arrays updated in place. State is
    keyed by each param's position in the flattened groups
    (``[p for g in opt.param_groups for p in g['params']]``), as in the
    ``state`` of torch's state_dict. Params may be given as (name, array)
    pairs, as torch's ``named_parameters()`` gives them; the names land in
    ``group['param_names']`` and can select params for weight decay.
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
            for key in sorted(k for k in group if k not in ("params", "param_names", "decay_mask")):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    def _check_group(self, group: dict, index: int | None) -> None:
        """Hyperparameter checks for one group (subclasses extend)."""

    def _init_group(self, group: dict, index: int) -> None:
        """Fills derived per-group entries (subclasses extend)."""

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
        self._check_group(group, index)
        self._init_group(group, index)
        named = [(param_name(gi, i), p) for gi, g in enumerate(self.param_groups + [group])
                 for i, p in enumerate(g["params"])]
        check_disjoint(named)
        self.param_groups.append(group)

    def _flat_params(self) -> list[np.ndarray]:
        return [p for g in self.param_groups for p in g["params"]]

    def _extra_state(self) -> dict:
        """Optimizer-wide entries of state_dict beyond torch's two (subclasses extend)."""
        return {}

    def _load_extra_state(self, state_dict: dict) -> Callable[[], None]:
        """Checks what _extra_state saved; returns the function that restores it."""
        return lambda: None

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
        return {"state": state, "param_groups": groups, **self._extra_state()}

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
            for key, value in mine.items():  # e.g. a torch checkpoint has no decay_mask
                group.setdefault(key, value)
            new_groups.append(group)
        for gi, group in enumerate(new_groups):
            self._check_group(group, gi)
        apply_extra = self._load_extra_state(state_dict)
        self.param_groups = new_groups
        self.state = new_state
        apply_extra()

    def _load_param_state(self, entry: dict, param: np.ndarray, index: int) -> dict:
        out = {}
        for key, value in entry.items():
            if key == "step":
                out[key] = int(np.asarray(value).item())
                continue
            if value is None:
                continue
            arr = np.asarray(value)
            if arr.shape != param.shape:
                raise ValueError(f"loaded state '{key}' for param {index} has shape {arr.shape}, "
                                 f"expected {param.shape}")
            out[key] = buffer_like(param, arr)
        return out


class _Batch:
    """Which params of a group one core batch updates: their positions in the
    group and in the flat order, the state lists, and the key they share."""

    __slots__ = ("group", "lists", "new_buffers", "decays", "indices", "flat")

    def __init__(self, group: int, lists: list, new_buffers: bool, decays: bool):
        self.group, self.lists, self.new_buffers, self.decays = group, lists, new_buffers, decays
        self.indices: list[int] = []
        self.flat: list[int] = []


class _Plan:
    """The sorting of one step's params into batches, reused by later steps
    while the params, the grads present and the state layout stay the same."""

    def __init__(self, key: tuple):
        self.key = key
        self.batches: list[_Batch] = []
        self.updated: list[int] = []            # flat indices stepped (their state advances)
        self.ema_only: list[int] = []           # no grad, but averaged (use_ema)
        self.accumulators_left: list[int] = []  # no grad, accumulator to restart


class _FusedOptimizer(Optimizer):
    """The driver shared by Adam, AdamW and SGD: the options that surround the
    update (Keras's clipping, loss scale, accumulation, EMA; weight-decay
    masks; lr schedules; non-finite steps), fused into one core call per step.
    """

    _core_step: Callable[..., dict]

    def __init__(self, params: Any, defaults: dict, *, clipnorm: float | None = None,
                 clipvalue: float | None = None, global_clipnorm: float | None = None,
                 loss_scale_factor: float | DynamicLossScale | None = None,
                 gradient_accumulation_steps: int | None = None, use_ema: bool = False,
                 ema_momentum: float = 0.99, ema_overwrite_frequency: int | None = None,
                 skip_nonfinite: bool | None = None,
                 weight_decay_mask: Callable[[str | None, np.ndarray], bool] | Sequence[bool] | None = None,
                 exclude_from_weight_decay: Sequence[str] | None = None):
        for value, name in ((clipnorm, "clipnorm"), (clipvalue, "clipvalue"),
                            (global_clipnorm, "global_clipnorm")):
            if value is not None:
                check_real(value, name, 0.0)
        # As in Keras, 0 (or None) turns a clipping option off.
        clipnorm, clipvalue, global_clipnorm = (x if x else None for x in (clipnorm, clipvalue, global_clipnorm))
        if sum(x is not None for x in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError("Only one of clipnorm, clipvalue and global_clipnorm can be set")
        if loss_scale_factor is not None and not isinstance(loss_scale_factor, DynamicLossScale):
            check_real(loss_scale_factor, "loss_scale_factor", 0.0)
            if loss_scale_factor <= 0:
                raise ValueError(f"Invalid loss_scale_factor: {loss_scale_factor} (expected > 0)")
        if gradient_accumulation_steps is not None and (
                not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1):
            raise ValueError("Invalid gradient_accumulation_steps: "
                             f"{gradient_accumulation_steps!r} (expected an int >= 1)")
        check_real(ema_momentum, "ema_momentum", 0.0, 1.0)
        if ema_overwrite_frequency is not None and (
                not isinstance(ema_overwrite_frequency, int) or ema_overwrite_frequency < 1):
            raise ValueError(f"Invalid ema_overwrite_frequency: {ema_overwrite_frequency!r}")
        if exclude_from_weight_decay is not None and isinstance(exclude_from_weight_decay, str):
            exclude_from_weight_decay = [exclude_from_weight_decay]
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = gradient_accumulation_steps or 1
        self.use_ema = bool(use_ema)
        self.ema_momentum = float(ema_momentum)
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.skip_nonfinite = (loss_scale_factor is not None) if skip_nonfinite is None else bool(skip_nonfinite)
        self._decay_mask_fn = weight_decay_mask if callable(weight_decay_mask) else None
        self._decay_mask_list = None if weight_decay_mask is None or callable(weight_decay_mask) \
            else [bool(x) for x in weight_decay_mask]
        self._exclude_names = None if exclude_from_weight_decay is None else list(exclude_from_weight_decay)
        #: Updates applied so far; an lr callable sees iterations + 1.
        self.iterations = 0
        #: Steps skipped because a grad held inf or NaN.
        self.skipped_steps = 0
        # Calls since the last applied update, under gradient accumulation.
        self._accumulated_calls = 0
        self._plan: _Plan | None = None
        self._flat_count = 0
        super().__init__(params, defaults)
        if self._decay_mask_list is not None and len(self._decay_mask_list) != self._flat_count:
            raise ValueError(f"weight_decay_mask has {len(self._decay_mask_list)} entries "
                             f"for {self._flat_count} params")

    def _init_group(self, group: dict, index: int) -> None:
        names = group.get("param_names")
        if "decay_mask" not in group:
            mask = []
            for i, p in enumerate(group["params"]):
                name = names[i] if names else None
                decays = True
                if self._decay_mask_fn is not None:
                    decays = bool(self._decay_mask_fn(name, p))
                if self._decay_mask_list is not None and self._flat_count + i < len(self._decay_mask_list):
                    decays = self._decay_mask_list[self._flat_count + i]
                if self._exclude_names is not None:
                    if name is None:
                        raise ValueError("exclude_from_weight_decay selects params by name: give them "
                                         "as (name, array) pairs, or use weight_decay_mask")
                    decays = decays and not any(re.search(pattern, name) for pattern in self._exclude_names)
                mask.append(decays)
            group["decay_mask"] = mask
        elif len(group["decay_mask"]) != len(group["params"]):
            raise ValueError(f"decay_mask in group {index} has {len(group['decay_mask'])} entries "
                             f"for {len(group['params'])} params")
        self._flat_count += len(group["params"])

    # --- what a subclass supplies -------------------------------------------------
    def _state_lists(self, group: dict) -> list[tuple[str, str]]:
        """(batch key, state key) of each state buffer the update reads and writes."""
        raise NotImplementedError

    def _batch_key(self, state: dict, new_buffers: bool) -> Any:
        """Tensors of a group with equal keys share one batch (e.g. the step count);
        new_buffers: this step creates the param's state buffers."""
        raise NotImplementedError

    def _batch_scalars(self, group: dict, lr: float, key: Any) -> dict:
        raise NotImplementedError

    def _advance(self, state: dict) -> None:
        """Per-param bookkeeping after an applied update (e.g. step += 1)."""

    # --- the step -----------------------------------------------------------------
    def _current_lr(self, group: dict) -> float:
        lr = group["lr"]
        return float(lr(self.iterations + 1)) if callable(lr) else float(lr)

    def _grad_scale(self) -> float:
        scale = 1.0
        if self.loss_scale_factor is not None:
            factor = self.loss_scale_factor
            scale /= factor.scale if isinstance(factor, DynamicLossScale) else float(factor)
        if self.gradient_accumulation_steps > 1:
            scale /= self.gradient_accumulation_steps
        return scale

    def _check_grads(self, grads: Any) -> list:
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError(f"step() expects a list of arrays, got {type(grads).__name__}") from None
        n = sum(len(g["params"]) for g in self.param_groups)
        if len(grads) != n:
            raise ValueError(f"step() got {len(grads)} grads for {n} params")
        return grads

    def _accumulate(self, grads: list) -> None:
        batches, fresh = [], []
        k = 0
        for gi, group in enumerate(self.param_groups):
            batch = {"grads": [], "grad_accums": [], "group": gi, "indices": []}
            for pi, p in enumerate(group["params"]):
                g, key = grads[k], k
                k += 1
                if g is None:
                    continue
                acc = self.state.get(key, {}).get("grad_accum")
                if acc is None:
                    acc = buffer_like(p)
                    fresh.append((key, acc))
                batch["grads"].append(g)
                batch["grad_accums"].append(acc)
                batch["indices"].append(pi)
            batches.append(batch)
        _core.accumulate(batches)
        for key, acc in fresh:
            self.state.setdefault(key, self._new_state())["grad_accum"] = acc

    def _new_state(self) -> dict:
        return {}

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
        """
        grads = self._check_grads(grads)
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
        accumulating = self.gradient_accumulation_steps > 1
        if accumulating and self._accumulated_calls + 1 < self.gradient_accumulation_steps:
            self._accumulate(grads)
            self._accumulated_calls += 1
            return
        key = self._plan_key(grads)
        plan = self._plan if self._plan is not None and self._plan.key == key else None
        pending: dict[int, dict] = {}
        if plan is not None:
            try:
                batches = self._gather(plan, grads, pending)
            except KeyError:  # state edited by hand since the plan was made
                plan = None
        if plan is None:
            plan = self._make_plan(key, grads, pending)
            batches = self._gather(plan, grads, pending)
        result = type(self)._core_step(batches, global_clipnorm=self.global_clipnorm,
                                       skip_nonfinite=self.skip_nonfinite)
        if isinstance(self.loss_scale_factor, DynamicLossScale):
            self.loss_scale_factor.update(result["finite"])
        if not result["applied"]:
            self.skipped_steps += 1
            if accumulating:
                self._reset_accumulators()
            self._plan = None
            return
        self.state.update(pending)
        for k in plan.updated:
            self._advance(self.state[k])
        if self.use_ema:
            momentum = self.ema_momentum if self.iterations > 0 else 0.0
            for k in plan.ema_only:  # averaged at their unchanged value, as Keras does
                p, avg = self._flat_params()[k], self.state[k]["ema"]
                avg *= momentum
                avg += (1.0 - momentum) * p
        if accumulating:
            for k in plan.accumulators_left:  # no grad this call: the window restarts anyway
                self.state[k]["grad_accum"].fill(0)
        self._accumulated_calls = 0
        self.iterations += 1
        # A plan is reused while the params, grads present and state layout stay
        # the same; a step that created state makes the next one build afresh.
        self._plan = None if pending else plan
        if self.use_ema and self.ema_overwrite_frequency and \
                self.iterations % self.ema_overwrite_frequency == 0:
            self.finalize()

    def _plan_key(self, grads: list) -> tuple:
        groups = tuple((id(g["params"]), len(g["params"]), tuple(self._state_lists(g)),
                        tuple(g["decay_mask"])) for g in self.param_groups)
        return (tuple(g is None for g in grads), groups)

    def _make_plan(self, key: tuple, grads: list, pending: dict) -> "_Plan":
        """Sorts the params with grads into batches (per group, step count and
        decay) and creates missing state in ``pending``, committed on success."""
        plan = _Plan(key)
        accumulating = self.gradient_accumulation_steps > 1
        k = 0
        for gi, group in enumerate(self.param_groups):
            lists = self._state_lists(group)
            by_key: dict[Any, _Batch] = {}
            for pi, p in enumerate(group["params"]):
                g, flat = grads[k], k
                k += 1
                state = self.state.get(flat)
                if g is None:
                    if self.use_ema:
                        if state is None or "ema" not in state:
                            pending[flat] = dict(state or self._new_state(), ema=buffer_like(p, p))
                        plan.ema_only.append(flat)
                    if accumulating and state is not None and "grad_accum" in state:
                        plan.accumulators_left.append(flat)
                    continue
                new_buffers = [sk for _, sk in lists if state is None or sk not in state]
                missing = dict.fromkeys(new_buffers)
                if accumulating and (state is None or "grad_accum" not in state):
                    missing["grad_accum"] = None
                if self.use_ema and (state is None or "ema" not in state):
                    missing["ema"] = None
                if state is None or missing:
                    state = dict(state or self._new_state())
                    for sk in missing:
                        # A new average starts at the param; the first update's
                        # momentum of 0 makes it a copy either way.
                        state[sk] = buffer_like(p, p) if sk == "ema" else buffer_like(p)
                    pending[flat] = state
                decays = bool(group["decay_mask"][pi])
                bkey = (self._batch_key(state, bool(new_buffers)), decays)
                batch = by_key.get(bkey)
                if batch is None:
                    batch = by_key[bkey] = _Batch(gi, lists, bool(new_buffers), decays)
                batch.indices.append(pi)
                batch.flat.append(flat)
                plan.updated.append(flat)
            plan.batches.extend(by_key.values())
        return plan

    def _gather(self, plan: "_Plan", grads: list, pending: dict) -> list[dict]:
        """This step's batch dicts: buffers looked up afresh, scalars recomputed."""
        grad_scale = self._grad_scale()
        ema_momentum = self.ema_momentum if self.iterations > 0 else 0.0
        accumulating = self.gradient_accumulation_steps > 1
        lrs = [self._current_lr(group) for group in self.param_groups]
        out = []
        for b in plan.batches:
            group = self.param_groups[b.group]
            params = group["params"]
            states = [pending[k] if k in pending else self.state[k] for k in b.flat]
            batch = {
                "params": [params[i] for i in b.indices],
                "grads": [grads[k] for k in b.flat],
                "indices": b.indices, "group": b.group, "grad_scale": grad_scale,
                "clipnorm": self.clipnorm, "clipvalue": self.clipvalue,
                **self._batch_scalars(group, lrs[b.group], self._batch_key(states[0], b.new_buffers)),
            }
            for bk, sk in b.lists:
                batch[bk] = [st[sk] for st in states]
            if not b.decays:
                batch["weight_decay"] = 0.0
            if accumulating:
                batch["grad_accums"] = [st["grad_accum"] for st in states]
            if self.use_ema:
                batch["emas"] = [st["ema"] for st in states]
                batch["ema_momentum"] = ema_momentum
            out.append(batch)
        for k in plan.ema_only:
            if k not in pending and "ema" not in self.state.get(k, {}):
                raise KeyError(k)  # an average removed by hand: the caller re-plans
        return out

    def _reset_accumulators(self) -> None:
        for state in self.state.values():
            if "grad_accum" in state:
                state["grad_accum"].fill(0)
        self._accumulated_calls = 0

    # --- EMA ----------------------------------------------------------------------
    def ema_params(self) -> list[np.ndarray | None]:
        """The moving averages, one per param in flat order (None before a param's first update)."""
        if not self.use_ema:
            raise RuntimeError("ema_params() needs use_ema=True")
        n = sum(len(g["params"]) for g in self.param_groups)
        return [self.state.get(k, {}).get("ema") for k in range(n)]

    def finalize(self) -> None:
        """Copies the moving averages into the params (Keras's finalize_variable_values)."""
        if not self.use_ema:
            return
        for p, avg in zip(self._flat_params(), self.ema_params()):
            if avg is not None:
                np.copyto(p, avg)

    def swap_ema(self) -> None:
        """Exchanges params and their moving averages, e.g. around an evaluation."""
        for p, avg in zip(self._flat_params(), self.ema_params()):
            if avg is not None:
                tmp = p.copy()
                np.copyto(p, avg)
                np.copyto(avg, tmp)

    # --- state_dict ---------------------------------------------------------------
    def _extra_state(self) -> dict:
        extra = {"iterations": self.iterations, "skipped_steps": self.skipped_steps,
                 "accumulated_calls": self._accumulated_calls}
        if isinstance(self.loss_scale_factor, DynamicLossScale):
            extra["loss_scale"] = self.loss_scale_factor.state_dict()
        return extra

    def _load_extra_state(self, state_dict: dict) -> Callable[[], None]:
        counters = {}
        for key in ("iterations", "skipped_steps", "accumulated_calls"):
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"loaded state dict has an invalid '{key}': {value!r}")
            counters[key] = int(value)
        loss_scale = state_dict.get("loss_scale")
        if loss_scale is not None and not isinstance(loss_scale, dict):
            raise ValueError("loaded state dict has an invalid 'loss_scale'")

        def apply() -> None:
            self.iterations = counters["iterations"]
            self.skipped_steps = counters["skipped_steps"]
            self._accumulated_calls = counters["accumulated_calls"]
            self._plan = None
            if isinstance(self.loss_scale_factor, DynamicLossScale) and loss_scale is not None:
                self.loss_scale_factor.load_state_dict(loss_scale)
        return apply


def _check_lr(group: dict, where: str) -> None:
    lr = group["lr"]
    if callable(lr):
        return
    if isinstance(lr, np.ndarray) and lr.ndim == 0:
        lr = lr.item()
    check_real(lr, "learning rate" + where, 0.0)


class _AdamBase(_FusedOptimizer):
    _decoupled = False
    _core_step = staticmethod(_core.adam_step)

    def __init__(self, params: Any, lr: float | Callable[[int], float], betas: Sequence[float],
                 eps: float, weight_decay: float, amsgrad: bool, maximize: bool, *,
                 eps_mode: str = "torch", decay_mode: str = "lr", **options: Any):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, eps_mode=eps_mode, decay_mode=decay_mode)
        self._check_group(defaults, None)
        super().__init__(params, defaults, **options)

    def _check_group(self, group: dict, index: int | None) -> None:
        where = "" if index is None else f" in group {index}"
        _check_lr(group, where)
        check_real(group["eps"], "epsilon value" + where, 0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas{where}: expected a pair (beta1, beta2), got {betas!r}")
        check_real(betas[0], "beta parameter at index 0" + where, 0.0, 1.0, high_open=True)
        check_real(betas[1], "beta parameter at index 1" + where, 0.0, 1.0, high_open=True)
        check_real(group["weight_decay"], "weight_decay value" + where, 0.0)
        check_choice(group["eps_mode"], "eps_mode" + where, _EPS_MODES)
        check_choice(group["decay_mode"], "decay_mode" + where, _DECAY_MODES)

    def _state_lists(self, group: dict) -> list[tuple[str, str]]:
        lists = [("exp_avgs", "exp_avg"), ("exp_avg_sqs", "exp_avg_sq")]
        if group["amsgrad"]:
            lists.append(("max_exp_avg_sqs", "max_exp_avg_sq"))
        return lists

    def _new_state(self) -> dict:
        return {"step": 0}

    def _load_param_state(self, entry: dict, param: np.ndarray, index: int) -> dict:
        out = super()._load_param_state(entry, param, index)
        if "exp_avg" in out and "step" not in out:
            raise ValueError(f"loaded state for param {index} has moments but no 'step'")
        return out

    def _batch_key(self, state: dict, new_buffers: bool) -> int:
        return state["step"] + 1

    def _batch_scalars(self, group: dict, lr: float, step: int) -> dict:
        beta1, beta2 = group["betas"]
        return {"step": step, "lr": lr, "beta1": float(beta1), "beta2": float(beta2),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"]),
                "amsgrad": bool(group["amsgrad"]), "maximize": bool(group["maximize"]),
                "decoupled": self._decoupled, "decay_mode": group["decay_mode"],
                "eps_mode": group["eps_mode"]}

    def _advance(self, state: dict) -> None:
        state["step"] += 1


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
    """SGD with momentum, dampening and Nesterov momentum (torch.optim.SGD's math), in place.

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

    _core_step = staticmethod(_core.sgd_step)

    def __init__(self, params: Any, lr: float | Callable[[int], float] = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, **options: Any):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        self._check_group(defaults, None)
        super().__init__(params, defaults, **options)

    def _check_group(self, group: dict, index: int | None) -> None:
        where = "" if index is None else f" in group {index}"
        _check_lr(group, where)
        check_real(group["momentum"], "momentum value" + where, 0.0)
        check_real(group["dampening"], "dampening value" + where, -math.inf)
        check_real(group["weight_decay"], "weight_decay value" + where, 0.0)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening" + where)

    def _state_lists(self, group: dict) -> list[tuple[str, str]]:
        return [("momentum_buffers", "momentum_buffer")] if group["momentum"] != 0 else []

    def _batch_key(self, state: dict, new_buffers: bool) -> bool:
        # A new momentum buffer starts as a copy of the first gradient (torch).
        return new_buffers

    def _batch_scalars(self, group: dict, lr: float, first: bool) -> dict:
        return {"lr": lr, "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]), "nesterov": bool(group["nesterov"]),
                "weight_decay": float(group["weight_decay"]), "maximize": bool(group["maximize"]),
                "momentum_first": first}
