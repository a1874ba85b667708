# SPDX-License-Identifier: MIT
"""cpuadam: fast, exact Adam/AdamW optimizer steps for CPUs."""

from cpuadam._core import __version__, build_info, get_num_threads, set_num_threads
from cpuadam import schedules
from cpuadam._engine import dequantize_state, from_bitsandbytes, quantize_state, to_bitsandbytes
from cpuadam.optim import SGD, Adam, AdamW, DynamicLossScale
from cpuadam._threadpoolctl import register as _register_threadpoolctl

_register_threadpoolctl()

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "DynamicLossScale",
    "__version__",
    "build_info",
    "dequantize_state",
    "from_bitsandbytes",
    "get_num_threads",
    "quantize_state",
    "schedules",
    "set_num_threads",
    "to_bitsandbytes",
]
