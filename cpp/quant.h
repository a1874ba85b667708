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
// hence ties go down). code = #midpoints below x, found with one table entry
// per bucket of x's top 16 bits (sign, exponent, 7 mantissa bits; kBuckets
// buckets in the order of x): the midpoints below the bucket and the one
// midpoint inside it, if any (no bucket holds two: checked when the table is
// built). That midpoint shares x's top 16 bits, so only its low 16 go in the
// entry, and x is above it when x's low 16 bits are (below it, for negative x).
// One table lookup per element: the loop vectorises with one gather.
//
// x = value / absmax is the float32 quotient, computed without a division
// (the kernels' divider is already busy with the update): q = value * r with
// r = 1/absmax, then q + (value - q*absmax) * r, both fused, which rounds like
// the division (Markstein's correction step). Blocks with an absmax below
// 2^-60 or above 2^60 are scaled by a power of two first, so no intermediate
// leaves the normal range where it matters.
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
  // Midpoints rounded toward -inf; mid[255] = +inf (no midpoint above 1).
  float mid[256];
  // Per bucket: midpoints below it (bits 0-7), whether one lies inside it
  // (bit 8) and that midpoint's low 16 magnitude bits (bits 16-31).
  int32_t entry[kBuckets];
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
    uint32_t inside_low = 0;
    for (int k = 0; k < 255; ++k) {
      if (t.mid[k] < lo) {
        ++below;
      } else if (t.mid[k] <= hi) {
        ++inside;
        inside_low = quant_bits(t.mid[k]) & 0xFFFFu;
      }
    }
    // The clamped end buckets hold values whose top bits are not the bucket's:
    // they must hold no midpoint (true of both maps: their midpoints lie in
    // [2^-26, 1)).
    const bool clamped = j == 0 || j == kBucketsPerSign - 1;
    if (inside > 1 || (inside == 1 && clamped))
      throw std::logic_error("quantization table: a bucket holds two midpoints");
    t.entry[b] = static_cast<int32_t>(static_cast<uint32_t>(below) | (static_cast<uint32_t>(inside) << 8) |
                                      (inside_low << 16));
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
  const uint32_t u = quant_bits(x);
  const uint32_t e = static_cast<uint32_t>(t.entry[quant_bucket(x)]);
  const uint32_t low = u & 0xFFFFu, mid_low = e >> 16;
  const bool beyond = (u >> 31) ? low < mid_low : low > mid_low;
  return static_cast<uint8_t>((e & 0xFFu) + (((e >> 8) & 1u) & static_cast<uint32_t>(beyond)));
}

// The power of two a block's values and absmax are scaled by before the
// quotient (1 unless absmax is below 2^-60 or above 2^60).
inline float quotient_prescale(float absmax) {
  return absmax < 0x1p-60f ? 0x1p64f : absmax > 0x1p60f ? 0x1p-64f : 1.f;
}

// value / scale, correctly rounded, from r = 1/scale (see the top of the file).
// Without hardware FMA the division itself is cheaper, and rounds the same.
inline float quotient(float value, float scale, float r) {
#if defined(__FMA__) || (defined(_MSC_VER) && defined(__AVX2__)) || defined(__aarch64__) || \
    defined(_M_ARM64)
  const float q = value * r;
  return std::fma(std::fma(-q, scale, value), r, q);
#else
  (void)r;
  return value / scale;
#endif
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
  const float pre = quotient_prescale(absmax);
  const float scale = absmax > 0.f ? absmax * pre : 1.f;  // 0 / 1 = 0: the code of 0
  const float r = 1.f / scale;
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 vscale = _mm256_set1_ps(scale), vr = _mm256_set1_ps(r), vpre = _mm256_set1_ps(pre);
  const __m256i sign_mask = _mm256_set1_epi32(0x7FFFFFFF), low16 = _mm256_set1_epi32(0xFFFF);
  const __m256i low = _mm256_set1_epi32(kBucketLow), high = _mm256_set1_epi32(kBucketHigh);
  const __m256i per_sign = _mm256_set1_epi32(kBucketsPerSign);
  const __m256i per_sign_m1 = _mm256_set1_epi32(kBucketsPerSign - 1);
  const __m256i byte = _mm256_set1_epi32(0xFF), one = _mm256_set1_epi32(1);
  for (; i + 16 <= n; i += 16) {
    __m256i code[2];
    for (int h = 0; h < 2; ++h) {
      const __m256 value = _mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * h), vpre);
      const __m256 q = _mm256_mul_ps(value, vr);
      const __m256 x = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, vscale, value), vr, q);
      const __m256i u = _mm256_castps_si256(x);
      __m256i j = _mm256_srli_epi32(_mm256_and_si256(u, sign_mask), kBucketShift);
      j = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(j, low), high), low);
      const __m256i neg = _mm256_srai_epi32(u, 31);  // all ones where the sign is set
      const __m256i b = _mm256_blendv_epi8(_mm256_add_epi32(per_sign, j),
                                           _mm256_sub_epi32(per_sign_m1, j), neg);
      const __m256i e = _mm256_i32gather_epi32(t.entry, b, 4);
      const __m256i x_low = _mm256_and_si256(u, low16), mid_low = _mm256_srli_epi32(e, 16);
      // -1 where x is beyond the bucket's midpoint (above it; below it for negative x).
      const __m256i beyond = _mm256_blendv_epi8(_mm256_cmpgt_epi32(x_low, mid_low),
                                                _mm256_cmpgt_epi32(mid_low, x_low), neg);
      const __m256i inside = _mm256_and_si256(_mm256_srli_epi32(e, 8), one);
      code[h] = _mm256_add_epi32(_mm256_and_si256(e, byte), _mm256_and_si256(inside, beyond));
    }
    // 16 codes < 256 to bytes, in order.
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(code[0], code[1]), 0xD8);
    const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), bytes);
  }
#endif
  for (; i < n; ++i) codes[i] = nearest_code(quotient(v[i] * pre, scale, r), t);
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
