# SPDX-License-Identifier: MIT
"""Peak memory of training a ~100M-param model: the ordinary loop vs cpuadam.torch.step_in_backward.

Each mode runs in its own fresh interpreter (peak RSS only grows, so the two
must not share a process) and reports its maximum resident set size from
``resource.getrusage``. Both build the same model, run the same steps and end
with the same weights; the difference in peak is what holding every grad at
once costs the ordinary loop.

    python benchmarks/bench_step_in_backward.py            # ~100M params, 3 steps
    python benchmarks/bench_step_in_backward.py --dim 512  # a quick, smaller run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MiB = 1 << 20


def build(vocab: int, dim: int, blocks: int):
    import torch

    torch.manual_seed(0)
    layers = [torch.nn.Embedding(vocab, dim)]
    for _ in range(blocks):
        layers += [torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                   torch.nn.Linear(4 * dim, dim)]
    layers += [torch.nn.LayerNorm(dim), torch.nn.Linear(dim, vocab)]
    return torch.nn.Sequential(*layers)


def child(args) -> None:
    """One mode, in this process; prints a JSON line with its measurements."""
    import torch
    import torch.nn.functional as F

    import cpuadam.torch

    model = build(args.vocab, args.dim, args.blocks)
    n_params = sum(p.numel() for p in model.parameters())
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.mode == "ordinary":
        opt = cpuadam.torch.AdamW(model.parameters(), lr=1e-4)
    else:
        handle = cpuadam.torch.step_in_backward(model, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        del logits
        loss.backward()
        if args.mode == "ordinary":
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.mode != "ordinary":
        handle.remove()
    checksum = sum(p.sum(dtype=torch.float64).item() for p in model.parameters())
    print(json.dumps({
        "mode": args.mode, "params": n_params, "grad_bytes": n_params * 4,
        "rss_after_model": rss_model, "peak_rss": peak,
        "seconds_per_step": seconds, "checksum": checksum,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=["ordinary", "step_in_backward"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return 0

    runs = {}
    for mode in ("ordinary", "step_in_backward"):
        argv = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "mode"]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])

    ordinary, hooked = runs["ordinary"], runs["step_in_backward"]
    drop = ordinary["peak_rss"] - hooked["peak_rss"]
    print(f"model: {ordinary['params'] / 1e6:.1f}M params; grads take "
          f"{ordinary['grad_bytes'] / MiB:.0f} MiB; {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens")
    for mode, run in runs.items():
        print(f"  {mode:<17} peak RSS {run['peak_rss'] / MiB:7.0f} MiB "
              f"(model alone {run['rss_after_model'] / MiB:5.0f} MiB), "
              f"{run['seconds_per_step']:.2f} s/step")
    print(f"  peak drop          {drop / MiB:7.0f} MiB = {drop / ordinary['grad_bytes']:.2f} x "
          "the grads' size")
    same = abs(ordinary["checksum"] - hooked["checksum"]) <= 1e-9 * abs(ordinary["checksum"])
    print(f"  same weights:      {'yes' if same else 'NO'} "
          f"(sum of params {ordinary['checksum']:.6f} vs {hooked['checksum']:.6f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
