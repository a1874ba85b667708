# SPDX-License-Identifier: MIT
"""8-bit states on a second model: the byte-level language model of examples/torch_train.py.

float32 moments, 8-bit moments with nearest codes and 8-bit moments with stochastic codes
(cpuadam.torch.AdamW, lr 2e-3 with warmup and cosine decay, weight decay 0.01, batch 64),
each seed with its own initial weights and batches, the same in every mode. Prints the final
loss (mean of the last 200 steps) per mode and seed, and the float32 spread across seeds.

    python benchmarks/bench_quality_lm.py [--steps 2000] [--hidden 512] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import cpuadam.torch as ct

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import torch_train as tt  # noqa: E402

MODES = {
    "float32": {},
    "8-bit, nearest codes": {"state_dtype": "8bit"},
    "8-bit, stochastic codes": {"state_dtype": "8bit", "state_rounding": "stochastic"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    data = tt.corpus()
    final: dict[str, list[float]] = {label: [] for label in MODES}
    for seed in range(args.seeds):
        runs = {}
        for label, options in MODES.items():
            torch.manual_seed(seed)
            model = tt.ByteMLP(args.hidden)
            opt = ct.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, **options)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, tt.warmup_cosine(args.steps // 10, args.steps))
            runs[label] = (model, opt, sched, [])
        gen = torch.Generator().manual_seed(100 + seed)
        for _ in range(args.steps):
            starts = torch.randint(0, len(data) - tt.CONTEXT - 1, (64,), generator=gen)
            window = data[starts[:, None] + torch.arange(tt.CONTEXT + 1)]
            for model, opt, sched, losses in runs.values():
                loss = F.cross_entropy(model(window[:, :-1]), window[:, -1])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
        for label, run in runs.items():
            final[label].append(statistics.fmean(run[3][-200:]))
    base = statistics.fmean(final["float32"])
    n_params = sum(p.numel() for p in tt.ByteMLP(args.hidden).parameters())
    print(f"byte-level LM, {n_params / 1e6:.2f}M params, {args.steps} steps; final loss (mean of the "
          f"last 200 steps); float32 spread across seeds: {max(final['float32']) - min(final['float32']):.4f}")
    print("| mode | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean | mean / fp32 mean |")
    print("| --- " * (args.seeds + 3) + "|")
    for label, values in final.items():
        mean = statistics.fmean(values)
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {mean:.4f} | {mean / base:.3f} |")


if __name__ == "__main__":
    main()
