// SPDX-License-Identifier: MIT
// The one kernel source compiled once per ISA level: instantiates kernel.h for
// the supported dtypes and flags, runs it over thread slices, exports a table.
#include <cmath>
#include <cstdint>

#include "threads.h"
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

// A runtime enum turned into a compile-time one: fn(Flag<value>{}).
template <auto V>
struct Flag {
  static constexpr auto value = V;
};

template <typename Fn>
void with_decay(DecayMode d, Fn&& fn) {
  switch (d) {
    case DecayMode::None: return fn(Flag<DecayMode::None>{});
    case DecayMode::L2: return fn(Flag<DecayMode::L2>{});
    case DecayMode::Decoupled: return fn(Flag<DecayMode::Decoupled>{});
  }
}

template <typename Fn>
void with_grad_ema(const StepArgs& a, Fn&& fn) {
  auto with_ema = [&](auto grad) {
    if (a.ema == Ema::On) return fn(grad, Flag<Ema::On>{});
    return fn(grad, Flag<Ema::Off>{});
  };
  switch (a.grad_input) {
    case GradInput::Raw: return with_ema(Flag<GradInput::Raw>{});
    case GradInput::Scaled: return with_ema(Flag<GradInput::Scaled>{});
    case GradInput::Accumulated: return with_ema(Flag<GradInput::Accumulated>{});
  }
}

// Runs fn(span, first, count) over this thread's slice of the concatenated
// range, for every thread of the team.
template <typename Fn>
void parallel_pieces(const TensorSpan* tensors, const int64_t* offsets, int64_t num_tensors,
                     int num_threads, Fn&& fn) {
  const int64_t total = offsets[num_tensors];
  auto slice = [&](int thread, int team) {
    Slice s = thread_slice(total, thread, team);
    for_each_piece(offsets, num_tensors, s, [&](int64_t t, int64_t first, int64_t count) {
      fn(tensors[t], first, count);
    });
  };
  parallel_for_threads(num_threads, slice);
}

// Runs fn(first, n) over [first, first + count) as at most two runs, the
// second starting where `base` (elements of `elem` bytes) is 64-byte aligned:
// a vector that straddles two cache lines costs two accesses. Buffers whose
// addresses agree modulo 64 (the optimizers allocate their state that way)
// are then all aligned together. The per-element math is the same either way.
template <typename Fn>
void aligned_runs(const void* base, int64_t elem, int64_t first, int64_t count, Fn&& fn) {
  constexpr uintptr_t kLine = 64;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(first * elem);
  int64_t head = static_cast<int64_t>((kLine - addr % kLine) % kLine) / elem;
  if (head > count) head = count;
  if (head > 0) fn(first, head);
  if (count > head) fn(first + head, count - head);
}

template <typename T>
T* at(void* base, int64_t first) {
  return base == nullptr ? nullptr : static_cast<T*>(base) + first;
}

template <typename T>
const T* at(const void* base, int64_t first) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + first;
}

template <typename P, typename G, typename S>
void adam_typed(const StepArgs& a) {
  with_decay(a.decay, [&](auto decay) {
    with_grad_ema(a, [&](auto grad_input, auto ema) {
      auto run = [&](auto amsgrad) {
        parallel_pieces(a.tensors, a.offsets, a.num_tensors, a.num_threads,
                        [&](const TensorSpan& s, int64_t piece_first, int64_t piece_count) {
                          aligned_runs(s.param, sizeof(P), piece_first, piece_count,
                                       [&](int64_t first, int64_t count) {
                            adam_range<decay.value, amsgrad.value, grad_input.value, ema.value>(
                                at<P>(s.param, first), at<G>(s.grad, first),
                                at<S>(s.exp_avg, first), at<S>(s.exp_avg_sq, first),
                                at<S>(s.max_exp_avg_sq, first), at<G>(s.grad_accum, first),
                                at<P>(s.ema, first), count, s.grad_scale, a.scalars);
                          });
                        });
      };
      if (a.amsgrad == Amsgrad::On) run(Flag<Amsgrad::On>{}); else run(Flag<Amsgrad::Off>{});
    });
  });
}

template <typename P, typename G, typename S>
void sgd_typed(const StepArgs& a) {
  const DecayMode decay_mode = a.decay == DecayMode::None ? DecayMode::None : DecayMode::L2;
  with_decay(decay_mode, [&](auto decay) {
    if constexpr (decay.value != DecayMode::Decoupled) {
      with_grad_ema(a, [&](auto grad_input, auto ema) {
        auto run = [&](auto momentum, auto nesterov) {
          parallel_pieces(a.tensors, a.offsets, a.num_tensors, a.num_threads,
                          [&](const TensorSpan& s, int64_t piece_first, int64_t piece_count) {
                            aligned_runs(s.param, sizeof(P), piece_first, piece_count,
                                         [&](int64_t first, int64_t count) {
                              sgd_range<decay.value, momentum.value, nesterov.value,
                                        grad_input.value, ema.value>(
                                  at<P>(s.param, first), at<G>(s.grad, first),
                                  at<S>(s.exp_avg, first), at<G>(s.grad_accum, first),
                                  at<P>(s.ema, first), count, s.grad_scale, a.scalars);
                            });
                          });
        };
        const bool nesterov = a.nesterov == Nesterov::On;
        switch (a.momentum) {
          case Momentum::Off: return run(Flag<Momentum::Off>{}, Flag<Nesterov::Off>{});
          case Momentum::First:
            return nesterov ? run(Flag<Momentum::First>{}, Flag<Nesterov::On>{})
                            : run(Flag<Momentum::First>{}, Flag<Nesterov::Off>{});
          case Momentum::On:
            return nesterov ? run(Flag<Momentum::On>{}, Flag<Nesterov::On>{})
                            : run(Flag<Momentum::On>{}, Flag<Nesterov::Off>{});
        }
      });
    }
  });
}

bool all_float32(const StepArgs& a) {
  return a.param_dtype == DType::Float32 && a.grad_dtype == DType::Float32 &&
         a.state_dtype == DType::Float32;
}

bool adam_step(const StepArgs& a) {
  if (!all_float32(a)) return false;
  adam_typed<float, float, float>(a);
  return true;
}

bool sgd_step(const StepArgs& a) {
  if (!all_float32(a)) return false;
  sgd_typed<float, float, float>(a);
  return true;
}

bool accumulate(const StepArgs& a) {
  if (a.grad_dtype != DType::Float32) return false;
  parallel_pieces(a.tensors, a.offsets, a.num_tensors, a.num_threads,
                  [&](const TensorSpan& s, int64_t piece_first, int64_t piece_count) {
                    aligned_runs(s.grad_accum, sizeof(float), piece_first, piece_count,
                                 [&](int64_t first, int64_t count) {
                      accumulate_range(at<float>(s.grad, first), at<float>(s.grad_accum, first),
                                       count);
                    });
                  });
  return true;
}

bool sum_squares(const NormArgs& a) {
  if (a.grad_dtype != DType::Float32) return false;
  const int64_t total_blocks = a.block_offsets[a.num_tensors];
  auto slice = [&](int thread, int team) {
    // Threads split the blocks; each block's sum depends only on its elements.
    Slice s = thread_slice(total_blocks, thread, team);
    for_each_piece(a.block_offsets, a.num_tensors, s, [&](int64_t t, int64_t first, int64_t count) {
      const TensorSpan& span = a.tensors[t];
      const float* grad = static_cast<const float*>(span.grad);
      const float* accum = static_cast<const float*>(span.grad_accum);
      for (int64_t b = first; b < first + count; ++b) {
        const int64_t lo = b * kNormBlock;
        const int64_t n = span.numel - lo < kNormBlock ? span.numel - lo : kNormBlock;
        a.block_sums[a.block_offsets[t] + b] =
            block_sum_squares(grad + lo, accum == nullptr ? nullptr : accum + lo, n);
      }
    });
  };
  parallel_for_threads(a.num_threads, slice);
  return true;
}

void stream_pass(const StepArgs& a) {
  parallel_pieces(a.tensors, a.offsets, a.num_tensors, a.num_threads,
                  [&](const TensorSpan& s, int64_t piece_first, int64_t piece_count) {
                    aligned_runs(s.param, sizeof(float), piece_first, piece_count,
                                 [&](int64_t first, int64_t count) {
                      stream_range(at<float>(s.param, first), at<float>(s.grad, first),
                                   at<float>(s.exp_avg, first), at<float>(s.exp_avg_sq, first),
                                   count);
                    });
                  });
}

}  // namespace

KernelTable kernel_table() {
  return {CPUADAM_STR(CPUADAM_LEVEL), &adam_step, &sgd_step, &accumulate, &sum_squares, &stream_pass};
}

}  // namespace CPUADAM_LEVEL
}  // namespace cpuadam
