// SPDX-License-Identifier: MIT
// The per-element Adam/AdamW/AMSGrad arithmetic, written once.
//
// Symbols (DESIGN.md): p param, g grad, m exp_avg, v exp_avg_sq, vmax max_exp_avg_sq.
//   g    = grad * grad_scale                (grad_scale < 0 for maximize)
//   g    = g + weight_decay * p             (DecayMode::L2, Adam)
//   p    = p * decay_factor                 (DecayMode::Decoupled, AdamW)
//   m    = m + (1 - beta1) * (g - m)        (torch's lerp form of beta1*m + (1-beta1)*g)
//   v    = beta2 * v + (1 - beta2) * g * g
//   vmax = max(vmax, v); use vmax for v     (Amsgrad::On)
//   p    = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
//
// The loops are plain C++ that GCC vectorises under each level's flags; the
// remainder is the same source run one lane at a time, so body and tail round
// identically and results never depend on where a thread's slice begins.
// Included only from kernel_isa.cpp, inside its per-level namespace.
#pragma once

#include <cstdint>

#include "convert.h"

// a * b + c, fused where this level has hardware FMA. std::fma would be a
// library call on baseline x86-64; -ffp-contract=off keeps the unfused form
// from being fused behind our back, so every level rounds deterministically.
inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

template <DecayMode kDecay, Amsgrad kAmsgrad, typename P, typename G, typename S>
inline void adam_range(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg,
                       S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq, int64_t n,
                       const StepScalars& sc) {
  // Scalars as locals: the compiler cannot prove the buffers do not alias sc.
  const float beta2 = sc.beta2, one_minus_beta1 = sc.one_minus_beta1;
  const float one_minus_beta2 = sc.one_minus_beta2, neg_step_size = -sc.step_size;
  const float bc2_sqrt = sc.bc2_sqrt, eps = sc.eps, weight_decay = sc.weight_decay;
  const float decay_factor = sc.decay_factor, grad_scale = sc.grad_scale;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float p = load_float(param[i]);
    float g = load_float(grad[i]) * grad_scale;
    if constexpr (kDecay == DecayMode::L2) g = madd(weight_decay, p, g);
    if constexpr (kDecay == DecayMode::Decoupled) p = p * decay_factor;
    float m = madd(one_minus_beta1, g - load_float(exp_avg[i]), load_float(exp_avg[i]));
    float v = madd(one_minus_beta2 * g, g, beta2 * load_float(exp_avg_sq[i]));
    float v_used = v;
    if constexpr (kAmsgrad == Amsgrad::On) {
      float vmax = load_float(max_exp_avg_sq[i]);
      v_used = vmax > v ? vmax : v;
      max_exp_avg_sq[i] = store_float<S>(v_used);
    }
    // Divide by bc2_sqrt (not multiply by its inverse), as torch does.
    float denom = __builtin_sqrtf(v_used) / bc2_sqrt + eps;
    p = madd(neg_step_size, m / denom, p);
    exp_avg[i] = store_float<S>(m);
    exp_avg_sq[i] = store_float<S>(v);
    param[i] = store_float<P>(p);
  }
}

// Roofline proxy: the step's memory traffic (read p, g, m, v; write p, m, v)
// with one add per written element.
inline void stream_range(float* __restrict param, const float* __restrict grad,
                         float* __restrict exp_avg, float* __restrict exp_avg_sq, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float g = grad[i];
    exp_avg[i] += g;
    exp_avg_sq[i] += g;
    param[i] += g;
  }
}
