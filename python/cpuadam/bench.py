# SPDX-License-Identifier: MIT
"""``python -m cpuadam.bench``: cpuadam's AdamW step against its peers and a roofline proxy, interleaved.

An fp32 AdamW step reads param, grad, exp_avg and exp_avg_sq and writes param,
exp_avg and exp_avg_sq back: 28 bytes per parameter (32 with AMSGrad, which
also reads and writes max_exp_avg_sq). No implementation can beat those bytes
divided by the memory bandwidth, so next to the optimizers the benchmark times
``cpuadam._core.stream_pass``, a minimal pass with the same access pattern
(read four buffers, write three in place), on the same buffers and in the same
rounds. "% of roofline" is an implementation's GB/s over the proxy's GB/s taken
in the same minute; on shared or frequency-scaled machines only such ratios
travel well, not the absolute times.

Every implementation works on the same param, grad and state buffers (the
optimizers are handed the benchmark's state arrays), so a 128M-param workload
holds 2.5 GB of buffers however many implementations run (peak RSS about 4.5 GB
with the NumPy peer's scratch buffer and torch foreach's temporaries). Rounds are interleaved:
each round runs one step of every implementation, in an order rotated from
round to round, and the reported time is the median over the timed rounds.

Optional packages: torch (torch.optim peers, ``cpuadam.torch``), deepspeed
(DeepSpeedCPUAdam), rich or tqdm (progress bar; rich also draws the table) and
matplotlib (``--plot``). ``pip install cpuadam[bench]`` installs rich and
matplotlib.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

import cpuadam
from cpuadam import _core

__all__ = ["IMPLS", "Workload", "NumpyAdamW", "gpt2_shapes", "parse_workload", "run", "main"]

# One step's hyperparameters: torch.optim.AdamW's defaults.
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 1e-2

# Bytes an fp32 step must move per parameter: read p, g, m, v (16), write p, m, v (12);
# AMSGrad adds a read and a write of max_exp_avg_sq.
BYTES_PER_PARAM = 28
BYTES_PER_PARAM_AMSGRAD = 32

DEFAULT_SIZES = ("1M", "16M", "128M", "gpt2", "4096x4096", "16M:amsgrad", "10000x16",
                 "1000x4096:each", "gpt2:each")
# --quick: the 128M-scale workloads (several seconds a round for the slow peers) are left out.
QUICK_SIZES = ("1M", "16M", "4096x4096", "16M:amsgrad", "10000x16", "1000x4096:each")


@dataclass(frozen=True)
class Impl:
    """One implementation the benchmark can time."""

    key: str
    label: str
    short: str  # column header of the speed-ratio columns


IMPLS = (
    Impl("cpuadam", "cpuadam.AdamW (NumPy)", "cpuadam"),
    # The core call alone, its batch built once: the class's own per-tensor Python cost is the difference.
    Impl("cpuadam._core", "cpuadam._core.adam_step, batch built once", "core"),
    Impl("cpuadam.torch", "cpuadam.torch.AdamW", "c.torch"),
    Impl("torch-fused", "torch AdamW fused=True", "fused"),
    Impl("torch-foreach", "torch AdamW foreach=True", "foreach"),
    Impl("torch-forloop", "torch AdamW default (for-loop)", "forloop"),
    Impl("deepspeed", "DeepSpeedCPUAdam", "ds"),
    Impl("numpy", "NumPy AdamW (in-place ufuncs)", "numpy"),
    Impl("roofline", "roofline proxy (stream_pass)", "roofline"),
    # Opt-in rows (not in the default list): the cost of the training features.
    Impl("cpuadam+clip", "cpuadam.AdamW, global_clipnorm=1", "+clip"),
    Impl("cpuadam+clip+ema", "cpuadam.AdamW, global_clipnorm=1, use_ema", "+clip+ema"),
)
_IMPL_BY_KEY = {impl.key: impl for impl in IMPLS}
_OPT_IN_IMPLS = ("cpuadam+clip", "cpuadam+clip+ema")
# The cpuadam.AdamW rows and the options each turns on.
_CLASS_FEATURES = {"cpuadam": {}, "cpuadam+clip": {"global_clipnorm": 1.0},
                   "cpuadam+clip+ema": {"global_clipnorm": 1.0, "use_ema": True}}
_TORCH_IMPLS = ("cpuadam.torch", "torch-fused", "torch-foreach", "torch-forloop", "deepspeed")


# --------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class Workload:
    """A list of parameter shapes stepped together as one param group."""

    name: str
    shapes: tuple
    amsgrad: bool = False
    # One optimizer per tensor, as offload frameworks build them (torchao's
    # CPUOffloadOptimizer, Megatron's HybridDeviceOptimizer): a step is one call each.
    each: bool = False

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def bytes_per_param(self) -> int:
        return BYTES_PER_PARAM_AMSGRAD if self.amsgrad else BYTES_PER_PARAM

    @property
    def bytes_per_step(self) -> int:
        return self.bytes_per_param * self.n_params


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> tuple:
    """Parameter shapes of a GPT-2-small-like transformer (124,439,808 params by default).

    Token and position embeddings; per layer a fused qkv projection, the
    attention output projection, a 4x MLP (each matrix with its bias) and two
    LayerNorms (weight and bias); a final LayerNorm. The output head is tied
    to the token embedding, as in GPT-2, so it adds no parameters.
    """
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,)]                              # ln_1
        shapes += [(width, 3 * width), (3 * width,)]                # attention qkv
        shapes += [(width, width), (width,)]                        # attention output
        shapes += [(width,), (width,)]                              # ln_2
        shapes += [(width, 4 * width), (4 * width,), (4 * width, width), (width,)]  # MLP
    shapes += [(width,), (width,)]                                  # ln_f
    return tuple(shapes)


_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _parse_count(text: str) -> int:
    text = text.strip().lower()
    digits = text.rstrip("kmg")
    suffix = text[len(digits):]
    if not digits.isdigit() or suffix not in _SIZE_SUFFIXES:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4096, 64k, 16M)")
    return int(digits) * _SIZE_SUFFIXES[suffix]


def parse_workload(spec: str) -> Workload:
    """Parses a workload name.

    ``SIZE`` is one tensor (``1M`` = 2**20 params, ``64k``, ``4096``);
    ``COUNTxSIZE`` is COUNT tensors of SIZE params each (``4096x4096``);
    ``gpt2`` is :func:`gpt2_shapes`; a ``:amsgrad`` suffix turns AMSGrad on, ``:each``
    builds one optimizer per tensor and steps them one after another.
    """
    name = spec.strip()
    base, _, variant = name.partition(":")
    if variant not in ("", "amsgrad", "each"):
        raise ValueError(f"unknown workload variant {variant!r} in {spec!r} "
                         "(':amsgrad' or ':each')")
    if base.lower() == "gpt2":
        shapes = gpt2_shapes()
    elif "x" in base.lower():
        count, _, size = base.lower().partition("x")
        shapes = ((_parse_count(size),),) * _parse_count(count)
    else:
        shapes = ((_parse_count(base),),)
    if not shapes or any(math.prod(s) == 0 for s in shapes):
        raise ValueError(f"workload {spec!r} has no parameters")
    return Workload(name, shapes, amsgrad=variant == "amsgrad", each=variant == "each")


class Buffers:
    """The param, grad and state arrays every implementation steps in turn.

    Pages are written here (``fill``, not ``np.zeros``, whose untouched pages
    all map the kernel's one zero page and would make the first reads look
    cache-resident). Adam keeps exp_avg_sq non-negative whichever
    implementation updates it, so sharing the state keeps every step finite.
    Every array starts on a 64-byte line, as torch's allocator places tensors
    (NumPy's own arrays start 16 bytes into one), so no peer pays for vectors
    that straddle two lines.
    """

    def __init__(self, workload: Workload, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.workload = workload
        self.params = [self._normal(rng, s, 0.02) for s in workload.shapes]
        self.grads = [self._normal(rng, s, 1.0) for s in workload.shapes]
        self.exp_avgs = [self._zeros(s) for s in workload.shapes]
        self.exp_avg_sqs = [self._zeros(s) for s in workload.shapes]
        self.max_exp_avg_sqs = [self._zeros(s) for s in workload.shapes] if workload.amsgrad else []
        # The roofline proxy adds its grads to three buffers; zeros leave them as they are.
        self.zero_grads = [self._zeros(s) for s in workload.shapes]
        self._torch_params = None

    @staticmethod
    def _empty(shape: tuple) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64))
        raw = np.empty(4 * size + 64, dtype=np.uint8)
        start = -raw.__array_interface__["data"][0] % 64
        return raw[start:start + 4 * size].view(np.float32).reshape(shape)

    @classmethod
    def _normal(cls, rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
        a = cls._empty(shape)
        rng.standard_normal(dtype=np.float32, out=a)
        a *= scale
        return a

    @classmethod
    def _zeros(cls, shape: tuple) -> np.ndarray:
        a = cls._empty(shape)
        a.fill(0.0)
        return a

    def torch_params(self) -> list:
        """Zero-copy torch views of the params, each with its grad attached (made once)."""
        if self._torch_params is None:
            import torch

            params = []
            for p, g in zip(self.params, self.grads):
                t = torch.from_numpy(p).requires_grad_()
                t.grad = torch.from_numpy(g)
                params.append(t)
            self._torch_params = params
        return self._torch_params


# --------------------------------------------------------------------------- the NumPy peer

class NumpyAdamW:
    """AdamW as a NumPy user would vectorise it: in-place ufuncs (``out=``), one scratch buffer.

    Same math as torch.optim.AdamW (decoupled decay scaled by lr, eps added
    after the bias-corrected square root). It is a peer, not a reference: each
    ufunc is its own pass over memory, so it moves several times the bytes a
    fused step does.
    """

    def __init__(self, params: Sequence[np.ndarray], exp_avgs: Sequence[np.ndarray],
                 exp_avg_sqs: Sequence[np.ndarray], max_exp_avg_sqs: Sequence[np.ndarray] = (),
                 *, lr: float = LR, betas: tuple = BETAS, eps: float = EPS,
                 weight_decay: float = WEIGHT_DECAY, amsgrad: bool = False):
        self.params, self.exp_avgs, self.exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)
        self.max_exp_avg_sqs = list(max_exp_avg_sqs) if amsgrad else [None] * len(self.params)
        self.lr, self.betas, self.eps, self.weight_decay, self.amsgrad = lr, betas, eps, weight_decay, amsgrad
        self.step_count = 0
        self._scratch = np.empty(max((p.size for p in self.params), default=0), dtype=np.float32)

    def step(self, grads: Sequence[np.ndarray]) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1.0 - beta1**self.step_count
        bias_correction2 = 1.0 - beta2**self.step_count
        step_size = self.lr / bias_correction1
        inv_sqrt_bc2 = 1.0 / math.sqrt(bias_correction2)
        decay = 1.0 - self.lr * self.weight_decay
        for p, g, m, v, vmax in zip(self.params, grads, self.exp_avgs, self.exp_avg_sqs,
                                    self.max_exp_avg_sqs):
            tmp = self._scratch[:p.size].reshape(p.shape)
            np.multiply(p, decay, out=p)
            # m = m + (1 - beta1) * (g - m), the lerp torch uses.
            np.subtract(g, m, out=tmp)
            np.multiply(tmp, 1.0 - beta1, out=tmp)
            np.add(m, tmp, out=m)
            np.multiply(v, beta2, out=v)
            np.multiply(g, g, out=tmp)
            np.multiply(tmp, 1.0 - beta2, out=tmp)
            np.add(v, tmp, out=v)
            if self.amsgrad:
                np.maximum(vmax, v, out=vmax)
                v = vmax
            np.sqrt(v, out=tmp)
            np.multiply(tmp, inv_sqrt_bc2, out=tmp)
            np.add(tmp, self.eps, out=tmp)
            np.divide(m, tmp, out=tmp)
            np.multiply(tmp, step_size, out=tmp)
            np.subtract(p, tmp, out=p)


# --------------------------------------------------------------------------- implementations

def _availability(keys: Sequence[str]) -> dict:
    """Maps each requested implementation to None (usable) or the reason it is not."""
    reasons: dict = {}
    torch_reason = None
    if any(k in _TORCH_IMPLS for k in keys):
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            torch_reason = f"torch is not installed ({exc})"
    for key in keys:
        reason = None
        if key in _TORCH_IMPLS and torch_reason:
            reason = torch_reason
        elif key == "cpuadam.torch":
            try:
                importlib.import_module("cpuadam.torch").AdamW  # noqa: B018
            except Exception as exc:  # a missing or broken module only drops this row
                reason = f"cpuadam.torch is not importable ({type(exc).__name__}: {exc})"
        elif key == "deepspeed":
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: F401
            except Exception as exc:
                reason = f"DeepSpeed is not importable ({type(exc).__name__}: {exc})"
        reasons[key] = reason
    return reasons


def _torch_state(bufs: Buffers, i: int, step) -> dict:
    import torch

    state = {"step": step, "exp_avg": torch.from_numpy(bufs.exp_avgs[i]),
             "exp_avg_sq": torch.from_numpy(bufs.exp_avg_sqs[i])}
    if bufs.workload.amsgrad:
        state["max_exp_avg_sq"] = torch.from_numpy(bufs.max_exp_avg_sqs[i])
    return state


def _each(make: Callable[[list, int], Callable[[], None]], n: int) -> Callable[[], None]:
    """One optimizer per tensor: make(indices, i) builds the one for tensor i."""
    steps = [make([i], i) for i in range(n)]

    def step_all() -> None:
        for step in steps:
            step()
    return step_all


def _prepare(key: str, bufs: Buffers) -> Callable[[], None]:
    """Builds one implementation over the shared buffers; returns its zero-argument step."""
    if bufs.workload.each and key not in ("numpy", "roofline"):
        if key == "deepspeed":
            raise _Unsupported("DeepSpeedCPUAdam runs py-cpuinfo in each constructor (seconds)")
        return _each(lambda idx, i: _prepare_one(key, bufs, idx), len(bufs.params))
    return _prepare_one(key, bufs, list(range(len(bufs.params))))


def _prepare_one(key: str, bufs: Buffers, idx: list) -> Callable[[], None]:
    """One optimizer over the tensors idx of the shared buffers; returns its step."""
    amsgrad = bufs.workload.amsgrad
    if key in _CLASS_FEATURES:
        features = _CLASS_FEATURES[key]
        opt = cpuadam.AdamW([bufs.params[i] for i in idx], lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=WEIGHT_DECAY, amsgrad=amsgrad, **features)
        for k, i in enumerate(idx):
            state = {"step": 0, "exp_avg": bufs.exp_avgs[i], "exp_avg_sq": bufs.exp_avg_sqs[i]}
            if amsgrad:
                state["max_exp_avg_sq"] = bufs.max_exp_avg_sqs[i]
            if features.get("use_ema"):
                state["ema"] = bufs.params[i].copy()
            opt.state[k] = state
        grads = [bufs.grads[i] for i in idx]
        return lambda: opt.step(grads)
    if key == "cpuadam._core":
        batch = {"params": [bufs.params[i] for i in idx], "grads": [bufs.grads[i] for i in idx],
                 "exp_avgs": [bufs.exp_avgs[i] for i in idx],
                 "exp_avg_sqs": [bufs.exp_avg_sqs[i] for i in idx],
                 "max_exp_avg_sqs": [bufs.max_exp_avg_sqs[i] for i in idx] if amsgrad else [],
                 "step": 0, "lr": LR, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS,
                 "weight_decay": WEIGHT_DECAY, "amsgrad": amsgrad, "maximize": False,
                 "decoupled": True, "decay_mode": "lr", "eps_mode": "torch", "group": 0,
                 "indices": list(range(len(idx)))}

        def core_step() -> None:
            batch["step"] += 1
            _core.adam_step([batch])
        return core_step
    if key == "numpy":
        opt = NumpyAdamW(bufs.params, bufs.exp_avgs, bufs.exp_avg_sqs, bufs.max_exp_avg_sqs,
                         amsgrad=amsgrad)
        grads = bufs.grads
        return lambda: opt.step(grads)
    if key == "roofline":
        args = (bufs.params, bufs.zero_grads, bufs.exp_avgs, bufs.exp_avg_sqs)
        return lambda: _core.stream_pass(*args)

    import torch

    all_params = bufs.torch_params()
    params = [all_params[i] for i in idx]
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if key.startswith("torch-"):
        flavour = {"torch-fused": dict(fused=True), "torch-foreach": dict(foreach=True),
                   "torch-forloop": dict(foreach=False, fused=False)}[key]
        opt = torch.optim.AdamW(params, amsgrad=amsgrad, **hyper, **flavour)
        for i, p in zip(idx, params):
            # torch.optim keeps `step` as a float32 scalar tensor on the params' device.
            opt.state[p] = _torch_state(bufs, i, torch.tensor(0.0, dtype=torch.float32))
        return opt.step
    if key == "deepspeed":
        if amsgrad:
            raise _Unsupported("DeepSpeedCPUAdam does not implement AMSGrad")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, adamw_mode=True, **hyper)
        for i, p in zip(idx, params):
            opt.state[p] = _torch_state(bufs, i, 0)
        return opt.step
    if key == "cpuadam.torch":
        # Its state has torch.optim's layout, so it takes the shared buffers too.
        opt = importlib.import_module("cpuadam.torch").AdamW(params, amsgrad=amsgrad, **hyper)
        for i, p in zip(idx, params):
            opt.state[p] = _torch_state(bufs, i, torch.tensor(0.0, dtype=torch.float32))
        return opt.step
    raise KeyError(key)


class _Unsupported(Exception):
    """An implementation that cannot run a workload (recorded as skipped, not failed)."""


# --------------------------------------------------------------------------- threads

def _available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _parse_threads(text: str) -> list:
    counts = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            n = _available_cpus()
        elif part == "pow2":
            # 1, 2, 4, ... below the CPU count, then the CPU count itself.
            top = _available_cpus()
            counts += [1 << i for i in range(top.bit_length()) if (1 << i) < top]
            n = top
        elif part.isdigit() and int(part) >= 1:
            n = int(part)
        else:
            raise argparse.ArgumentTypeError(f"bad thread count {part!r} (expected N >= 1 or 'all')")
        counts.append(n)
    return sorted(set(counts))


def _set_threads(n: int, keys: Sequence[str]) -> None:
    """Gives every implementation the same thread count.

    One OpenMP runtime serves the whole process (torch's bundled libgomp and
    the system one share a soname, so whichever loads first is used by both),
    and torch.set_num_threads also sets the count DeepSpeed's op runs with.
    """
    cpuadam.set_num_threads(n)
    if any(k in _TORCH_IMPLS for k in keys) and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


# --------------------------------------------------------------------------- progress

class _Progress:
    """A progress bar on stderr: rich if installed, else tqdm, else one line per cell."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self._kind = total, 0, "off"
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("", total=total)
            self._bar.start()
            self._kind = "rich"
            return
        except ImportError:
            pass
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, leave=False, unit="round", dynamic_ncols=True)
            self._kind = "tqdm"
        except ImportError:
            self._kind = "text"

    def describe(self, text: str, milestone: bool = False) -> None:
        """Shows what runs now; the text fallback prints only milestones (one line per cell)."""
        if self._kind == "rich":
            self._bar.update(self._task, description=text)
        elif self._kind == "tqdm":
            self._bar.set_description_str(text)
        elif self._kind == "text" and milestone:
            print(f"[{self.done}/{self.total} rounds] {text}", file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._kind == "rich":
            self._bar.advance(self._task, n)
        elif self._kind == "tqdm":
            self._bar.update(n)

    def close(self) -> None:
        if self._kind in ("rich", "tqdm"):
            if self._kind == "rich":
                self._bar.stop()
            else:
                self._bar.close()
            self._kind = "off"


# --------------------------------------------------------------------------- measuring

def _time_rounds(steps: dict, rounds: int, warmup: int, progress: _Progress, failures: dict) -> dict:
    """Runs `rounds` interleaved rounds; returns each step's times (seconds) after the warm-up.

    Each round runs every step once, starting one position later than the
    round before, so no implementation always follows the same neighbour. A
    step that raises is dropped from the remaining rounds and reported.
    """
    keys = list(steps)
    times: dict = {k: [] for k in keys}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            shift = r % len(keys) if keys else 0
            for key in keys[shift:] + keys[:shift]:
                if key in failures:
                    continue
                start = time.perf_counter()
                try:
                    steps[key]()
                except Exception as exc:
                    failures[key] = f"{type(exc).__name__}: {exc}"
                    continue
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[key].append(elapsed)
            progress.advance()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: v for k, v in times.items() if k not in failures}


def _row(workload: Workload, threads: int, key: str, times: list) -> dict:
    median = statistics.median(times)
    # The proxy moves 28 B/param even where the step moves 32 (AMSGrad).
    moved = BYTES_PER_PARAM * workload.n_params if key == "roofline" else workload.bytes_per_step
    return {
        "workload": workload.name, "threads": threads, "impl": key, "label": _IMPL_BY_KEY[key].label,
        "n_params": workload.n_params, "n_tensors": workload.n_tensors, "amsgrad": workload.amsgrad,
        "bytes_per_step": moved, "times_s": times, "median_s": median, "min_s": min(times),
        "gbps": moved / median / 1e9, "us_per_tensor": median / workload.n_tensors * 1e6,
    }


def _add_ratios(rows: list) -> None:
    """Adds roofline_fraction and speedup_vs (peer's median / this row's median) per cell."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["workload"], row["threads"]), {})[row["impl"]] = row
    for cell in cells.values():
        roof = cell.get("roofline")
        for key, row in cell.items():
            row["roofline_fraction"] = row["gbps"] / roof["gbps"] if roof else None
            row["speedup_vs"] = {} if key == "roofline" else {
                peer: other["median_s"] / row["median_s"]
                for peer, other in cell.items() if peer not in (key, "roofline")}


def run(workloads: Sequence[Workload], threads: Sequence[int], impls: Sequence[str], *,
        rounds: int = 15, warmup: int = 3, progress: bool = True) -> dict:
    """Measures every workload at every thread count; returns the report as plain data.

    Buffers are made for one workload at a time and shared by all
    implementations. The report holds one row per (workload, threads, impl)
    plus the implementations skipped and why.
    """
    availability = _availability(impls)
    usable = [k for k in impls if availability[k] is None]
    skipped = [{"impl": k, "workload": None, "threads": None, "reason": availability[k]}
               for k in impls if availability[k] is not None]
    rows: list = []
    saved_threads = cpuadam.get_num_threads()
    saved_torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    bar = _Progress(len(workloads) * len(threads) * (rounds + warmup), enabled=progress)
    try:
        for workload in workloads:
            n_buffers = 6 if workload.amsgrad else 5
            bar.describe(f"{workload.name}: allocating {n_buffers * 4 * workload.n_params / 2**20:,.0f} MiB")
            bufs = Buffers(workload)
            steps: dict = {}
            for key in usable:
                bar.describe(f"{workload.name}: preparing {key}")
                try:
                    steps[key] = _prepare(key, bufs)
                except _Unsupported as exc:
                    skipped.append({"impl": key, "workload": workload.name, "threads": None, "reason": str(exc)})
                except Exception as exc:
                    skipped.append({"impl": key, "workload": workload.name, "threads": None,
                                    "reason": f"setup failed: {type(exc).__name__}: {exc}"})
            for n in threads:
                _set_threads(n, usable)
                bar.describe(f"{workload.name}, {n} thread{'s' if n > 1 else ''}", milestone=True)
                failures: dict = {}
                times = _time_rounds(steps, warmup + rounds, warmup, bar, failures)
                for key, reason in failures.items():
                    skipped.append({"impl": key, "workload": workload.name, "threads": n,
                                    "reason": f"step failed: {reason}"})
                    steps.pop(key, None)
                rows.extend(_row(workload, n, key, t) for key, t in times.items() if t)
            del steps, bufs
            gc.collect()
    finally:
        bar.close()
        cpuadam.set_num_threads(saved_threads)
        if saved_torch_threads is not None and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(saved_torch_threads)
    order = {k: i for i, k in enumerate(_IMPL_BY_KEY)}
    rows.sort(key=lambda r: ([w.name for w in workloads].index(r["workload"]),
                             r["threads"], order[r["impl"]]))
    _add_ratios(rows)
    return {"meta": machine_info(), "config": {
        "workloads": [{"name": w.name, "n_params": w.n_params, "n_tensors": w.n_tensors,
                       "amsgrad": w.amsgrad} for w in workloads],
        "threads": list(threads), "impls": list(impls), "rounds": rounds, "warmup": warmup,
        "hyperparameters": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY}},
        "rows": rows, "skipped": skipped, "many_tensor_cost": _many_tensor_cost(rows)}


def _many_tensor_cost(rows: list) -> list:
    """Per implementation: GB/s of one tensor ÷ GB/s of a many-tensor list of about the same size.

    1.0 means a list costs what one tensor of its size costs; the single
    tensor compared is the one closest in size, within a factor of 2.
    """
    singles = [r for r in rows if r["n_tensors"] == 1]
    out = []
    for row in rows:
        if row["n_tensors"] == 1 or row["impl"] == "roofline":
            continue
        candidates = [s for s in singles if s["impl"] == row["impl"] and s["threads"] == row["threads"]
                      and s["amsgrad"] == row["amsgrad"]
                      and abs(math.log2(s["n_params"] / row["n_params"])) <= 1.0]
        if not candidates:
            continue
        single = min(candidates, key=lambda s: abs(math.log2(s["n_params"] / row["n_params"])))
        out.append({"workload": row["workload"], "single": single["workload"], "threads": row["threads"],
                    "impl": row["impl"], "cost": single["gbps"] / row["gbps"]})
    return out


# --------------------------------------------------------------------------- reporting

def _dist_version(name: str):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What a reader needs to judge the numbers: build, CPU, threads, versions, date."""
    info = cpuadam.build_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpuadam": cpuadam.__version__, "isa_selected": info["isa_selected"],
        "isa_forced": info["isa_forced"], "isa_compiled": list(info["isa_compiled"]),
        "compiler": info["compiler"], "openmp": info["openmp"],
        "default_num_threads": info["num_threads"], "available_cpus": _available_cpus(),
        "cpu": _cpu_model(), "machine": platform.machine(), "system": platform.system(),
        "python": platform.python_version(), "numpy": np.__version__,
        "torch": _dist_version("torch"), "deepspeed": _dist_version("deepspeed"),
    }


def header_lines(meta: dict, config: dict) -> list:
    forced = "forced by CPUADAM_ISA" if meta["isa_forced"] else "auto"
    peers = ", ".join(f"{name} {meta[name]}" for name in ("torch", "deepspeed") if meta[name])
    return [
        f"cpuadam {meta['cpuadam']}: ISA level {meta['isa_selected']} ({forced}; compiled: "
        f"{', '.join(meta['isa_compiled'])}), {meta['openmp']}, {meta['compiler']}",
        f"CPU: {meta['cpu']} ({meta['machine']}), {meta['available_cpus']} CPUs available, "
        f"default threads {meta['default_num_threads']}; threads measured: "
        f"{', '.join(map(str, config['threads']))}",
        f"Python {meta['python']}, NumPy {meta['numpy']}" + (f", {peers}" if peers else "") + f"; {meta['date']}",
        f"fp32 AdamW (lr {LR:g}, weight_decay {WEIGHT_DECAY:g}); {BYTES_PER_PARAM} B/param "
        f"({BYTES_PER_PARAM_AMSGRAD} with AMSGrad); median of {config['rounds']} interleaved steps "
        f"after {config['warmup']} warm-up",
    ]


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def table_rows(report: dict) -> tuple:
    """The main table as strings: (column headers, rows)."""
    present = [k for k in _IMPL_BY_KEY if k != "roofline" and any(r["impl"] == k for r in report["rows"])]
    headers = ["workload", "threads", "impl", "ms/step", "GB/s", "% roofline", "µs/tensor"]
    headers += [f"vs {_IMPL_BY_KEY[k].short}" for k in present]
    out = []
    for r in report["rows"]:
        cells = [r["workload"], str(r["threads"]), r["impl"], _fmt_ms(r["median_s"]), f"{r['gbps']:.1f}",
                 "" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f}%",
                 f"{r['us_per_tensor']:.2f}" if r["n_tensors"] > 1 else ""]
        for k in present:
            ratio = r["speedup_vs"].get(k)
            cells.append("" if ratio is None else f"{ratio:.2f}")
        out.append(cells)
    return headers, out


LEGEND = ("ms/step: median; GB/s: bytes an fp32 step must move (28/param, 32 with AMSGrad) per second; "
          "% roofline: GB/s over the roofline proxy's GB/s in the same rounds; "
          "vs X: X's time / this row's time (above 1: this row is faster); "
          "µs/tensor: step time / number of tensors.")


_TEXT_COLUMNS = ("workload", "impl", "vs one tensor of")


def _plain_table(headers: list, rows: list) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    left = {i for i, h in enumerate(headers) if h in _TEXT_COLUMNS}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: list, rows: list) -> str:
    align = ["---" if h in _TEXT_COLUMNS else "---:" for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _section_tables(report: dict, scaling: bool) -> list:
    """The smaller tables under the main one: (title, headers, rows)."""
    sections = []
    cost = report["many_tensor_cost"]
    if cost:
        sections.append(("Many tensors vs one tensor of about the same size "
                         "(GB/s of one ÷ GB/s of many; 1.00 = no cost)",
                         ["workload", "vs one tensor of", "threads", "impl", "cost"],
                         [[c["workload"], c["single"], str(c["threads"]), c["impl"], f"{c['cost']:.2f}"]
                          for c in cost]))
    threads = report["config"]["threads"]
    if scaling and len(threads) > 1:
        rows = []
        for w in report["config"]["workloads"]:
            for key in _IMPL_BY_KEY:
                gbps = {r["threads"]: r["gbps"] for r in report["rows"]
                        if r["workload"] == w["name"] and r["impl"] == key}
                if not gbps:
                    continue
                base = gbps.get(min(threads))
                cells = [w["name"], key] + [f"{gbps[n]:.1f}" if n in gbps else "" for n in threads]
                top = gbps.get(max(threads))
                cells.append(f"{top / base:.2f}" if base and top else "")
                rows.append(cells)
        sections.append(("Thread scaling (GB/s)", ["workload", "impl"] + [f"{n} thr" for n in threads]
                         + [f"{max(threads)} ÷ {min(threads)}"], rows))
    return sections


def print_report(report: dict, *, markdown: bool = False, scaling: bool = False, file=None) -> None:
    """Prints the tables: rich on a terminal, aligned text otherwise, or Markdown."""
    file = file or sys.stdout
    headers, rows = table_rows(report)
    sections = _section_tables(report, scaling)
    extras = [f"skipped {s['impl']}" + (f" on {s['workload']}" if s["workload"] else "")
              + (f" at {s['threads']} threads" if s["threads"] else "") + f": {s['reason']}"
              for s in report["skipped"]]
    use_rich = False
    if not markdown and file is sys.stdout and sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table

            use_rich = True
        except ImportError:
            pass
    if use_rich:
        console = Console()
        for title, h, body in [("AdamW step", headers, rows)] + sections:
            table = Table(title=title, title_justify="left")
            for i, name in enumerate(h):
                table.add_column(name, justify="left" if name in _TEXT_COLUMNS else "right")
            for r in body:
                table.add_row(*r)
            console.print(table)
        console.print(LEGEND, style="dim", highlight=False)
        for line in extras:
            console.print(line, style="dim", highlight=False)
        return
    render = markdown_table if markdown else _plain_table
    print(render(headers, rows), file=file)
    for title, h, body in sections:
        print(f"\n{title}\n", file=file)
        print(render(h, body), file=file)
    print("\n" + LEGEND, file=file)
    for line in extras:
        print(("- " if markdown else "") + line, file=file)


def plot(report: dict, path: str) -> None:
    """GB/s against param count per implementation, one panel per thread count, roofline drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = report["config"]["threads"]
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.8), squeeze=False, sharey=True)
    colours = dict(zip(_IMPL_BY_KEY, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    for ax, n in zip(axes[0], threads):
        rows = [r for r in report["rows"] if r["threads"] == n and not r["amsgrad"]]
        for key in _IMPL_BY_KEY:
            mine = [r for r in rows if r["impl"] == key]
            single = sorted((r for r in mine if r["n_tensors"] == 1), key=lambda r: r["n_params"])
            many = [r for r in mine if r["n_tensors"] > 1]
            if key == "roofline":
                if single:
                    ax.plot([r["n_params"] for r in single], [r["gbps"] for r in single], "k--", lw=2.5,
                            label="roofline proxy", zorder=3)
                if many:
                    ax.scatter([r["n_params"] for r in many], [r["gbps"] for r in many], marker="x", s=50,
                               color="k", zorder=3)
                continue
            if single:
                ax.plot([r["n_params"] for r in single], [r["gbps"] for r in single], "o-",
                        color=colours[key], label=key)
            if many:
                ax.scatter([r["n_params"] for r in many], [r["gbps"] for r in many], marker="x", s=50,
                           color=colours[key], label=None if single else key)
        for name in sorted({r["workload"] for r in rows if r["n_tensors"] > 1}):
            x = next(r["n_params"] for r in rows if r["workload"] == name)
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
            ax.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        va="top", ha="right", color="0.4")
        ax.set_xscale("log")
        ax.set_xlabel("parameters per step (lines: one tensor; x: many tensors)")
        ax.set_title(f"{n} thread{'s' if n > 1 else ''}")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (28 B per fp32 param)")
    axes[0][-1].legend(fontsize=8, loc="best")
    meta = report["meta"]
    fig.suptitle(f"fp32 AdamW step, cpuadam {meta['cpuadam']} ({meta['isa_selected']}), {meta['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def _parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cpuadam.bench",
        description="Time cpuadam's fp32 AdamW step against torch.optim, DeepSpeedCPUAdam, NumPy and a "
                    "memory-roofline proxy, interleaved in one process.",
        epilog=LEGEND)
    parser.add_argument("--quick", action="store_true",
                        help=f"about 30 s: workloads {','.join(QUICK_SIZES)}, fewer rounds")
    parser.add_argument("--sizes", metavar="LIST",
                        help="comma-separated workloads: SIZE (one tensor: 4096, 64k, 16M; M = 2**20), "
                             "COUNTxSIZE (4096x4096), gpt2; append :amsgrad for AMSGrad, :each for one optimizer per tensor "
                             f"(default {','.join(DEFAULT_SIZES)})")
    parser.add_argument("--threads", metavar="LIST", type=_parse_threads, default=None,
                        help="comma-separated thread counts; 'all' = every available CPU, "
                             "'pow2' = 1, 2, 4, ... and all (default 1,all)")
    parser.add_argument("--impls", metavar="LIST",
                        help="comma-separated implementations (default all available but the "
                             f"opt-in {','.join(_OPT_IN_IMPLS)}): {','.join(_IMPL_BY_KEY)}")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed interleaved steps per implementation (default 15; 6 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; 1 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="write the full report (every time measured) as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="draw GB/s vs size per implementation (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--scaling", action="store_true", help="also print a thread-scaling table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        specs = args.sizes.split(",") if args.sizes else QUICK_SIZES if args.quick else DEFAULT_SIZES
        names = list(dict.fromkeys(s.strip() for s in specs if s.strip()))
        args.workloads = [parse_workload(s) for s in names]
    except ValueError as exc:
        parser.error(str(exc))
    if not args.workloads:
        parser.error("--sizes names no workload")
    args.threads = args.threads or _parse_threads("1,all")
    args.impls = ([k.strip() for k in args.impls.split(",") if k.strip()] if args.impls
                  else [k for k in _IMPL_BY_KEY if k not in _OPT_IN_IMPLS])
    unknown = [k for k in args.impls if k not in _IMPL_BY_KEY]
    if unknown:
        parser.error(f"unknown implementation(s) {', '.join(unknown)}; choose from {', '.join(_IMPL_BY_KEY)}")
    args.rounds = args.rounds if args.rounds is not None else 6 if args.quick else 15
    args.warmup = args.warmup if args.warmup is not None else 1 if args.quick else 3
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark from command-line arguments, prints the tables, returns the report."""
    args = _parse_args(argv)
    config = {"threads": args.threads, "rounds": args.rounds, "warmup": args.warmup}
    for line in header_lines(machine_info(), config):
        print(line)
    print(flush=True)
    report = run(args.workloads, args.threads, args.impls, rounds=args.rounds, warmup=args.warmup,
                 progress=not args.no_progress)
    report["meta"]["argv"] = list(sys.argv[1:] if argv is None else argv)
    print_report(report, markdown=args.markdown, scaling=args.scaling)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.plot:
        try:
            plot(report, args.plot)
        except ImportError:
            print(f"--plot: matplotlib is not installed (pip install 'cpuadam[bench]'); {args.plot} not written",
                  file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
