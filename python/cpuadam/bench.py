# SPDX-License-Identifier: MIT
"""``python -m cpuadam.bench``: cpuadam's AdamW step against its peers and a roofline proxy, interleaved.

An fp32 AdamW step reads param, grad, exp_avg and exp_avg_sq and writes param,
exp_avg and exp_avg_sq back: 28 bytes per parameter (36 with AMSGrad, which
also reads and writes max_exp_avg_sq). No implementation can beat those bytes
divided by the memory bandwidth, so next to the optimizers the benchmark times
``cpuadam._core.stream_pass``, a minimal pass with the same access pattern
(read four buffers, write three in place), on the same buffers and in the same
rounds. "% of roofline" is an implementation's GB/s over the proxy's GB/s taken
in the same minute; on shared or frequency-scaled machines only such ratios
travel well, not the absolute times.

Every workload has a precision, named by a suffix (``16M:bf16``, see
:func:`parse_workload`): float32 (the default), bfloat16 params and grads with
bfloat16 or float32 moments, and 8-bit block-wise moments with float32 or
bfloat16 params. Each moves its own bytes per param (``Workload.bytes_per_param``:
14 for ``bf16``, about 16.06 for ``8bit``), and its GB/s and "% of roofline" are
taken over those bytes, so a mode at the memory limit shows about 100% whatever
it moves. The proxy stays the float32 pass: it measures the bandwidth. Beside the
mode's rows, ``cpuadam-fp32`` steps float32 buffers of the same shapes in the same
rounds, so each mode's speed-up over cpuadam's own float32 step is one column.

Every implementation works on the same param, grad and state buffers (the
optimizers are handed the benchmark's state arrays), so a 128M-param workload
holds 2.5 GB of buffers however many implementations run (peak RSS about 4.5 GB
with the NumPy peer's scratch buffer and torch foreach's temporaries); a precision
workload adds its own buffers to the float32 ones (``gpt2:bf16``: 3.5 GB). The
exception is bitsandbytes, whose 8-bit state has its own layout and code maps: it
keeps its own state, as any optimizer does on its first step. Rounds are interleaved:
each round runs one step of every implementation, in an order rotated from
round to round, and the reported time is the median over the timed rounds.

Optional packages: torch (torch.optim peers, ``cpuadam.torch``), ml_dtypes (the
NumPy class on bfloat16 arrays), deepspeed (DeepSpeedCPUAdam), bitsandbytes
(AdamW8bit), rich or tqdm (progress bar; rich also draws the table) and
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
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

import cpuadam
from cpuadam import _core
from cpuadam._engine import QUANT_MAPS, quant_blocks

__all__ = ["IMPLS", "PRECISIONS", "Precision", "Workload", "NumpyAdamW", "gpt2_shapes", "parse_workload",
           "run", "main"]

# One step's hyperparameters: torch.optim.AdamW's defaults.
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 1e-2

# Bytes an fp32 step must move per parameter, and the roofline proxy's pass: read p, g, m, v
# (16), write p, m, v (12). Every precision's count is Precision.bytes_per_step.
BYTES_PER_PARAM = 28

# Under state_dtype="8bit", tensors with fewer elements keep float32 moments. 4096 is the
# default min_8bit_size of cpuadam and of bitsandbytes; the benchmark passes it to both.
MIN_8BIT_SIZE = 4096

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
    # The same core call on float32 buffers of the workload's shapes, in the same rounds:
    # a precision mode's speed-up over cpuadam's own float32 step.
    Impl("cpuadam-fp32", "cpuadam._core.adam_step on float32 buffers of the same shapes", "fp32"),
    Impl("torch-fused", "torch AdamW fused=True", "fused"),
    Impl("torch-foreach", "torch AdamW foreach=True", "foreach"),
    Impl("torch-forloop", "torch AdamW default (for-loop)", "forloop"),
    Impl("deepspeed", "DeepSpeedCPUAdam", "ds"),
    Impl("bitsandbytes", "bitsandbytes AdamW8bit", "bnb"),
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
_TORCH_IMPLS = ("cpuadam.torch", "torch-fused", "torch-foreach", "torch-forloop", "deepspeed", "bitsandbytes")


# --------------------------------------------------------------------------- workloads

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "8bit": 1}


@dataclass(frozen=True)
class Precision:
    """How a workload stores its params and grads (one dtype) and its moments."""

    name: str  # the workload suffix
    param_dtype: str  # params and grads: "float32" or "bfloat16"
    state_dtype: str  # exp_avg, exp_avg_sq, max_exp_avg_sq: "float32", "bfloat16" or "8bit"
    arrangement: str

    def state_dtype_of(self, numel: int) -> str:
        """The moments' dtype in a tensor of numel elements: 8-bit ones stay float32 when small."""
        if self.state_dtype == "8bit" and numel < MIN_8BIT_SIZE:
            return "float32"
        return self.state_dtype

    def bytes_per_step(self, numel: int, moments: int = 2) -> int:
        """Bytes one step moves over a tensor: param read and written, grad read, each moment
        read and written; an 8-bit moment as its codes plus one float32 absmax per block."""
        state = self.state_dtype_of(numel)
        moved = numel * (3 * _ITEMSIZE[self.param_dtype] + 2 * moments * _ITEMSIZE[state])
        if state == "8bit":
            moved += 2 * moments * 4 * quant_blocks(numel)
        return moved

    def bytes_per_param(self, amsgrad: bool = False) -> float:
        """Bytes per param of a large tensor (a whole number of 8-bit blocks): 28 for fp32,
        14 for bf16, 22 for bf16-fp32, 16.0625 for 8bit, 10.0625 for bf16-8bit."""
        numel = 1 << 20
        return self.bytes_per_step(numel, 3 if amsgrad else 2) / numel


PRECISIONS = {p.name: p for p in (
    Precision("fp32", "float32", "float32", "float32 params, grads and moments"),
    Precision("bf16", "bfloat16", "bfloat16",
              "bfloat16 params, grads and moments (torch.optim's arrangement for a bfloat16 model)"),
    Precision("bf16-fp32", "bfloat16", "float32",
              "bfloat16 params and grads, float32 moments (DeepSpeedCPUAdam's for bfloat16 params)"),
    Precision("8bit", "float32", "8bit",
              "float32 params and grads, 8-bit block-wise moments (bitsandbytes' AdamW8bit)"),
    Precision("bf16-8bit", "bfloat16", "8bit", "bfloat16 params and grads, 8-bit block-wise moments"),
)}
FP32 = PRECISIONS["fp32"]


@dataclass(frozen=True)
class Workload:
    """A list of parameter shapes stepped together as one param group, in one precision."""

    name: str
    shapes: tuple
    amsgrad: bool = False
    # One optimizer per tensor, as offload frameworks build them (torchao's
    # CPUOffloadOptimizer, Megatron's HybridDeviceOptimizer): a step is one call each.
    each: bool = False
    precision: Precision = FP32

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def moment_keys(self) -> tuple:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if self.amsgrad else ("exp_avg", "exp_avg_sq")

    @property
    def bytes_per_step(self) -> int:
        moments = len(self.moment_keys)
        return sum(self.precision.bytes_per_step(math.prod(s), moments) for s in self.shapes)

    @property
    def bytes_per_param(self) -> float:
        """Bytes a step moves per param in this precision (small 8-bit tensors at float32's)."""
        return self.bytes_per_step / self.n_params

    def as_fp32(self) -> "Workload":
        """The same shapes and variants with float32 buffers."""
        return replace(self, precision=FP32)


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
_VARIANTS = ("amsgrad", "each")


def _parse_count(text: str) -> int:
    text = text.strip().lower()
    digits = text.rstrip("kmg")
    suffix = text[len(digits):]
    if not digits.isdigit() or suffix not in _SIZE_SUFFIXES:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4096, 64k, 16M)")
    return int(digits) * _SIZE_SUFFIXES[suffix]


def parse_workload(spec: str) -> Workload:
    """Parses a workload name, ``BASE[:SUFFIX]...``.

    BASE: ``SIZE`` is one tensor (``1M`` = 2**20 params, ``64k``, ``4096``);
    ``COUNTxSIZE`` is COUNT tensors of SIZE params each (``4096x4096``); ``gpt2``
    is :func:`gpt2_shapes`. Suffixes, in any order, each kind at most once: a
    precision from :data:`PRECISIONS` (``fp32``, the default; ``bf16``,
    ``bf16-fp32``, ``8bit``, ``bf16-8bit``), ``amsgrad`` to turn AMSGrad on, and
    ``each`` to build one optimizer per tensor and step them one after another.
    For example ``gpt2:bf16``, ``16M:8bit:amsgrad``, ``1000x4096:bf16:each``.
    """
    name = spec.strip()
    base, *suffixes = name.split(":")
    precision, variants = None, set()
    for suffix in suffixes:
        word = suffix.strip().lower()
        if word in PRECISIONS:
            if precision is not None:
                raise ValueError(f"workload {spec!r} names two precisions ({precision.name!r} and {word!r})")
            precision = PRECISIONS[word]
        elif word in _VARIANTS:
            if word in variants:
                raise ValueError(f"workload {spec!r} names ':{word}' twice")
            variants.add(word)
        else:
            raise ValueError(f"unknown workload suffix {suffix!r} in {spec!r} (a precision: "
                             f"{', '.join(PRECISIONS)}; or amsgrad, each)")
    if base.lower() == "gpt2":
        shapes = gpt2_shapes()
    elif "x" in base.lower():
        count, _, size = base.lower().partition("x")
        shapes = ((_parse_count(size),),) * _parse_count(count)
    else:
        shapes = ((_parse_count(base),),)
    if not shapes or any(math.prod(s) == 0 for s in shapes):
        raise ValueError(f"workload {spec!r} has no parameters")
    return Workload(name, shapes, amsgrad="amsgrad" in variants, each="each" in variants,
                    precision=precision or FP32)


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bits, rounded to nearest even (the values here are finite)."""
    bits = x.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _numpy_view(a: np.ndarray) -> np.ndarray:
    """The array as the NumPy class takes it: bfloat16 bits as ml_dtypes.bfloat16 (no copy)."""
    if a.dtype == np.uint16:
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16)
    return a


def _torch_view(a: np.ndarray):
    """The array as a zero-copy tensor: bfloat16 bits as torch.bfloat16."""
    import torch

    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class Buffers:
    """The param, grad and state arrays every implementation steps in turn.

    They hold the workload's precision: bfloat16 as raw bits (uint16), which the
    core takes as they are, the NumPy class as ml_dtypes.bfloat16 and torch as
    torch.bfloat16, all without a copy; an 8-bit moment as uint8 codes beside one
    float32 absmax per block of 256 (``absmaxs[key][i]``, None for a tensor under
    MIN_8BIT_SIZE, whose moments stay float32 as the optimizers keep them). ``fp32``
    holds float32 buffers of the same shapes and starting values (the workload's
    own when it is float32): the cpuadam-fp32 row steps them and the roofline
    proxy reads them.

    Pages are written here (``fill``, not ``np.zeros``, whose untouched pages
    all map the kernel's one zero page and would make the first reads look
    cache-resident). Adam keeps exp_avg_sq non-negative whichever
    implementation updates it, so sharing the state keeps every step finite.
    Every array starts on a 64-byte line, as torch's allocator places tensors
    (NumPy's own arrays start 16 bytes into one), so no peer pays for vectors
    that straddle two lines.
    """

    def __init__(self, workload: Workload, seed: int = 0):
        self.workload = workload
        precision = workload.precision
        if precision is FP32:
            rng = np.random.default_rng(seed)
            self.fp32 = self
            self.params = [self._normal(rng, s, 0.02) for s in workload.shapes]
            self.grads = [self._normal(rng, s, 1.0) for s in workload.shapes]
            # The roofline proxy adds its grads to three buffers; zeros leave them as they are.
            self.zero_grads = [self._zeros(s, np.float32) for s in workload.shapes]
        else:
            self.fp32 = Buffers(workload.as_fp32(), seed)
            self.params = [self._converted(p, precision.param_dtype) for p in self.fp32.params]
            self.grads = [self._converted(g, precision.param_dtype) for g in self.fp32.grads]
            self.zero_grads = []
        self.state_dtypes = [precision.state_dtype_of(math.prod(s)) for s in workload.shapes]
        storage = {"float32": np.float32, "bfloat16": np.uint16, "8bit": np.uint8}
        self.moments = {key: [self._zeros(s, storage[d]) for s, d in zip(workload.shapes, self.state_dtypes)]
                        for key in workload.moment_keys}
        self.absmaxs = {key: [self._zeros((quant_blocks(math.prod(s)),), np.float32) if d == "8bit" else None
                              for s, d in zip(workload.shapes, self.state_dtypes)]
                        for key in workload.moment_keys}
        self._torch_params = None

    @property
    def exp_avgs(self) -> list:
        return self.moments["exp_avg"]

    @property
    def exp_avg_sqs(self) -> list:
        return self.moments["exp_avg_sq"]

    @property
    def max_exp_avg_sqs(self) -> list:
        return self.moments.get("max_exp_avg_sq", [])

    @staticmethod
    def nbytes(workload: Workload) -> int:
        """What Buffers(workload) allocates, float32 twin included."""
        n, moments = workload.n_params, len(workload.moment_keys)
        total = 4 * n * (3 + moments)  # param, grad, zero grad and moments
        precision = workload.precision
        if precision is not FP32:
            for shape in workload.shapes:
                numel = math.prod(shape)
                state = precision.state_dtype_of(numel)
                total += 2 * numel * _ITEMSIZE[precision.param_dtype] + moments * numel * _ITEMSIZE[state]
                total += moments * 4 * quant_blocks(numel) if state == "8bit" else 0
        return total

    @staticmethod
    def _empty(shape: tuple, dtype=np.float32) -> np.ndarray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        raw = np.empty(nbytes + 64, dtype=np.uint8)
        start = -raw.__array_interface__["data"][0] % 64
        return raw[start:start + nbytes].view(dtype).reshape(shape)

    @classmethod
    def _normal(cls, rng: np.random.Generator, shape: tuple, scale: float) -> np.ndarray:
        a = cls._empty(shape)
        rng.standard_normal(dtype=np.float32, out=a)
        a *= scale
        return a

    @classmethod
    def _zeros(cls, shape: tuple, dtype) -> np.ndarray:
        a = cls._empty(shape, dtype)
        a.fill(0)
        return a

    @classmethod
    def _converted(cls, a: np.ndarray, dtype: str) -> np.ndarray:
        out = cls._empty(a.shape, np.float32 if dtype == "float32" else np.uint16)
        out[...] = a if dtype == "float32" else _bfloat16_bits(a)
        return out

    def state(self, i: int, view: Callable) -> dict:
        """Tensor i's moments as an optimizer's state entries (8-bit: codes, absmax and map)."""
        out = {}
        for key, arrays in self.moments.items():
            out[key] = view(arrays[i])
            if self.absmaxs[key][i] is not None:
                out[key + "_absmax"] = view(self.absmaxs[key][i])
                out[key + "_qmap"] = view(_core.qmap(QUANT_MAPS[key]))
        return out

    def torch_params(self) -> list:
        """Zero-copy torch views of the params, each with its grad attached (made once)."""
        if self._torch_params is None:
            params = []
            for p, g in zip(self.params, self.grads):
                t = _torch_view(p).requires_grad_()
                t.grad = _torch_view(g)
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
        elif key == "bitsandbytes":
            try:
                importlib.import_module("bitsandbytes").optim.AdamW8bit  # noqa: B018
            except Exception as exc:
                reason = f"bitsandbytes is not importable ({type(exc).__name__}: {exc})"
        reasons[key] = reason
    return reasons


def _unsupported(key: str, workload: Workload) -> str | None:
    """Why an implementation cannot step a workload as it is arranged, or None."""
    precision = workload.precision
    if key == "cpuadam-fp32" and precision is FP32:
        return "the workload is float32 (its cpuadam._core row is this step)"
    if key == "numpy" and precision is not FP32:
        return "the NumPy peer steps float32 buffers only"
    if key in _CLASS_FEATURES and precision.param_dtype == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            return "bfloat16 NumPy arrays need ml_dtypes (pip install 'cpuadam[bf16]')"
    if key.startswith("torch-"):
        if precision.state_dtype == "8bit":
            return "torch.optim has no 8-bit moments"
        if precision.state_dtype != precision.param_dtype:
            return "torch.optim keeps the moments in the param's dtype"
    if key == "deepspeed":
        if precision.state_dtype != "float32":
            return ("DeepSpeedCPUAdam keeps float32 moments for bfloat16 params (the bf16-fp32 workload)"
                    if precision.state_dtype == "bfloat16" else "DeepSpeedCPUAdam has no 8-bit moments")
        if workload.amsgrad:
            return "DeepSpeedCPUAdam does not implement AMSGrad"
        if workload.each:
            return "DeepSpeedCPUAdam runs py-cpuinfo in each constructor (seconds)"
    if key == "bitsandbytes":
        if precision.state_dtype != "8bit":
            return "bitsandbytes is timed on 8-bit workloads (its AdamW8bit) only"
        if workload.amsgrad:
            return "AdamW8bit does not support AMSGrad"
    return None


def _each(make: Callable[[list, int], Callable[[], None]], n: int) -> Callable[[], None]:
    """One optimizer per tensor: make(indices, i) builds the one for tensor i."""
    steps = [make([i], i) for i in range(n)]

    def step_all() -> None:
        for step in steps:
            step()
    return step_all


def _prepare(key: str, bufs: Buffers) -> Callable[[], None]:
    """Builds one implementation over the shared buffers; returns its zero-argument step."""
    reason = _unsupported(key, bufs.workload)
    if reason:
        raise _Unsupported(reason)
    if bufs.workload.each and key not in ("numpy", "roofline"):
        return _each(lambda idx, i: _prepare_one(key, bufs, idx), len(bufs.params))
    return _prepare_one(key, bufs, list(range(len(bufs.params))))


def _core_step(bufs: Buffers, idx: list) -> Callable[[], None]:
    """cpuadam._core.adam_step over the tensors idx, its batches built once: one batch per
    moment dtype, since an 8-bit workload's small tensors keep float32 moments."""
    workload, precision = bufs.workload, bufs.workload.precision
    members: dict = {}
    for k, i in enumerate(idx):
        members.setdefault(bufs.state_dtypes[i], []).append((k, i))
    batches = []
    for state_dtype, pairs in members.items():
        batch = {"params": [bufs.params[i] for _, i in pairs], "grads": [bufs.grads[i] for _, i in pairs],
                 "step": 0, "lr": LR, "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS,
                 "weight_decay": WEIGHT_DECAY, "amsgrad": workload.amsgrad, "maximize": False,
                 "decoupled": True, "decay_mode": "lr", "eps_mode": "torch", "group": 0,
                 "indices": [k for k, _ in pairs],
                 "param_dtype": precision.param_dtype, "grad_dtype": precision.param_dtype,
                 "state_dtype": state_dtype}
        for key in workload.moment_keys:
            batch[key + "s"] = [bufs.moments[key][i] for _, i in pairs]
            if state_dtype == "8bit":
                batch[key + "_absmaxs"] = [bufs.absmaxs[key][i] for _, i in pairs]
        batches.append(batch)

    def core_step() -> None:
        for batch in batches:
            batch["step"] += 1
        _core.adam_step(batches)
    return core_step


def _prepare_one(key: str, bufs: Buffers, idx: list) -> Callable[[], None]:
    """One optimizer over the tensors idx of the shared buffers; returns its step."""
    workload = bufs.workload
    amsgrad, precision = workload.amsgrad, workload.precision
    if key in _CLASS_FEATURES:
        features = _CLASS_FEATURES[key]
        opt = cpuadam.AdamW([_numpy_view(bufs.params[i]) for i in idx], lr=LR, betas=BETAS, eps=EPS,
                            weight_decay=WEIGHT_DECAY, amsgrad=amsgrad, state_dtype=precision.state_dtype,
                            min_8bit_size=MIN_8BIT_SIZE, **features)
        for k, i in enumerate(idx):
            state = {"step": 0, **bufs.state(i, _numpy_view)}
            if features.get("use_ema"):
                state["ema"] = _numpy_view(bufs.params[i]).astype(np.float32)
            opt.state[k] = state
        grads = [_numpy_view(bufs.grads[i]) for i in idx]
        return lambda: opt.step(grads)
    if key == "cpuadam._core":
        return _core_step(bufs, idx)
    if key == "cpuadam-fp32":
        return _core_step(bufs.fp32, idx)
    if key == "numpy":
        opt = NumpyAdamW(bufs.params, bufs.exp_avgs, bufs.exp_avg_sqs, bufs.max_exp_avg_sqs,
                         amsgrad=amsgrad)
        grads = bufs.grads
        return lambda: opt.step(grads)
    if key == "roofline":
        fp32 = bufs.fp32
        args = (fp32.params, fp32.zero_grads, fp32.exp_avgs, fp32.exp_avg_sqs)
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
            opt.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32), **bufs.state(i, _torch_view)}
        return opt.step
    if key == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        # Given float32 moments it steps bfloat16 params as it does its own (fp32_optimizer_states).
        opt = DeepSpeedCPUAdam(params, adamw_mode=True, **hyper)
        for i, p in zip(idx, params):
            opt.state[p] = {"step": 0, **bufs.state(i, _torch_view)}
        return opt.step
    if key == "bitsandbytes":
        import bitsandbytes

        # Its codes, absmax and code maps have their own layout: it makes its state on its first step.
        opt = bitsandbytes.optim.AdamW8bit(params, min_8bit_size=MIN_8BIT_SIZE, **hyper)
        return opt.step
    if key == "cpuadam.torch":
        # Its state has torch.optim's layout, so it takes the shared buffers too.
        opt = importlib.import_module("cpuadam.torch").AdamW(
            params, amsgrad=amsgrad, state_dtype=precision.state_dtype, min_8bit_size=MIN_8BIT_SIZE, **hyper)
        for i, p in zip(idx, params):
            opt.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32), **bufs.state(i, _torch_view)}
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


def _bytes_moved(workload: Workload, key: str) -> int:
    """Bytes one step of implementation key moves on the workload."""
    if key == "roofline":
        # The proxy is the float32 pass of 28 B/param, whatever the workload's step moves.
        return BYTES_PER_PARAM * workload.n_params
    if key == "cpuadam-fp32":
        return workload.as_fp32().bytes_per_step
    return workload.bytes_per_step


def _row(workload: Workload, threads: int, key: str, times: list) -> dict:
    median = statistics.median(times)
    moved = _bytes_moved(workload, key)
    return {
        "workload": workload.name, "threads": threads, "impl": key, "label": _IMPL_BY_KEY[key].label,
        "precision": workload.precision.name, "n_params": workload.n_params,
        "n_tensors": workload.n_tensors, "amsgrad": workload.amsgrad,
        "bytes_per_step": moved, "bytes_per_param": moved / workload.n_params,
        "times_s": times, "median_s": median, "min_s": min(times),
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
            bar.describe(f"{workload.name}: allocating {Buffers.nbytes(workload) / 2**20:,.0f} MiB")
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
                       "amsgrad": w.amsgrad, "each": w.each, "precision": w.precision.name,
                       "bytes_per_param": w.bytes_per_param} for w in workloads],
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
                      and s["amsgrad"] == row["amsgrad"] and s["precision"] == row["precision"]
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
        "bitsandbytes": _dist_version("bitsandbytes"), "ml_dtypes": _dist_version("ml_dtypes"),
    }


def header_lines(meta: dict, config: dict) -> list:
    forced = "forced by CPUADAM_ISA" if meta["isa_forced"] else "auto"
    peers = ", ".join(f"{name} {meta[name]}" for name in ("torch", "deepspeed", "bitsandbytes", "ml_dtypes")
                      if meta.get(name))
    moved = ", ".join(f"{name} {PRECISIONS[name].bytes_per_param():g} ({PRECISIONS[name].bytes_per_param(True):g})"
                      for name in config.get("precisions", ["fp32"]))
    return [
        f"cpuadam {meta['cpuadam']}: ISA level {meta['isa_selected']} ({forced}; compiled: "
        f"{', '.join(meta['isa_compiled'])}), {meta['openmp']}, {meta['compiler']}",
        f"CPU: {meta['cpu']} ({meta['machine']}), {meta['available_cpus']} CPUs available, "
        f"default threads {meta['default_num_threads']}; threads measured: "
        f"{', '.join(map(str, config['threads']))}",
        f"Python {meta['python']}, NumPy {meta['numpy']}" + (f", {peers}" if peers else "") + f"; {meta['date']}",
        f"AdamW (lr {LR:g}, weight_decay {WEIGHT_DECAY:g}); bytes moved per param (with AMSGrad): {moved}; "
        f"median of {config['rounds']} interleaved steps after {config['warmup']} warm-up",
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


LEGEND = ("ms/step: median; GB/s: bytes the workload's precision must move per param (fp32 28, bf16 14, "
          "bf16-fp32 22, 8bit 16.06, bf16-8bit 10.06; AMSGrad moves a third moment; cpuadam-fp32 and the "
          "roofline proxy move float32 bytes) per second; "
          "% roofline: GB/s over the roofline proxy's GB/s in the same rounds; "
          "vs X: X's time / this row's time (above 1: this row is faster; vs fp32: the speed-up over "
          "cpuadam's float32 step on the same shapes); "
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


def skipped_lines(skipped: list) -> list:
    """One line per implementation, thread count and reason, naming every workload it covers."""
    grouped: dict = {}
    for s in skipped:
        grouped.setdefault((s["impl"], s["threads"], s["reason"]), []).append(s["workload"])
    lines = []
    for (impl, threads, reason), names in grouped.items():
        names = [n for n in names if n]
        lines.append(f"skipped {impl}" + (f" on {', '.join(names)}" if names else "")
                     + (f" at {threads} threads" if threads else "") + f": {reason}")
    return lines


def print_report(report: dict, *, markdown: bool = False, scaling: bool = False, file=None) -> None:
    """Prints the tables: rich on a terminal, aligned text otherwise, or Markdown."""
    file = file or sys.stdout
    headers, rows = table_rows(report)
    sections = _section_tables(report, scaling)
    extras = skipped_lines(report["skipped"])
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
    """GB/s against param count per implementation and precision, one panel per thread count,
    roofline drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = report["config"]["threads"]
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.8), squeeze=False, sharey=True)
    colours = dict(zip(_IMPL_BY_KEY, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    styles = dict(zip(PRECISIONS, ("o-", "s--", "^-.", "D:", "v:")))
    for ax, n in zip(axes[0], threads):
        rows = [r for r in report["rows"] if r["threads"] == n and not r["amsgrad"]]
        # The proxy is the same float32 pass in every precision's rounds: one point per size.
        proxy: dict = {}
        for r in rows:
            if r["impl"] == "roofline":
                proxy.setdefault((r["n_params"], r["n_tensors"] > 1), []).append(r["gbps"])
        single = sorted((x, statistics.mean(v)) for (x, many), v in proxy.items() if not many)
        many = [(x, statistics.mean(v)) for (x, is_many), v in proxy.items() if is_many]
        if single:
            ax.plot(*zip(*single), "k--", lw=2.5, label="roofline proxy", zorder=3)
        if many:
            ax.scatter(*zip(*many), marker="x", s=50, color="k", zorder=3)
        for key in _IMPL_BY_KEY:
            if key in ("roofline", "cpuadam-fp32"):  # the latter is cpuadam._core's fp32 row again
                continue
            for precision in PRECISIONS:
                mine = [r for r in rows if r["impl"] == key and r["precision"] == precision]
                label = key if precision == "fp32" else f"{key} {precision}"
                single = sorted((r for r in mine if r["n_tensors"] == 1), key=lambda r: r["n_params"])
                many = [r for r in mine if r["n_tensors"] > 1]
                if single:
                    ax.plot([r["n_params"] for r in single], [r["gbps"] for r in single], styles[precision],
                            color=colours[key], label=label)
                if many:
                    ax.scatter([r["n_params"] for r in many], [r["gbps"] for r in many], marker="x", s=50,
                               color=colours[key], label=None if single else label)
        for name in sorted({r["workload"] for r in rows if r["n_tensors"] > 1}):
            x = next(r["n_params"] for r in rows if r["workload"] == name)
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
            ax.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        va="top", ha="right", color="0.4")
        ax.set_xscale("log")
        ax.set_xlabel("parameters per step (lines: one tensor; x: many tensors)")
        ax.set_title(f"{n} thread{'s' if n > 1 else ''}")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (bytes each precision moves per param)")
    axes[0][-1].legend(fontsize=8, loc="best")
    meta = report["meta"]
    fig.suptitle(f"AdamW step, cpuadam {meta['cpuadam']} ({meta['isa_selected']}), {meta['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def _cross_precisions(names: list, precisions: list) -> list:
    """Each workload name that names no precision, once per precision (fp32: the name as it is)."""
    unknown = [p for p in precisions if p.lower() not in PRECISIONS]
    if unknown:
        raise ValueError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)}")
    out = []
    for name in names:
        base, *suffixes = name.split(":")
        if any(s.strip().lower() in PRECISIONS for s in suffixes):
            out.append(name)
            continue
        for precision in precisions:
            out.append(name if precision.lower() == "fp32" else ":".join([base, precision.lower(), *suffixes]))
    return out


def _parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cpuadam.bench",
        description="Time cpuadam's AdamW step (float32, bfloat16 and 8-bit storage) against torch.optim, "
                    "DeepSpeedCPUAdam, bitsandbytes, NumPy and a memory-roofline proxy, interleaved in one "
                    "process.",
        epilog=LEGEND)
    parser.add_argument("--quick", action="store_true",
                        help=f"about 30 s: workloads {','.join(QUICK_SIZES)}, fewer rounds")
    parser.add_argument("--sizes", metavar="LIST",
                        help="comma-separated workloads: SIZE (one tensor: 4096, 64k, 16M; M = 2**20), "
                             "COUNTxSIZE (4096x4096), gpt2; then any of :PRECISION (" + ", ".join(PRECISIONS)
                             + "; default fp32), :amsgrad for AMSGrad, :each for one optimizer per tensor, "
                             f"e.g. gpt2:bf16, 16M:8bit:amsgrad (default {','.join(DEFAULT_SIZES)})")
    parser.add_argument("--precisions", metavar="LIST",
                        help="comma-separated precisions (" + "; ".join(f"{p.name}: {p.arrangement}"
                                                                        for p in PRECISIONS.values())
                             + "): each workload that names none runs once in each")
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
        names = [s.strip() for s in specs if s.strip()]
        if args.precisions:
            names = _cross_precisions(names, [p.strip() for p in args.precisions.split(",") if p.strip()])
        args.workloads = [parse_workload(s) for s in dict.fromkeys(names)]
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
    config = {"threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
              "precisions": list(dict.fromkeys(w.precision.name for w in args.workloads))}
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
