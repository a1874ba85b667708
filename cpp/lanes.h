// SPDX-License-Identifier: MIT
// The arithmetic's value types: float (one lane) and, where the level has AVX2,
// F8 (eight float32 lanes in a __m256), with the same operations on both.
//
// kernel.h writes each per-element update once, as a generic lambda over the
// lane type, and runs it eight elements at a time with F8 and one at a time
// with float for the remainder. Both do the same IEEE operations in the same
// order (add, mul, div, sqrt rounded to nearest; madd fused on both, as every
// level with AVX2 has FMA; max_of/min_of as the compare-and-select below), so a
// remainder element gets the bits a vector lane would, whatever the vector width.
//
// Why intrinsics rather than GCC's vectoriser: the vectoriser turns the 16-bit
// loads and stores of bfloat16/float16 storage into long sequences of shuffles
// (about 1 ns an element on the 2-core Zen 4 these kernels were tuned on, as
// much as the whole float32 step); here a bfloat16 load is one widening
// instruction and a shift, a store six integer operations and a pack.
// Included only from kernel_isa.cpp, inside its per-level namespace.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

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

inline float lane_sqrt(float x) { return std::sqrt(x); }

// Compare-and-select, NaN-aware in a fixed way: when either is NaN (or they
// are equal) the second operand is returned, exactly as x86's max/min do.
inline float max_of(float a, float b) { return a > b ? a : b; }
inline float min_of(float a, float b) { return a < b ? a : b; }

// x where probe is finite, else 0 (probe - probe is NaN for inf and NaN).
inline float keep_if_finite(float probe, float x) { return probe - probe == 0.f ? x : 0.f; }

// One element in, one out. The first argument is a tag naming the lane type.
template <typename T>
inline float load_lanes(float, const T* src) {
  return load_float(*src);
}

template <typename T>
inline void store_lanes(T* dst, float x) {
  *dst = store_float<T>(x);
}

#if defined(__AVX2__)
#define CPUADAM_F8 1

struct F8 {
  __m256 v;
  F8() = default;
  F8(__m256 x) : v(x) {}                      // NOLINT: a vector is its lanes
  F8(float x) : v(_mm256_set1_ps(x)) {}       // NOLINT: scalars broadcast, as in the scalar code
};

inline F8 operator+(F8 a, F8 b) { return _mm256_add_ps(a.v, b.v); }
inline F8 operator-(F8 a, F8 b) { return _mm256_sub_ps(a.v, b.v); }
inline F8 operator*(F8 a, F8 b) { return _mm256_mul_ps(a.v, b.v); }
inline F8 operator/(F8 a, F8 b) { return _mm256_div_ps(a.v, b.v); }
inline F8 madd(F8 a, F8 b, F8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline F8 lane_sqrt(F8 x) { return _mm256_sqrt_ps(x.v); }
inline F8 max_of(F8 a, F8 b) { return _mm256_max_ps(a.v, b.v); }
inline F8 min_of(F8 a, F8 b) { return _mm256_min_ps(a.v, b.v); }

inline F8 keep_if_finite(F8 probe, F8 x) {
  const __m256 d = _mm256_sub_ps(probe.v, probe.v);
  return _mm256_and_ps(_mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ), x.v);
}

inline F8 load_lanes(F8, const float* src) { return _mm256_loadu_ps(src); }
inline void store_lanes(float* dst, F8 x) { _mm256_storeu_ps(dst, x.v); }

inline __m128i load8x16(const void* src) { return _mm_loadu_si128(static_cast<const __m128i*>(src)); }
inline void store8x16(void* dst, __m128i x) { _mm_storeu_si128(static_cast<__m128i*>(dst), x); }

// Eight uint32 lanes, each < 2^16, packed into eight uint16.
inline __m128i pack_u16(__m256i x) {
  return _mm_packus_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
}

// bfloat16: the upper half of a float32 (exact).
inline F8 load_lanes(F8, const BFloat16* src) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load8x16(src)), 16));
}

// bf16_bits_nearest, eight at a time.
inline __m256i bf16_bits_nearest(F8 x) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x0040));
  const __m256 nan = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(nan));
}

inline void store_lanes(BFloat16* dst, F8 x) { store8x16(dst, pack_u16(bf16_bits_nearest(x))); }

// float16: F16C, exact in and round to nearest even out (the rounding is given
// in the instruction, not taken from MXCSR), the bits of the portable code.
inline F8 load_lanes(F8, const Float16* src) { return _mm256_cvtph_ps(load8x16(src)); }

inline void store_lanes(Float16* dst, F8 x) {
  store8x16(dst, _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}

// mix32 and rounding_bits of convert.h on eight consecutive indices.
inline __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0x846CA68Bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// rounding_bits of elements index + offsets[k] (the lane order of the caller).
inline __m256i rounding_bits8(uint32_t index, __m256i offsets, uint32_t key0, uint32_t key1) {
  const __m256i i = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(index)), offsets);
  const __m256i h = mix32(_mm256_xor_si256(i, _mm256_set1_epi32(static_cast<int32_t>(key0))));
  return mix32(_mm256_add_epi32(h, _mm256_set1_epi32(static_cast<int32_t>(key1))));
}

// bf16_bits_stochastic on eight lanes with their random bits. Magnitudes are at
// most 0x7FFFFFFF, so the signed compare orders them as unsigned.
inline __m256i bf16_bits_stochastic(F8 x, __m256i random) {
  const __m256i u = _mm256_castps_si256(x.v);
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_srli_epi32(random, 16)), 16);
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF));
  const __m256i no_upper = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7F7F0000));
  return _mm256_blendv_epi8(rounded, bf16_bits_nearest(x), no_upper);
}

// Stochastic rounding of elements index .. index + 7 into dst.
inline void store_stochastic_lanes(BFloat16* dst, F8 x, uint32_t index, uint32_t key0,
                                   uint32_t key1) {
  const __m256i order = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  store8x16(dst, pack_u16(bf16_bits_stochastic(x, rounding_bits8(index, order, key0, key1))));
}
#endif

// Sixteen float32 lanes as two F8 in the order a bfloat16 vector unpacks to:
// a holds elements 0-3 and 8-11, b holds 4-7 and 12-15 (vpunpck{l,h}wd work
// within 128-bit halves). One unpack widens eight bfloat16 and one pack
// narrows sixteen, instead of a widen and a shift per eight and an extract and
// a pack per eight: on AVX2 these shuffles and shifts share two ports with the
// divider, and they were what a bfloat16 step spent its time on. Elementwise
// arithmetic does not care about the order; float32 buffers are permuted into
// it and back. Used where every stepped buffer is bfloat16 (WideLanes).
#if defined(CPUADAM_F8)
struct F16 {
  F8 a, b;
  F16() = default;
  F16(F8 lo, F8 hi) : a(lo), b(hi) {}
  F16(float x) : a(x), b(x) {}  // NOLINT: scalars broadcast
};

inline F16 operator+(F16 x, F16 y) { return {x.a + y.a, x.b + y.b}; }
inline F16 operator-(F16 x, F16 y) { return {x.a - y.a, x.b - y.b}; }
inline F16 operator*(F16 x, F16 y) { return {x.a * y.a, x.b * y.b}; }
inline F16 operator/(F16 x, F16 y) { return {x.a / y.a, x.b / y.b}; }
inline F16 madd(F16 x, F16 y, F16 z) { return {madd(x.a, y.a, z.a), madd(x.b, y.b, z.b)}; }
inline F16 lane_sqrt(F16 x) { return {lane_sqrt(x.a), lane_sqrt(x.b)}; }
inline F16 max_of(F16 x, F16 y) { return {max_of(x.a, y.a), max_of(x.b, y.b)}; }
inline F16 min_of(F16 x, F16 y) { return {min_of(x.a, y.a), min_of(x.b, y.b)}; }
inline F16 keep_if_finite(F16 probe, F16 x) {
  return {keep_if_finite(probe.a, x.a), keep_if_finite(probe.b, x.b)};
}

inline F16 load_lanes(F16, const BFloat16* src) {
  const __m256i x = _mm256_loadu_si256(static_cast<const __m256i*>(static_cast<const void*>(src)));
  const __m256i zero = _mm256_setzero_si256();
  return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x)),
          _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x))};
}

inline void store_lanes(BFloat16* dst, F16 x) {
  // Each 32-bit lane holds its bfloat16 in the low half: the pack undoes the unpack.
  _mm256_storeu_si256(static_cast<__m256i*>(static_cast<void*>(dst)),
                      _mm256_packus_epi32(bf16_bits_nearest(x.a), bf16_bits_nearest(x.b)));
}

inline F16 load_lanes(F16, const float* src) {
  const __m256 lo = _mm256_loadu_ps(src), hi = _mm256_loadu_ps(src + 8);
  return {_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31)};
}

inline void store_lanes(float* dst, F16 x) {
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(x.a.v, x.b.v, 0x20));
  _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(x.a.v, x.b.v, 0x31));
}

inline void store_stochastic_lanes(BFloat16* dst, F16 x, uint32_t index, uint32_t key0,
                                   uint32_t key1) {
  const __m256i a = bf16_bits_stochastic(
      x.a, rounding_bits8(index, _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11), key0, key1));
  const __m256i b = bf16_bits_stochastic(
      x.b, rounding_bits8(index, _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15), key0, key1));
  _mm256_storeu_si256(static_cast<__m256i*>(static_cast<void*>(dst)), _mm256_packus_epi32(a, b));
}
#endif

// Param handles for bfloat16 params stepped in place: handle + i is the handle
// of element i, and load_lanes / store_lanes read and write through it as
// through a plain pointer.
//
// StochasticParam: the update is stored by stochastic rounding; element i of
// the run is keyed by index0 + i (see store_param_tile).
struct StochasticParam {
  BFloat16* p;
  uint32_t index0, key0, key1;
};

inline StochasticParam operator+(const StochasticParam& s, int64_t i) {
  return {s.p + i, s.index0 + static_cast<uint32_t>(i), s.key0, s.key1};
}

template <typename L>
inline L load_lanes(L lane, StochasticParam at) {
  return load_lanes(lane, static_cast<const BFloat16*>(at.p));
}

template <typename L>
inline void store_lanes(StochasticParam at, L x) {
  store_stochastic_lanes(at.p, x, at.index0, at.key0, at.key1);
}

// KahanParam: the param with its compensation (ParamUpdate::Kahan), read as
// param + compensation, stored rounded to nearest with what the rounding
// dropped in the compensation, as the tiled path does.
struct KahanParam {
  BFloat16* p;
  BFloat16* comp;
};

inline KahanParam operator+(const KahanParam& k, int64_t i) { return {k.p + i, k.comp + i}; }

template <typename L>
inline L load_lanes(L lane, KahanParam at) {
  return load_lanes(lane, static_cast<const BFloat16*>(at.p)) +
         load_lanes(lane, static_cast<const BFloat16*>(at.comp));
}

template <typename L>
inline void store_lanes(KahanParam at, L x) {
  store_lanes(at.p, x);
  const L stored = load_lanes(L{}, static_cast<const BFloat16*>(at.p));
  // An inf or NaN param has nothing to compensate (inf - inf would be NaN).
  store_lanes(at.comp, keep_if_finite(stored, x - stored));
}

// MasterParam: a float32 master copy stepped in place and rounded to nearest
// into its bfloat16 param, as the tiled path does (ParamUpdate::Master).
struct MasterParam {
  float* master;
  BFloat16* param;
};

inline MasterParam operator+(const MasterParam& m, int64_t i) { return {m.master + i, m.param + i}; }

template <typename L>
inline L load_lanes(L lane, MasterParam at) {
  return load_lanes(lane, static_cast<const float*>(at.master));
}

template <typename L>
inline void store_lanes(MasterParam at, L x) {
  store_lanes(at.master, x);
  store_lanes(at.param, x);
}

// The element type a param handle (a pointer, a StochasticParam, a KahanParam
// or a MasterParam) is read from.
template <typename P>
struct ParamElement;
template <typename T>
struct ParamElement<T*> {
  using type = T;
};
template <>
struct ParamElement<StochasticParam> {
  using type = BFloat16;
};
template <>
struct ParamElement<MasterParam> {
  using type = float;
};
template <>
struct ParamElement<KahanParam> {
  using type = BFloat16;
};

// The widest lane type for a loop over buffers of the given element types.
template <typename... T>
struct WideLanesOf {
#if defined(CPUADAM_F8)
  using type = std::conditional_t<(sizeof...(T) > 0 && (std::is_same_v<T, BFloat16> && ...)), F16, F8>;
#else
  using type = float;
#endif
};
template <typename... T>
using WideLanes = typename WideLanesOf<T...>::type;

// for_lanes and the bodies it runs are always inlined into the kernel: a
// 16-bit store is made through a pointer that may alias anything, so a body
// left out of line reloads captured pointers and scalars after each one, and
// an F16 passed between functions goes through memory (measured in cache:
// bfloat16 params, grads and moments about 1.3x slower when left to GCC's
// inlining, for about 6% of the binary).
#if defined(__GNUC__) || defined(__clang__)
#define CPUADAM_INLINE_BODY __attribute__((always_inline))
#define CPUADAM_FORCE_INLINE __attribute__((always_inline)) inline
#else
#define CPUADAM_INLINE_BODY
#define CPUADAM_FORCE_INLINE __forceinline
#endif

// Runs body(lane, i) for i in [0, n): sixteen at a time when Wide is F16, then
// eight at a time where the level has F8, then one at a time. body must not
// depend on which.
template <typename Wide = WideLanes<>, typename Body>
CPUADAM_FORCE_INLINE void for_lanes(int64_t n, Body&& body) {
  int64_t i = 0;
#if defined(CPUADAM_F8)
  if constexpr (std::is_same_v<Wide, F16>)
    for (; i + 16 <= n; i += 16) body(F16{}, i);
  for (; i + 8 <= n; i += 8) body(F8{}, i);
#endif
#pragma GCC ivdep
  for (; i < n; ++i) body(float{}, i);
}

// Stochastic rounding of element `index` into dst, one lane (any 16-bit type).
template <typename P>
inline void store_stochastic_lanes(P* dst, float x, uint32_t index, uint32_t key0, uint32_t key1) {
  *dst = store_stochastic<P>(x, rounding_bits(index, key0, key1));
}

// Whole arrays between storage and float32 (grad tiles, norm blocks).
template <typename T>
inline void load_array(const T* __restrict src, float* __restrict dst, int64_t n) {
  for_lanes(n, [&](auto lane, int64_t i) CPUADAM_INLINE_BODY { store_lanes(dst + i, load_lanes(lane, src + i)); });
}
