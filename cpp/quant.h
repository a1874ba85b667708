// SPDX-License-Identifier: MIT
// Block-wise dynamic 8-bit quantization of optimizer states: the code maps, the
// nearest-code search and the block quantize/dequantize loops.
//
// A state of n elements is stored as n uint8 codes and one float32 absmax per
// block of kQuantBlock consecutive elements: value = qmap[code] * absmax, where
// absmax is the block's largest |value| and code is the code nearest to
// x = value / absmax (float32 division). Ties (x exactly half-way between two
// map values) go to the lower code. The maps are the dynamic ones of Dettmers et
// al., "8-bit Optimizers via Block-wise Quantization" (2022): a value is a
// power of ten 10^-d (d = 6..0) times a linear fraction in (0.1, 1); the decade
// 10^-d holds 2^(6-d) fractions in the signed map (each with both signs) and
// 2^(7-d) in the unsigned one, the centres of as many equal parts of [0.1, 1];
// 0 and 1 complete the 256 values.
//
// The search: the 255 midpoints of consecutive map values, each rounded to
// float32 toward -inf (then x > midpoint in float32 says exactly whether x is
// above the real midpoint; x equal to a representable midpoint is not above it,
// hence ties go down). code = #midpoints below x, counted with a table indexed
// by the top bits of x (sign, exponent, 7 mantissa bits: kBuckets buckets in the
// order of x) giving the midpoints below the bucket, plus one comparison with
// the next midpoint: no bucket holds more than one (checked when the table is
// built). Two table lookups per element, so the loop vectorises with gathers.
//
// Included inside a per-level namespace (kernel_isa.cpp) and in bindings.cpp;
// needs convert.h's float_bits when used from the kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>

constexpr int64_t kQuantBlock = 256;
// Buckets: |x| bits >> 16 clamped to [2^-26, 1], per sign, ordered as x.
constexpr uint32_t kBucketShift = 16;
constexpr int32_t kBucketLow = 0x32800000 >> kBucketShift;   // 2^-26: below every midpoint
constexpr int32_t kBucketHigh = 0x3F800000 >> kBucketShift;  // 1.0
constexpr int32_t kBucketsPerSign = kBucketHigh - kBucketLow + 1;
constexpr int32_t kBuckets = 2 * kBucketsPerSign;

// The 256 values of a dynamic map, ascending, computed in double from the
// definition above and rounded to float32.
inline void build_qmap(bool is_signed, float out[256]) {
  double v[256];
  int n = 0;
  v[n++] = 0.0;
  v[n++] = 1.0;
  for (int i = 0; i < 7; ++i) {
    const int parts = is_signed ? (1 << i) : (1 << (i + 1));
    const double decade = std::pow(10.0, 6 - i);  // exact
    for (int k = 0; k < parts; ++k) {
      const double x = (0.1 + 0.9 * (2 * k + 1) / (2.0 * parts)) / decade;
      v[n++] = x;
      if (is_signed) v[n++] = -x;
    }
  }
  // 256 values by construction (2 + 2*127 signed, 2 + 254 unsigned); sort them.
  for (int i = 1; i < n; ++i)
    for (int j = i; j > 0 && v[j - 1] > v[j]; --j) {
      const double t = v[j];
      v[j] = v[j - 1];
      v[j - 1] = t;
    }
  for (int i = 0; i < 256; ++i) out[i] = static_cast<float>(v[i]);
}

inline uint32_t quant_bits(float x) { return __builtin_bit_cast(uint32_t, x); }

// The bucket of x: monotone in x (NaN and |x| > 1 land in the outermost buckets).
inline int32_t quant_bucket(float x) {
  const uint32_t u = quant_bits(x);
  int32_t j = static_cast<int32_t>((u & 0x7FFFFFFFu) >> kBucketShift);
  j = j < kBucketLow ? kBucketLow : j;
  j = j > kBucketHigh ? kBucketHigh : j;
  j -= kBucketLow;
  return (u >> 31) ? kBucketsPerSign - 1 - j : kBucketsPerSign + j;
}

struct QuantTable {
  float qmap[256];
  // Midpoints rounded toward -inf; mid[255] = +inf so that a probe past the
  // last midpoint never counts.
  float mid[256];
  int32_t below[kBuckets];  // midpoints below every x of the bucket
};

inline float float_of_bits(uint32_t u) { return __builtin_bit_cast(float, u); }

inline void build_table(bool is_signed, QuantTable& t) {
  build_qmap(is_signed, t.qmap);
  for (int k = 0; k < 255; ++k) {
    const double m = (static_cast<double>(t.qmap[k]) + static_cast<double>(t.qmap[k + 1])) / 2.0;
    float f = static_cast<float>(m);
    if (static_cast<double>(f) > m) f = std::nextafter(f, -INFINITY);
    t.mid[k] = f;
  }
  t.mid[255] = INFINITY;
  // Each bucket's smallest and largest x, from its magnitude range.
  for (int32_t b = 0; b < kBuckets; ++b) {
    const bool neg = b < kBucketsPerSign;
    const int32_t j = neg ? kBucketsPerSign - 1 - b : b - kBucketsPerSign;
    const uint32_t jj = static_cast<uint32_t>(j + kBucketLow);
    const float mag_lo = j == 0 ? 0.f : float_of_bits(jj << kBucketShift);
    const float mag_hi = j == kBucketsPerSign - 1 ? INFINITY
                                                  : float_of_bits((jj << kBucketShift) | ((1u << kBucketShift) - 1));
    const float lo = neg ? -mag_hi : mag_lo;
    const float hi = neg ? -mag_lo : mag_hi;
    int32_t below = 0, inside = 0;
    for (int k = 0; k < 255; ++k) {
      if (t.mid[k] < lo) ++below;
      else if (t.mid[k] <= hi) ++inside;
    }
    if (inside > 1) throw std::logic_error("quantization table: a bucket holds two midpoints");
    t.below[b] = below;
  }
}

// The two tables, built once per process (per including namespace).
inline const QuantTable& signed_table() {
  static const QuantTable t = [] {
    QuantTable q;
    build_table(true, q);
    return q;
  }();
  return t;
}

inline const QuantTable& unsigned_table() {
  static const QuantTable t = [] {
    QuantTable q;
    build_table(false, q);
    return q;
  }();
  return t;
}

inline uint8_t nearest_code(float x, const QuantTable& t) {
  const int32_t lo = t.below[quant_bucket(x)];
  return static_cast<uint8_t>(lo + (x > t.mid[lo] ? 1 : 0));
}

// The block's largest |value|. NaNs are passed over (a > m is false for them).
inline float block_absmax(const float* __restrict v, int64_t n) {
  float m = 0.f;
#if defined(__AVX2__)
  int64_t i = 0;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 acc = _mm256_setzero_ps();
  // max_ps(a, acc) returns acc when a is NaN, as the scalar form does.
  for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + i), abs_mask), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (int j = 0; j < 8; ++j) m = lanes[j] > m ? lanes[j] : m;
  for (; i < n; ++i) {
    const float a = __builtin_fabsf(v[i]);
    m = a > m ? a : m;
  }
#else
  for (int64_t i = 0; i < n; ++i) {
    const float a = __builtin_fabsf(v[i]);
    m = a > m ? a : m;
  }
#endif
  return m;
}

// Codes of one block of n <= kQuantBlock values; returns its absmax. An all-zero
// block has absmax 0 and every code that of 0 (x taken as 0).
inline float quantize_block(const float* __restrict v, uint8_t* __restrict codes, int64_t n,
                            const QuantTable& t) {
  const float absmax = block_absmax(v, n);
  const float scale = absmax > 0.f ? absmax : 1.f;  // 0 / 1 = 0: the code of 0
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256i sign_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i low = _mm256_set1_epi32(kBucketLow), high = _mm256_set1_epi32(kBucketHigh);
  const __m256i per_sign = _mm256_set1_epi32(kBucketsPerSign);
  const __m256i per_sign_m1 = _mm256_set1_epi32(kBucketsPerSign - 1);
  alignas(32) int32_t out[8];
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(v + i), vscale);
    const __m256i u = _mm256_castps_si256(x);
    __m256i j = _mm256_srli_epi32(_mm256_and_si256(u, sign_mask), kBucketShift);
    j = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(j, low), high), low);
    const __m256i neg = _mm256_srai_epi32(u, 31);  // all ones where the sign is set
    const __m256i b = _mm256_blendv_epi8(_mm256_add_epi32(per_sign, j),
                                         _mm256_sub_epi32(per_sign_m1, j), neg);
    const __m256i lo = _mm256_i32gather_epi32(t.below, b, 4);
    const __m256 m = _mm256_i32gather_ps(t.mid, lo, 4);
    // The comparison's mask is -1 where x is above the midpoint.
    const __m256i code = _mm256_sub_epi32(lo, _mm256_castps_si256(_mm256_cmp_ps(x, m, _CMP_GT_OQ)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(out), code);
    for (int k = 0; k < 8; ++k) codes[i + k] = static_cast<uint8_t>(out[k]);
  }
#endif
  for (; i < n; ++i) codes[i] = nearest_code(v[i] / scale, t);
  return absmax;
}

// values = qmap[code] * absmax for one block.
inline void dequantize_block(const uint8_t* __restrict codes, float absmax, float* __restrict v,
                             int64_t n, const QuantTable& t) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 vabsmax = _mm256_set1_ps(absmax);
  for (; i + 8 <= n; i += 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_i32gather_ps(t.qmap, c, 4), vabsmax));
  }
#endif
  for (; i < n; ++i) v[i] = t.qmap[codes[i]] * absmax;
}
