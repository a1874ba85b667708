# SPDX-License-Identifier: MIT
"""cpuadam: fast, exact Adam/AdamW optimizer steps for CPUs."""

from cpuadam._core import __version__, build_info, get_num_threads, set_num_threads
from cpuadam.optim import Adam, AdamW

__all__ = ["Adam", "AdamW", "__version__", "build_info", "get_num_threads", "set_num_threads"]
