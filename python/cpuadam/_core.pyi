# SPDX-License-Identifier: MIT
# Type stubs for the compiled module cpuadam._core (kept in step with cpp/bindings.cpp).
from typing import Any, Sequence, TypedDict

import numpy as np

__version__: str

class _Batch(TypedDict, total=False):
    params: Sequence[np.ndarray]
    grads: Sequence[np.ndarray]
    lr: float
    weight_decay: float
    maximize: bool
    grad_scale: float
    clipnorm: float | None
    clipvalue: float | None
    grad_accums: Sequence[np.ndarray]  # the applying call of gradient accumulation
    emas: Sequence[np.ndarray]
    ema_momentum: float
    group: int
    indices: Sequence[int]
    # Element types: "float32" (default), "bfloat16" (uint16/int16 bits or
    # ml_dtypes.bfloat16 arrays) or "float16"; state_dtype: "float32", "bfloat16",
    # "float16" or "8bit" (uint8 codes with one float32 absmax per 256 elements in
    # the <state>_absmaxs lists). grad_accums, emas and masters are float32 whatever
    # these say.
    param_dtype: str
    grad_dtype: str
    state_dtype: str
    # How a bfloat16/float16 param takes its update: "nearest" (default),
    # "stochastic" (seed, rounding_step, stream_ids), "kahan" (kahan_comps, in
    # param_dtype) or "master" (masters). Ignored for float32 params.
    param_update: str
    # How new 8-bit codes and bfloat16/float16 states are chosen (not for
    # float32 states): "nearest" (default) or "stochastic" (seed, rounding_step,
    # stream_ids).
    state_rounding: str
    masters: Sequence[np.ndarray]
    kahan_comps: Sequence[np.ndarray]
    seed: int  # in [0, 2**31)
    rounding_step: int  # >= 0
    stream_ids: Sequence[int]  # one per tensor, >= 0

class _AdamBatch(_Batch, total=False):
    exp_avgs: Sequence[np.ndarray]
    exp_avg_sqs: Sequence[np.ndarray]
    max_exp_avg_sqs: Sequence[np.ndarray]
    exp_avg_absmaxs: Sequence[np.ndarray]  # state_dtype "8bit"
    exp_avg_sq_absmaxs: Sequence[np.ndarray]
    max_exp_avg_sq_absmaxs: Sequence[np.ndarray]
    step: int
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    decoupled: bool
    decay_mode: str
    eps_mode: str
    step_buffers: Sequence[np.ndarray]  # one-element arrays that receive the step count

class _SgdBatch(_Batch, total=False):
    momentum_buffers: Sequence[np.ndarray]
    momentum_buffer_absmaxs: Sequence[np.ndarray]  # state_dtype "8bit"
    momentum: float
    dampening: float
    nesterov: bool
    momentum_first: bool

class _StepResult(TypedDict):
    applied: bool
    finite: bool
    global_norm: float | None

class _AccumulateBatch(TypedDict, total=False):
    grads: Sequence[np.ndarray]
    grad_accums: Sequence[np.ndarray]  # float32
    grad_dtype: str
    group: int
    indices: Sequence[int]

def adam_step(
    batches: Sequence[_AdamBatch], *, global_clipnorm: float | None = None, skip_nonfinite: bool = False
) -> _StepResult: ...
def sgd_step(
    batches: Sequence[_SgdBatch], *, global_clipnorm: float | None = None, skip_nonfinite: bool = False
) -> _StepResult: ...
def accumulate(batches: Sequence[_AccumulateBatch]) -> None: ...
def sum_squares(grads: Sequence[np.ndarray], *, grad_dtype: str = "float32") -> list[float]: ...
def stream_pass(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
) -> None: ...
def build_info() -> dict[str, Any]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...

def qmap(map: str) -> np.ndarray: ...
def quantize_blockwise(values: np.ndarray, map: str) -> tuple[np.ndarray, np.ndarray]: ...
def dequantize_blockwise(codes: np.ndarray, absmax: np.ndarray, map: str) -> np.ndarray: ...
