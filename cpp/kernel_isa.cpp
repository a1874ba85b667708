// SPDX-License-Identifier: MIT
// The one kernel source compiled once per ISA level: instantiates kernel.h for
// the supported dtypes and flags, runs it over thread slices, exports a table.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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
#include "quant.h"

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

// kRaw false: GradInput::Raw runs as Scaled, which gives the same bits (the
// binding picks Raw only when every scale is 1 and nothing is clipped), and
// saves a third of the instantiations for grads that are not float32.
template <bool kRaw = true, typename Fn>
void with_grad_ema(const StepArgs& a, Fn&& fn) {
  auto with_ema = [&](auto grad) {
    if (a.ema == Ema::On) return fn(grad, Flag<Ema::On>{});
    return fn(grad, Flag<Ema::Off>{});
  };
  switch (a.grad_input) {
    case GradInput::Raw:
      if constexpr (kRaw) return with_ema(Flag<GradInput::Raw>{});
      else return with_ema(Flag<GradInput::Scaled>{});
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

template <typename T>
T* at_bytes(void* base, int64_t first, int64_t elem) {
  return base == nullptr ? nullptr : reinterpret_cast<T*>(static_cast<char*>(base) + first * elem);
}

// One run of the arithmetic over n elements: the param in the type the
// arithmetic reads (float32: the param itself, a tile or the master; bfloat16:
// the param itself, see run_direct), the grad likewise.
struct RunPtrs {
  void* param;
  // Stochastic rounding in place: element i of the run is keyed by index0 + i.
  uint32_t index0, key0, key1;
  // A master stepped in place (param is the master): the bfloat16 param;
  // Kahan in place: the compensation.
  void* rounded;
  const void* grad;
  void* exp_avg;  // SGD: momentum_buffer
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* grad_accum;
  float* ema;
};

// The arithmetic for one set of flags and (G, S), behind a plain function
// pointer: the drivers below (one per param dtype and update mode) call it per
// tile without being instantiated again for every flag combination.
using RangeFn = void (*)(const RunPtrs& r, int64_t n, float grad_scale, const StepScalars& sc);

// The param handle of a run: a pointer, a StochasticParam or a MasterParam.
template <typename P>
auto param_handle(const RunPtrs& r) {
  if constexpr (std::is_same_v<P, StochasticParam>)
    return StochasticParam{static_cast<BFloat16*>(r.param), r.index0, r.key0, r.key1};
  else if constexpr (std::is_same_v<P, MasterParam>)
    return MasterParam{static_cast<float*>(r.param), static_cast<BFloat16*>(r.rounded)};
  else if constexpr (std::is_same_v<P, KahanParam>)
    return KahanParam{static_cast<BFloat16*>(r.param), static_cast<BFloat16*>(r.rounded)};
  else
    return static_cast<P*>(r.param);
}

template <DecayMode kDecay, Amsgrad kAmsgrad, GradInput kGrad, Ema kEma, typename P, typename G,
          typename S>
void adam_run(const RunPtrs& r, int64_t n, float grad_scale, const StepScalars& sc) {
  adam_range<kDecay, kAmsgrad, kGrad, kEma>(
      param_handle<P>(r), static_cast<const G*>(r.grad), static_cast<S*>(r.exp_avg),
      static_cast<S*>(r.exp_avg_sq), static_cast<S*>(r.max_exp_avg_sq), r.grad_accum, r.ema, n,
      grad_scale, sc);
}

template <DecayMode kDecay, Momentum kMomentum, Nesterov kNesterov, GradInput kGrad, Ema kEma,
          typename P, typename G, typename S>
void sgd_run(const RunPtrs& r, int64_t n, float grad_scale, const StepScalars& sc) {
  sgd_range<kDecay, kMomentum, kNesterov, kGrad, kEma>(param_handle<P>(r),
                                                       static_cast<const G*>(r.grad),
                                                       static_cast<S*>(r.exp_avg), r.grad_accum,
                                                       r.ema, n, grad_scale, sc);
}

// P is float (the param, a tile or the master) or, for run_direct, bfloat16
// without EMA: nullptr for the EMA flags there, which run_direct never asks for.
template <typename P, typename G, typename S>
RangeFn adam_fn(const StepArgs& a) {
  RangeFn fn = nullptr;
  with_decay(a.decay, [&](auto decay) {
    with_grad_ema<std::is_same_v<G, float>>(a, [&](auto grad_input, auto ema) {
      if constexpr (std::is_same_v<P, float> || ema.value == Ema::Off) {
        if (a.amsgrad == Amsgrad::On)
          fn = &adam_run<decay.value, Amsgrad::On, grad_input.value, ema.value, P, G, S>;
        else
          fn = &adam_run<decay.value, Amsgrad::Off, grad_input.value, ema.value, P, G, S>;
      }
    });
  });
  return fn;
}

template <typename P, typename G, typename S>
RangeFn sgd_fn(const StepArgs& a) {
  RangeFn fn = nullptr;
  const DecayMode decay_mode = a.decay == DecayMode::None ? DecayMode::None : DecayMode::L2;
  with_decay(decay_mode, [&](auto decay) {
    if constexpr (decay.value != DecayMode::Decoupled) {
      with_grad_ema<std::is_same_v<G, float>>(a, [&](auto grad_input, auto ema) {
        auto pick = [&](auto momentum, auto nesterov) {
          if constexpr (std::is_same_v<P, float> || ema.value == Ema::Off)
            fn = &sgd_run<decay.value, momentum.value, nesterov.value, grad_input.value,
                          ema.value, P, G, S>;
        };
        const bool nesterov = a.nesterov == Nesterov::On;
        switch (a.momentum) {
          case Momentum::Off: return pick(Flag<Momentum::Off>{}, Flag<Nesterov::Off>{});
          case Momentum::First:
            return nesterov ? pick(Flag<Momentum::First>{}, Flag<Nesterov::On>{})
                            : pick(Flag<Momentum::First>{}, Flag<Nesterov::Off>{});
          case Momentum::On:
            return nesterov ? pick(Flag<Momentum::On>{}, Flag<Nesterov::On>{})
                            : pick(Flag<Momentum::On>{}, Flag<Nesterov::Off>{});
        }
      });
    }
  });
  return fn;
}

// Elements per tile when a bfloat16/float16 param or a float16 grad is
// converted to float32 around the arithmetic: 2 KiB per tile, so the tiles stay
// in L1 between the conversion, the step and the store.
constexpr int64_t kTile = 512;

// Steps [first, first + count) of one tensor. float32 params with float32 or
// bfloat16 grads run in place; otherwise tile by tile: convert in, step, store.
// A stepped float32 tile of n elements from element i0 back into a 16-bit param.
// Stochastic rounding keys element i by i0 + i; a run never crosses a multiple of
// 2^32, whose high part is folded into the key: (index0, key0, key1) of the run
// from element i0 under a tensor's (or a state's) 64-bit key.
inline void rounding_keys(uint64_t key, int64_t i0, RunPtrs& r) {
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(i0) >> 32);
  r.index0 = static_cast<uint32_t>(i0);
  r.key0 = static_cast<uint32_t>(key);
  r.key1 = static_cast<uint32_t>(key >> 32) ^ mix32(hi);
}

template <ParamUpdate kUpdate, typename P>
void store_param_run(const float* tile, const TensorSpan& s, int64_t i0, int64_t n) {
  RunPtrs keys{};
  rounding_keys(s.rounding_key, i0, keys);
  store_param_tile<kUpdate>(tile, at<P>(s.param, i0), at<P>(s.kahan_comp, i0), n, keys.index0,
                            keys.key0, keys.key1);
}

// Elements from i0 to the next multiple of 2^32, where stochastic keys change.
inline int64_t to_key_boundary(int64_t i0) { return (int64_t{1} << 32) - (i0 & 0xFFFFFFFF); }

// kDirect: fn reads and writes the bfloat16 param (or its master) itself (step_direct).
template <typename P, ParamUpdate kUpdate, typename G, bool kDirect = false>
void run_tensor(const TensorSpan& s, int64_t first, int64_t count, RangeFn fn, int64_t state_size,
                const StepScalars& sc) {
  constexpr bool kTiledParam = !std::is_same_v<P, float> && !kDirect;
  constexpr bool kTiledGrad = std::is_same_v<G, Float16>;
  auto ptrs = [&](int64_t i0) {
    return RunPtrs{at<P>(s.param, i0), 0, 0, 0, nullptr, at<G>(s.grad, i0),
                   at_bytes<void>(s.exp_avg, i0, state_size),
                   at_bytes<void>(s.exp_avg_sq, i0, state_size),
                   at_bytes<void>(s.max_exp_avg_sq, i0, state_size),
                   at<float>(s.grad_accum, i0), at<float>(s.ema, i0)};
  };
  if constexpr (kDirect) {
    // One run; stochastic runs stop at multiples of 2^32, where the keys change.
    for (int64_t i0 = first, end = first + count; i0 < end;) {
      int64_t n = end - i0;
      RunPtrs r = ptrs(i0);
      if constexpr (kUpdate == ParamUpdate::Stochastic) {
        n = n < to_key_boundary(i0) ? n : to_key_boundary(i0);
        rounding_keys(s.rounding_key, i0, r);
      } else if constexpr (kUpdate == ParamUpdate::Master) {
        r.rounded = r.param;
        r.param = at<float>(s.master, i0);
      } else if constexpr (kUpdate == ParamUpdate::Kahan) {
        r.rounded = at<P>(s.kahan_comp, i0);
      }
      fn(r, n, s.grad_scale, sc);
      i0 += n;
    }
  } else if constexpr (!kTiledParam && !kTiledGrad) {
    fn(ptrs(first), count, s.grad_scale, sc);
  } else {
    alignas(64) float param_tile[kTile];
    alignas(64) float grad_tile[kTile];
    for (int64_t i0 = first, end = first + count; i0 < end;) {
      int64_t n = end - i0 < kTile ? end - i0 : kTile;
      // The stochastic key's index is 32 bits: runs stop at multiples of 2^32.
      n = n < to_key_boundary(i0) ? n : to_key_boundary(i0);
      RunPtrs r = ptrs(i0);
      if constexpr (kTiledGrad) {
        load_array(at<Float16>(s.grad, i0), grad_tile, n);
        r.grad = grad_tile;
      }
      if constexpr (kTiledParam) {
        if constexpr (kUpdate == ParamUpdate::Master) {
          r.param = at<float>(s.master, i0);
        } else {
          load_param_tile<kUpdate>(at<P>(s.param, i0), at<P>(s.kahan_comp, i0), param_tile, n);
          r.param = param_tile;
        }
      }
      fn(r, n, s.grad_scale, sc);
      if constexpr (kTiledParam) store_param_run<kUpdate, P>(static_cast<float*>(r.param), s, i0, n);
      i0 += n;
    }
  }
}

template <typename P, ParamUpdate kUpdate, typename G, bool kDirect = false>
void run_all(const StepArgs& a, RangeFn fn, int64_t state_size) {
  parallel_pieces(a.tensors, a.offsets, a.num_tensors, a.num_threads,
                  [&](const TensorSpan& s, int64_t piece_first, int64_t piece_count) {
                    aligned_runs(s.param, sizeof(P), piece_first, piece_count,
                                 [&](int64_t first, int64_t count) {
                      run_tensor<P, kUpdate, G, kDirect>(s, first, count, fn, state_size, a.scalars);
                    });
                  });
}

template <typename P, typename G>
void run_update(const StepArgs& a, RangeFn fn, int64_t state_size) {
  if constexpr (std::is_same_v<P, float>) {
    run_all<P, ParamUpdate::Nearest, G>(a, fn, state_size);
  } else {
    switch (a.param_update) {
      case ParamUpdate::Nearest: return run_all<P, ParamUpdate::Nearest, G>(a, fn, state_size);
      case ParamUpdate::Stochastic: return run_all<P, ParamUpdate::Stochastic, G>(a, fn, state_size);
      case ParamUpdate::Kahan: return run_all<P, ParamUpdate::Kahan, G>(a, fn, state_size);
      case ParamUpdate::Master: return run_all<P, ParamUpdate::Master, G>(a, fn, state_size);
    }
  }
}

template <typename G>
void run_param(const StepArgs& a, RangeFn fn, int64_t state_size) {
  switch (a.param_dtype) {
    case DType::Float32: return run_update<float, G>(a, fn, state_size);
    case DType::BFloat16: return run_update<BFloat16, G>(a, fn, state_size);
    case DType::Float16: return run_update<Float16, G>(a, fn, state_size);
  }
}

// --- 8-bit block-wise states (quant.h), and 16-bit states rounded stochastically ----------
// Each block of kQuantBlock elements is one tile: its codes are dequantized into
// float32 tiles, the float32 arithmetic (the same RangeFn as float32 states)
// steps the param from those exact values, and the new float32 moments are
// quantized back. Threads take whole blocks, so a block is never split and the
// bits do not depend on the thread count. bfloat16/float16 states under
// StateRounding::Stochastic take the same road: loaded into the tiles, stepped
// in float32, stored by stochastic rounding (S, the stored state type: uint8_t
// codes, BFloat16 or Float16).

struct QuantTiles {
  alignas(64) float exp_avg[kQuantBlock];
  alignas(64) float exp_avg_sq[kQuantBlock];
  alignas(64) float max_exp_avg_sq[kQuantBlock];
  alignas(64) float param[kQuantBlock];
  alignas(64) float grad[kQuantBlock];
};

// rounding_bits of elements index0 .. index0 + n - 1 (never crossing a multiple of 2^32).
inline void fill_rounding_bits(uint32_t* out, int64_t n, uint32_t index0, uint32_t key0, uint32_t key1) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256i order = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        rounding_bits8(index0 + static_cast<uint32_t>(i), order, key0, key1));
#endif
  for (; i < n; ++i) out[i] = rounding_bits(index0 + static_cast<uint32_t>(i), key0, key1);
}

// Blocks [block0, block0 + nblocks) of one tensor.
template <typename S, typename P, ParamUpdate kUpdate, typename G>
void run_blocks_tiled(const TensorSpan& s, int64_t block0, int64_t nblocks, RangeFn fn,
                      const StepScalars& sc, StateRounding rounding) {
  constexpr bool kCodes = std::is_same_v<S, uint8_t>;
  constexpr bool kTiledParam = !std::is_same_v<P, float>;
  constexpr bool kTiledGrad = std::is_same_v<G, Float16>;
  const QuantTable& signed_map = signed_table();
  const QuantTable& unsigned_map = unsigned_table();
  QuantTiles t;
  // A state in flight: its codes (or 16-bit values), its absmax (codes only) and
  // the float32 tile it is stepped in.
  struct Moment {
    S* codes;
    float* absmax;
    float* tile;
    const QuantTable* map;
    uint64_t key;  // StateRounding::Stochastic: this state's own rounding key
  };
  // Each state's stochastic rounding gets a key of its own, apart from the param's
  // (kStateKeyTag times 1, 2, 3 mixed into the tensor's key).
  constexpr uint64_t kStateKeyTag = 0x9E3779B97F4A7C15ull;
  const auto state_key = [&](uint64_t which) { return s.rounding_key ^ (kStateKeyTag * which); };
  Moment moments[3];
  int num_moments = 0;
  if (s.exp_avg != nullptr)
    moments[num_moments++] = {static_cast<S*>(s.exp_avg), static_cast<float*>(s.exp_avg_absmax), t.exp_avg,
                              &signed_map, state_key(1)};
  if (s.exp_avg_sq != nullptr)
    moments[num_moments++] = {static_cast<S*>(s.exp_avg_sq), static_cast<float*>(s.exp_avg_sq_absmax), t.exp_avg_sq,
                              &unsigned_map, state_key(2)};
  if (s.max_exp_avg_sq != nullptr)
    moments[num_moments++] = {static_cast<S*>(s.max_exp_avg_sq),
                              static_cast<float*>(s.max_exp_avg_sq_absmax),
                              t.max_exp_avg_sq, &unsigned_map, state_key(3)};
  const bool stochastic = rounding == StateRounding::Stochastic;
  alignas(32) uint32_t random[kQuantBlock];
  for (int64_t b = block0; b < block0 + nblocks; ++b) {
    const int64_t i0 = b * kQuantBlock;
    const int64_t n = s.numel - i0 < kQuantBlock ? s.numel - i0 : kQuantBlock;
    for (int k = 0; k < num_moments; ++k) {
      if constexpr (kCodes)
        dequantize_block(moments[k].codes + i0, moments[k].absmax[b], moments[k].tile, n, *moments[k].map);
      else
        load_param_tile<ParamUpdate::Nearest>(moments[k].codes + i0, static_cast<const S*>(nullptr),
                                              moments[k].tile, n);
    }
    RunPtrs r{at<float>(s.param, i0), 0, 0, 0, nullptr, at<G>(s.grad, i0),
              s.exp_avg != nullptr ? t.exp_avg : nullptr,
              s.exp_avg_sq != nullptr ? t.exp_avg_sq : nullptr,
              s.max_exp_avg_sq != nullptr ? t.max_exp_avg_sq : nullptr,
              at<float>(s.grad_accum, i0), at<float>(s.ema, i0)};
    if constexpr (kTiledGrad) {
      load_array(at<Float16>(s.grad, i0), t.grad, n);
      r.grad = t.grad;
    }
    if constexpr (kTiledParam) {
      if constexpr (kUpdate == ParamUpdate::Master) {
        r.param = at<float>(s.master, i0);
      } else {
        load_param_tile<kUpdate>(at<P>(s.param, i0), at<P>(s.kahan_comp, i0), t.param, n);
        r.param = t.param;
      }
    }
    fn(r, n, s.grad_scale, sc);
    // Blocks never cross a multiple of 2^32 (a multiple of kQuantBlock).
    if constexpr (kTiledParam) store_param_run<kUpdate, P>(static_cast<float*>(r.param), s, i0, n);
    for (int k = 0; k < num_moments; ++k) {
      RunPtrs keys{};
      rounding_keys(moments[k].key, i0, keys);
      if constexpr (kCodes) {
        if (stochastic) fill_rounding_bits(random, n, keys.index0, keys.key0, keys.key1);
        moments[k].absmax[b] = quantize_block(moments[k].tile, moments[k].codes + i0, n, *moments[k].map,
                                              stochastic ? random : nullptr);
      } else {
        store_param_tile<ParamUpdate::Stochastic>(moments[k].tile, moments[k].codes + i0, static_cast<S*>(nullptr),
                                                  n, keys.index0, keys.key0, keys.key1);
      }
    }
  }
}

template <typename S, typename P, ParamUpdate kUpdate, typename G>
void run_all_tiled(const StepArgs& a, RangeFn fn) {
  // The concatenated range of blocks, split between threads.
  std::vector<int64_t> block_offsets(static_cast<size_t>(a.num_tensors) + 1, 0);
  for (int64_t t = 0; t < a.num_tensors; ++t)
    block_offsets[t + 1] = block_offsets[t] + (a.tensors[t].numel + kQuantBlock - 1) / kQuantBlock;
  const int64_t total = block_offsets[a.num_tensors];
  const int num_threads = total < a.num_threads ? (total > 0 ? static_cast<int>(total) : 1) : a.num_threads;
  auto slice = [&](int me, int team) {
    // Whole blocks per thread (thread_slice would round to kSliceAlign blocks).
    const int64_t per = (total + team - 1) / team;
    Slice sl{per * me < total ? per * me : total, per * (me + 1) < total ? per * (me + 1) : total};
    for_each_piece(block_offsets.data(), a.num_tensors, sl, [&](int64_t t, int64_t first, int64_t count) {
      run_blocks_tiled<S, P, kUpdate, G>(a.tensors[t], first, count, fn, a.scalars, a.state_rounding);
    });
  };
  parallel_for_threads(num_threads, slice);
}

template <typename S, typename P, typename G>
void run_update_tiled(const StepArgs& a, RangeFn fn) {
  if constexpr (std::is_same_v<P, float>) {
    run_all_tiled<S, P, ParamUpdate::Nearest, G>(a, fn);
  } else {
    switch (a.param_update) {
      case ParamUpdate::Nearest: return run_all_tiled<S, P, ParamUpdate::Nearest, G>(a, fn);
      case ParamUpdate::Stochastic: return run_all_tiled<S, P, ParamUpdate::Stochastic, G>(a, fn);
      case ParamUpdate::Kahan: return run_all_tiled<S, P, ParamUpdate::Kahan, G>(a, fn);
      case ParamUpdate::Master: return run_all_tiled<S, P, ParamUpdate::Master, G>(a, fn);
    }
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The float32-state arithmetic (S = float) run on the tiles of the states.
template <template <typename, typename, typename> class Pick, typename S>
bool step_tiled(const StepArgs& a) {
  auto by_param = [&](auto grad_type, RangeFn fn) {
    using G = typename decltype(grad_type)::type;
    switch (a.param_dtype) {
      case DType::Float32: return run_update_tiled<S, float, G>(a, fn);
      case DType::BFloat16: return run_update_tiled<S, BFloat16, G>(a, fn);
      case DType::Float16: return run_update_tiled<S, Float16, G>(a, fn);
      case DType::Blockwise8: return;
    }
  };
  switch (a.grad_dtype) {
    case DType::Float32: by_param(TypeTag<float>{}, Pick<float, float, float>::fn(a)); return true;
    case DType::BFloat16:
      by_param(TypeTag<BFloat16>{}, Pick<float, BFloat16, float>::fn(a));
      return true;
    case DType::Float16: by_param(TypeTag<Float16>{}, Pick<float, float, float>::fn(a)); return true;
    case DType::Blockwise8: return false;
  }
  return false;
}

// bfloat16 params in every update mode (nearest, stochastic, Kahan, from a
// float32 master), with bfloat16 grads and no EMA (a bfloat16 model, with bfloat16 or
// float32 moments): the arithmetic reads and writes the param (or the master
// and the param) itself, with no float32 tile between (the tile's extra loads,
// stores and loop cost as much as the conversions).
template <template <typename, typename, typename> class Pick>
bool step_direct(const StepArgs& a) {
  if (a.param_dtype != DType::BFloat16 || a.grad_dtype != DType::BFloat16 || a.ema != Ema::Off ||
      (a.state_dtype != DType::BFloat16 && a.state_dtype != DType::Float32))
    return false;
  auto run = [&](auto update, auto handle) {
    using H = typename decltype(handle)::type;
    if (a.state_dtype == DType::BFloat16)
      run_all<BFloat16, decltype(update)::value, BFloat16, true>(a, Pick<H, BFloat16, BFloat16>::fn(a), 2);
    else
      run_all<BFloat16, decltype(update)::value, BFloat16, true>(a, Pick<H, BFloat16, float>::fn(a), 4);
  };
  switch (a.param_update) {
    case ParamUpdate::Nearest: run(Flag<ParamUpdate::Nearest>{}, TypeTag<BFloat16>{}); return true;
    case ParamUpdate::Stochastic:
      run(Flag<ParamUpdate::Stochastic>{}, TypeTag<StochasticParam>{});
      return true;
    case ParamUpdate::Master: run(Flag<ParamUpdate::Master>{}, TypeTag<MasterParam>{}); return true;
    case ParamUpdate::Kahan: run(Flag<ParamUpdate::Kahan>{}, TypeTag<KahanParam>{}); return true;
    default: return false;
  }
}

// The arithmetic reads float32 or bfloat16 grads; float16 grads come as a
// float32 tile (the level's F16C conversion), so fn is picked for G = float.
template <template <typename, typename, typename> class Pick>
bool step(const StepArgs& a) {
  if (a.state_dtype == DType::Blockwise8) return step_tiled<Pick, uint8_t>(a);
  if (a.state_rounding == StateRounding::Stochastic) {
    if (a.state_dtype == DType::BFloat16) return step_tiled<Pick, BFloat16>(a);
    if (a.state_dtype == DType::Float16) return step_tiled<Pick, Float16>(a);
  }
  if (step_direct<Pick>(a)) return true;
  if (a.state_dtype == DType::Float16) {
    // float16 moments (a float16 model as torch.optim keeps it): float32 grads, or
    // float16 grads as a float32 tile; the binding refuses bfloat16 grads.
    switch (a.grad_dtype) {
      case DType::Float32: run_param<float>(a, Pick<float, float, Float16>::fn(a), 2); return true;
      case DType::Float16: run_param<Float16>(a, Pick<float, float, Float16>::fn(a), 2); return true;
      default: return false;
    }
  }
  const bool bf16_state = a.state_dtype == DType::BFloat16;
  const int64_t state_size = bf16_state ? 2 : 4;
  switch (a.grad_dtype) {
    case DType::Float32:
      run_param<float>(a, bf16_state ? Pick<float, float, BFloat16>::fn(a)
                                     : Pick<float, float, float>::fn(a),
                       state_size);
      return true;
    case DType::BFloat16:
      run_param<BFloat16>(a, bf16_state ? Pick<float, BFloat16, BFloat16>::fn(a)
                                        : Pick<float, BFloat16, float>::fn(a),
                          state_size);
      return true;
    case DType::Float16:
      run_param<Float16>(a, bf16_state ? Pick<float, float, BFloat16>::fn(a)
                                       : Pick<float, float, float>::fn(a),
                         state_size);
      return true;
  }
  return false;
}

template <typename P, typename G, typename S>
struct PickAdam {
  static RangeFn fn(const StepArgs& a) { return adam_fn<P, G, S>(a); }
};

template <typename P, typename G, typename S>
struct PickSgd {
  static RangeFn fn(const StepArgs& a) { return sgd_fn<P, G, S>(a); }
};

bool adam_step(const StepArgs& a) { return step<PickAdam>(a); }

bool sgd_step(const StepArgs& a) { return step<PickSgd>(a); }

template <typename G>
void accumulate_typed(const StepArgs& a) {
  parallel_pieces(a.tensors, a.offsets, a.num_tensors, a.num_threads,
                  [&](const TensorSpan& s, int64_t piece_first, int64_t piece_count) {
                    aligned_runs(s.grad_accum, sizeof(float), piece_first, piece_count,
                                 [&](int64_t first, int64_t count) {
                      if constexpr (std::is_same_v<G, Float16>) {
                        alignas(64) float tile[kTile];
                        for (int64_t i0 = first; i0 < first + count; i0 += kTile) {
                          const int64_t n = first + count - i0 < kTile ? first + count - i0 : kTile;
                          load_array(at<Float16>(s.grad, i0), tile, n);
                          accumulate_range(tile, at<float>(s.grad_accum, i0), n);
                        }
                      } else {
                        accumulate_range(at<G>(s.grad, first), at<float>(s.grad_accum, first),
                                         count);
                      }
                    });
                  });
}

bool accumulate(const StepArgs& a) {
  switch (a.grad_dtype) {
    case DType::Float32: accumulate_typed<float>(a); return true;
    case DType::BFloat16: accumulate_typed<BFloat16>(a); return true;
    case DType::Float16: accumulate_typed<Float16>(a); return true;
  }
  return false;
}

template <typename G>
void sum_squares_typed(const NormArgs& a) {
  const int64_t total_blocks = a.block_offsets[a.num_tensors];
  auto slice = [&](int thread, int team) {
    // Threads split the blocks; each block's sum depends only on its elements.
    Slice s = thread_slice(total_blocks, thread, team);
    for_each_piece(a.block_offsets, a.num_tensors, s, [&](int64_t t, int64_t first, int64_t count) {
      const TensorSpan& span = a.tensors[t];
      const G* grad = static_cast<const G*>(span.grad);
      const float* accum = static_cast<const float*>(span.grad_accum);
      for (int64_t b = first; b < first + count; ++b) {
        const int64_t lo = b * kNormBlock;
        const int64_t n = span.numel - lo < kNormBlock ? span.numel - lo : kNormBlock;
        double sum;
        if constexpr (std::is_same_v<G, Float16>) {
          // The level's F16C conversion, then the float32 block.
          float tile[kNormBlock];
          load_array(grad + lo, tile, n);
          sum = block_sum_squares(tile, accum == nullptr ? nullptr : accum + lo, n);
        } else {
          sum = block_sum_squares(grad + lo, accum == nullptr ? nullptr : accum + lo, n);
        }
        a.block_sums[a.block_offsets[t] + b] = sum;
      }
    });
  };
  parallel_for_threads(a.num_threads, slice);
}

bool sum_squares(const NormArgs& a) {
  switch (a.grad_dtype) {
    case DType::Float32: sum_squares_typed<float>(a); return true;
    case DType::BFloat16: sum_squares_typed<BFloat16>(a); return true;
    case DType::Float16: sum_squares_typed<Float16>(a); return true;
  }
  return false;
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

void quantize_blocks(const float* values, uint8_t* codes, float* absmax, int64_t n, bool is_signed) {
  const QuantTable& t = is_signed ? signed_table() : unsigned_table();
  for (int64_t i0 = 0; i0 < n; i0 += kQuantBlock)
    absmax[i0 / kQuantBlock] = quantize_block(values + i0, codes + i0, std::min(kQuantBlock, n - i0), t);
}

void dequantize_blocks(const uint8_t* codes, const float* absmax, float* values, int64_t n, bool is_signed) {
  const QuantTable& t = is_signed ? signed_table() : unsigned_table();
  for (int64_t i0 = 0; i0 < n; i0 += kQuantBlock)
    dequantize_block(codes + i0, absmax[i0 / kQuantBlock], values + i0, std::min(kQuantBlock, n - i0), t);
}

}  // namespace

KernelTable kernel_table() {
  return {CPUADAM_STR(CPUADAM_LEVEL), &adam_step,      &sgd_step,         &accumulate,
          &sum_squares,               &stream_pass,    &quantize_blocks,  &dequantize_blocks};
}

}  // namespace CPUADAM_LEVEL
}  // namespace cpuadam
