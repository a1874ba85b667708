# SPDX-License-Identifier: MIT
# Type stubs for the compiled module cpuadam._core (kept in step with cpp/bindings.cpp).
from typing import Any, Sequence, TypedDict

import numpy as np

__version__: str

class _Batch(TypedDict, total=False):
    params: Sequence[np.ndarray]
    grads: Sequence[np.ndarray]
    exp_avgs: Sequence[np.ndarray]
    exp_avg_sqs: Sequence[np.ndarray]
    max_exp_avg_sqs: Sequence[np.ndarray]
    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled: bool
    decay_mode: str
    eps_mode: str
    grad_scale: float
    group: int
    indices: Sequence[int]

def adam_step(batches: Sequence[_Batch]) -> None: ...
def stream_pass(
    params: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    exp_avgs: Sequence[np.ndarray],
    exp_avg_sqs: Sequence[np.ndarray],
) -> None: ...
def build_info() -> dict[str, Any]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
