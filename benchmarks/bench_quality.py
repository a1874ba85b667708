# SPDX-License-Identifier: MIT
"""Training quality of each precision mode: one small model, fixed seeds and data, final losses.

A teacher network labels random inputs; a student MLP learns it with cpuadam.torch.AdamW in
float32 and in each bfloat16 arrangement (and 8-bit states where the build has them). The
table gives the final training loss (mean of the last 100 steps) per mode and seed, and the
spread of the float32 runs across seeds, the yardstick for "as good as float32".

    python benchmarks/bench_quality.py [--steps 3000] [--seeds 3] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import cpuadam.torch as ct

# (label, param dtype, optimizer options)
MODES = [
    ("float32", torch.float32, {}),
    ("bf16 params, bf16 moments, nearest (torch's arrangement)", torch.bfloat16,
     {"state_dtype": "bfloat16"}),
    ("bf16 params, fp32 moments, nearest", torch.bfloat16, {"state_dtype": "float32"}),
    ("bf16 params, bf16 moments, stochastic", torch.bfloat16,
     {"state_dtype": "bfloat16", "param_update": "stochastic"}),
    ("bf16 params, bf16 moments, kahan", torch.bfloat16,
     {"state_dtype": "bfloat16", "param_update": "kahan"}),
    ("bf16 params, bf16 moments, master", torch.bfloat16,
     {"state_dtype": "bfloat16", "param_update": "master"}),
    ("bf16 params, fp32 moments, master", torch.bfloat16,
     {"state_dtype": "float32", "param_update": "master"}),
]
EIGHT_BIT = [
    ("fp32 params, 8-bit moments", torch.float32, {"state_dtype": "8bit", "min_8bit_size": 1}),
    ("bf16 params, 8-bit moments, stochastic", torch.bfloat16,
     {"state_dtype": "8bit", "param_update": "stochastic", "min_8bit_size": 1}),
]


def make_data(seed: int, n: int = 8192, d_in: int = 32, d_out: int = 8):
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher = [torch.randn(d_in, 64, generator=gen) / d_in**0.5,
               torch.randn(64, d_out, generator=gen) / 8.0]
    x = torch.randn(n, d_in, generator=gen)
    y = torch.tanh(x @ teacher[0]) @ teacher[1]
    return x, y


def train(dtype, options: dict, seed: int, steps: int, lr: float = 3e-4) -> float:
    x, y = make_data(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 8)).to(dtype)
    opt = ct.AdamW(model.parameters(), lr=lr, weight_decay=0.0, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        out = model(x[idx].to(dtype)).float()
        loss = torch.nn.functional.mse_loss(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return statistics.fmean(losses[-100:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    modes = list(MODES)
    try:
        ct.AdamW([torch.nn.Parameter(torch.zeros(8))], state_dtype="8bit")
        modes += EIGHT_BIT
    except (TypeError, ValueError):
        pass
    seeds = list(range(args.seeds))
    rows = []
    for label, dtype, options in modes:
        t0 = time.perf_counter()
        finals = [train(dtype, options, s, args.steps) for s in seeds]
        rows.append((label, finals, time.perf_counter() - t0))
    fp32 = rows[0][1]
    spread = max(fp32) - min(fp32)
    head = ["mode"] + [f"seed {s}" for s in seeds] + ["mean", "mean / fp32 mean"]
    print(f"final training loss (mean of the last 100 of {args.steps} steps); float32 spread "
          f"across seeds: {spread:.3e}")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
    for label, finals, _ in rows:
        mean = statistics.fmean(finals)
        cells = [label] + [f"{v:.4e}" for v in finals] + [f"{mean:.4e}",
                                                          f"{mean / statistics.fmean(fp32):.3f}"]
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))


if __name__ == "__main__":
    main()
