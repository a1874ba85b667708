// SPDX-License-Identifier: MIT
// Loads and stores between storage element types and the float32 arithmetic:
// bfloat16 and float16 round to nearest even, stochastic rounding, array forms.
// Included only from kernel_isa.cpp, inside its per-level namespace, so that
// nothing here is shared (and merged by the linker) between ISA levels.
#pragma once

// Storage types as distinct 16-bit integers, so the core never needs a
// compiler's half-precision extension and the conversions are plain integer
// code that GCC vectorises at every level.
enum class BFloat16 : uint16_t {};
enum class Float16 : uint16_t {};

inline uint32_t float_bits(float x) { return __builtin_bit_cast(uint32_t, x); }
inline float bits_float(uint32_t u) { return __builtin_bit_cast(float, u); }

inline float load_float(float x) { return x; }

// bfloat16 is the upper half of a float32: exact.
inline float load_float(BFloat16 x) { return bits_float(static_cast<uint32_t>(x) << 16); }

// float16 to float32, exact. Subnormals are converted as integer * 2^-24 (an
// int-to-float conversion and a power-of-two scaling, both exact) rather than by
// normalising the bits, which would need a count of leading zeros per lane.
inline float load_float(Float16 x) {
  const uint32_t h = static_cast<uint32_t>(x);
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // Normal: rebias the exponent from 15 to 127. Inf/NaN: exponent all ones,
  // NaN made quiet as the F16C instruction does.
  const uint32_t normal = (em << 13) + (112u << 23);
  const uint32_t inf_nan = (em << 13) | 0x7F800000u | (em > 0x7C00u ? 0x00400000u : 0u);
  const uint32_t subnormal = float_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  return bits_float(sign | (em >= 0x7C00u ? inf_nan : em >= 0x0400u ? normal : subnormal));
}

// float32 to bfloat16, round to nearest even. A NaN keeps its sign and upper
// payload and is made quiet; values past the largest finite round to inf as
// round-to-nearest-even says. AVX-512 BF16's VCVTNEPS2BF16 is not used: it
// flushes denormal inputs and outputs to zero, so it would neither match torch's
// c10::BFloat16 nor give the other levels' bits.
inline uint16_t bf16_bits_nearest(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? (u >> 16) | 0x0040u : rounded);
}

// float32 to float16, round to nearest even, with subnormals, inf and NaN (a
// NaN keeps its sign and upper payload and is made quiet, as F16C does).
inline uint16_t f16_bits_nearest(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // |x| >= 2^-14 (float16 normal): rebias the exponent, round the 13 dropped bits.
  const uint32_t normal = (a - (112u << 23) + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
  // |x| < 2^-14: in 0.5 + |x| the float's last place is 2^-24, the float16
  // subnormal step, so the hardware add rounds to nearest even for us.
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  const uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  // 0x477FF000 is 65520, half-way between 65504 (the largest float16) and 2^16.
  const uint32_t mag = a > 0x7F800000u   ? nan
                       : a >= 0x477FF000u ? 0x7C00u
                       : a >= 0x38800000u ? normal
                                          : subnormal;
  return static_cast<uint16_t>(sign | mag);
}

template <typename T>
inline T store_float(float x);

template <>
inline float store_float<float>(float x) {
  return x;
}

template <>
inline BFloat16 store_float<BFloat16>(float x) {
  return BFloat16(bf16_bits_nearest(x));
}

template <>
inline Float16 store_float<Float16>(float x) {
  return Float16(f16_bits_nearest(x));
}

// Counter-based random bits for stochastic rounding: no state, so the bits of
// element i depend only on (key, i), never on threads or vector width. mix32 is
// the "lowbias32" integer hash (C. Wellons, "Prospecting for Hash Functions",
// 2018); two rounds with the key between them decorrelate neighbouring indices
// and neighbouring keys. Only 32-bit multiplies, shifts and xors: vectorised.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t rounding_bits(uint32_t index, uint32_t key0, uint32_t key1) {
  return mix32(mix32(index ^ key0) + key1);
}

// Stochastic rounding to bfloat16: 16 random bits added below the kept
// mantissa, then truncation. The carry happens with probability equal to the
// dropped fraction of the distance to the upper neighbour, so the result is
// one of the two neighbours and exact in expectation. NaN, inf and values past
// the largest finite bfloat16 (no finite upper neighbour) round to nearest.
inline uint16_t bf16_bits_stochastic(float x, uint32_t random) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + (random >> 16)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F7F0000u ? bf16_bits_nearest(x) : static_cast<uint16_t>(rounded);
}

// Stochastic rounding to float16. Normal range: 13 random bits below the kept
// 10-bit mantissa, as for bfloat16. Subnormal range (|x| < 2^-14), where the
// step is a fixed 2^-24: |x| as a fixed-point number with 13 bits below that
// step (exact scaling by 2^37, truncated to an integer: anything below 2^-37 is
// dropped, a bias under 2^-13 of a step), plus 13 random bits, truncated.
// A carry out of the largest subnormal gives the smallest normal, 0x0400.
inline uint16_t f16_bits_stochastic(float x, uint32_t random) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t r = random >> 19;
  const uint32_t normal = ((a + r) >> 13) - (112u << 10);
  const bool is_subnormal = a < 0x38800000u;
  // Only subnormal-range values are scaled, so the integer conversion never overflows.
  const float scaled = bits_float(is_subnormal ? a : 0u) * 0x1p37f;
  const uint32_t subnormal = (static_cast<uint32_t>(static_cast<int32_t>(scaled)) + r) >> 13;
  // 0x477FE000 is 65504, the largest float16: beyond it there is no finite upper neighbour.
  return a > 0x477FE000u ? f16_bits_nearest(x)
                         : static_cast<uint16_t>(sign | (is_subnormal ? subnormal : normal));
}

template <typename P>
inline P store_stochastic(float x, uint32_t random);

template <>
inline BFloat16 store_stochastic<BFloat16>(float x, uint32_t random) {
  return BFloat16(bf16_bits_stochastic(x, random));
}

template <>
inline Float16 store_stochastic<Float16>(float x, uint32_t random) {
  return Float16(f16_bits_stochastic(x, random));
}
