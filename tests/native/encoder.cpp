// SPDX-License-Identifier: MIT
// Exhaustive check of the AVX2 arithmetic code search (quant.h, Encoder8): for
// every float32 x with |x| <= 1, both signs, and for NaN and the infinities, in
// both maps, each lane the search does not send back for the exact search holds
// the nearest code (nearest_code, the bucket table that the Python tests check
// against the float64 reference). Also: quantize_block, fast search and exact
// fall-back together, gives the exact codes on whole blocks of such x; and the
// search keeps all but a few non-negative x (at most 1 in 10,000 sent back).
// Built and run by tools/check_encoder.sh; prints the share of lanes sent back.
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "../../cpp/quant.h"

namespace {

struct Count {
  uint64_t lanes = 0, redone = 0, wrong = 0;
};

// Eight x given as bits: checks the lanes kept by the search.
template <bool kSigned>
void check8(const uint32_t (&bits)[8], const QuantTable& t, const Encoder8<kSigned>& encode, Count& n) {
  __m256 x[1] = {_mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits)))};
  __m256i code[1];
  __m256 redo = _mm256_setzero_ps();
  encode(x, code, redo);
  alignas(32) int32_t got[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(got), code[0]);
  const int redo_mask = _mm256_movemask_ps(redo);
  for (int k = 0; k < 8; ++k) {
    ++n.lanes;
    if ((redo_mask >> k) & 1) {
      ++n.redone;
      continue;
    }
    float xf;
    std::memcpy(&xf, &bits[k], 4);
    const int want = nearest_code(xf, t);
    if (got[k] != want) {
      if (n.wrong < 10) std::printf("x = %.9g (0x%08x): code %d, nearest %d\n", xf, bits[k], got[k], want);
      ++n.wrong;
    }
  }
}

// One map's checks; true when all pass.
template <bool kSigned>
bool check_map() {
  const QuantTable& t = kSigned ? signed_table() : unsigned_table();
  const Encoder8<kSigned> encode(t);
  Count n, positive;
  // Every |x| <= 1 (bits 0 .. 0x3F800000), both signs.
  for (uint32_t sign : {0u, 0x80000000u}) {
    for (uint64_t u = 0; u <= 0x3F800000u; u += 8) {
      uint32_t bits[8];
      for (int k = 0; k < 8; ++k) bits[k] = static_cast<uint32_t>(u + k > 0x3F800000u ? 0x3F800000u : u + k) | sign;
      check8(bits, t, encode, n);
    }
    if (sign == 0) positive = n;
  }
  // The search must keep almost every lane, or it is the exact search in disguise:
  // at most 1 in 10,000 non-negative x sent back.
  const bool keeps = positive.redone * 10000 <= positive.lanes;
  // NaNs: the search must send them back. (Infinities never reach it: a block
  // holding one is quantized one element at a time.)
  const uint32_t nans[8] = {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFFFFFFFFu,
                            0x7FA00000u, 0xFF800001u, 0x7FFFFFFFu, 0xFFBFFFFFu};
  Count nan_count;
  check8(nans, t, encode, nan_count);
  const bool sent_back = nan_count.redone == 8;
  // Whole blocks through quantize_block (absmax 1: x = value): the fall-back
  // gives the exact codes. Blocks of consecutive floats around every midpoint.
  uint64_t block_wrong = 0;
  alignas(32) float v[kQuantBlock];
  uint8_t codes[kQuantBlock];
  for (int k = 0; k < 255; ++k) {
    for (const float side : {1.f, -1.f}) {
      uint32_t m;
      const float mid = t.mid[k] * side;
      std::memcpy(&m, &mid, 4);
      for (int i = 0; i < kQuantBlock; ++i) {
        const uint32_t b = m - kQuantBlock / 2 + static_cast<uint32_t>(i);
        std::memcpy(&v[i], &b, 4);
        if (!(v[i] >= -1.f && v[i] <= 1.f)) v[i] = 0.f;
      }
      v[0] = 1.f;  // absmax 1
      volatile int64_t size = kQuantBlock;  // not a constant the compiler folds into quant.h's loops
      quantize_block(v, codes, size, t);
      for (int i = 0; i < kQuantBlock; ++i) block_wrong += codes[i] != nearest_code(v[i], t);
    }
  }
  std::printf("%s map: %llu lanes, %llu sent to the exact search (%.2g; x >= 0: %.2g), %llu wrong; "
              "NaN sent back: %s; blocks at the midpoints: %llu wrong codes\n",
              kSigned ? "signed" : "unsigned", static_cast<unsigned long long>(n.lanes),
              static_cast<unsigned long long>(n.redone), static_cast<double>(n.redone) / n.lanes,
              static_cast<double>(positive.redone) / positive.lanes, static_cast<unsigned long long>(n.wrong),
              sent_back ? "yes" : "NO", static_cast<unsigned long long>(block_wrong));
  return n.wrong == 0 && sent_back && block_wrong == 0 && keeps;
}

}  // namespace

int main() {
  const bool signed_ok = check_map<true>(), unsigned_ok = check_map<false>();
  return signed_ok && unsigned_ok ? 0 : 1;
}
