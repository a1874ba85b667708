# SPDX-License-Identifier: MIT
"""Optimizer-state bytes per param, measured: what the first step allocates, per state_dtype and param_update.

The NumPy classes allocate their state on the first step; tracemalloc sees every
NumPy allocation, so the traced growth over that step, divided by the number of
params, is the state the optimizer keeps (nothing else survives the step). With
torch installed the same is measured for cpuadam.torch.AdamW and torch.optim.AdamW
as the bytes of every tensor in `optimizer.state`. Run:

    python benchmarks/bench_memory.py [--params 16M] [--markdown]
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

import numpy as np

import cpuadam

# (label, param dtype, options). bfloat16 params need ml_dtypes.
ARRANGEMENTS = (
    ("float32 params, float32 states", "float32", {"state_dtype": "float32"}),
    ("float32 params, 8-bit states", "float32", {"state_dtype": "8bit"}),
    ("bfloat16 params, float32 states", "bfloat16", {"state_dtype": "float32"}),
    ("bfloat16 params, bfloat16 states", "bfloat16", {"state_dtype": "bfloat16"}),
    ("bfloat16 params, bfloat16 states, stochastic", "bfloat16",
     {"state_dtype": "bfloat16", "param_update": "stochastic"}),
    ("bfloat16 params, bfloat16 states, kahan", "bfloat16",
     {"state_dtype": "bfloat16", "param_update": "kahan"}),
    ("bfloat16 params, bfloat16 states, master", "bfloat16",
     {"state_dtype": "bfloat16", "param_update": "master"}),
    ("bfloat16 params, float32 states, master", "bfloat16",
     {"state_dtype": "float32", "param_update": "master"}),
    ("bfloat16 params, 8-bit states", "bfloat16", {"state_dtype": "8bit"}),
)


def _count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float32


def numpy_state_bytes(n: int, dtype: str, options: dict) -> int:
    """Traced bytes the first step of cpuadam.AdamW leaves allocated (its state)."""
    rng = np.random.default_rng(0)
    param = rng.standard_normal(n, dtype=np.float32).astype(_dtype(dtype))
    grad = (rng.standard_normal(n, dtype=np.float32) * 1e-3).astype(_dtype(dtype))
    opt = cpuadam.AdamW([param], lr=1e-3, **options)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        opt.step([grad])
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return after - before


def torch_state_bytes(n: int, dtype: str, options: dict, peer: bool = False) -> int:
    """Bytes of every tensor in optimizer.state after one step."""
    import torch

    import cpuadam.torch as ct

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    param = torch.randn(n).to(torch_dtype).requires_grad_()
    param.grad = (torch.randn(n) * 1e-3).to(torch_dtype)
    opt = torch.optim.AdamW([param], lr=1e-3) if peer else ct.AdamW([param], lr=1e-3, **options)
    opt.step()
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif isinstance(value, np.ndarray):
                total += value.nbytes
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="16M", help="params in the one tensor (default 16M)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    n = _count(args.params)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    rows = []
    for label, dtype, options in ARRANGEMENTS:
        row = [label, f"{numpy_state_bytes(n, dtype, options) / n:.3f}"]
        if have_torch:
            row.append(f"{torch_state_bytes(n, dtype, options) / n:.3f}")
        rows.append(row)
    if have_torch:
        for dtype in ("float32", "bfloat16"):
            rows.append([f"torch.optim.AdamW, {dtype} params", "-",
                         f"{torch_state_bytes(n, dtype, {}, peer=True) / n:.3f}"])
    headers = ["arrangement", "cpuadam.AdamW (traced)"] + (["optimizer.state bytes"] if have_torch else [])
    print(f"optimizer state, bytes per param, one tensor of {n:,} params")
    if args.markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + " --- |" * len(headers))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        width = max(len(r[0]) for r in rows)
        for row in [headers] + rows:
            print(row[0].ljust(width), *(c.rjust(14) for c in row[1:]))


if __name__ == "__main__":
    main()
