# SPDX-License-Identifier: MIT
"""Trains a small byte-level language model with cpuadam.torch.AdamW and with torch.optim.AdamW.

The model reads the previous CONTEXT bytes of Python's own standard-library
source and predicts the next one: an embedding, two hidden layers with
LayerNorm, an output layer. Each optimizer starts from the same weights, sees
the same batches and the same warmup-then-cosine schedule (a LambdaLR), so the
losses should agree to rounding; what differs is the time an optimizer step
takes, printed next to the loss.

    python examples/torch_train.py                 # about half a minute on 2 cores
    python examples/torch_train.py --hidden 2048   # a larger parameter list
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import cpuadam
import cpuadam.torch

CONTEXT = 16


def corpus(limit: int = 1 << 20) -> torch.Tensor:
    """Up to `limit` bytes of stdlib source: real text that ships with every Python."""
    chunks, size = [], 0
    for name in ("argparse", "inspect", "json/decoder", "json/encoder", "statistics", "typing",
                 "dataclasses", "pathlib", "textwrap", "string", "functools", "enum"):
        path = os.path.join(os.path.dirname(os.__file__), name + ".py")
        if not os.path.exists(path):
            path = os.path.join(os.path.dirname(os.__file__), name, "__init__.py")
        if os.path.exists(path):
            with open(path, "rb") as f:
                chunks.append(f.read())
                size += len(chunks[-1])
        if size >= limit:
            break
    data = b"".join(chunks)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class ByteMLP(torch.nn.Module):
    def __init__(self, hidden: int, dim: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(256, dim)
        self.fc1 = torch.nn.Linear(CONTEXT * dim, hidden)
        self.norm1 = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.norm2 = torch.nn.LayerNorm(hidden)
        self.out = torch.nn.Linear(hidden, 256)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        h = self.embed(context).flatten(1)
        h = F.gelu(self.norm1(self.fc1(h)))
        h = h + F.gelu(self.norm2(self.fc2(h)))
        return self.out(h)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def train(optimizers: dict, data: torch.Tensor, args) -> dict:
    """Trains one model per optimizer, in lockstep, so that a busy machine slows all alike."""
    runs = {}
    for label, make_optimizer in optimizers.items():
        torch.manual_seed(0)
        model = ByteMLP(args.hidden)
        opt = make_optimizer(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps // 10, args.steps))
        runs[label] = (model, opt, sched, [], [])
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (args.batch,), generator=gen)
        window = data[starts[:, None] + torch.arange(CONTEXT + 1)]
        for model, opt, sched, losses, step_ms in runs.values():
            loss = F.cross_entropy(model(window[:, :-1]), window[:, -1])
            opt.zero_grad()
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
            sched.step()
            losses.append(loss.item())
    return {label: (run[3], run[4]) for label, run in runs.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and cpuadam (default: their own defaults)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        cpuadam.set_num_threads(args.threads)

    data = corpus()
    n_params = sum(p.numel() for p in ByteMLP(args.hidden).parameters())
    info = cpuadam.build_info()
    print(f"model: {n_params / 1e6:.2f}M params in {len(list(ByteMLP(args.hidden).parameters()))} "
          f"tensors; corpus {len(data) / 1e3:.0f} kB; {args.steps} steps of batch {args.batch}")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); cpuadam "
          f"{info['version']} ({info['isa_selected']}, {info['num_threads']} threads)")

    hp = {"lr": args.lr, "weight_decay": 0.01}
    optimizers = {
        "cpuadam.torch.AdamW": lambda ps: cpuadam.torch.AdamW(ps, **hp),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **hp),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **hp),
        "torch AdamW for-loop": lambda ps: torch.optim.AdamW(ps, foreach=False, **hp),
    }
    results = train(optimizers, data, args)

    every = max(1, args.steps // 5)
    labels = list(results)
    print("\nloss (mean over the last steps)")
    print(f"{'step':>6}  " + "  ".join(f"{label:>22}" for label in labels))
    for end in range(every, args.steps + 1, every):
        row = [statistics.fmean(results[label][0][end - every:end]) for label in labels]
        print(f"{end:>6}  " + "  ".join(f"{value:>22.4f}" for value in row))

    print("\noptimizer step, ms (median over steps after the first 5; lower is better)")
    base = statistics.median(results[labels[0]][1][5:])
    for label in labels:
        ms = statistics.median(results[label][1][5:])
        print(f"  {label:<22} {ms:8.2f} ms   {ms / base:5.2f}x cpuadam's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
