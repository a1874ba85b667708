// SPDX-License-Identifier: MIT
// Plain structs and enums the core speaks; no pybind11, no Python objects.
#pragma once

#include <cstdint>

namespace cpuadam {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2,
                         // States only: uint8 codes of block-wise dynamic quantization,
                         // one float32 absmax per kQuantBlock elements (quant.h).
                         Blockwise8 = 3 };

// How weight decay enters the step; a template parameter of the kernels.
enum class DecayMode : int {
  None = 0,       // weight_decay == 0, or the tensor is masked out of decay
  L2 = 1,         // Adam, SGD: g += weight_decay * p
  Decoupled = 2,  // AdamW: p *= decay_factor before the update
};

enum class Amsgrad : int { Off = 0, On = 1 };

// How the kernel forms the gradient it steps on. Raw: the grad as it is (no
// scale, no clipping: the common case, two fewer operations per element).
// Scaled: times the tensor's grad_scale, clipped to clip_value. Accumulated:
// the applying call of gradient accumulation, (accumulated sum + grad) scaled
// and clipped, and the accumulator zeroed.
enum class GradInput : int { Raw = 0, Scaled = 1, Accumulated = 2 };

// An exponential moving average of the params, updated in the same pass.
enum class Ema : int { Off = 0, On = 1 };

// How a bfloat16/float16 param takes its float32 update (float32 params: always
// Nearest). Nearest: round to nearest even. Stochastic: one of the two
// neighbours, chosen by a counter-based hash. Kahan: a compensation buffer in
// the param's dtype holds what rounding lost. Master: a float32 copy is stepped
// and rounded into the param.
enum class ParamUpdate : int { Nearest = 0, Stochastic = 1, Kahan = 2, Master = 3 };

// How new 8-bit codes (quant.h) and bfloat16/float16 state values are chosen:
// the nearest, or one of the two around the value by a counter-based hash
// (unbiased).
enum class StateRounding : int { Nearest = 0, Stochastic = 1 };

// SGD's momentum buffer: none, or the first step (buffer = d_p), or later steps.
enum class Momentum : int { Off = 0, First = 1, On = 2 };
enum class Nesterov : int { Off = 0, On = 1 };

// Per-step scalars, computed once on the host in double and rounded to float
// (see scalars.cpp); the kernels never recompute them per element.
struct StepScalars {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float one_minus_beta1 = 0.1f;
  // m = lerp(m, g, 1 - beta1) in torch's two forms: small weights step from m,
  // large ones (beta1 > 0.5) from g, so beta1 = 0 gives m == g exactly.
  float lerp_coef = 0.1f;     // 1 - beta1, or (1 - beta1) - 1 when stepping from g
  int lerp_from_grad = 0;
  float one_minus_beta2 = 0.001f;
  float step_size = 0.f;     // Adam: lr * sqrt(bc2) / bc1; SGD: lr
  float eps = 0.f;           // eps_mode "torch": eps * sqrt(bc2); "keras": eps
  float weight_decay = 0.f;  // used by DecayMode::L2
  float decay_factor = 1.f;  // used by DecayMode::Decoupled: 1 - lr*wd, or 1 - wd (independent)
  float clip_value = 0.f;    // |g| is clipped to this after scaling; +inf when unused
  float ema_momentum = 0.f;  // EMA: ema = ema_momentum * ema + (1 - ema_momentum) * p
  float one_minus_ema_momentum = 1.f;
  float momentum = 0.f;      // SGD
  float one_minus_dampening = 1.f;
};

// One tensor's buffers; all have `numel` elements. Unused pointers are null.
// param, kahan_comp: param_dtype; grad: grad_dtype; exp_avg, exp_avg_sq,
// max_exp_avg_sq: state_dtype; grad_accum, ema, master: always float32 (an
// accumulator or average in bfloat16 would lose the small increments).
struct TensorSpan {
  void* param = nullptr;
  const void* grad = nullptr;
  void* exp_avg = nullptr;         // SGD: momentum_buffer
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;  // amsgrad
  void* grad_accum = nullptr;      // GradInput::Accumulated, and the accumulate pass
  void* ema = nullptr;             // Ema::On
  void* master = nullptr;          // ParamUpdate::Master
  void* kahan_comp = nullptr;      // ParamUpdate::Kahan
  // DType::Blockwise8 states: one float32 absmax per block of each quantized buffer.
  void* exp_avg_absmax = nullptr;  // SGD: the momentum buffer's
  void* exp_avg_sq_absmax = nullptr;
  void* max_exp_avg_sq_absmax = nullptr;
  // ParamUpdate::Stochastic, StateRounding::Stochastic: the hash of (seed,
  // rounding_step, stream_id), computed on the host; element i's rounding is
  // keyed by (rounding_key, i), each 8-bit state's by a key derived from it.
  uint64_t rounding_key = 0;
  int64_t numel = 0;
  // maximize's sign x loss scale x clipping x 1/accumulation steps, set per
  // tensor on the host in double because clipnorm differs between tensors.
  float grad_scale = 1.f;
};

struct StepArgs {
  const TensorSpan* tensors = nullptr;
  int64_t num_tensors = 0;
  // Prefix sums of numel, num_tensors + 1 entries: the concatenated range.
  const int64_t* offsets = nullptr;
  StepScalars scalars;
  DecayMode decay = DecayMode::None;
  Amsgrad amsgrad = Amsgrad::Off;
  GradInput grad_input = GradInput::Scaled;
  Ema ema = Ema::Off;
  Momentum momentum = Momentum::Off;
  Nesterov nesterov = Nesterov::Off;
  DType param_dtype = DType::Float32;
  DType grad_dtype = DType::Float32;
  DType state_dtype = DType::Float32;
  ParamUpdate param_update = ParamUpdate::Nearest;
  StateRounding state_rounding = StateRounding::Nearest;  // 8-bit and 16-bit states
  int num_threads = 1;
};

// Sum of squares of each tensor's grad (plus its grad_accum where that is
// set: the sum an accumulating step will apply), in double, over
// fixed blocks of kNormBlock elements combined in a fixed order, so the bits
// never depend on the thread count or ISA level. Non-finite grads give a
// non-finite sum, which is how a step detects them without another pass.
constexpr int64_t kNormBlock = 4096;
struct NormArgs {
  const TensorSpan* tensors = nullptr;
  int64_t num_tensors = 0;
  // Prefix sums of each tensor's block count, num_tensors + 1 entries.
  const int64_t* block_offsets = nullptr;
  double* block_sums = nullptr;  // one per block, written by the pass
  DType grad_dtype = DType::Float32;
  int num_threads = 1;
};

// What each compiled ISA level exports: plain function pointers whose
// signatures never carry vector types. Each returns false if the level has
// no instantiation for the dtypes asked.
struct KernelTable {
  const char* level;
  bool (*adam_step)(const StepArgs& args);
  bool (*sgd_step)(const StepArgs& args);
  // grad_accum += grad (a gradient-accumulation call that does not update).
  bool (*accumulate)(const StepArgs& args);
  bool (*sum_squares)(const NormArgs& args);
  // The memory-roofline proxy: read four buffers, write three in place, with
  // the access pattern of an fp32 Adam step and the least arithmetic possible.
  void (*stream_pass)(const StepArgs& args);
  // Block-wise 8-bit conversion of a whole array (quant.h), one thread: codes
  // and one absmax per block from float32 values, and back.
  void (*quantize_blocks)(const float* values, uint8_t* codes, float* absmax, int64_t n, bool is_signed);
  void (*dequantize_blocks)(const uint8_t* codes, const float* absmax, float* values, int64_t n,
                            bool is_signed);
};

}  // namespace cpuadam
