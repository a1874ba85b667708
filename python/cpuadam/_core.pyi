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

class _AdamBatch(_Batch, total=False):
    exp_avgs: Sequence[np.ndarray]
    exp_avg_sqs: Sequence[np.ndarray]
    max_exp_avg_sqs: Sequence[np.ndarray]
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
    grad_accums: Sequence[np.ndarray]
    group: int
    indices: Sequence[int]

def adam_step(
    batches: Sequence[_AdamBatch], *, global_clipnorm: float | None = None, skip_nonfinite: bool = False
) -> _StepResult: ...
def sgd_step(
    batches: Sequence[_SgdBatch], *, global_clipnorm: float | None = None, skip_nonfinite: bool = False
) -> _StepResult: ...
def accumulate(batches: Sequence[_AccumulateBatch]) -> None: ...
def sum_squares(grads: Sequence[np.ndarray]) -> list[float]: ...
def stream_pass(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
) -> None: ...
def build_info() -> dict[str, Any]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
