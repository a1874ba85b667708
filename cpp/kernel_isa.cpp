// SPDX-License-Identifier: MIT
// The one kernel source compiled once per ISA level: instantiates kernel.h for
// the supported dtypes and flags, runs it over thread slices, exports a table.
#include <omp.h>

#include <cstdint>

#include "types.h"

#ifndef CPUADAM_LEVEL
#error "CPUADAM_LEVEL must name the ISA level this file is compiled for"
#endif
#define CPUADAM_STR2(x) #x
#define CPUADAM_STR(x) CPUADAM_STR2(x)

namespace cpuadam {
// Everything below is per level: distinct symbols, so the linker never picks
// one level's copy of an inline function for another level's caller.
namespace CPUADAM_LEVEL {

#include "kernel.h"
#include "partition.h"

namespace {

template <DecayMode kDecay, Amsgrad kAmsgrad, typename P, typename G, typename S>
void adam_step_typed(const StepArgs& a) {
  const int64_t total = a.offsets[a.num_tensors];
#pragma omp parallel num_threads(a.num_threads) if (a.num_threads > 1)
  {
    Slice s = thread_slice(total, omp_get_thread_num(), omp_get_num_threads());
    for_each_piece(a.offsets, a.num_tensors, s, [&](int64_t t, int64_t first, int64_t count) {
      const TensorSpan& span = a.tensors[t];
      S* max_exp_avg_sq = nullptr;
      if constexpr (kAmsgrad == Amsgrad::On) max_exp_avg_sq = static_cast<S*>(span.max_exp_avg_sq) + first;
      adam_range<kDecay, kAmsgrad>(static_cast<P*>(span.param) + first,
                                   static_cast<const G*>(span.grad) + first,
                                   static_cast<S*>(span.exp_avg) + first,
                                   static_cast<S*>(span.exp_avg_sq) + first, max_exp_avg_sq,
                                   count, a.scalars);
    });
  }
}

template <typename P, typename G, typename S>
void adam_step_flags(const StepArgs& a) {
  const bool ams = a.amsgrad == Amsgrad::On;
  switch (a.decay) {
    case DecayMode::None:
      return ams ? adam_step_typed<DecayMode::None, Amsgrad::On, P, G, S>(a)
                 : adam_step_typed<DecayMode::None, Amsgrad::Off, P, G, S>(a);
    case DecayMode::L2:
      return ams ? adam_step_typed<DecayMode::L2, Amsgrad::On, P, G, S>(a)
                 : adam_step_typed<DecayMode::L2, Amsgrad::Off, P, G, S>(a);
    case DecayMode::Decoupled:
      return ams ? adam_step_typed<DecayMode::Decoupled, Amsgrad::On, P, G, S>(a)
                 : adam_step_typed<DecayMode::Decoupled, Amsgrad::Off, P, G, S>(a);
  }
}

bool adam_step(const StepArgs& a) {
  if (a.param_dtype == DType::Float32 && a.grad_dtype == DType::Float32 &&
      a.state_dtype == DType::Float32) {
    adam_step_flags<float, float, float>(a);
    return true;
  }
  return false;
}

void stream_pass(const StreamArgs& a) {
  const int64_t total = a.offsets[a.num_tensors];
#pragma omp parallel num_threads(a.num_threads) if (a.num_threads > 1)
  {
    Slice s = thread_slice(total, omp_get_thread_num(), omp_get_num_threads());
    for_each_piece(a.offsets, a.num_tensors, s, [&](int64_t t, int64_t first, int64_t count) {
      const TensorSpan& span = a.tensors[t];
      stream_range(static_cast<float*>(span.param) + first,
                   static_cast<const float*>(span.grad) + first,
                   static_cast<float*>(span.exp_avg) + first,
                   static_cast<float*>(span.exp_avg_sq) + first, count);
    });
  }
}

}  // namespace

KernelTable kernel_table() { return {CPUADAM_STR(CPUADAM_LEVEL), &adam_step, &stream_pass}; }

}  // namespace CPUADAM_LEVEL
}  // namespace cpuadam
