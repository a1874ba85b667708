// SPDX-License-Identifier: MIT
// Timing only, never shipped: a linear 8-bit codec (code = round(127 x) + 128,
// value = (code - 128) / 127 * absmax) with the signatures of quant.h's
// quantize_block and dequantize_block. tools/bench_native_step.sh --linear-codec
// builds a copy of the kernels that calls these instead, keeping everything else
// of the 8-bit step (the block loop, the tiles, the absmax, the Adam arithmetic):
// its time is what the step would cost if decoding and searching the dynamic map
// cost no more than a conversion. Included after quant.h, inside the level's
// namespace.

inline float quantize_block_linear(const float* __restrict v, uint8_t* __restrict codes, int64_t n,
                                   const QuantTable&, const uint32_t* __restrict = nullptr) {
  const float absmax = block_absmax(v, n);
  const float r = 127.f / (absmax > 0.f ? absmax : 1.f);
  int64_t i = 0;
  const __m256 vr = _mm256_set1_ps(r);
  const __m256i offset = _mm256_set1_epi32(128);
  for (; i + 16 <= n; i += 16) {
    __m256i code[2];
    for (int h = 0; h < 2; ++h)
      code[h] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i + 8 * h), vr)), offset);
    store_codes16(code, codes + i);
  }
  for (; i < n; ++i) codes[i] = static_cast<uint8_t>(std::lrint(v[i] * r) + 128);
  return absmax;
}

inline void dequantize_block_linear(const uint8_t* __restrict codes, float absmax, float* __restrict v,
                                    int64_t n, const QuantTable&) {
  const float s = absmax / 127.f;
  int64_t i = 0;
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i offset = _mm256_set1_epi32(128);
  for (; i + 8 <= n; i += 8) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, offset)), vs));
  }
  for (; i < n; ++i) v[i] = static_cast<float>(codes[i] - 128) * s;
}
