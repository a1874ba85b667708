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
// templated on P (param: float32 here; a bfloat16/float16 param is stepped as a
// float32 tile, see below), G (grad: float32 or bfloat16; float16 grads arrive
// as a float32 tile) and S (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum
// buffer: float32 or bfloat16). grad_accum and ema are always float32.
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
// The loops are plain C++ that GCC vectorises under each level's flags; the
// remainder is the same source run one lane at a time, so body and tail round
// identically and results never depend on where a thread's slice begins.
// Included only from kernel_isa.cpp, inside its per-level namespace.
#pragma once

#include <cmath>
#include <cstdint>

#include "convert.h"

// a * b + c, fused where this level has hardware FMA (MSVC's /arch:AVX2 and
// AVX512 imply it but define no __FMA__). There std::fma is one instruction;
// on baseline x86-64 it would be a library call. -ffp-contract=off keeps the
// unfused form from being fused behind our back, so every level rounds
// deterministically.
inline float madd(float a, float b, float c) {
#if defined(__FMA__) || (defined(_MSC_VER) && defined(__AVX2__)) || defined(__aarch64__) || \
    defined(_M_ARM64)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Written as compare-and-select so a NaN grad stays NaN (and is caught by the
// finiteness check) instead of being clipped to a finite value.
inline float clip(float g, float limit) {
  g = g > limit ? limit : g;
  return g < -limit ? -limit : g;
}

// The gradient as the update sees it: accumulated, scaled, clipped (GradInput).
template <GradInput kGrad, typename G>
inline float effective_grad(const G* __restrict grad, float* __restrict grad_accum, int64_t i,
                            float scale, float clip_value) {
  float g = load_float(grad[i]);
  if constexpr (kGrad == GradInput::Raw) return g;
  if constexpr (kGrad == GradInput::Accumulated) {
    g = grad_accum[i] + g;
    grad_accum[i] = 0.f;
  }
  return clip(g * scale, clip_value);
}

template <DecayMode kDecay, Amsgrad kAmsgrad, GradInput kGrad, Ema kEma, typename P,
          typename G, typename S>
inline void adam_range(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg,
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
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float p = load_float(param[i]);
    float g = effective_grad<kGrad>(grad, grad_accum, i, grad_scale, clip_value);
    if constexpr (kDecay == DecayMode::L2) g = madd(weight_decay, p, g);
    // torch's (and DESIGN's) form. p - (lr*wd)*p would round the decay more
    // finely, but would no longer follow torch.optim.AdamW step for step.
    if constexpr (kDecay == DecayMode::Decoupled) p = p * decay_factor;
    const float m_old = load_float(exp_avg[i]);
    const float m = madd(lerp_coef, g - m_old, lerp_from_grad ? g : m_old);
    const float v = madd(one_minus_beta2 * g, g, beta2 * load_float(exp_avg_sq[i]));
    float v_used = v;
    if constexpr (kAmsgrad == Amsgrad::On) {
      const float vmax = load_float(max_exp_avg_sq[i]);
      v_used = vmax > v ? vmax : v;
      max_exp_avg_sq[i] = store_float<S>(v_used);
    }
    const float denom = std::sqrt(v_used) + eps;
    p = madd(neg_step_size, m / denom, p);
    exp_avg[i] = store_float<S>(m);
    exp_avg_sq[i] = store_float<S>(v);
    param[i] = store_float<P>(p);
    if constexpr (kEma == Ema::On)
      ema[i] = madd(ema_momentum, ema[i], one_minus_ema * p);
  }
}

template <DecayMode kDecay, Momentum kMomentum, Nesterov kNesterov, GradInput kGrad,
          Ema kEma, typename P, typename G, typename S>
inline void sgd_range(P* __restrict param, const G* __restrict grad, S* __restrict momentum_buffer,
                      float* __restrict grad_accum, float* __restrict ema, int64_t n, float grad_scale,
                      const StepScalars& sc) {
  const float neg_lr = -sc.step_size, weight_decay = sc.weight_decay, clip_value = sc.clip_value;
  const float momentum = sc.momentum, one_minus_dampening = sc.one_minus_dampening;
  const float ema_momentum = sc.ema_momentum, one_minus_ema = sc.one_minus_ema_momentum;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float p = load_float(param[i]);
    float g = effective_grad<kGrad>(grad, grad_accum, i, grad_scale, clip_value);
    if constexpr (kDecay == DecayMode::L2) g = madd(weight_decay, p, g);
    if constexpr (kMomentum != Momentum::Off) {
      float b = g;  // torch starts the buffer as a copy of the first d_p
      if constexpr (kMomentum == Momentum::On)
        b = madd(one_minus_dampening, g, momentum * load_float(momentum_buffer[i]));
      momentum_buffer[i] = store_float<S>(b);
      g = kNesterov == Nesterov::On ? madd(momentum, b, g) : b;
    }
    p = madd(neg_lr, g, p);
    param[i] = store_float<P>(p);
    if constexpr (kEma == Ema::On)
      ema[i] = madd(ema_momentum, ema[i], one_minus_ema * p);
  }
}

template <typename G>
inline void accumulate_range(const G* __restrict grad, float* __restrict grad_accum, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) grad_accum[i] = grad_accum[i] + load_float(grad[i]);
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
  if constexpr (kUpdate == ParamUpdate::Kahan) {
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) tile[i] = load_float(param[i]) + load_float(kahan_comp[i]);
  } else {
    load_array(param, tile, n);
  }
}

// The stepped float32 values (a tile, or the master) back into the param.
// Stochastic: element i of the run is keyed by index0 + i (the run never
// crosses a multiple of 2^32, whose high part is folded into key1).
template <ParamUpdate kUpdate, typename P>
inline void store_param_tile(const float* __restrict tile, P* __restrict param,
                             P* __restrict kahan_comp, int64_t n, uint32_t index0, uint32_t key0,
                             uint32_t key1) {
  if constexpr (kUpdate == ParamUpdate::Stochastic) {
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i)
      param[i] = store_stochastic<P>(
          tile[i], rounding_bits(index0 + static_cast<uint32_t>(i), key0, key1));
  } else if constexpr (kUpdate == ParamUpdate::Kahan) {
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      const P q = store_float<P>(tile[i]);
      const float stored = load_float(q);
      // An inf or NaN param has nothing to compensate (inf - inf would be NaN).
      const float lost = stored - stored == 0.f ? tile[i] - stored : 0.f;
      param[i] = q;
      kahan_comp[i] = store_float<P>(lost);
    }
  } else {
    store_array(tile, param, n);
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
