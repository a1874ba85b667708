# SPDX-License-Identifier: MIT
"""One 16M-element AdamW step with bfloat16 params, grads and moments in each param_update mode (and stochastic params with stochastically rounded moments, state_rounding="stochastic"), against the float32 step: `_core.adam_step` directly, medians of 7 interleaved runs at 1 and 2 threads (N, R in the environment change the size and rounds)."""
import time, sys, os, numpy as np
from cpuadam import _core
n = int(os.environ.get("N", 16 * 2**20))
rng = np.random.default_rng(0)
def f32(s=1.0): return (rng.standard_normal(n)*s).astype(np.float32)
def bf(x): return (x.view(np.uint32) >> 16).astype(np.uint16)
H = dict(lr=1e-3, weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8, decoupled=True, step=3)
p = f32(); g = f32(1e-3); m = f32(1e-4); v = np.abs(f32(1e-6))
bufs = {}
def case(update, sdt="bfloat16", state_rounding="nearest"):
    pb, gb = bf(p.copy()), bf(g)
    mm = bf(m.copy()) if sdt == "bfloat16" else m.copy(); vv = bf(v.copy()) if sdt == "bfloat16" else v.copy()
    extra = {}
    if update == "stochastic" or state_rounding == "stochastic": extra = dict(seed=1, rounding_step=3, stream_ids=[0])
    if update == "kahan": extra = dict(kahan_comps=[np.zeros(n, np.uint16)])
    if update == "master": extra = dict(masters=[p.copy()])
    b = [dict(params=[pb], grads=[gb], exp_avgs=[mm], exp_avg_sqs=[vv], param_dtype="bfloat16", grad_dtype="bfloat16", state_dtype=sdt, param_update=update, state_rounding=state_rounding, **H, **extra)]
    return lambda: _core.adam_step(b)
cases = {"fp32": (lambda b=[dict(params=[p.copy()], grads=[g], exp_avgs=[m.copy()], exp_avg_sqs=[v.copy()], **H)]: _core.adam_step(b))}
for u in ("nearest", "stochastic", "kahan", "master"): cases[u] = case(u)
cases["stochastic+sr-states"] = case("stochastic", state_rounding="stochastic")
for threads in (1, 2):
    _core.set_num_threads(threads)
    times = {k: [] for k in cases}
    for f in cases.values(): f()
    for r in range(int(os.environ.get("R", 7))):
        for k, f in cases.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(x)) * 1e3 for k, x in times.items()}
    print(f"threads={threads} " + " ".join(f"{k}={v:.1f}ms({med['fp32']/v:.2f}x)" for k, v in med.items()), flush=True)
