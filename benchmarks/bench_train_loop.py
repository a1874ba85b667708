# SPDX-License-Identifier: MIT
"""A small torch training loop (MLP, 100 steps) with cpuadam.torch.AdamW imported before or after
torch, against torch.optim.AdamW(fused=True): does cpuadam's thread pool slow torch's threads?

Each run is a fresh interpreter (import order is the point); runs of the three setups are
interleaved and the medians reported, with each setup's ratio to torch fused.

Usage: python benchmarks/bench_train_loop.py [--rounds 7] [--steps 100]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

# Runs in the child: argv = setup, steps. Prints the seconds the timed steps took.
CHILD = """
import sys, time
setup, steps = sys.argv[1], int(sys.argv[2])
if setup == "cpuadam_first":
    import cpuadam.torch
    import torch
elif setup == "torch_first":
    import torch
    import cpuadam.torch
else:
    import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
                            torch.nn.ReLU(), torch.nn.Linear(512, 10))
if setup == "torch_fused":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
else:
    opt = cpuadam.torch.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
loss_fn = torch.nn.CrossEntropyLoss()

def step():
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    opt.step()

for _ in range(10):  # warm-up: allocator, thread pools, the optimizer's step plan
    step()
start = time.perf_counter()
for _ in range(steps):
    step()
print(time.perf_counter() - start)
"""

SETUPS = ("torch_fused", "cpuadam_first", "torch_first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {s: [] for s in SETUPS}
    for _ in range(args.rounds):
        for setup in SETUPS:
            out = subprocess.run([sys.executable, "-c", CHILD, setup, str(args.steps)],
                                 capture_output=True, text=True, check=True)
            times[setup].append(float(out.stdout))
    base = statistics.median(times["torch_fused"])
    print(f"{args.steps} steps, median of {args.rounds} interleaved runs")
    print("| setup | median s | min s | max s | ratio to torch fused |")
    print("| --- | --- | --- | --- | --- |")
    for setup in SETUPS:
        t = times[setup]
        print(f"| {setup} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} | "
              f"{statistics.median(t) / base:.3f} |")


if __name__ == "__main__":
    main()
