// SPDX-License-Identifier: MIT
// Plain structs and enums the core speaks; no pybind11, no Python objects.
#pragma once

#include <cstdint>

namespace cpuadam {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// How weight decay enters the step; a template parameter of the kernel.
enum class DecayMode : int {
  None = 0,       // weight_decay == 0
  L2 = 1,         // Adam: g += weight_decay * p
  Decoupled = 2,  // AdamW: p *= decay_factor before the update
};

enum class Amsgrad : int { Off = 0, On = 1 };

// Per-step scalars, computed once on the host in double and rounded to float
// (see scalars.cpp); the kernel never recomputes them per element.
struct StepScalars {
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float one_minus_beta1 = 0.1f;
  float one_minus_beta2 = 0.001f;
  float step_size = 0.f;     // lr / bc1
  float bc2_sqrt = 1.f;      // sqrt(1 - beta2**step)
  float eps = 0.f;           // eps_mode "torch": eps; "keras": eps / sqrt(bc2)
  float weight_decay = 0.f;  // used by DecayMode::L2
  float decay_factor = 1.f;  // used by DecayMode::Decoupled: 1 - lr*wd or 1 - wd
  float grad_scale = 1.f;    // sign of maximize times the gradient scale
};

// One tensor's buffers; all have `numel` elements of the step's dtypes.
struct TensorSpan {
  void* param = nullptr;
  const void* grad = nullptr;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;  // null unless amsgrad
  int64_t numel = 0;
};

struct StepArgs {
  const TensorSpan* tensors = nullptr;
  int64_t num_tensors = 0;
  // Prefix sums of numel, num_tensors + 1 entries: the concatenated range.
  const int64_t* offsets = nullptr;
  StepScalars scalars;
  DecayMode decay = DecayMode::None;
  Amsgrad amsgrad = Amsgrad::Off;
  DType param_dtype = DType::Float32;
  DType grad_dtype = DType::Float32;
  DType state_dtype = DType::Float32;
  int num_threads = 1;
};

// The memory-roofline proxy: read four buffers, write three in place, with
// the access pattern of an fp32 step and the least arithmetic possible.
struct StreamArgs {
  const TensorSpan* tensors = nullptr;
  int64_t num_tensors = 0;
  const int64_t* offsets = nullptr;
  int num_threads = 1;
};

// What each compiled ISA level exports: plain function pointers whose
// signatures never carry vector types.
struct KernelTable {
  const char* level;
  // Returns false if this level has no instantiation for the dtypes asked.
  bool (*adam_step)(const StepArgs& args);
  void (*stream_pass)(const StreamArgs& args);
};

}  // namespace cpuadam
