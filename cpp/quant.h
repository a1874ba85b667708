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
// Decoding needs no table: a code's value has a closed form. Let w = |code - 127|
// (signed map) or code + 1 (unsigned map) and P the largest power of two <= w.
// The values of one decade are the w in [P, 2P), j = w - P, and
// (0.1 + 0.9 (2j + 1) / (2P)) / 10^d = (18w - 16P + 9) * C_P, C_P = 1 / (20 P 10^d);
// the top value 1 fits with C_P = 1 / (2P + 9); code 127 (signed) or 0 (unsigned)
// is zero. C_P is kept as two floats, hi + lo, and the value is fma(hi, N, lo * N)
// with N = 18w - 16P + 9 (an exact integer): one rounding of a product good to
// ~2^-48, which gives qmap's bits for all 256 codes of both maps (checked when the
// table is built). P and the slot of C_P come from float(w)'s exponent, so 8 codes
// decode with two 8-entry permutes (vpermps) and no gather.
//
// The search, exact: the 255 midpoints of consecutive map values, each rounded to
// float32 toward -inf (then x > midpoint in float32 says exactly whether x is
// above the real midpoint; x equal to a representable midpoint is not above it,
// hence ties go down). code = #midpoints below x, found with one table entry
// per bucket of x's top 16 bits (sign, exponent, 7 mantissa bits; kBuckets
// buckets in the order of x): the midpoints below the bucket and the one
// midpoint inside it, if any (no bucket holds two: checked when the table is
// built). That midpoint shares x's top 16 bits, so only its low 16 go in the
// entry, and x is above it when x's low 16 bits are (below it, for negative x).
// Scalar code and levels without AVX2 use it; the AVX2 form runs a block in
// three passes: x and its bucket (8 lanes at a time), the table entries (scalar
// loads), then the codes.
//
// The search, arithmetic (AVX2 levels, the hot path): no table loads. Split
// a = |x| into 8 classes, the decades 0-6 and zero, at the boundaries between
// them (the rounded-down midpoints between a decade's lowest value and the next
// decade's highest; exact compares). Inside decade d, whose P values are the
// centres of P equal parts of [0.1, 1] / 10^d, the nearest value is the part
// holding a: j = floor(t), t = (a 10^d - 0.1) P / 0.9 = a * A_d + B_d, clamped to
// [0, P - 1]; w = P + j as in the decode. The class: c0 = int(-log10(a) - 0.3),
// with log2(a) read off a's bits taken as an integer (piecewise linear, low by
// at most 0.086; never below 0 for a <= 1), capped at 6, is the class or one below it (the boundaries
// sit 0.006 to 0.44 decades under the powers of ten), so one compare with the
// boundary above c0 (an 8-entry permute) settles it. t is computed in float32, so
// near a part boundary (t near an integer: |t - round(t)| < kEncodeMargin) the
// lane is not trusted; nor NaN, nor (unsigned map) negative x. A block with such
// a lane runs the exact search instead (about 1 block in 120 of normally distributed moments). x
// above the top boundary takes the code of 1. The margin and the whole method
// are checked against the exact search on every float32 in [-1, 1] by
// tests/native/encoder.cpp (CI): the errors of t stay below 1e-5 (5e-6 fails);
// the margin is 2e-5. Ties at a class boundary (representable midpoints) sit at t
// = P + 1 of the class below, so they go to the exact search too.
// Stochastic rounding (the state_rounding="stochastic" option): x goes to one
// of the two map values around it, lo <= x < hi, the upper one when
// u * (hi - lo) < x - lo for u = (random >> 8) * 2^-24 in [0, 1) from 32 random
// bits per element, so that the expected stored value is x. A map value keeps
// its code (x - lo = 0); NaN keeps its nearest code. x below the map's lowest
// value (x = -1, a block whose largest magnitude is negative, under the signed
// map's -0.99297) takes the lowest code, as with nearest rounding: the one
// place the stored value is biased (towards 0). lo and hi come from the nearest
// code and its neighbour on x's side, decoded by the closed form.
//
// x = value / absmax is the float32 quotient, computed without a division
// (the kernels' divider is already busy with the update): q = value * r with
// r = 1/absmax, then q + (value - q*absmax) * r, both fused, which rounds like
// the division (Markstein's correction step). Blocks with an absmax below
// 2^-60 or above 2^60 are scaled by a power of two first, so no intermediate
// leaves the normal range where it matters. A block holding an infinite value
// (absmax = inf) takes x = value / inf = 0 for its finite values and x = +-1
// for its infinities, one element at a time at every level (the fused form
// would give NaN for every element, and inf / inf a NaN whose sign differs
// between CPUs).
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
  // The closed form of qmap (see the top of the file): C_P = hi + lo per slot,
  // the slot being bits 23-25 of float(w).
  alignas(32) float coef_hi[8];
  alignas(32) float coef_lo[8];
  // The arithmetic search (see the top of the file), per class c (decades 0-6,
  // then zero): t = a * enc_a[c] + enc_b[c], and enc_next[c] the boundary below
  // class c (a above it is in class c or higher).
  alignas(32) float enc_a[8];
  alignas(32) float enc_b[8];
  alignas(32) float enc_next[8];
  float enc_top;  // x above it takes the code of 1
  bool is_signed;
};

inline float float_of_bits(uint32_t u) { return __builtin_bit_cast(float, u); }

// w of a code (see the top of the file).
inline int32_t quant_w(int32_t code, bool is_signed) {
  return is_signed ? (code < 127 ? 127 - code : code - 127) : code + 1;
}

// qmap[code] from the closed form, as the vector decode computes it.
inline float decode_closed_form(int32_t code, const QuantTable& t) {
  const int32_t w = quant_w(code, t.is_signed);
  if (w == (t.is_signed ? 0 : 1)) return 0.f;
  const uint32_t wb = quant_bits(static_cast<float>(w));
  const float p = float_of_bits(wb & 0xFF800000u);
  const uint32_t slot = (wb >> 23) & 7u;
  const float n = std::fma(static_cast<float>(w), 18.f, std::fma(p, -16.f, 9.f));
  const float v = std::fma(t.coef_hi[slot], n, t.coef_lo[slot] * n);
  return t.is_signed && code < 127 ? -v : v;
}

inline void build_decode(QuantTable& t) {
  // P = 2^e for e = 0..7 (signed: decades 0..6, then the top value at w = 128)
  // or e = 1..8 (unsigned: decades 0..6, top value at w = 256).
  const int e0 = t.is_signed ? 0 : 1;
  for (int e = e0; e < e0 + 8; ++e) {
    const double p = std::ldexp(1.0, e);
    const bool top = e == e0 + 7;
    const double c = top ? 1.0 / (2.0 * p + 9.0) : 1.0 / (20.0 * p * std::pow(10.0, 6 - (e - e0)));
    const int slot = (e + 127) & 7;
    t.coef_hi[slot] = static_cast<float>(c);
    t.coef_lo[slot] = static_cast<float>(c - static_cast<double>(t.coef_hi[slot]));
  }
  for (int32_t code = 0; code < 256; ++code)
    if (quant_bits(decode_closed_form(code, t)) != quant_bits(t.qmap[code]))
      throw std::logic_error("quantization table: the closed form misses a map value");
}

// The arithmetic search's tables (see the top of the file); needs t.mid.
inline void build_encoder(QuantTable& t) {
  // Positive x: code = w + w0 for the magnitude index w (0, unsigned 1, is zero;
  // the top, 1, is w_top). The vector code takes the class's first w, p, as
  // p0 >> c, which gives the w of zero for c = 7.
  const int32_t w0 = t.is_signed ? 127 : -1;
  const int32_t w_top = t.is_signed ? 128 : 256;
  // The boundary between the magnitudes of w - 1 and w: their midpoint (rounded down).
  const auto boundary = [&](int32_t w) { return t.mid[w + w0 - 1]; };
  for (int c = 0; c < 7; ++c) {
    const int32_t p = (t.is_signed ? 64 : 128) >> c;  // the decade's w are p .. 2p - 1
    t.enc_a[c] = static_cast<float>(p * std::pow(10.0, c) / 0.9);
    t.enc_b[c] = static_cast<float>(-p / 9.0);
    t.enc_next[c] = boundary(p);
  }
  // Class 7, zero: t = 0.5 + 0.5 a / (its upper boundary), so that t nears 1 (and
  // the lane is redone exactly) only next to that boundary.
  t.enc_a[7] = 0.5f / t.enc_next[6];
  t.enc_b[7] = 0.5f;
  t.enc_next[7] = 0.f;
  t.enc_top = boundary(w_top);
}

inline void build_table(bool is_signed, QuantTable& t) {
  t.is_signed = is_signed;
  build_qmap(is_signed, t.qmap);
  build_decode(t);
  for (int k = 0; k < 255; ++k) {
    const double m = (static_cast<double>(t.qmap[k]) + static_cast<double>(t.qmap[k + 1])) / 2.0;
    float f = static_cast<float>(m);
    if (static_cast<double>(f) > m) f = std::nextafter(f, -INFINITY);
    t.mid[k] = f;
  }
  t.mid[255] = INFINITY;
  build_encoder(t);
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

// The stochastic choice between the map values around x (see the top of the
// file), from x's nearest code q.
inline uint8_t stochastic_code(float x, uint8_t q, uint32_t random, const QuantTable& t) {
  const float vq = t.qmap[q];
  const bool above = vq > x;  // q is the upper neighbour
  const int32_t n = above ? (q > 0 ? q - 1 : 0) : (q < 255 ? q + 1 : 255);
  const float vn = t.qmap[n];
  const float lo = above ? vn : vq, hi = above ? vq : vn;
  const float u = static_cast<float>(random >> 8) * 0x1p-24f;
  const bool up = u * (hi - lo) < x - lo;
  return static_cast<uint8_t>(up == above ? q : n);
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

#if defined(__AVX2__)
// quotient() on eight values, each first scaled by pre.
inline __m256 quotient8(const float* v, __m256 pre, __m256 scale, __m256 r) {
  const __m256 value = _mm256_mul_ps(_mm256_loadu_ps(v), pre);
  const __m256 q = _mm256_mul_ps(value, r);
  return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, scale, value), r, q);
}
#endif

// The block's largest |value|. NaNs are passed over (a > m is false for them).
inline float block_absmax(const float* __restrict v, int64_t n) {
  float m = 0.f;
#if defined(__AVX2__)
  int64_t i = 0;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // max_ps(a, acc) returns acc when a is NaN, as the scalar form does. Four
  // accumulators: one would wait on its own previous max every step.
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; i + 32 <= n; i += 32)
    for (int h = 0; h < 4; ++h)
      acc[h] = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + i + 8 * h), abs_mask), acc[h]);
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(v + i), abs_mask), acc[0]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3])));
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

#if defined(__AVX2__)
// The closed form (see the top of the file) on eight codes, as decode_closed_form
// computes it: qmap[code] for codes in [0, 255] held in 32-bit lanes.
struct Decoder8 {
  __m256 hi, lo, c18, cm16, c9;
  __m256i exponent, sign_bit, offset, zero_w;

  explicit Decoder8(const QuantTable& t)
      : hi(_mm256_load_ps(t.coef_hi)), lo(_mm256_load_ps(t.coef_lo)), c18(_mm256_set1_ps(18.f)),
        cm16(_mm256_set1_ps(-16.f)), c9(_mm256_set1_ps(9.f)),
        exponent(_mm256_set1_epi32(static_cast<int32_t>(0xFF800000u))),
        sign_bit(_mm256_set1_epi32(static_cast<int32_t>(0x80000000u))),
        offset(_mm256_set1_epi32(t.is_signed ? 127 : -1)), zero_w(_mm256_set1_epi32(t.is_signed ? 0 : 1)) {}

  __m256 operator()(__m256i c) const {
    const __m256i d = _mm256_sub_epi32(c, offset);  // signed: code - 127; unsigned: code + 1
    const __m256i w = _mm256_abs_epi32(d);
    const __m256 wf = _mm256_cvtepi32_ps(w);
    const __m256i wb = _mm256_castps_si256(wf);
    const __m256 p = _mm256_castsi256_ps(_mm256_and_si256(wb, exponent));
    const __m256i slot = _mm256_srli_epi32(wb, 23);  // vpermps reads bits 0-2
    const __m256 numer = _mm256_fmadd_ps(wf, c18, _mm256_fmadd_ps(p, cm16, c9));
    const __m256 value = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(hi, slot), numer,
                                         _mm256_mul_ps(_mm256_permutevar8x32_ps(lo, slot), numer));
    const __m256 zero = _mm256_castsi256_ps(_mm256_cmpeq_epi32(w, zero_w));
    // d < 0 only for the signed map's negative codes.
    const __m256 sign = _mm256_castsi256_ps(_mm256_and_si256(d, sign_bit));
    return _mm256_xor_ps(_mm256_andnot_ps(zero, value), sign);
  }
};

// The arithmetic search (see the top of the file) on eight lanes: the nearest
// codes of x, exact wherever the lane's t is not within kEncodeMargin of an
// integer; such lanes, NaN and (unsigned map) negative x set the sign bit of
// `redo`'s lanes, and the caller then runs the exact search instead.
constexpr float kEncodeMargin = 2e-5f;
template <bool kSigned>
struct Encoder8 {
  __m256 a, b, next, abs_mask, log_scale, log_offset, margin, top;
  __m256i p0, w0, minus_one, six, code_top, mirror;

  explicit Encoder8(const QuantTable& t)
      : a(_mm256_load_ps(t.enc_a)), b(_mm256_load_ps(t.enc_b)), next(_mm256_load_ps(t.enc_next)),
        abs_mask(_mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))),
        // -log10(a) - 0.3 from a's bits read as an integer (a piecewise linear log2).
        log_scale(_mm256_set1_ps(static_cast<float>(-0.30102999566398120 / 8388608.0))),
        log_offset(_mm256_set1_ps(static_cast<float>(127.0 * 0.30102999566398120 - 0.3))),
        margin(_mm256_set1_ps(kEncodeMargin)), top(_mm256_set1_ps(t.enc_top)),
        p0(_mm256_set1_epi32(kSigned ? 64 : 128)), w0(_mm256_set1_epi32(kSigned ? 127 : -1)),
        minus_one(_mm256_set1_epi32(-1)), six(_mm256_set1_epi32(6)),
        code_top(_mm256_set1_epi32(255)), mirror(_mm256_set1_epi32(254)) {
    if (t.is_signed != kSigned) throw std::logic_error("Encoder8: the map's sign does not match");
  }

  // kVectors vectors in lockstep, each step over all of them: one vector's chain
  // of steps is long, and independent work side by side keeps the units busy.
  template <int kVectors>
  void operator()(const __m256 (&x)[kVectors], __m256i (&code)[kVectors], __m256& redo) const {
    __m256 mag[kVectors], t[kVectors];
    __m256i c[kVectors];
#define CPUADAM_EACH for (int h = 0; h < kVectors; ++h)
    CPUADAM_EACH mag[h] = _mm256_and_ps(x[h], abs_mask);
    // The class: c0 (one below the true class or the class itself), then one boundary.
    // a <= 1 gives c0 >= 0 (truncation of -0.3), so only the top needs a clamp; a
    // NaN's c0 is negative, and its lane is redone (t is NaN) whatever c says.
    CPUADAM_EACH c[h] = _mm256_cvttps_epi32(
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_castps_si256(mag[h])), log_scale, log_offset));
    CPUADAM_EACH c[h] = _mm256_min_epi32(c[h], six);
    CPUADAM_EACH c[h] = _mm256_sub_epi32(
        c[h], _mm256_castps_si256(_mm256_cmp_ps(mag[h], _mm256_permutevar8x32_ps(next, c[h]), _CMP_LE_OQ)));
    CPUADAM_EACH t[h] = _mm256_fmadd_ps(mag[h], _mm256_permutevar8x32_ps(a, c[h]), _mm256_permutevar8x32_ps(b, c[h]));
    // The class's first w, p = p0 >> c (0 or 1 for class 7, zero), and its last p - 1
    // (unsigned: no limit in class 7, whose t < 1 unless the lane is redone).
    CPUADAM_EACH {
      const __m256i p = _mm256_srlv_epi32(p0, c[h]);
      code[h] = _mm256_add_epi32(_mm256_min_epu32(_mm256_cvttps_epi32(t[h]), _mm256_add_epi32(p, minus_one)),
                                 _mm256_add_epi32(p, w0));
    }
    CPUADAM_EACH code[h] = _mm256_blendv_epi8(code[h], code_top, _mm256_castps_si256(_mm256_cmp_ps(x[h], top, _CMP_GT_OQ)));
    // Near an integer (or NaN): redo; not above the top boundary, where the code is
    // the map's end whatever t (t nears an integer at x = +-1).
    CPUADAM_EACH {
      const __m256 off = _mm256_and_ps(
          _mm256_sub_ps(t[h], _mm256_round_ps(t[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), abs_mask);
      const __m256 end = _mm256_cmp_ps(mag[h], top, _CMP_GT_OQ);
      redo = _mm256_or_ps(redo, _mm256_andnot_ps(end, _mm256_cmp_ps(off, margin, _CMP_NGE_UQ)));
    }
    if constexpr (kSigned) {
      CPUADAM_EACH code[h] = _mm256_castps_si256(_mm256_blendv_ps(
          _mm256_castsi256_ps(code[h]), _mm256_castsi256_ps(_mm256_sub_epi32(mirror, code[h])), x[h]));
    } else {
      CPUADAM_EACH redo = _mm256_or_ps(redo, x[h]);
    }
#undef CPUADAM_EACH
  }
};

// stochastic_code on eight lanes: x, its nearest codes q and 32 random bits each.
inline __m256i stochastic_codes8(__m256 x, __m256i q, __m256i random, const Decoder8& decode) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256 vq = decode(q);
  const __m256i above = _mm256_castps_si256(_mm256_cmp_ps(vq, x, _CMP_GT_OQ));
  // above: q - 1; else q + 1; clamped to the map, as stochastic_code does.
  __m256i n = _mm256_min_epi32(_mm256_add_epi32(q, _mm256_or_si256(above, one)), _mm256_set1_epi32(255));
  n = _mm256_max_epi32(n, _mm256_setzero_si256());
  const __m256 vn = decode(n);
  const __m256 lo = _mm256_blendv_ps(vq, vn, _mm256_castsi256_ps(above));
  const __m256 hi = _mm256_blendv_ps(vn, vq, _mm256_castsi256_ps(above));
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(random, 8)), _mm256_set1_ps(0x1p-24f));
  const __m256i up = _mm256_castps_si256(
      _mm256_cmp_ps(_mm256_mul_ps(u, _mm256_sub_ps(hi, lo)), _mm256_sub_ps(x, lo), _CMP_LT_OQ));
  // up == above: q; otherwise n.
  return _mm256_blendv_epi8(n, q, _mm256_cmpeq_epi32(up, above));
}

// 16 codes < 256, as bytes in order.
inline void store_codes16(const __m256i code[2], uint8_t* out) {
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(code[0], code[1]), 0xD8);
  const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
}
#endif

#if defined(__AVX2__)
// The codes of x = value * pre / scale for n (a multiple of 32) values of a
// finite block, by the arithmetic search; false (and the codes unfinished) when
// a lane needs the exact search. With `random`, rounded stochastically. kSigned:
// t's map.
template <bool kStochastic, bool kSigned>
bool search_codes(const float* __restrict v, uint8_t* __restrict codes, int64_t n, float pre, float scale,
                  float r, const QuantTable& t, const uint32_t* __restrict random) {
  const __m256 vscale = _mm256_set1_ps(scale), vr = _mm256_set1_ps(r), vpre = _mm256_set1_ps(pre);
  const Encoder8<kSigned> encode(t);
  __m256 redo = _mm256_setzero_ps();
  constexpr int kVectors = 4;
  for (int64_t k = 0; k < n; k += 8 * kVectors) {
    __m256 x[kVectors];
    __m256i code[kVectors];
    for (int h = 0; h < kVectors; ++h) x[h] = quotient8(v + k + 8 * h, vpre, vscale, vr);
    encode(x, code, redo);
    if constexpr (kStochastic) {
      const Decoder8 decode(t);
      for (int h = 0; h < kVectors; ++h)
        code[h] = stochastic_codes8(x[h], code[h],
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(random + k + 8 * h)), decode);
    }
    for (int h = 0; h < kVectors; h += 2) store_codes16(code + h, codes + k + 8 * h);
  }
  return _mm256_movemask_ps(redo) == 0;
}

// search_codes for t's map.
template <bool kStochastic>
bool search_codes_for(const float* __restrict v, uint8_t* __restrict codes, int64_t n, float pre, float scale,
                      float r, const QuantTable& t, const uint32_t* __restrict random) {
  return t.is_signed ? search_codes<kStochastic, true>(v, codes, n, pre, scale, r, t, random)
                     : search_codes<kStochastic, false>(v, codes, n, pre, scale, r, t, random);
}

// The same codes by the exact search through the bucket table, in three passes.
inline void search_codes_exact(const float* __restrict v, uint8_t* __restrict codes, int64_t n, float pre,
                               float scale, float r, const QuantTable& t, const uint32_t* __restrict random) {
  alignas(32) int32_t xs[kQuantBlock];
  alignas(32) int32_t entries[kQuantBlock];
  const __m256 vscale = _mm256_set1_ps(scale), vr = _mm256_set1_ps(r), vpre = _mm256_set1_ps(pre);
  const __m256i sign_mask = _mm256_set1_epi32(0x7FFFFFFF), low16 = _mm256_set1_epi32(0xFFFF);
  const __m256i low = _mm256_set1_epi32(kBucketLow), high = _mm256_set1_epi32(kBucketHigh);
  const __m256i per_sign = _mm256_set1_epi32(kBucketsPerSign);
  const __m256i per_sign_m1 = _mm256_set1_epi32(kBucketsPerSign - 1);
  const __m256i byte = _mm256_set1_epi32(0xFF), one = _mm256_set1_epi32(1);
  const Decoder8 decode(t);
  // Pass 1: x and its bucket, 8 lanes at a time.
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i u = _mm256_castps_si256(quotient8(v + i, vpre, vscale, vr));
    __m256i j = _mm256_srli_epi32(_mm256_and_si256(u, sign_mask), kBucketShift);
    j = _mm256_sub_epi32(_mm256_min_epi32(_mm256_max_epi32(j, low), high), low);
    const __m256i neg = _mm256_srai_epi32(u, 31);  // all ones where the sign is set
    const __m256i b = _mm256_blendv_epi8(_mm256_add_epi32(per_sign, j), _mm256_sub_epi32(per_sign_m1, j), neg);
    _mm256_store_si256(reinterpret_cast<__m256i*>(xs + i), u);
    _mm256_store_si256(reinterpret_cast<__m256i*>(entries + i), b);
  }
  // Pass 2: bucket -> table entry, one scalar load each. The empty asm keeps the
  // compiler from turning the loop back into gathers.
  for (int64_t k = 0; k < n; ++k) {
    int32_t b = entries[k];
#if defined(__GNUC__)
    __asm__("" : "+r"(b));
#endif
    entries[k] = t.entry[b];
  }
  // Pass 3: the codes, 16 at a time.
  for (int64_t k = 0; k < n; k += 16) {
    __m256i code[2];
    for (int h = 0; h < 2; ++h) {
      const __m256i u = _mm256_load_si256(reinterpret_cast<const __m256i*>(xs + k + 8 * h));
      const __m256i e = _mm256_load_si256(reinterpret_cast<const __m256i*>(entries + k + 8 * h));
      const __m256i neg = _mm256_srai_epi32(u, 31);
      const __m256i x_low = _mm256_and_si256(u, low16), mid_low = _mm256_srli_epi32(e, 16);
      // -1 where x is beyond the bucket's midpoint (above it; below it for negative x).
      const __m256i beyond = _mm256_blendv_epi8(_mm256_cmpgt_epi32(x_low, mid_low),
                                                _mm256_cmpgt_epi32(mid_low, x_low), neg);
      const __m256i inside = _mm256_and_si256(_mm256_srli_epi32(e, 8), one);
      code[h] = _mm256_add_epi32(_mm256_and_si256(e, byte), _mm256_and_si256(inside, beyond));
      if (random != nullptr)
        code[h] = stochastic_codes8(_mm256_castsi256_ps(u), code[h],
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(random + k + 8 * h)),
                                    decode);
    }
    store_codes16(code, codes + k);
  }
}
#endif

// Codes of one block of n <= kQuantBlock values; returns its absmax. An all-zero
// block has absmax 0 and every code that of 0 (x taken as 0). With `random` (n
// words of random bits), the codes are rounded stochastically instead.
inline float quantize_block(const float* __restrict v, uint8_t* __restrict codes, int64_t n,
                            const QuantTable& t, const uint32_t* __restrict random = nullptr) {
  const float absmax = block_absmax(v, n);
  const float pre = quotient_prescale(absmax);
  const float scale = absmax > 0.f ? absmax * pre : 1.f;  // 0 / 1 = 0: the code of 0
  const float r = 1.f / scale;
  const bool finite = absmax <= 0x1.fffffep127f;
  int64_t i = 0;
#if defined(__AVX2__)
  if (finite) {
    i = n & ~int64_t{31};
    const bool found = random != nullptr ? search_codes_for<true>(v, codes, i, pre, scale, r, t, random)
                                         : search_codes_for<false>(v, codes, i, pre, scale, r, t, random);
    if (i > 0 && !found) search_codes_exact(v, codes, i, pre, scale, r, t, random);
  }
#endif
  for (; i < n; ++i) {
    const float x = finite ? quotient(v[i] * pre, scale, r)
                  : std::isinf(v[i]) ? std::copysign(1.f, v[i]) : v[i] * pre / scale;
    const uint8_t q = nearest_code(x, t);
    codes[i] = random != nullptr ? stochastic_code(x, q, random[i], t) : q;
  }
  return absmax;
}

// values = qmap[code] * absmax for one block.
inline void dequantize_block(const uint8_t* __restrict codes, float absmax, float* __restrict v,
                             int64_t n, const QuantTable& t) {
  int64_t i = 0;
#if defined(__AVX2__)
  const __m256 vabsmax = _mm256_set1_ps(absmax);
  const Decoder8 decode(t);
  for (; i + 8 <= n; i += 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(v + i, _mm256_mul_ps(decode(c), vabsmax));
  }
#endif
  for (; i < n; ++i) v[i] = t.qmap[codes[i]] * absmax;
}
