# SPDX-License-Identifier: MIT
"""A small torch training loop (MLP, 100 steps) with cpuadam.torch.AdamW imported before or after
torch, against torch.optim.AdamW(fused=True): does cpuadam's thread pool slow torch's threads?

Each run is a fresh interpreter (import order is the point); runs of the three setups are
interleaved and the medians reported, with each setup's ratio to torch fused.

Usage: python benchmarks/bench_train_loop.py [--rounds 7] [--steps 100] [--before DIR]
(--before DIR: also time the two cpuadam setups importing cpuadam from DIR, e.g. an older
wheel unpacked there, interleaved with the rest.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

# Runs in the child: argv = setup, steps. Prints the wall and CPU seconds (all threads of
# the process) the timed steps took; CPU seconds show threads spinning against each other
# even when other load on the machine blurs the wall time.
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
start, cpu_start = time.perf_counter(), time.process_time()
for _ in range(steps):
    step()
print(time.perf_counter() - start, time.process_time() - cpu_start)
"""

SETUPS = ("torch_fused", "cpuadam_first", "torch_first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--before", help="a directory to import an older cpuadam from")
    args = parser.parse_args(argv)
    runs = [(setup, setup, None) for setup in SETUPS]
    if args.before:
        runs += [(f"{setup} (before)", setup, args.before) for setup in SETUPS[1:]]
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(args.rounds):
        for name, setup, path in runs:
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
            out = subprocess.run([sys.executable, "-c", CHILD, setup, str(args.steps)], env=env,
                                 capture_output=True, text=True, check=True)
            wall, cpu_s = (float(x) for x in out.stdout.split())
            times[name].append(wall)
            cpu[name].append(cpu_s)
    base = statistics.median(times["torch_fused"])
    print(f"{args.steps} steps, median of {args.rounds} interleaved runs")
    print("| setup | median s | min s | max s | ratio to torch fused | median CPU s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for setup in times:
        t = times[setup]
        print(f"| {setup} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} | "
              f"{statistics.median(t) / base:.3f} | {statistics.median(cpu[setup]):.3f} |")


if __name__ == "__main__":
    main()
