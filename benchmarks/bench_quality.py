# SPDX-License-Identifier: MIT
"""Training quality of each precision mode: one small model, fixed seeds and data, final losses.

A teacher network labels random inputs; a student MLP learns it with cpuadam.torch.AdamW in
float32 and in each bfloat16 arrangement (and 8-bit states where the build has them, and
bitsandbytes' AdamW8bit where it is installed). The table gives the final training loss (mean of
the last 100 steps) per mode and seed, and the spread of the float32 runs across seeds, the
yardstick for "as good as float32".

    python benchmarks/bench_quality.py [--steps 3000] [--seeds 3] [--markdown]
        [--modes fp32,8bit,bnb-8bit,fp32@4e-4] [--threads 1] [--curve] [--probe]

--modes picks rows by key (listed by --help); KEY@LR runs a row at another lr (float32 at the
default lr always runs first: it is the yardstick). --curve adds the loss at each quarter of the
run. --probe follows every float32-param row with float32 moments fed the same grads (a shadow
AdamW on the row's own trajectory) and reports, over the last quarter of the steps, how the
row's stored exp_avg_sq and its actual step compare with the shadow's. The rows bf16-sr,
8bit-sr and bf16-8bit-sr use state_rounding="stochastic" (every bfloat16 moment or 8-bit code
rounded stochastically). The row
model-8bit-stochastic-v (run only when named) is a NumPy model: 8-bit moments whose exp_avg_sq
codes alone are rounded stochastically instead of to the nearest code.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

import cpuadam
import cpuadam.torch as ct
from cpuadam import _core

LR = 3e-4
BETAS = (0.9, 0.999)
EPS = 1e-8


def _cpuadam(params, lr: float, seed: int, **options):
    return ct.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, seed=seed, **options)


def _bitsandbytes(params, lr: float, seed: int):
    import bitsandbytes as bnb

    # min_8bit_size=1: every tensor 8-bit, as in cpuadam's 8-bit rows (both default to 4096).
    return bnb.optim.AdamW8bit(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, min_8bit_size=1)


class StochasticV8bit(torch.optim.Optimizer):
    """A model, not cpuadam's kernel: AdamW with 8-bit moments as cpuadam stores them, except
    that each exp_avg_sq code is rounded stochastically between the two map values around
    x = v / absmax, up with probability (x - lower) / (upper - lower), so that the stored v is v
    in expectation. With nearest rounding a step moves v by about 1 - beta2 = 0.1%, less than
    half a code gap (0.35% to 3.5% of x in [0.1, 1]), so most codes never change and the stored
    v follows its block's absmax instead of its own g**2; this row measures what unbiased
    rounding of v gives."""

    def __init__(self, params, lr: float, seed: int):
        super().__init__(params, dict(lr=lr))
        self.gen = np.random.default_rng(seed)
        self.qmap = {name: _core.qmap(name) for name in ("signed", "unsigned")}

    def _quantize(self, values: np.ndarray, name: str, stochastic: bool):
        codes, absmax = _core.quantize_blockwise(values, name)
        if stochastic:
            q = self.qmap[name]
            x = values / np.repeat(np.where(absmax > 0, absmax, 1), 256)[:values.size]
            lower = np.clip(np.searchsorted(q, x, side="right") - 1, 0, 254)
            up = (x - q[lower]) / (q[lower + 1] - q[lower])
            codes = (lower + (self.gen.random(values.size) < up)).astype(np.uint8)
        return codes, absmax

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                g = p.grad.numpy().reshape(-1)
                if not st:
                    st["step"] = 0
                    for key, name in (("exp_avg", "signed"), ("exp_avg_sq", "unsigned")):
                        st[key] = torch.zeros(g.size, dtype=torch.uint8)
                        st[key + "_absmax"] = torch.zeros(-(-g.size // 256))
                        st[key + "_qmap"] = torch.from_numpy(self.qmap[name])
                st["step"] += 1
                m = _core.dequantize_blockwise(st["exp_avg"].numpy(), st["exp_avg_absmax"].numpy(), "signed")
                v = _core.dequantize_blockwise(st["exp_avg_sq"].numpy(), st["exp_avg_sq_absmax"].numpy(),
                                               "unsigned")
                m = (np.float32(BETAS[0]) * m + np.float32(1 - BETAS[0]) * g).astype(np.float32)
                v = (np.float32(BETAS[1]) * v + np.float32(1 - BETAS[1]) * g * g).astype(np.float32)
                bc1, bc2 = 1 - BETAS[0] ** st["step"], 1 - BETAS[1] ** st["step"]
                update = np.float32(group["lr"] / bc1) * m / (np.sqrt(v) / np.float32(bc2**0.5) + np.float32(EPS))
                p.view(-1).sub_(torch.from_numpy(update.astype(np.float32)))
                for key, name, values, stochastic in (("exp_avg", "signed", m, False),
                                                      ("exp_avg_sq", "unsigned", v, True)):
                    codes, absmax = self._quantize(values, name, stochastic)
                    st[key].copy_(torch.from_numpy(codes))
                    st[key + "_absmax"].copy_(torch.from_numpy(absmax))


@dataclass
class Mode:
    key: str
    label: str
    dtype: torch.dtype
    options: dict = field(default_factory=dict)
    make: Optional[Callable] = None  # (params, lr, seed) -> optimizer; None: cpuadam with options
    lr: float = LR

    def optimizer(self, params, seed: int):
        if self.make is not None:
            return self.make(params, self.lr, seed)
        return _cpuadam(params, self.lr, seed, **self.options)


MODES = [
    Mode("fp32", "float32", torch.float32),
    Mode("bf16", "bf16 params, bf16 moments, nearest (torch's arrangement)", torch.bfloat16,
         {"state_dtype": "bfloat16"}),
    Mode("bf16-fp32m", "bf16 params, fp32 moments, nearest", torch.bfloat16, {"state_dtype": "float32"}),
    Mode("bf16-stochastic", "bf16 params, bf16 moments, stochastic", torch.bfloat16,
         {"state_dtype": "bfloat16", "param_update": "stochastic"}),
    Mode("bf16-sr", "bf16 params, bf16 moments, both rounded stochastically", torch.bfloat16,
         {"state_dtype": "bfloat16", "param_update": "stochastic", "state_rounding": "stochastic"}),
    Mode("bf16-kahan", "bf16 params, bf16 moments, kahan", torch.bfloat16,
         {"state_dtype": "bfloat16", "param_update": "kahan"}),
    Mode("bf16-master", "bf16 params, bf16 moments, master", torch.bfloat16,
         {"state_dtype": "bfloat16", "param_update": "master"}),
    Mode("bf16-fp32m-master", "bf16 params, fp32 moments, master", torch.bfloat16,
         {"state_dtype": "float32", "param_update": "master"}),
]
EIGHT_BIT = [
    Mode("8bit", "fp32 params, 8-bit moments", torch.float32, {"state_dtype": "8bit", "min_8bit_size": 1}),
    Mode("bf16-8bit-stochastic", "bf16 params, 8-bit moments, stochastic", torch.bfloat16,
         {"state_dtype": "8bit", "param_update": "stochastic", "min_8bit_size": 1}),
    Mode("8bit-sr", "fp32 params, 8-bit moments with stochastic codes", torch.float32,
         {"state_dtype": "8bit", "state_rounding": "stochastic", "min_8bit_size": 1}),
    Mode("bf16-8bit-sr", "bf16 params, 8-bit moments with stochastic codes, stochastic", torch.bfloat16,
         {"state_dtype": "8bit", "state_rounding": "stochastic", "param_update": "stochastic",
          "min_8bit_size": 1}),
]
MODELS = [
    Mode("model-8bit-stochastic-v", "model: 8-bit moments, exp_avg_sq codes rounded stochastically",
         torch.float32, make=lambda params, lr, seed: StochasticV8bit(params, lr, seed)),
]
BITSANDBYTES = [
    Mode("bnb-8bit", "bitsandbytes AdamW8bit, fp32 params, 8-bit moments", torch.float32,
         make=_bitsandbytes),
]


def available_modes() -> list[Mode]:
    modes = list(MODES)
    try:
        ct.AdamW([torch.nn.Parameter(torch.zeros(8))], state_dtype="8bit")
        modes += EIGHT_BIT + MODELS
    except (TypeError, ValueError):
        pass
    try:
        import bitsandbytes  # noqa: F401
        modes += BITSANDBYTES
    except ImportError:
        pass
    return modes


def select_modes(spec: Optional[str], modes: list[Mode]) -> list[Mode]:
    """The rows named by --modes (KEY or KEY@LR), float32 at the default lr first."""
    if spec is None:
        return [m for m in modes if m not in MODELS]
    by_key = {m.key: m for m in modes}
    chosen = [by_key["fp32"]]
    for item in spec.split(","):
        key, _, lr = item.strip().partition("@")
        if key not in by_key:
            raise SystemExit(f"--modes: unknown or unavailable mode {key!r}; available: "
                             + ", ".join(by_key))
        mode = by_key[key]
        if lr:
            mode = Mode(mode.key, f"{mode.label}, lr {float(lr):g}", mode.dtype, mode.options,
                        mode.make, float(lr))
        if mode.key == "fp32" and mode.lr == LR:
            continue
        chosen.append(mode)
    return chosen


def make_data(seed: int, n: int = 8192, d_in: int = 32, d_out: int = 8):
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher = [torch.randn(d_in, 64, generator=gen) / d_in**0.5,
               torch.randn(64, d_out, generator=gen) / 8.0]
    x = torch.randn(n, d_in, generator=gen)
    y = torch.tanh(x @ teacher[0]) @ teacher[1]
    return x, y


def stored_exp_avg_sq(state: dict) -> Optional[torch.Tensor]:
    """The float32 values of a param's second moment as the optimizer stores it (codes
    dequantized: qmap[code] * absmax of the code's block), for cpuadam's and bitsandbytes' keys."""
    for key, absmax, qmap in (("exp_avg_sq", "exp_avg_sq_absmax", "exp_avg_sq_qmap"),
                              ("state2", "absmax2", "qmap2")):
        value = state.get(key)
        if value is None:
            continue
        if value.dtype != torch.uint8:
            return value.float().reshape(-1)
        codes = value.reshape(-1).long()
        scale = state[absmax].repeat_interleave(256)[:codes.numel()]
        return state[qmap][codes] * scale
    return None


class Probe:
    """Float32 AdamW moments fed the grads of the run under test: the step float32 moments would
    take on this very trajectory, against the step the optimizer took."""

    def __init__(self, params: list):
        self.params = params
        self.exp_avg = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        self.step = 0
        self.rows = []  # per step: sum |step taken|, sum |shadow step|, sum v stored, sum v shadow, v == 0 < shadow

    def before(self) -> None:
        self.step += 1
        self.start = [p.detach().clone() for p in self.params]
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            g = p.grad.float()
            m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])

    def after(self, opt, lr: float) -> None:
        bc1 = 1 - BETAS[0] ** self.step
        bc2 = 1 - BETAS[1] ** self.step
        taken = shadow = v_stored = v_shadow = zeros = count = 0.0
        for p, p0, m, v in zip(self.params, self.start, self.exp_avg, self.exp_avg_sq):
            taken += (p.detach() - p0).abs().sum().item()
            shadow += (lr / bc1 * m / (v.sqrt() / bc2**0.5 + EPS)).abs().sum().item()
            stored = stored_exp_avg_sq(opt.state[p])
            if stored is not None:
                v_stored += stored.sum().item()
                v_shadow += v.sum().item()
                zeros += ((stored == 0) & (v.reshape(-1) > 0)).sum().item()
                count += v.numel()
        self.rows.append((taken, shadow, v_stored, v_shadow, zeros / max(count, 1)))

    def summary(self) -> tuple[float, float, float]:
        """Over the last quarter of the steps: step taken / shadow step, stored v / shadow v
        (sums over all elements), and the fraction of v stored as 0 where the shadow's is not."""
        tail = self.rows[len(self.rows) * 3 // 4:]
        return (sum(r[0] for r in tail) / sum(r[1] for r in tail),
                sum(r[2] for r in tail) / max(sum(r[3] for r in tail), 1e-300),
                statistics.fmean(r[4] for r in tail))


def train(mode: Mode, seed: int, steps: int, probe: bool = False):
    """Per-step training losses, and the probe's summary (or None)."""
    x, y = make_data(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 8)).to(mode.dtype)
    params = list(model.parameters())
    opt = mode.optimizer(params, seed)
    shadow = Probe(params) if probe and mode.dtype == torch.float32 else None
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        out = model(x[idx].to(mode.dtype)).float()
        loss = torch.nn.functional.mse_loss(out, y[idx])
        opt.zero_grad()
        loss.backward()
        if shadow is not None:
            shadow.before()
        opt.step()
        if shadow is not None:
            shadow.after(opt, mode.lr)
        losses.append(loss.item())
    return losses, (shadow.summary() if shadow is not None else None)


def final(losses: list) -> float:
    return statistics.fmean(losses[-100:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    modes = available_modes()
    ap.add_argument("--modes", help="comma-separated keys, KEY@LR for another lr: "
                    + ", ".join(m.key for m in modes))
    ap.add_argument("--threads", type=int, help="torch's and cpuadam's thread count")
    ap.add_argument("--curve", action="store_true", help="the loss at each quarter of the run")
    ap.add_argument("--probe", action="store_true",
                    help="compare each float32-param row's v and step with float32 moments")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        cpuadam.set_num_threads(args.threads)
    modes = select_modes(args.modes, modes)
    seeds = list(range(args.seeds))
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        runs = [train(mode, s, args.steps, args.probe) for s in seeds]
        rows.append((mode, runs, time.perf_counter() - t0))
    fp32 = [final(losses) for losses, _ in rows[0][1]]
    spread = max(fp32) - min(fp32)
    head = ["mode"] + [f"seed {s}" for s in seeds] + ["mean", "mean / fp32 mean"]
    print(f"final training loss (mean of the last 100 of {args.steps} steps); float32 spread "
          f"across seeds: {spread:.3e}")

    def table(head: list, lines: list) -> None:
        if args.markdown:
            print("| " + " | ".join(head) + " |")
            print("|" + " --- |" * len(head))
        for cells in lines:
            print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))

    lines = []
    for mode, runs, _ in rows:
        finals = [final(losses) for losses, _ in runs]
        mean = statistics.fmean(finals)
        lines.append([mode.label] + [f"{v:.4e}" for v in finals]
                     + [f"{mean:.4e}", f"{mean / statistics.fmean(fp32):.3f}"])
    table(head, lines)
    if args.curve:
        ends = [args.steps * q // 4 for q in (1, 2, 3, 4)]
        print(f"\nloss at each quarter (mean over seeds of the mean of the 100 steps before it)")
        table(["mode"] + [f"step {e}" for e in ends],
              [[mode.label] + [f"{statistics.fmean(statistics.fmean(l[max(e - 100, 0):e]) for l, _ in runs):.4e}"
                               for e in ends] for mode, runs, _ in rows])
    if args.probe:
        print("\nagainst float32 moments fed the same grads, last quarter of the steps (mean over seeds)")
        lines = []
        for mode, runs, _ in rows:
            summaries = [s for _, s in runs if s is not None]
            if summaries:
                means = [statistics.fmean(s[i] for s in summaries) for i in range(3)]
                lines.append([mode.label, f"{means[0]:.3f}", f"{means[1]:.3f}", f"{means[2]:.2e}"])
        table(["mode", "step / float32-moment step", "stored v / float32 v",
               "v stored as 0 (fraction)"], lines)


if __name__ == "__main__":
    main()
