# SPDX-License-Identifier: MIT
"""One AdamW step over a 16M-element param: float32 states vs 8-bit states (float32 and bfloat16 params; nearest codes, and stochastic codes with state_rounding="stochastic"), medians of 9 interleaved runs at 1 and 2 threads."""
import time, numpy as np
from cpuadam import _core
n = 16 * 2**20
rng = np.random.default_rng(0)
p = rng.standard_normal(n).astype(np.float32); g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
m = np.zeros(n, np.float32); v = np.zeros(n, np.float32)
nb = -(-n // 256)
c1 = np.zeros(n, np.uint8); c2 = np.zeros(n, np.uint8); a1 = np.zeros(nb, np.float32); a2 = np.zeros(nb, np.float32)
pb = (p.view(np.uint32) >> 16).astype(np.uint16); gb = (g.view(np.uint32) >> 16).astype(np.uint16)
c3 = np.zeros(n, np.uint8); c4 = np.zeros(n, np.uint8); a3 = np.zeros(nb, np.float32); a4 = np.zeros(nb, np.float32)
c5 = np.zeros(n, np.uint8); c6 = np.zeros(n, np.uint8); a5 = np.zeros(nb, np.float32); a6 = np.zeros(nb, np.float32)
SR = dict(state_rounding="stochastic", seed=0, rounding_step=1, stream_ids=[0])
H = dict(lr=1e-3, weight_decay=0.01, beta1=0.9, beta2=0.999, eps=1e-8, decoupled=True, step=1)
cases = {
 "fp32": lambda: _core.adam_step([dict(params=[p], grads=[g], exp_avgs=[m], exp_avg_sqs=[v], **H)]),
 "fp32+8bit": lambda: _core.adam_step([dict(params=[p], grads=[g], exp_avgs=[c1], exp_avg_sqs=[c2], exp_avg_absmaxs=[a1], exp_avg_sq_absmaxs=[a2], state_dtype="8bit", **H)]),
 "fp32+8bit-sr": lambda: _core.adam_step([dict(params=[p], grads=[g], exp_avgs=[c5], exp_avg_sqs=[c6], exp_avg_absmaxs=[a5], exp_avg_sq_absmaxs=[a6], state_dtype="8bit", **H, **SR)]),
 "bf16+8bit": lambda: _core.adam_step([dict(params=[pb], grads=[gb], exp_avgs=[c3], exp_avg_sqs=[c4], exp_avg_absmaxs=[a3], exp_avg_sq_absmaxs=[a4], param_dtype="bfloat16", grad_dtype="bfloat16", state_dtype="8bit", **H)]),
}
for threads in (1, 2):
    _core.set_num_threads(threads)
    times = {k: [] for k in cases}
    for f in cases.values(): f()
    for r in range(9):
        for k, f in cases.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(x)) * 1e3 for k, x in times.items()}
    print(f"threads={threads} " + " ".join(f"{k}={v:.1f}ms" for k, v in med.items()),
          f"speedup fp32/8bit={med['fp32']/med['fp32+8bit']:.2f} fp32/bf16+8bit={med['fp32']/med['bf16+8bit']:.2f}",
          f"stochastic/nearest codes={med['fp32+8bit-sr']/med['fp32+8bit']:.2f}")
