// SPDX-License-Identifier: MIT
// The per-element optimizer arithmetic, written once.
//
// Adam/AdamW, with p param, g grad, m exp_avg, v exp_avg_sq, vmax max_exp_avg_sq:
//   g    = (grad [+ accumulated]) * grad_scale, clipped to [-clip_value, clip_value]
//   g    = g + weight_decay * p             (DecayMode::L2, Adam)
//   p    = p * decay_factor                 (DecayMode::Decoupled, AdamW: 1 - lr * wd)
//   m    = lerp(m, g, 1 - beta1)            (torch's form of beta1*m + (1-beta1)*g)
//   v    = beta2 * v + (1 - beta2) * g * g
//   vmax = max(vmax, v); use vmax for v     (Amsgrad::On)
//   p    = p - step_size * m / (sqrt(v) + eps)
//          with step_size = lr * sqrt(bc2) / bc1 and eps = eps_torch * sqrt(bc2) (or
//          eps_keras): torch's lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) with sqrt(bc2)
//          moved into the scalars, one division per element instead of two.
//   ema  = ema_momentum * ema + (1 - ema_momentum) * p   (Ema::On)
// SGD (torch.optim.SGD), with b the momentum buffer:
//   b    = g (first step) or momentum * b + (1 - dampening) * g
//   g    = g + momentum * b (nesterov) or b
//   p    = p - lr * g
//
// Element types: the arithmetic is always float32. The functions below are
// templated on P (the param handle: a float32 pointer (the param, a float32
// tile of a 16-bit param, or the master); a bfloat16 pointer, or a
// StochasticParam, for bfloat16 params stepped in place, see kernel_isa.cpp),
// G (grad: float32 or bfloat16; float16 grads arrive as a float32 tile) and S
// (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum buffer: float32, bfloat16 or
// float16). grad_accum and ema are always float32.
//
// How a bfloat16/float16 param takes its update (ParamUpdate), with q the
// stored param, c the compensation, M the float32 master, step() the update above:
//   Nearest:    p = q;          q = rne(step(p))
//   Stochastic: p = q;          q = sr(step(p), hash(key, i))   (one of the two neighbours)
//   Kahan:      p = q + c;      p = step(p);  q = rne(p);  c = rne(p - q)   (0 if q is not finite)
//   Master:     M = step(M);    q = rne(M)
// Kahan is compensated summation of each step's float32 change d = step(p) - p:
// p + d = q + (c + d), and c keeps the part of the sum the stored q cannot, so
// q + c follows the float32 trajectory to about one ulp of c, well within one
// ulp of q's dtype. ema, decay and L2 see p (the compensated value, the master).
//
// Each loop body is written once, over a lane type (lanes.h): eight float32
// lanes where the level has AVX2, one lane for the remainder and on the other
// levels (which GCC vectorises under their flags). Both round identically, so
// results never depend on where a thread's slice begins.
// Included only from kernel_isa.cpp, inside its per-level namespace.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "convert.h"
#include "lanes.h"

// Written as compare-and-select so a NaN grad stays NaN (and is caught by the
// finiteness check) instead of being clipped to a finite value.
template <typename L>
inline L clip(L g, float limit) {
  return max_of(L(-limit), min_of(L(limit), g));
}

// The gradient as the update sees it: accumulated, scaled, clipped (GradInput).
template <GradInput kGrad, typename L, typename G>
inline L effective_grad(L lane, const G* __restrict grad, float* __restrict grad_accum, int64_t i,
                        float scale, float clip_value) {
  L g = load_lanes(lane, grad + i);
  if constexpr (kGrad == GradInput::Raw) return g;
  if constexpr (kGrad == GradInput::Accumulated) {
    g = load_lanes(lane, grad_accum + i) + g;
    store_lanes(grad_accum + i, L(0.f));
  }
  return clip(g * scale, clip_value);
}

template <DecayMode kDecay, Amsgrad kAmsgrad, GradInput kGrad, Ema kEma, typename P,
          typename G, typename S>
inline void adam_range(P param, const G* __restrict grad, S* __restrict exp_avg,
                       S* __restrict exp_avg_sq, S* __restrict max_exp_avg_sq,
                       float* __restrict grad_accum, float* __restrict ema, int64_t n, float grad_scale,
                       const StepScalars& sc) {
  // Scalars as locals: the compiler cannot prove the buffers do not alias sc.
  const float beta2 = sc.beta2, lerp_coef = sc.lerp_coef;
  const bool lerp_from_grad = sc.lerp_from_grad != 0;
  const float one_minus_beta2 = sc.one_minus_beta2, neg_step_size = -sc.step_size;
  const float eps = sc.eps, weight_decay = sc.weight_decay;
  const float decay_factor = sc.decay_factor, clip_value = sc.clip_value;
  const float ema_momentum = sc.ema_momentum, one_minus_ema = sc.one_minus_ema_momentum;
  // Every load comes before the first store: a load issued after a store to an
  // address with the same low 12 bits (page-aligned buffers) can stall on a
  // false dependency.
  for_lanes<WideLanes<typename ParamElement<P>::type, G, S>>(n, [&](auto lane, int64_t i) CPUADAM_INLINE_BODY {
    using L = decltype(lane);
    L p = load_lanes(lane, param + i);
    L g = effective_grad<kGrad>(lane, grad, grad_accum, i, grad_scale, clip_value);
    if constexpr (kDecay == DecayMode::L2) g = madd(weight_decay, p, g);
    // torch's (and DESIGN's) form. p - (lr*wd)*p would round the decay more
    // finely, but would no longer follow torch.optim.AdamW step for step.
    if constexpr (kDecay == DecayMode::Decoupled) p = p * decay_factor;
    const L m_old = load_lanes(lane, exp_avg + i);
    const L m = madd(lerp_coef, g - m_old, lerp_from_grad ? g : m_old);
    const L v = madd(one_minus_beta2 * g, g, beta2 * load_lanes(lane, exp_avg_sq + i));
    L v_used = v;
    if constexpr (kAmsgrad == Amsgrad::On) v_used = max_of(load_lanes(lane, max_exp_avg_sq + i), v);
    L ema_old = 0.f;
    if constexpr (kEma == Ema::On) ema_old = load_lanes(lane, ema + i);
    const L denom = lane_sqrt(v_used) + eps;
    p = madd(neg_step_size, m / denom, p);
    if constexpr (kAmsgrad == Amsgrad::On) store_lanes(max_exp_avg_sq + i, v_used);
    store_lanes(exp_avg + i, m);
    store_lanes(exp_avg_sq + i, v);
    store_lanes(param + i, p);
    if constexpr (kEma == Ema::On) store_lanes(ema + i, madd(ema_momentum, ema_old, one_minus_ema * p));
  });
}

template <DecayMode kDecay, Momentum kMomentum, Nesterov kNesterov, GradInput kGrad,
          Ema kEma, typename P, typename G, typename S>
inline void sgd_range(P param, const G* __restrict grad, S* __restrict momentum_buffer,
                      float* __restrict grad_accum, float* __restrict ema, int64_t n, float grad_scale,
                      const StepScalars& sc) {
  const float neg_lr = -sc.step_size, weight_decay = sc.weight_decay, clip_value = sc.clip_value;
  const float momentum = sc.momentum, one_minus_dampening = sc.one_minus_dampening;
  const float ema_momentum = sc.ema_momentum, one_minus_ema = sc.one_minus_ema_momentum;
  for_lanes<WideLanes<typename ParamElement<P>::type, G, S>>(n, [&](auto lane, int64_t i) CPUADAM_INLINE_BODY {
    using L = decltype(lane);
    L p = load_lanes(lane, param + i);
    L g = effective_grad<kGrad>(lane, grad, grad_accum, i, grad_scale, clip_value);
    if constexpr (kDecay == DecayMode::L2) g = madd(weight_decay, p, g);
    L ema_old = 0.f;
    if constexpr (kEma == Ema::On) ema_old = load_lanes(lane, ema + i);
    if constexpr (kMomentum != Momentum::Off) {
      L b = g;  // torch starts the buffer as a copy of the first d_p
      if constexpr (kMomentum == Momentum::On)
        b = madd(one_minus_dampening, g, momentum * load_lanes(lane, momentum_buffer + i));
      store_lanes(momentum_buffer + i, b);
      g = kNesterov == Nesterov::On ? madd(momentum, b, g) : b;
    }
    p = madd(neg_lr, g, p);
    store_lanes(param + i, p);
    if constexpr (kEma == Ema::On) store_lanes(ema + i, madd(ema_momentum, ema_old, one_minus_ema * p));
  });
}

template <typename G>
inline void accumulate_range(const G* __restrict grad, float* __restrict grad_accum, int64_t n) {
  for_lanes(n, [&](auto lane, int64_t i) CPUADAM_INLINE_BODY {
    store_lanes(grad_accum + i, load_lanes(lane, grad_accum + i) + load_lanes(lane, grad + i));
  });
}

// Sum of squares of one block in double. Element i always lands in lane
// i % kLanes and the lanes combine in a fixed tree, so the result is the same
// bits whatever the vector width. Squares of floats are exact in double.
template <typename G>
inline double block_sum_squares(const G* __restrict grad, const float* __restrict grad_accum,
                                int64_t n) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      float x = load_float(grad[i + j]);
      if (grad_accum != nullptr) x = grad_accum[i + j] + x;
      const double d = x;
      lanes[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    float x = load_float(grad[i]);
    if (grad_accum != nullptr) x = grad_accum[i] + x;
    const double d = x;
    lanes[j] += d * d;
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// A bfloat16/float16 param as the float32 values the step starts from
// (Nearest, Stochastic: the param; Kahan: param + compensation). Master needs
// no tile: the master itself is stepped in place.
template <ParamUpdate kUpdate, typename P>
inline void load_param_tile(const P* __restrict param, const P* __restrict kahan_comp,
                            float* __restrict tile, int64_t n) {
  for_lanes(n, [&](auto lane, int64_t i) CPUADAM_INLINE_BODY {
    auto p = load_lanes(lane, param + i);
    if constexpr (kUpdate == ParamUpdate::Kahan) p = p + load_lanes(lane, kahan_comp + i);
    store_lanes(tile + i, p);
  });
}

// The stepped float32 values (a tile, or the master) back into the param.
// Stochastic: element i of the run is keyed by index0 + i (the run never
// crosses a multiple of 2^32, whose high part is folded into key1).
template <ParamUpdate kUpdate, typename P>
inline void store_param_tile(const float* __restrict tile, P* __restrict param,
                             P* __restrict kahan_comp, int64_t n, uint32_t index0, uint32_t key0,
                             uint32_t key1) {
  if constexpr (kUpdate == ParamUpdate::Stochastic && std::is_same_v<P, BFloat16>) {
    for_lanes(n, [&](auto lane, int64_t i) CPUADAM_INLINE_BODY {
      store_stochastic_lanes(param + i, load_lanes(lane, tile + i),
                             index0 + static_cast<uint32_t>(i), key0, key1);
    });
  } else if constexpr (kUpdate == ParamUpdate::Stochastic) {
    // float16's subnormal branch has no eight-lane form here: one at a time.
    for (int64_t i = 0; i < n; ++i)
      store_stochastic_lanes(param + i, tile[i], index0 + static_cast<uint32_t>(i), key0, key1);
  } else {
    for_lanes(n, [&](auto lane, int64_t i) CPUADAM_INLINE_BODY {
      const auto x = load_lanes(lane, tile + i);
      store_lanes(param + i, x);
      if constexpr (kUpdate == ParamUpdate::Kahan) {
        const auto stored = load_lanes(lane, param + i);
        // An inf or NaN param has nothing to compensate (inf - inf would be NaN).
        store_lanes(kahan_comp + i, keep_if_finite(stored, x - stored));
      }
    });
  }
}

// Roofline proxy: the step's memory traffic (read p, g, m, v; write p, m, v)
// with one add per written element. Every load comes before the first store,
// as in adam_range: a load issued after a store to an address with the same
// low 12 bits (page-aligned buffers) can stall on a false dependency.
inline void stream_range(float* __restrict param, const float* __restrict grad,
                         float* __restrict exp_avg, float* __restrict exp_avg_sq, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i], p = param[i];
    const float m = exp_avg[i] + g, v = exp_avg_sq[i] + g;
    param[i] = p + g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
  }
}
