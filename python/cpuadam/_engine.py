# SPDX-License-Identifier: MIT
"""The one step engine under both front-ends: options, validation, the reusable plan, one core call.

The front-ends (optim.py for NumPy arrays, torch.py for torch tensors) hand the engine their
param groups, their ``state`` mapping and an adapter that turns their objects into NumPy
buffers. Everything else is here, once: hyperparameter checks, Keras's options (clipping, loss
scale, accumulation, EMA, skipping non-finite steps, weight-decay masks, lr schedules), the
precision options, sorting params into core batches, the plan reused between steps (checked
against the live state every step), checkpoint validation, and the bookkeeping after the core
call. The core (`_core`) then validates every buffer again before it writes a byte.
"""

from __future__ import annotations

import inspect
import itertools
import math
import operator
import re
import threading
from typing import Any, Callable, Sequence

import numpy as np

from cpuadam import _core

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_EPS_MODES = ("torch", "keras")
_DECAY_MODES = ("lr", "independent")
STATE_DTYPES = ("float32", "bfloat16", "float16", "8bit")
PARAM_UPDATES = ("nearest", "stochastic", "kahan", "master")
STATE_ROUNDINGS = ("nearest", "stochastic")
# Float dtypes the fused kernel steps, by name.
KERNEL_DTYPES = ("float32", "bfloat16", "float16")
# 8-bit states: the code map of each moment, and the elements per absmax.
QUANT_MAPS = {"exp_avg": "signed", "exp_avg_sq": "unsigned", "max_exp_avg_sq": "unsigned",
              "momentum_buffer": "signed"}
QUANT_BLOCK = 256


def quant_blocks(numel: int) -> int:
    return -(-numel // QUANT_BLOCK)


# --- checks shared by both front-ends ----------------------------------------------------

def _as_real(value: Any, name: str) -> float:
    """A number from a Python/NumPy scalar, a 0-d array or a one-element tensor."""
    numel = getattr(value, "numel", None)
    if callable(numel):  # a torch tensor (duck-typed: the engine never imports torch)
        if numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        value = value.item()
    elif isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"Invalid {name}: expected a real number, got {type(value).__name__}")
    return float(value)


def check_real(value: Any, name: str, low: float = 0.0, high: float = math.inf,
               high_open: bool = False) -> float:
    """torch.optim-style check: a real in [low, high) or [low, high], finite in float32.

    Raises ValueError "Invalid {name}: {value}" (torch's wording) otherwise.
    """
    v = _as_real(value, name)
    shown = value.item() if callable(getattr(value, "item", None)) and not isinstance(
        value, (int, float)) else value
    ok = math.isfinite(v) and v >= low and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"Invalid {name}: {shown}")
    if abs(v) > _FLOAT32_MAX:
        raise ValueError(f"Invalid {name}: {shown} (cannot be converted to float32 without "
                         "overflow; the step computes in float32)")
    return v


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {listed})")


def _check_count(value: Any, name: str, low: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {low})")


# --- the update rules: what each optimizer's groups hold and how they become core scalars ---

def _check_lr(lr: Any, where: str) -> None:
    """A number (or one-element tensor) in range; a schedule is checked at each step."""
    if not callable(lr) or callable(getattr(lr, "numel", None)):
        check_real(lr, "learning rate" + where)


class _Adam:
    name = "adam"
    counts_steps = True

    @staticmethod
    def core_step(batches: list, **kw: Any) -> dict:
        return _core.adam_step(batches, **kw)

    @staticmethod
    def check_group(group: dict, where: str) -> None:
        _check_lr(group["lr"], where)
        check_real(group["eps"], "epsilon value" + where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas{where}: expected a pair (beta1, beta2), got {betas!r}")
        check_real(betas[0], "beta parameter at index 0" + where, 0.0, 1.0, high_open=True)
        check_real(betas[1], "beta parameter at index 1" + where, 0.0, 1.0, high_open=True)
        check_real(group["weight_decay"], "weight_decay value" + where)
        check_choice(group.get("eps_mode", "torch"), "eps_mode" + where, _EPS_MODES)
        check_choice(group.get("decay_mode", "lr"), "decay_mode" + where, _DECAY_MODES)
        if group.get("decay_mode", "lr") != "lr" and not group.get("decoupled_weight_decay"):
            raise ValueError(f"decay_mode{where} applies to decoupled weight decay only (AdamW, "
                             "or Adam with decoupled_weight_decay=True)")

    @staticmethod
    def state_keys(group: dict) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    @staticmethod
    def scalars(group: dict, lr: float, key: Any) -> dict:
        beta1, beta2 = group["betas"]
        return {"step": key, "lr": lr, "beta1": float(beta1), "beta2": float(beta2),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"]),
                "amsgrad": bool(group["amsgrad"]), "maximize": bool(group["maximize"]),
                "decoupled": bool(group.get("decoupled_weight_decay", False)),
                "decay_mode": group.get("decay_mode", "lr"),
                "eps_mode": group.get("eps_mode", "torch")}


class _Sgd:
    name = "sgd"
    counts_steps = False

    @staticmethod
    def core_step(batches: list, **kw: Any) -> dict:
        return _core.sgd_step(batches, **kw)

    @staticmethod
    def check_group(group: dict, where: str) -> None:
        _check_lr(group["lr"], where)
        check_real(group["momentum"], "momentum value" + where)
        check_real(group["dampening"], "dampening value" + where, low=-math.inf)
        check_real(group["weight_decay"], "weight_decay value" + where)
        # torch checks only the constructor's defaults; in a group, nesterov without
        # momentum changes nothing (there and here), and with dampening the core refuses it.
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        refused = (momentum != 0 and dampening != 0) if where else (momentum <= 0 or dampening != 0)
        if group["nesterov"] and refused:
            raise ValueError(f"Nesterov momentum{where} requires a momentum and zero dampening")

    @staticmethod
    def state_keys(group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if float(group["momentum"]) != 0 else ()

    @staticmethod
    def scalars(group: dict, lr: float, key: Any) -> dict:
        momentum = float(group["momentum"])
        return {"lr": lr, "momentum": momentum, "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"]),
                "nesterov": bool(group["nesterov"]) and momentum != 0,
                "maximize": bool(group["maximize"]), "momentum_first": key}


RULES = {"adam": _Adam, "sgd": _Sgd}


# --- loss scaling -------------------------------------------------------------------------

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
        self.load_state_dict(dict(scale=initial_scale, growth_interval=growth_interval,
                                  growth_factor=growth_factor, backoff_factor=backoff_factor,
                                  min_scale=min_scale, good_steps=0), first=True)

    def __repr__(self) -> str:
        return (f"DynamicLossScale(scale={self.scale}, growth_interval={self.growth_interval}, "
                f"good_steps={self.good_steps})")

    def update(self, finite: bool) -> None:
        """Adjusts the scale after a step whose grads were (not) all finite."""
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale = min(self.scale * self.growth_factor, _FLOAT32_MAX)
                self.good_steps = 0
        else:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_interval": self.growth_interval,
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "min_scale": self.min_scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict, first: bool = False) -> None:
        """Restores a saved scale; every entry is checked first (nothing changes on error)."""
        if not isinstance(state, dict):
            raise ValueError("loss scale state must be a dict")
        merged = {} if first else self.state_dict()
        merged.update(state)
        unknown = set(merged) - {"scale", "growth_interval", "growth_factor", "backoff_factor",
                                 "min_scale", "good_steps"}
        if unknown:
            raise ValueError(f"loss scale state has unknown keys {sorted(unknown)}")
        name = "initial_scale" if first else "loss scale 'scale'"
        scale = check_real(merged["scale"], name)
        if scale <= 0:
            raise ValueError(f"Invalid {name}: {merged['scale']} (expected > 0)")
        _check_count(merged["growth_interval"], "growth_interval", 1, allow_none=False)
        _check_count(merged["good_steps"], "good_steps", 0, allow_none=False)
        growth = check_real(merged["growth_factor"], "growth_factor", 1.0)
        backoff = check_real(merged["backoff_factor"], "backoff_factor", 0.0, 1.0, high_open=True)
        min_scale = check_real(merged["min_scale"], "min_scale")
        self.scale = scale
        self.growth_interval = int(merged["growth_interval"])
        self.growth_factor = growth
        self.backoff_factor = backoff
        self.min_scale = min_scale
        self.good_steps = int(merged["good_steps"])


# --- options ------------------------------------------------------------------------------

class Options:
    """The options around the update, validated once (the same in both front-ends)."""

    def __init__(self, *, clipnorm: float | None = None, clipvalue: float | None = None,
                 global_clipnorm: float | None = None,
                 loss_scale_factor: float | DynamicLossScale | None = None,
                 gradient_accumulation_steps: int | None = None, use_ema: bool = False,
                 ema_momentum: float = 0.99, ema_overwrite_frequency: int | None = None,
                 skip_nonfinite: bool | None = None,
                 weight_decay_mask: Callable[[str | None, Any], bool] | Sequence[bool] | None = None,
                 exclude_from_weight_decay: Sequence[str] | str | None = None,
                 state_dtype: str | None = "float32", param_update: str = "nearest",
                 seed: int = 0, min_8bit_size: int = 4096, state_rounding: str = "nearest"):
        for value, name in ((clipnorm, "clipnorm"), (clipvalue, "clipvalue"),
                            (global_clipnorm, "global_clipnorm")):
            if value is not None:
                check_real(value, name)
        # As in Keras, 0 (or None) turns a clipping option off.
        clipnorm, clipvalue, global_clipnorm = (float(x) if x else None
                                                for x in (clipnorm, clipvalue, global_clipnorm))
        if sum(x is not None for x in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError("Only one of clipnorm, clipvalue and global_clipnorm can be set")
        if loss_scale_factor is not None and not isinstance(loss_scale_factor, DynamicLossScale):
            if check_real(loss_scale_factor, "loss_scale_factor") <= 0:
                raise ValueError(f"Invalid loss_scale_factor: {loss_scale_factor} (expected > 0)")
            loss_scale_factor = float(loss_scale_factor)
        _check_count(gradient_accumulation_steps, "gradient_accumulation_steps", 1)
        check_real(ema_momentum, "ema_momentum", 0.0, 1.0)
        _check_count(ema_overwrite_frequency, "ema_overwrite_frequency", 1)
        if weight_decay_mask is not None and not callable(weight_decay_mask):
            weight_decay_mask = [bool(x) for x in weight_decay_mask]
        if isinstance(exclude_from_weight_decay, str):
            exclude_from_weight_decay = [exclude_from_weight_decay]
        if state_dtype is not None:
            check_choice(state_dtype, "state_dtype", STATE_DTYPES)
        check_choice(param_update, "param_update", PARAM_UPDATES)
        check_choice(state_rounding, "state_rounding", STATE_ROUNDINGS)
        if state_rounding == "stochastic" and state_dtype == "float32":
            raise ValueError("state_rounding='stochastic' rounds 8-bit, bfloat16 and float16 states: "
                             "it has nothing to round with state_dtype='float32'")
        _check_count(min_8bit_size, "min_8bit_size", 0, allow_none=False)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
            raise ValueError(f"Invalid seed: {seed!r} (expected an int in [0, 2**31))")
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = int(gradient_accumulation_steps or 1)
        self.use_ema = bool(use_ema)
        self.ema_momentum = float(ema_momentum)
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.skip_nonfinite = (loss_scale_factor is not None) if skip_nonfinite is None \
            else bool(skip_nonfinite)
        self.weight_decay_mask = weight_decay_mask
        self.exclude_from_weight_decay = None if exclude_from_weight_decay is None \
            else list(exclude_from_weight_decay)
        self.state_dtype = state_dtype
        self.param_update = param_update
        self.state_rounding = state_rounding
        self.seed = int(seed)
        #: Tensors with fewer elements keep float32 state when state_dtype is "8bit".
        self.min_8bit_size = int(min_8bit_size)

    @property
    def has_masks(self) -> bool:
        return self.weight_decay_mask is not None or self.exclude_from_weight_decay is not None

    @property
    def is_default(self) -> bool:
        """True when no option changes the plain torch.optim step (and its checkpoint)."""
        return (self.clipnorm is None and self.clipvalue is None and self.global_clipnorm is None
                and self.loss_scale_factor is None and self.gradient_accumulation_steps == 1
                and not self.use_ema and not self.skip_nonfinite and not self.has_masks
                and not self.uses_seed)

    @property
    def uses_seed(self) -> bool:
        """Whether some rounding is stochastic, keyed by the seed."""
        return self.param_update == "stochastic" or self.state_rounding == "stochastic"


#: The Options keywords: set for the whole optimizer, never per param group.
OPTION_NAMES = frozenset(inspect.signature(Options.__init__).parameters) - {"self"}


def make_options(owner: str, options: dict) -> Options:
    """Options from an optimizer's keyword arguments; an unknown one is a TypeError
    naming the optimizer, as for any function."""
    for name in options:
        if name not in OPTION_NAMES:
            raise TypeError(f"{owner}() got an unexpected keyword argument '{name}'")
    return Options(**options)


# --- the plan -----------------------------------------------------------------------------

_STEP = operator.itemgetter("step")

class _Member:
    """One param of a planned batch: where it lives, and the objects its views were made of."""

    __slots__ = ("flat", "gi", "pi", "skey", "param", "state", "objs", "step_obj", "step_view")

    def __init__(self, flat: int, gi: int, pi: int, skey: Any, param: Any, state: dict,
                 objs: tuple):
        self.flat, self.gi, self.pi, self.skey, self.param = flat, gi, pi, skey, param
        self.state, self.objs = state, objs
        # A front-end's step tensor and its view (the core writes the new count there).
        self.step_obj = state.get("step") if state else None
        self.step_view = None


class _Batch:
    """Params of one group that share a step count, decay, dtypes and state layout."""

    __slots__ = ("gi", "key", "decays", "dtypes", "keys", "tracked", "members", "lists", "watch",
                 "static")

    def __init__(self, gi: int, key: Any, decays: bool, dtypes: tuple, keys: tuple,
                 tracked: tuple):
        self.gi, self.key, self.decays, self.dtypes, self.keys = gi, key, decays, dtypes, keys
        # The state entries a step must find unchanged: keys (the core's buffers), then
        # entries the core does not read but the plan checked (8-bit code maps).
        self.tracked = tracked
        self.members: list[_Member] = []
        self.lists: dict[str, list] = {}
        self.watch: _Watch | None = None
        self.static: dict = {}


class _Watch:
    """A batch's members as flat lists, so that checking them each step runs in C loops."""

    __slots__ = ("flats", "pis", "params", "states", "objs", "ptr_objs", "ptrs", "step_objs",
                 "step_views")

    def __init__(self, batch: _Batch, ptr: Callable | None):
        members = batch.members
        self.flats = [m.flat for m in members]
        self.pis = [m.pi for m in members]
        self.params = [m.param for m in members]
        self.states = [m.state for m in members]
        self.objs = [(operator.itemgetter(sk), [m.objs[k] for m in members])
                     for k, sk in enumerate(batch.tracked)]
        self.ptr_objs = [o for m in members for o in (m.param, *m.objs)] if ptr else []
        self.ptrs = list(map(ptr, self.ptr_objs)) if ptr else []
        self.step_objs = [m.step_obj for m in members]
        self.step_views = [m.step_view for m in members] if members and \
            members[0].step_view is not None else None


class _Plan:
    def __init__(self, key: tuple):
        self.key = key
        self.batches: list[_Batch] = []
        self.ema_only: list[tuple[int, Any, Any]] = []      # (flat, state key, param): averaged only
        self.accumulators_left: list[Any] = []               # state keys: restart, no grad this call
        self.pending: dict[Any, dict] = {}                   # new states, committed on success
        # The state mapping's dicts when the plan last ran: the same objects in the same
        # order mean nothing was cleared, loaded or replaced (no per-key hashing).
        self.state_dicts: list = []


class Adapter:
    """How a front-end's objects become buffers. Subclassed by optim.py and torch.py."""

    #: The front-end's counts are core-written one-element float buffers (torch's 'step' tensors).
    step_buffers = False
    #: Grads go to the core as given (the core checks them); else grad_view makes each one.
    grads_as_given = False
    #: Whether mark_updated wants the params a step wrote.
    marks_updates = False

    def view(self, obj: Any, name: str) -> np.ndarray:
        raise NotImplementedError

    def grad_view(self, grad: Any, param: Any, gi: int, pi: int) -> np.ndarray:
        """The core's view of a grad; errors name it as param_name(gi, pi) says."""
        raise NotImplementedError

    #: Where an object's data lives now (a tensor's .data can be swapped), or None when
    #: the front-end's buffers cannot move under the same object.
    ptr: Callable[[Any], int] | None = None

    def dtype_name(self, obj: Any) -> str:
        raise NotImplementedError

    def new_buffer(self, param: Any, dtype: str | None, fill: Any = None) -> Any:
        """A zeroed buffer of param's shape (dtype None: param's dtype); fill: a param to copy."""
        raise NotImplementedError

    def new_state(self) -> dict:
        return {}

    def step_view(self, state: dict, name: str) -> np.ndarray:
        """A one-element float32/float64 view of the state's step tensor (step_buffers only)."""
        raise NotImplementedError

    def float32_of(self, obj: Any) -> np.ndarray:
        """A float32 copy of a param's values."""
        raise NotImplementedError

    def from_numpy(self, arr: np.ndarray) -> Any:
        """A new front-end buffer holding a copy of a NumPy array (8-bit states' absmax, qmap)."""
        raise NotImplementedError

    def get_step(self, state: dict) -> int:
        return int(state["step"])

    def set_step(self, state: dict, value: int) -> None:
        state["step"] = value

    def copy_into(self, dst: Any, src: Any) -> None:
        np.copyto(self.view(dst, "ema"), self.view(src, "param"))

    def mark_updated(self, params: list) -> None:
        """Tells the front-end which params the core wrote (torch bumps autograd versions)."""


class EngineUser:
    """What both front-ends expose of their engine: options as attributes, counters, EMA."""

    _engine: "Engine"

    def __getattr__(self, name: str) -> Any:
        # The options (clipnorm, use_ema, loss_scale_factor, ...) read as attributes.
        engine = self.__dict__.get("_engine")
        if engine is not None and name in vars(engine.options):
            return getattr(engine.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def iterations(self) -> int:
        """Updates applied so far; an lr schedule given as ``lr`` sees iterations + 1."""
        return self._engine.iterations

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a grad held inf or NaN (skip_nonfinite)."""
        return self._engine.skipped_steps

    def _skeys(self) -> list:
        return self._engine.adapter.state_keys(self.param_groups)

    def ema_params(self) -> list:
        """The moving averages (float32), one per param in flat order (None before its first update)."""
        return self._engine.ema_params(self.param_groups, self.state, self._skeys())

    def finalize(self) -> None:
        """Copies the moving averages into the params (Keras's finalize_variable_values)."""
        self._engine.finalize(self.param_groups, self.state, self._skeys())

    def swap_ema(self) -> None:
        """Exchanges params and their moving averages, e.g. around an evaluation."""
        self._engine.swap_ema(self.param_groups, self.state, self._skeys())


def param_name(gi: int, pi: int) -> str:
    return f"params[{pi}] in group {gi}"


class Engine:
    """Owns the options, counters and plan of one optimizer; steps its params in one core call."""

    def __init__(self, rule: str, options: Options, adapter: Adapter):
        self.rule = RULES[rule]
        self.options = options
        self.adapter = adapter
        #: Updates applied so far; an lr callable sees iterations + 1.
        self.iterations = 0
        #: Steps skipped because a grad held inf or NaN.
        self.skipped_steps = 0
        self.accumulated_calls = 0
        self._plans: dict[tuple, _Plan] = {}
        self._flat_count = 0
        self._checked: dict[int, tuple] = {}
        self._lock = threading.Lock()

    # A copy (copy.deepcopy, pickle) keeps the options and counters; plans, checked groups
    # and the lock belong to the original's objects and are made afresh.
    def __getstate__(self) -> dict:
        out = dict(self.__dict__)
        for key in ("_plans", "_checked", "_lock"):
            del out[key]
        return out

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._plans, self._checked, self._lock = {}, {}, threading.Lock()

    # --- groups ---------------------------------------------------------------------------
    def check_group(self, group: dict, where: str) -> None:
        # torch keeps unknown group keys silently; an option of the whole optimizer in a group
        # would be silently ignored, so it is refused.
        wide = sorted(OPTION_NAMES.intersection(group))
        if wide:
            raise ValueError(f"{wide[0]}{where} is an option of the whole optimizer, not of a "
                             "param group: pass it to the optimizer's constructor")
        self.rule.check_group(group, where)

    def init_group(self, group: dict, gi: int) -> None:
        """Computes a new group's weight-decay mask (only when a mask option is set)."""
        opts = self.options
        n = len(group["params"])
        if "decay_mask" in group:
            if len(group["decay_mask"]) != n:
                raise ValueError(f"decay_mask in group {gi} has {len(group['decay_mask'])} "
                                 f"entries for {n} params")
        elif opts.has_masks:
            names = group.get("param_names")
            mask = []
            for i, p in enumerate(group["params"]):
                name = names[i] if names else None
                decays = True
                fn = opts.weight_decay_mask
                if callable(fn):
                    decays = bool(fn(name, p))
                elif fn is not None and self._flat_count + i < len(fn):
                    decays = fn[self._flat_count + i]
                if opts.exclude_from_weight_decay is not None:
                    if name is None:
                        raise ValueError("exclude_from_weight_decay selects params by name: give "
                                         "them as (name, param) pairs (e.g. named_parameters()), "
                                         "or use weight_decay_mask")
                    decays = decays and not any(re.search(pattern, name)
                                                for pattern in opts.exclude_from_weight_decay)
                mask.append(decays)
            group["decay_mask"] = mask
        self._flat_count += n
        self._plans.clear()

    def check_mask_length(self) -> None:
        mask = self.options.weight_decay_mask
        if mask is not None and not callable(mask) and len(mask) != self._flat_count:
            raise ValueError(f"weight_decay_mask has {len(mask)} entries for "
                             f"{self._flat_count} params")

    def check_groups(self, groups: list[dict]) -> None:
        """Each group's hyperparameters, re-checked only when one of them changed."""
        checked = self._checked
        for gi, group in enumerate(groups):
            sig = tuple(group.values())
            old = checked.get(id(group))
            try:
                same = old is not None and old[0] is group and old[1] == sig
            except (RuntimeError, ValueError):  # multi-element tensors do not compare to bool
                same = False
            if not same:
                self.rule.check_group(group, f" in group {gi}")
                # The group's core scalars, reused until one of its values changes.
                checked[id(group)] = (group, sig, self.rule.scalars(group, 0.0, None))

    # --- the step -------------------------------------------------------------------------
    def step(self, groups: list[dict], state: Any, grads: Any, skeys: Any, *,
             targets: list[int] | None = None, amp_scale: float | None = None) -> dict | None:
        """One update of every param whose grad is not None.

        grads and skeys are indexed by flat param position (skeys: each param's key in
        ``state``). targets, if given, lists the only flat positions to step (a step in
        backward): no accumulation, no averaging of other params, iterations not advanced.
        amp_scale: a GradScaler's scale, divided out inside the pass. Returns the core's
        result ({'applied', 'finite', 'global_norm'}), or None when the call only
        accumulated. Nothing changes when it raises.
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this optimizer is already stepping in another thread; an "
                               "optimizer must be stepped by one thread at a time")
        try:
            return self._step(groups, state, grads, skeys, targets, amp_scale)
        finally:
            self._lock.release()

    def _step(self, groups: list[dict], state: Any, grads: Any, skeys: Any,
              targets: list[int] | None, amp_scale: float | None) -> dict | None:
        opts = self.options
        self.check_groups(groups)
        accumulating = opts.gradient_accumulation_steps > 1
        if targets is not None:
            self.check_stepwise()
        if accumulating and self.accumulated_calls + 1 < opts.gradient_accumulation_steps:
            self._accumulate(groups, state, grads, skeys)
            self.accumulated_calls += 1
            return None
        key = self._plan_key(groups, grads, targets)
        plans = self._plans
        plan = plans.get(key)
        result = None
        lrs = [self._current_lr(group) for group in groups]  # a schedule is asked once a step
        if plan is not None:
            batches = self._gather(plan, groups, state, grads, lrs, live=True, amp_scale=amp_scale)
            if batches is not None:
                try:
                    result = self.rule.core_step(batches, global_clipnorm=opts.global_clipnorm,
                                                 skip_nonfinite=opts.skip_nonfinite)
                except TypeError:
                    # The plan fixes each batch's grad dtype; a grad that changed dtype
                    # (refused before anything was written) is planned afresh below.
                    result = None
        if result is None:
            plan = self._make_plan(key, groups, state, grads, skeys, targets)
            batches = self._gather(plan, groups, state, grads, lrs, live=False, amp_scale=amp_scale)
            result = self.rule.core_step(batches, global_clipnorm=opts.global_clipnorm,
                                         skip_nonfinite=opts.skip_nonfinite)
        if isinstance(opts.loss_scale_factor, DynamicLossScale):
            opts.loss_scale_factor.update(result["finite"])
        if not result["applied"]:
            self.skipped_steps += 1
            if accumulating:
                self._reset_accumulators(state)
            plans.pop(key, None)
            return result
        self._commit(plan, groups, state, count=targets is None)
        if len(plans) >= 64 and key not in plans:
            plans.clear()  # patterns of grads present vary without end: keep the newest
        plans[key] = plan
        return result

    def _plan_key(self, groups: list[dict], grads: Any, targets: list[int] | None) -> tuple:
        present = tuple(targets) if targets is not None else \
            tuple(map(operator.is_, grads, itertools.repeat(None)))
        return (present,
                tuple((id(g["params"]), len(g["params"]), self.rule.state_keys(g),
                       tuple(g.get("decay_mask", ()))) for g in groups))

    def check_stepwise(self) -> None:
        """Refuses the options that need every grad of a step at once, for stepping each
        param on its own as its grad arrives (a step in backward)."""
        opts = self.options
        needs_all = [("gradient_accumulation_steps", opts.gradient_accumulation_steps > 1),
                     ("global_clipnorm", opts.global_clipnorm is not None),
                     ("a DynamicLossScale loss_scale_factor",
                      isinstance(opts.loss_scale_factor, DynamicLossScale)),
                     ("skip_nonfinite (on by default with a loss_scale_factor)",
                      bool(opts.skip_nonfinite))]
        for name, on in needs_all:
            if on:
                raise ValueError(f"{name} does not combine with stepping in backward: it needs "
                                 "every grad of a step at once, and each param steps on its own "
                                 "as its grad arrives")

    def forget_plans(self) -> None:
        """Drops every plan (groups added, state loaded): the next step plans afresh."""
        self._plans.clear()

    def _state_dtype(self, param_dtype: str, numel: int | None = None) -> str:
        wanted = self.options.state_dtype
        if wanted is None:  # torch.optim's rule: moments in the param's dtype
            return param_dtype if param_dtype in STATE_DTYPES else "float32"
        if wanted == "8bit" and numel is not None and numel < self.options.min_8bit_size:
            return "float32"
        return wanted

    def buffer_dtype(self, key: str, param_dtype: str) -> str:
        """The dtype of a state buffer of a param of param_dtype."""
        if key in ("master_param", "ema", "grad_accum"):
            return "float32"
        if key == "kahan_comp":
            return param_dtype
        if key.endswith(("_absmax", "_qmap")):
            return "float32"
        return self._state_dtype(param_dtype)

    def loaded_dtype(self, key: str, saved_dtype: str, param_dtype: str) -> str:
        """The dtype a loaded state buffer takes: 8-bit codes stay uint8; every other
        buffer the dtype the step uses it in (a float moment loaded into an 8-bit
        optimizer stays float32 until the next step quantizes it)."""
        if saved_dtype == "uint8":
            return "uint8"
        name = self.buffer_dtype(key, param_dtype)
        return "float32" if name == "8bit" else name

    def _param_update(self, param_dtype: str) -> str:
        return "nearest" if param_dtype == "float32" else self.options.param_update

    def _make_plan(self, key: tuple, groups: list[dict], state: Any, grads: Any, skeys: Any,
                   targets: list[int] | None) -> _Plan:
        """Sorts the params with grads into batches (group, step count, decay, dtypes) and
        creates missing state in plan.pending, committed only after the core succeeds."""
        adapter, opts, rule = self.adapter, self.options, self.rule
        plan = _Plan(key)
        accumulating = opts.gradient_accumulation_steps > 1
        flat = 0
        wanted_flat = None if targets is None else set(targets)
        for gi, group in enumerate(groups):
            keys = rule.state_keys(group)
            by_key: dict[Any, _Batch] = {}
            mask = group.get("decay_mask")
            for pi, p in enumerate(group["params"]):
                k = flat
                flat += 1
                if wanted_flat is not None:
                    if k not in wanted_flat:
                        continue
                g, skey = grads[k], skeys[k]
                st = state.get(skey)
                if g is None:
                    if opts.use_ema:
                        if not st or "ema" not in st:
                            plan.pending[skey] = dict(st or adapter.new_state(),
                                                      ema=adapter.new_buffer(p, "float32", fill=p))
                        plan.ema_only.append((k, skey, p))
                    if accumulating and st and "grad_accum" in st:
                        plan.accumulators_left.append(skey)
                    continue
                name = param_name(gi, pi)
                if st and rule.counts_steps:
                    check_adam_state(st, name, "")  # edited live: refused as a load would be
                pdtype = adapter.dtype_name(p)
                if pdtype not in KERNEL_DTYPES:
                    adapter.view(p, name)  # raises the front-end's error for this param
                    raise TypeError(f"{name}: dtype {pdtype} is not supported by the fused step")
                sdtype = self._state_dtype(pdtype, math.prod(p.shape))
                update = self._param_update(pdtype)
                wanted = list(keys)
                if sdtype == "8bit":
                    wanted += [sk + "_absmax" for sk in keys]
                if st and any(st.get(sk) is not None and
                              (st.get(sk + "_absmax") is not None) != (sdtype == "8bit") for sk in keys):
                    st = self._convert_moments(st, keys, p, sdtype)  # a checkpoint in the other form
                    plan.pending[skey] = st
                if update == "master":
                    wanted.append("master_param")
                elif update == "kahan":
                    wanted.append("kahan_comp")
                if accumulating:
                    wanted.append("grad_accum")
                if opts.use_ema:
                    wanted.append("ema")
                missing = [sk for sk in wanted if not st or st.get(sk) is None]
                fresh_moments = any(sk in keys for sk in missing)
                if missing or (not st and rule.counts_steps):
                    st = dict(st) if st else adapter.new_state()
                    for sk in missing:
                        fill = p if sk in ("ema", "master_param") else None
                        if sdtype == "8bit" and sk in QUANT_MAPS:
                            st[sk] = adapter.new_buffer(p, "uint8")
                            st[sk + "_qmap"] = adapter.from_numpy(_core.qmap(QUANT_MAPS[sk]))
                        elif sk.endswith("_absmax"):
                            st[sk] = adapter.from_numpy(np.zeros(quant_blocks(math.prod(p.shape)),
                                                                 np.float32))
                        else:
                            dtype = sdtype if sk in QUANT_MAPS else self.buffer_dtype(sk, pdtype)
                            st[sk] = adapter.new_buffer(p, dtype, fill=fill)
                    plan.pending[skey] = st
                tracked = wanted
                if sdtype == "8bit":
                    tracked = wanted + [sk + "_qmap" for sk in keys]
                    for sk in keys:
                        qmap = st.get(sk + "_qmap")
                        if qmap is None:  # a checkpoint without it: the map is always the same
                            st = plan.pending[skey] = dict(st)
                            st[sk + "_qmap"] = adapter.from_numpy(_core.qmap(QUANT_MAPS[sk]))
                        elif not is_own_qmap(qmap, sk):
                            raise ValueError(f"{sk}_qmap of {name} is not cpuadam's "
                                             f"{QUANT_MAPS[sk]} dynamic map, the only map its "
                                             "8-bit step decodes with")
                if rule.counts_steps:
                    if "step" not in st:
                        raise ValueError(f"state of {name} has moments but no 'step'")
                    bkey = adapter.get_step(st) + 1
                else:
                    bkey = fresh_moments
                decays = True if mask is None else bool(mask[pi])
                dtypes = (pdtype, adapter.dtype_name(g), sdtype, update)
                batch = by_key.get((bkey, decays, dtypes))
                if batch is None:
                    batch = by_key[(bkey, decays, dtypes)] = _Batch(gi, bkey, decays, dtypes,
                                                                   tuple(wanted), tuple(tracked))
                objs = tuple(st[sk] for sk in tracked)
                batch.members.append(_Member(k, gi, pi, skey, p, st, objs))
            plan.batches.extend(by_key.values())
        for batch in plan.batches:
            self._build_lists(batch)
        return plan

    def _convert_moments(self, st: dict, keys: tuple, p: Any, sdtype: str) -> dict:
        """A copy of st whose moments are in the form sdtype asks (8-bit codes, or float
        buffers), converted from the form a loaded checkpoint gave them."""
        adapter = self.adapter
        st = dict(st)
        for sk in keys:
            value = st.get(sk)
            if value is None or (st.get(sk + "_absmax") is not None) == (sdtype == "8bit"):
                continue
            if sdtype == "8bit":
                codes, absmax = _core.quantize_blockwise(
                    np.ascontiguousarray(adapter.float32_of(value)), QUANT_MAPS[sk])
                st[sk] = adapter.from_numpy(codes)
                st[sk + "_absmax"] = adapter.from_numpy(absmax)
                st[sk + "_qmap"] = adapter.from_numpy(_core.qmap(QUANT_MAPS[sk]))
            else:
                values = dequantize_moment(st, sk, lambda obj, sk=sk: adapter.view(obj, f"loaded '{sk}'"))
                st[sk] = adapter.new_buffer(p, sdtype, fill=adapter.from_numpy(values))
                st.pop(sk + "_absmax", None)
                st.pop(sk + "_qmap", None)
        return st

    def _build_lists(self, batch: _Batch) -> None:
        """The batch's buffer lists (views made once, reused while the plan lives)."""
        adapter = self.adapter
        lists: dict[str, list] = {"params": [], "indices": []}
        names = {"exp_avg": "exp_avgs", "exp_avg_sq": "exp_avg_sqs",
                 "max_exp_avg_sq": "max_exp_avg_sqs", "momentum_buffer": "momentum_buffers",
                 "master_param": "masters", "kahan_comp": "kahan_comps",
                 "grad_accum": "grad_accums", "ema": "emas"}
        names.update({sk + "_absmax": sk + "_absmaxs" for sk in QUANT_MAPS})
        for sk in batch.keys:
            lists[names[sk]] = []
        if adapter.step_buffers and self.rule.counts_steps:
            lists["step_buffers"] = []
        for m in batch.members:
            name = param_name(m.gi, m.pi)
            lists["params"].append(adapter.view(m.param, name))
            lists["indices"].append(m.pi)
            for sk, obj in zip(batch.keys, m.objs):
                lists[names[sk]].append(adapter.view(obj, f"{sk} of {name}"))
            if "step_buffers" in lists:
                m.step_view = adapter.step_view(m.state, name)
                lists["step_buffers"].append(m.step_view)
        batch.lists = lists
        batch.watch = _Watch(batch, adapter.ptr)
        # What a step's batch dict holds whatever the step: buffers and per-batch keys.
        static = dict(lists)
        static["group"] = batch.gi
        static["clipnorm"] = self.options.clipnorm
        static["clipvalue"] = self.options.clipvalue
        pdtype, gdtype, sdtype, update = batch.dtypes
        for key, name in (("param_dtype", pdtype), ("grad_dtype", gdtype), ("state_dtype", sdtype)):
            if name != "float32" and (name in KERNEL_DTYPES or name == "8bit"):
                static[key] = name
        if update != "nearest":
            static["param_update"] = update
        if sdtype != "float32" and self.options.state_rounding != "nearest":
            static["state_rounding"] = self.options.state_rounding
        if update == "stochastic" or "state_rounding" in static:
            static["stream_ids"] = [m.flat for m in batch.members]
        batch.static = static

    def _alive(self, plan: _Plan, groups: list[dict], state: Any) -> bool:
        """Whether every planned member still is what its views were made of: the same param
        in the same place, the same state dict and buffers at the same addresses, and (Adam)
        the live step count the batch expects. Edits, loads and clears fail this check."""
        counts = self.rule.counts_steps
        ptr = self.adapter.ptr
        is_ = operator.is_
        snapshot = plan.state_dicts
        if len(state) != len(snapshot) or not all(map(is_, state.values(), snapshot)):
            return False
        try:
            for batch in plan.batches:
                w = batch.watch
                params = groups[batch.gi]["params"]
                if not all(map(is_, map(params.__getitem__, w.pis), w.params)):
                    return False
                for getter, objs in w.objs:
                    if not all(map(is_, map(getter, w.states), objs)):
                        return False
                if ptr is not None and list(map(ptr, w.ptr_objs)) != w.ptrs:
                    return False
                if counts:
                    expected = float(batch.key - 1)
                    steps = map(_STEP, w.states)
                    if w.step_views is None:
                        if any(map(expected.__ne__, map(float, steps))):
                            return False
                    elif not all(map(is_, steps, w.step_objs)) or \
                            any(map(expected.__ne__, map(float, w.step_views))):
                        return False
        except (KeyError, IndexError, TypeError, ValueError):
            return False  # a key removed, a group shortened, a step that is not a number
        return True

    def _gather(self, plan: _Plan, groups: list[dict], state: Any, grads: Any, lrs: list,
                live: bool, amp_scale: float | None = None) -> list[dict] | None:
        """This step's batch dicts; None if the plan no longer describes the live state."""
        if live and (plan.pending or not self._alive(plan, groups, state)):
            return None
        for _, skey, _ in plan.ema_only:
            st = plan.pending.get(skey) or state.get(skey)
            if not st or "ema" not in st:
                return None
        opts, adapter, rule = self.options, self.adapter, self.rule
        grad_scale = self._grad_scale()
        if amp_scale is not None:
            grad_scale /= amp_scale
        ema_momentum = opts.ema_momentum if self.iterations > 0 else 0.0
        out = []
        checked = self._checked
        key_name = "step" if rule.counts_steps else "momentum_first"
        for batch in plan.batches:
            group = groups[batch.gi]
            d = dict(batch.static)
            if adapter.grads_as_given:
                d["grads"] = list(map(grads.__getitem__, batch.watch.flats))
            else:
                view = adapter.grad_view
                d["grads"] = [view(grads[m.flat], m.param, m.gi, m.pi) for m in batch.members]
            d.update(checked[id(group)][2])
            d["lr"] = lrs[batch.gi]
            d[key_name] = batch.key
            d["grad_scale"] = grad_scale
            if "stream_ids" in d:
                d["seed"] = opts.seed
                d["rounding_step"] = batch.key if rule.counts_steps else self.iterations + 1
            if not batch.decays:
                d["weight_decay"] = 0.0
            if "emas" in d:
                d["ema_momentum"] = ema_momentum
            out.append(d)
        return out

    def _commit(self, plan: _Plan, groups: list[dict], state: Any, count: bool = True) -> None:
        """Bookkeeping after the core applied an update (count: advance iterations)."""
        opts, adapter = self.options, self.adapter
        for skey, st in plan.pending.items():
            state[skey] = st
        plan.pending = {}
        if self.rule.counts_steps:
            write = not adapter.step_buffers
            for batch in plan.batches:
                if write:
                    key = batch.key
                    for st in batch.watch.states:
                        st["step"] = key
                batch.key += 1
        else:
            for batch in plan.batches:
                batch.key = False  # a momentum buffer is new for one step only
        if opts.use_ema:
            momentum = opts.ema_momentum if self.iterations > 0 else 0.0
            for _, skey, p in plan.ema_only:  # averaged at their unchanged value, as Keras does
                avg = adapter.view(state[skey]["ema"], "ema")
                avg *= momentum
                avg += (1.0 - momentum) * self._value_of(p, state[skey])
        if opts.gradient_accumulation_steps > 1:
            for skey in plan.accumulators_left:  # no grad this call: the window restarts anyway
                adapter.view(state[skey]["grad_accum"], "grad_accum").fill(0)
        if adapter.marks_updates:
            adapter.mark_updated([p for b in plan.batches for p in b.watch.params])
        plan.state_dicts = list(state.values())
        if not count:
            return
        self.accumulated_calls = 0
        self.iterations += 1
        if opts.use_ema and opts.ema_overwrite_frequency and \
                self.iterations % opts.ema_overwrite_frequency == 0:
            self.finalize(groups, state, self._skeys_of(groups))

    def _skeys_of(self, groups: list[dict]) -> list:
        return self.adapter.state_keys(groups)

    def _current_lr(self, group: dict) -> float:
        lr = group["lr"]
        if callable(lr) and not callable(getattr(lr, "numel", None)):
            return check_real(lr(self.iterations + 1), "learning rate from the schedule")
        return _as_real(lr, "learning rate")

    def _grad_scale(self) -> float:
        opts = self.options
        scale = 1.0
        factor = opts.loss_scale_factor
        if factor is not None:
            scale /= factor.scale if isinstance(factor, DynamicLossScale) else factor
        if opts.gradient_accumulation_steps > 1:
            scale /= opts.gradient_accumulation_steps
        return scale

    # --- accumulation -----------------------------------------------------------------------
    def _accumulate(self, groups: list[dict], state: Any, grads: list, skeys: list) -> None:
        adapter = self.adapter
        batches: dict[tuple, dict] = {}
        fresh = []
        flat = 0
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                g, skey = grads[flat], skeys[flat]
                flat += 1
                if g is None:
                    continue
                name = param_name(gi, pi)
                st = state.get(skey)
                acc = st.get("grad_accum") if st else None
                if acc is None:
                    acc = adapter.new_buffer(p, "float32")
                    fresh.append((skey, acc))
                gdtype = adapter.dtype_name(g)
                batch = batches.setdefault((gi, gdtype), {"grads": [], "grad_accums": [],
                                                          "group": gi, "indices": []})
                if gdtype != "float32" and gdtype in KERNEL_DTYPES:
                    batch["grad_dtype"] = gdtype  # any other: the core names the grad it refuses
                batch["grads"].append(g if adapter.grads_as_given else adapter.grad_view(g, p, gi, pi))
                batch["grad_accums"].append(adapter.view(acc, f"grad_accum of {name}"))
                batch["indices"].append(pi)
        _core.accumulate(list(batches.values()))
        for skey, acc in fresh:
            st = state.get(skey)
            if not st:
                state[skey] = st = adapter.new_state()
            st["grad_accum"] = acc
        self._plans.clear()

    def _reset_accumulators(self, state: Any) -> None:
        for st in list(state.values()):
            if isinstance(st, dict) and st.get("grad_accum") is not None:
                self.adapter.view(st["grad_accum"], "grad_accum").fill(0)
        self.accumulated_calls = 0

    # --- EMA ----------------------------------------------------------------------------------
    def ema_params(self, groups: list[dict], state: Any, skeys: list) -> list:
        if not self.options.use_ema:
            raise RuntimeError("ema_params() needs use_ema=True")
        out = []
        for skey in skeys:
            st = state.get(skey)
            out.append(st.get("ema") if st else None)
        return out

    def finalize(self, groups: list[dict], state: Any, skeys: list) -> None:
        """Copies the moving averages into the params (Keras's finalize_variable_values)."""
        if not self.options.use_ema:
            return
        params = [p for g in groups for p in g["params"]]
        for p, skey, avg in zip(params, skeys, self.ema_params(groups, state, skeys)):
            if avg is not None:
                self._set_value(p, state[skey], avg)

    def swap_ema(self, groups: list[dict], state: Any, skeys: list) -> None:
        """Exchanges params and their moving averages, e.g. around an evaluation."""
        params = [p for g in groups for p in g["params"]]
        for p, skey, avg in zip(params, skeys, self.ema_params(groups, state, skeys)):
            if avg is None:
                continue
            st = state[skey]
            if self._param_update(self.adapter.dtype_name(p)) not in ("master", "kahan"):
                self.adapter.swap(p, avg)
                continue
            value = self.adapter.from_numpy(self._value_of(p, st))
            self._set_value(p, st, avg)
            self.adapter.assign(avg, value)

    def _kept(self, p: Any, st: dict | None, key: str, update: str) -> Any:
        """st[key] if p's update mode is update and keeps it there (a buffer of another
        mode, left by a checkpoint or a cast, is not read)."""
        if not st or st.get(key) is None:
            return None
        return st[key] if self._param_update(self.adapter.dtype_name(p)) == update else None

    def _value_of(self, p: Any, st: dict | None) -> np.ndarray:
        """The float32 value the step reads for param p: its master, or the param plus its
        Kahan compensation, or the param itself."""
        adapter = self.adapter
        master = self._kept(p, st, "master_param", "master")
        if master is not None:
            return adapter.float32_of(master)
        value = adapter.float32_of(p)
        comp = self._kept(p, st, "kahan_comp", "kahan")
        if comp is not None:
            value += adapter.float32_of(comp)
        return value

    def _set_value(self, p: Any, st: dict, value: Any) -> None:
        """Sets param p to the float32 buffer value as the step would leave it: the master
        (if any) to value, p to value rounded to p's dtype, the Kahan compensation (if any)
        to what that rounding dropped (0 where the rounded value is not finite)."""
        adapter = self.adapter
        master = self._kept(p, st, "master_param", "master")
        if master is not None:
            adapter.assign(master, value)
        adapter.assign(p, value)
        if self._kept(p, st, "kahan_comp", "kahan") is not None:
            stored = adapter.float32_of(p)
            with np.errstate(invalid="ignore"):
                dropped = np.where(np.isfinite(stored), adapter.float32_of(value) - stored,
                                   np.float32(0))
            adapter.assign(st["kahan_comp"], adapter.from_numpy(dropped.astype(np.float32)))

    # --- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        extra = {"iterations": self.iterations, "skipped_steps": self.skipped_steps,
                 "accumulated_calls": self.accumulated_calls}
        if isinstance(self.options.loss_scale_factor, DynamicLossScale):
            extra["loss_scale"] = self.options.loss_scale_factor.state_dict()
        if self.options.uses_seed:
            # With the step counts, the seed is the whole position of the rounding stream.
            extra["seed"] = self.options.seed
        return extra

    def load_extra_state(self, state_dict: dict) -> Callable[[], None]:
        """Checks the optimizer-wide entries of a checkpoint; returns what applies them."""
        counters = {}
        for key in ("iterations", "skipped_steps", "accumulated_calls"):
            value = state_dict.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"loaded state dict has an invalid '{key}': {value!r}")
            counters[key] = int(value)
        if counters["accumulated_calls"] >= self.options.gradient_accumulation_steps > 1:
            raise ValueError("loaded state dict has an invalid 'accumulated_calls': "
                             f"{counters['accumulated_calls']} (gradient_accumulation_steps is "
                             f"{self.options.gradient_accumulation_steps})")
        seed = state_dict.get("seed", self.options.seed)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
            raise ValueError(f"loaded state dict has an invalid 'seed': {seed!r}")
        loss_scale = state_dict.get("loss_scale")
        factor = self.options.loss_scale_factor
        checked = None
        if loss_scale is not None:
            if not isinstance(loss_scale, dict):
                raise ValueError("loaded state dict has an invalid 'loss_scale'")
            if isinstance(factor, DynamicLossScale):
                checked = DynamicLossScale.__new__(DynamicLossScale)
                checked.__dict__.update(factor.state_dict())
                try:
                    checked.load_state_dict(loss_scale)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"loaded state dict has an invalid 'loss_scale': {e}") from None

        def apply() -> None:
            self.iterations = counters["iterations"]
            self.skipped_steps = counters["skipped_steps"]
            self.accumulated_calls = counters["accumulated_calls"]
            self.options.seed = int(seed)
            self._plans.clear()
            if checked is not None:
                factor.load_state_dict(checked.state_dict())
        return apply

    def check_param_state(self, entry: Any, name: str, shape: tuple, view: Callable) -> None:
        """Checks one param's loaded state: its keys, step count and buffer shapes.

        view(value) gives the value as a NumPy array (or raises) for shape checks.
        """
        if not isinstance(entry, dict):
            raise ValueError(f"loaded state for {name} must be a dict, got {type(entry).__name__}")
        if self.rule.counts_steps:
            check_adam_state(entry, name, "loaded ")
            if "momentum_buffer" in entry:
                raise ValueError(f"loaded state for {name} has a 'momentum_buffer': a checkpoint "
                                 "of SGD cannot be loaded into Adam/AdamW")
        elif "exp_avg" in entry or "step" in entry:
            raise ValueError(f"loaded state for {name} has Adam's entries ('step'/'exp_avg'): "
                             "a checkpoint of Adam cannot be loaded into SGD")
        for key, value in entry.items():
            if key == "step" or value is None:
                continue
            try:
                arr = view(value)
            except (TypeError, ValueError, RuntimeError):
                continue  # not a buffer: a hook's flag, kept as it is
            if arr is None:
                continue
            moment = key.rsplit("_", 1)[0]
            if key.endswith(("_absmax", "_qmap")) and moment in QUANT_MAPS:
                self._check_quant_entry(entry, key, moment, arr, name, shape, view)
                continue
            if moment in QUANT_MAPS or key in QUANT_MAPS:
                if arr.dtype == np.uint8 and entry.get(key + "_absmax") is None:
                    raise ValueError(f"loaded state '{key}' for {name} holds 8-bit codes but "
                                     f"no '{key}_absmax'")
                if arr.dtype == np.uint8 and tuple(arr.shape) == tuple(shape):
                    continue
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"loaded state '{key}' for {name} has shape {tuple(arr.shape)}, "
                                 f"expected {tuple(shape)}")
            if arr.dtype.kind not in "fV" and not (arr.dtype.kind in "ui" and arr.itemsize == 2):
                raise ValueError(f"loaded state '{key}' for {name} has dtype {arr.dtype}, "
                                 "expected a floating-point array")


    @staticmethod
    def _check_quant_entry(entry: dict, key: str, moment: str, arr: np.ndarray, name: str,
                           shape: tuple, view: Callable) -> None:
        """An 8-bit moment's absmax (one float32 per block) or qmap (cpuadam's map)."""
        codes = entry.get(moment)
        if codes is None or view(codes).dtype != np.uint8:
            raise ValueError(f"loaded state '{key}' for {name} belongs to 8-bit codes in "
                             f"'{moment}', which are missing")
        if arr.dtype != np.float32:
            raise ValueError(f"loaded state '{key}' for {name} has dtype {arr.dtype}, "
                             "expected float32")
        if key.endswith("_absmax"):
            blocks = quant_blocks(math.prod(shape))
            if arr.shape != (blocks,):
                raise ValueError(f"loaded state '{key}' for {name} has shape {tuple(arr.shape)}, "
                                 f"expected ({blocks},): one absmax per block of {QUANT_BLOCK}")
        elif not is_own_qmap(entry[key], moment):
            raise ValueError(f"loaded state '{key}' for {name} is not cpuadam's "
                             f"{QUANT_MAPS[moment]} dynamic map: convert the checkpoint with "
                             "cpuadam.dequantize_state first")


def is_own_qmap(obj: Any, moment: str) -> bool:
    """Whether obj holds exactly cpuadam's code map for moment (256 float32 values)."""
    values = _values_of(obj)
    return values.size == 256 and np.array_equal(values.reshape(-1), _core.qmap(QUANT_MAPS[moment]))


def _values_of(obj: Any) -> np.ndarray:
    """A NumPy copy of an array or a CPU tensor's values (duck-typed: no torch import)."""
    if callable(getattr(obj, "detach", None)):
        obj = obj.detach().cpu()
        return obj.numpy() if str(obj.dtype) in ("torch.uint8", "torch.float32") else obj.float().numpy()
    return np.asarray(obj)


def dequantize_moment(entry: dict, key: str, view: Callable = np.asarray) -> np.ndarray:
    """The float32 values of an 8-bit moment: qmap[code] * absmax of the code's block."""
    codes = np.ascontiguousarray(view(entry[key]))
    absmax = np.ascontiguousarray(view(entry[key + "_absmax"]), dtype=np.float32)
    qmap = entry.get(key + "_qmap")
    if qmap is None:
        return _core.dequantize_blockwise(codes, absmax, QUANT_MAPS[key])
    qmap = np.asarray(view(qmap), dtype=np.float32).reshape(-1)
    if qmap.size != 256:
        raise ValueError(f"'{key}_qmap' has {qmap.size} values, expected 256")
    if np.array_equal(qmap, _core.qmap(QUANT_MAPS[key])):
        return _core.dequantize_blockwise(codes, absmax, QUANT_MAPS[key])
    scale = np.repeat(absmax, QUANT_BLOCK)[:codes.size].reshape(codes.shape)
    return (qmap[codes] * scale).astype(np.float32)


def check_step_value(value: Any, name: str, where: str = "loaded ") -> int:
    """A step count (where: "loaded " in a checkpoint, "" in live state): an integral,
    finite, non-negative number below 2**53."""
    numel = getattr(value, "numel", None)
    if callable(numel):
        if numel() != 1:
            raise ValueError(f"{where}{name} must hold one number")
        value = value.item()
    elif isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{where}{name} must hold one number")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or v != math.floor(v) or v >= 2.0**53:
        raise ValueError(f"{where}{name} is {value!r}; expected a whole number in [0, 2**53)")
    return int(v)


def check_adam_state(entry: dict, name: str, where: str) -> int | None:
    """An Adam state's moments and step (where: "loaded " in a checkpoint, "" in live
    state): both moments or neither, a step with them; returns the step (None: none)."""
    has_moments = any(entry.get(k) is not None for k in ("exp_avg", "exp_avg_sq"))
    if has_moments and not all(entry.get(k) is not None for k in ("exp_avg", "exp_avg_sq")):
        raise ValueError(f"{where}state for {name} has only one of 'exp_avg' and 'exp_avg_sq'")
    if has_moments and "step" not in entry:
        raise ValueError(f"{where}state for {name} has moments but no 'step'")
    return check_step_value(entry["step"], f"'step' of {name}", where) if "step" in entry else None


# --- conversions of checkpoints between 8-bit and float32 states ---------------------------

def _like(template: Any, arr: np.ndarray) -> Any:
    """arr as the kind of object template is: a torch tensor for a tensor, else NumPy."""
    if callable(getattr(template, "detach", None)):
        import torch  # only reached with torch tensors in hand
        return torch.from_numpy(np.array(arr, order="C"))
    return np.array(arr, order="C")


def _map_state(state_dict: dict, convert: Callable[[dict], dict]) -> dict:
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise ValueError("state_dict must be a dict with a 'state' dict")
    out = dict(state_dict)
    out["state"] = {k: convert(dict(v)) if isinstance(v, dict) else v
                    for k, v in state_dict["state"].items()}
    return out


def dequantize_state(state_dict: dict) -> dict:
    """A copy of an optimizer state_dict whose 8-bit moments are float32 buffers.

    Every moment stored as codes (``exp_avg`` + ``exp_avg_absmax`` + ``exp_avg_qmap``, and
    likewise ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``) becomes the float32
    values it stands for, qmap[code] * absmax, and its ``_absmax``/``_qmap`` entries go: the
    layout of torch.optim's checkpoints. Works on both front-ends' state_dicts (NumPy arrays
    or torch tensors); the input is not changed.
    """
    def convert(entry: dict) -> dict:
        for key in QUANT_MAPS:
            if entry.get(key) is not None and entry.get(key + "_absmax") is not None:
                values = dequantize_moment({k: _values_of(entry[k]) for k in
                                            (key, key + "_absmax", key + "_qmap") if k in entry}, key)
                entry[key] = _like(entry[key], values)
                entry.pop(key + "_absmax")
                entry.pop(key + "_qmap", None)
        return entry
    return _map_state(state_dict, convert)


def quantize_state(state_dict: dict, min_8bit_size: int = 4096) -> dict:
    """A copy of an optimizer state_dict whose float moments are 8-bit, as
    ``state_dtype="8bit"`` stores them (moments of fewer than ``min_8bit_size`` elements stay
    as they are). The inverse of dequantize_state up to the quantization; a checkpoint of
    torch.optim.AdamW loads into an 8-bit optimizer directly too (it quantizes at its first
    step), so this is for writing 8-bit checkpoints.
    """
    _check_count(min_8bit_size, "min_8bit_size", 0, allow_none=False)

    def convert(entry: dict) -> dict:
        for key in QUANT_MAPS:
            value = entry.get(key)
            if value is None or entry.get(key + "_absmax") is not None:
                continue
            values = np.ascontiguousarray(_values_of(value), dtype=np.float32)
            if values.size < min_8bit_size:
                continue
            codes, absmax = _core.quantize_blockwise(values, QUANT_MAPS[key])
            entry[key] = _like(value, codes)
            entry[key + "_absmax"] = _like(value, absmax)
            entry[key + "_qmap"] = _like(value, _core.qmap(QUANT_MAPS[key]))
        return entry
    return _map_state(state_dict, convert)


# --- conversions to and from bitsandbytes' 8-bit optimizer checkpoints ---------------------

# bitsandbytes' 8-bit optimizers (AdamW8bit, Adam8bit, SGD8bit ...) keep per param `state1`
# (and `state2` for Adam) with `absmax1`/`qmap1` (`absmax2`/`qmap2`), wrapped in one nested dict
# under this key in their state_dict (plain keys in older releases).
_BNB_WRAP = "__bnb_optimizer_quant_state__"
_BNB_MOMENTS = {2: (("state1", "exp_avg"), ("state2", "exp_avg_sq")), 1: (("state1", "momentum_buffer"),)}
# Per-step scratch of theirs, rebuilt at each step: dropped.
_BNB_SCRATCH = ("unorm_vec", "gnorm_vec")
_BNB_GROUP_KEYS = {"alpha": 0.0, "t_alpha": None, "t_beta3": None}


def _ulp_close(a: np.ndarray, b: np.ndarray, ulps: int) -> bool:
    ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
    same_sign = np.sign(np.asarray(a)) == np.sign(np.asarray(b))
    return bool(np.all(same_sign & (np.abs(ia - ib) <= ulps)))


def from_bitsandbytes(state_dict: dict) -> dict:
    """A cpuadam.torch state_dict made of a bitsandbytes 8-bit optimizer's one.

    Adam/AdamW (two states) give ``exp_avg``/``exp_avg_sq``, SGD with momentum (one state)
    gives ``momentum_buffer``. Their codes and block absmax are the same layout as cpuadam's
    (codes of the param's shape, one float32 absmax per 256 elements) and are kept as they
    are; their code maps are the same dynamic maps computed in float32, up to 2 ulp off in some
    values, so the codes are given cpuadam's map (each moment moves by at most those 2 ulp).
    A moment under any other map becomes its float32 values (their map, exact), which an 8-bit
    optimizer quantizes at its first step. float32 states (their small tensors) stay float32.
    Refused: their non-blockwise 8-bit states (``max1``) and AdEMAMix (``alpha`` != 0).
    """
    def convert(entry: dict) -> dict:
        entry.update(entry.pop(_BNB_WRAP, None) or {})
        if "max1" in entry or "new_max1" in entry:
            raise ValueError("bitsandbytes state with block_wise=False (max1/new_max1) has no "
                             "cpuadam layout; dequantize it with bitsandbytes first")
        for key in _BNB_SCRATCH:
            entry.pop(key, None)
        if "state3" in entry:
            raise ValueError("bitsandbytes AdEMAMix state (state3) has no cpuadam equivalent")
        moments = _BNB_MOMENTS[2 if "state2" in entry else 1] if "state1" in entry else ()
        for i, (theirs, ours) in enumerate(moments, start=1):
            value = entry.pop(theirs)
            absmax, qmap = entry.pop(f"absmax{i}", None), entry.pop(f"qmap{i}", None)
            codes = _values_of(value)
            if codes.dtype != np.uint8:
                entry[ours] = value
                continue
            if absmax is None or qmap is None:
                raise ValueError(f"bitsandbytes {theirs} is 8-bit but absmax{i}/qmap{i} are missing")
            mine, theirs_map = _core.qmap(QUANT_MAPS[ours]), _values_of(qmap).reshape(-1)
            if theirs_map.size != 256:
                raise ValueError(f"bitsandbytes qmap{i} has {theirs_map.size} values, expected the "
                                 "256 of an 8-bit map")
            if _ulp_close(theirs_map, mine, 2):
                entry[ours] = value
                entry[ours + "_absmax"] = _like(value, _values_of(absmax).astype(np.float32))
                entry[ours + "_qmap"] = _like(value, mine)
            else:
                values = dequantize_moment({ours: codes, ours + "_absmax": _values_of(absmax),
                                            ours + "_qmap": _values_of(qmap)}, ours)
                entry[ours] = _like(value, values)
        if "momentum_buffer" in entry:
            entry.pop("step", None)  # SGD keeps no step count (torch.optim.SGD's layout)
        elif "step" in entry and not callable(getattr(entry["step"], "detach", None)):
            template = next((v for v in entry.values() if callable(getattr(v, "detach", None))), None)
            step = np.array(float(check_step_value(entry["step"], "step")), np.float32)
            entry["step"] = _like(template, step) if template is not None else step
        return entry

    out = _map_state(state_dict, convert)
    one_state = any(isinstance(e, dict) and "momentum_buffer" in e for e in out["state"].values())
    groups = []
    for group in state_dict.get("param_groups", []):
        group = dict(group)
        if one_state:
            # Their SGD8bit keeps momentum as betas = (momentum, 0) with eps = 0; other one-state
            # optimizers (Lion, RMSprop, Adagrad) do not fit SGD's state.
            betas = tuple(group.get("betas", ()))
            if len(betas) != 2 or betas[1] != 0 or group.get("eps", 0) != 0:
                raise ValueError("a one-state bitsandbytes optimizer converts only as SGD8bit "
                                 "(its groups have betas = (momentum, 0) and eps = 0)")
            group.pop("betas"), group.pop("eps", None)
            # Their state_dict does not record dampening and nesterov: their defaults.
            group = {"momentum": betas[0], "dampening": 0.0, "nesterov": False, **group}
        elif group.get("alpha") not in (None, 0, 0.0):
            raise ValueError("bitsandbytes AdEMAMix (alpha != 0) has no cpuadam equivalent")
        for key in _BNB_GROUP_KEYS:
            group.pop(key, None)
        groups.append(group)
    out["param_groups"] = groups
    return out


def to_bitsandbytes(state_dict: dict, min_8bit_size: int = 4096) -> dict:
    """A bitsandbytes 8-bit optimizer state_dict made of a cpuadam.torch one (Adam/AdamW, or
    SGD with momentum): the inverse of from_bitsandbytes. float32 or 16-bit moments of at least
    ``min_8bit_size`` elements (bitsandbytes' default, 4096) are quantized first, as
    cpuadam.quantize_state does; smaller ones stay float32, as bitsandbytes keeps them. The
    codes keep cpuadam's map in ``qmap1``/``qmap2``, which bitsandbytes decodes with.
    Refused: AMSGrad's ``max_exp_avg_sq`` (bitsandbytes has no 8-bit AMSGrad).
    """
    quantized = quantize_state(state_dict, min_8bit_size)

    def convert(entry: dict) -> dict:
        if entry.get("max_exp_avg_sq") is not None:
            raise ValueError("max_exp_avg_sq: bitsandbytes has no AMSGrad state")
        moments = _BNB_MOMENTS[1] if "momentum_buffer" in entry else _BNB_MOMENTS[2]
        wrapped = {}
        for i, (theirs, ours) in enumerate(moments, start=1):
            if entry.get(ours) is None:
                continue
            value = entry.pop(ours)
            absmax = entry.pop(ours + "_absmax", None)
            entry.pop(ours + "_qmap", None)
            if absmax is None:  # a small tensor: float32, as theirs are
                wrapped[theirs] = _like(value, _values_of(value).astype(np.float32))
            else:
                wrapped[theirs] = value
                wrapped[f"absmax{i}"] = absmax
                wrapped[f"qmap{i}"] = _like(value, _core.qmap(QUANT_MAPS[ours]))
        if "step" in entry:
            entry["step"] = check_step_value(entry["step"], "step")
        elif "state1" in wrapped:
            # Their SGD8bit counts steps and starts the buffer afresh at step 1: a buffer
            # already there is past it.
            entry["step"] = 1
        if wrapped:
            entry[_BNB_WRAP] = wrapped
        return entry

    out = _map_state(quantized, convert)
    groups = []
    for group in quantized.get("param_groups", []):
        if "momentum" in group and "betas" not in group:  # SGD: their SGD8bit's group layout
            group = {k: v for k, v in group.items() if k != "momentum"} | {
                "betas": (float(group["momentum"]), 0.0), "eps": 0.0}
        else:
            group = {**_BNB_GROUP_KEYS, **group}
        groups.append(group)
    out["param_groups"] = groups
    return out
