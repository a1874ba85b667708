// SPDX-License-Identifier: MIT
// cpp/partition.h up to 2**62 elements and 256 threads: slices cover the range
// once, in order, aligned; pieces cover each slice. Exits non-zero on a failure.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "../../cpp/partition.h"

namespace {

int failures = 0;

void fail(const char* what, int64_t total, int threads, int thread) {
  if (failures++ < 20)
    std::fprintf(stderr, "%s: total=%lld threads=%d thread=%d\n", what, static_cast<long long>(total),
                 threads, thread);
}

void check_slices(int64_t total, int threads) {
  int64_t expected_begin = 0;
  for (int t = 0; t < threads; ++t) {
    Slice s = thread_slice(total, t, threads);
    if (s.begin != expected_begin) fail("slice does not start where the previous ended", total, threads, t);
    if (s.end < s.begin) fail("slice ends before it begins", total, threads, t);
    if (s.begin < total && s.begin % kSliceAlign != 0) fail("slice start is not aligned", total, threads, t);
    expected_begin = s.end;
  }
  if (expected_begin != total) fail("slices do not end at the total", total, threads, -1);
}

// Tensors of the given sizes: every slice's pieces are contiguous, inside one
// tensor each, and add up to the slice.
void check_pieces(const std::vector<int64_t>& sizes, int threads) {
  std::vector<int64_t> offsets(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) offsets[i + 1] = offsets[i] + sizes[i];
  const int64_t total = offsets.back();
  const auto n = static_cast<int64_t>(sizes.size());
  for (int t = 0; t < threads; ++t) {
    Slice s = thread_slice(total, t, threads);
    int64_t at = s.begin;
    for_each_piece(offsets.data(), n, s, [&](int64_t tensor, int64_t first, int64_t count) {
      if (offsets[tensor] + first != at) fail("piece is not where the previous ended", total, threads, t);
      if (count <= 0 || first + count > sizes[tensor]) fail("piece leaves its tensor", total, threads, t);
      at += count;
    });
    if (at != s.end) fail("pieces do not cover the slice", total, threads, t);
  }
}

}  // namespace

int main() {
  const int64_t kMax = int64_t{1} << 62;
  std::vector<int64_t> totals = {0, 1, 2, 15, 16, 17, 31, 33, 255, 256, 257, 4095, 4097, 65537,
                                 (int64_t{1} << 31) - 1, int64_t{1} << 31, (int64_t{1} << 31) + 17,
                                 int64_t{1} << 32, kMax - 1, kMax, kMax - 15, kMax - 17};
  std::mt19937_64 rng(2024);
  for (int i = 0; i < 40; ++i) totals.push_back(static_cast<int64_t>(rng() % static_cast<uint64_t>(kMax)));
  for (int shift = 33; shift < 62; ++shift) totals.push_back((int64_t{1} << shift) + 1);
  int64_t slices = 0;
  for (int64_t total : totals)
    for (int threads = 1; threads <= 256; ++threads) {
      check_slices(total, threads);
      slices += threads;
    }
  const std::vector<std::vector<int64_t>> layouts = {
      {kMax},
      {kMax / 2, 0, kMax / 2},
      {1, kMax - 2, 1},
      {0, 0, 17, 0, (int64_t{1} << 40) + 3, 5, kMax - (int64_t{1} << 40) - 25},
      {3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53},
  };
  for (const auto& sizes : layouts)
    for (int threads : {1, 2, 3, 7, 16, 64, 255, 256}) check_pieces(sizes, threads);
  if (failures != 0) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("partition: %zu totals up to 2**62 x threads 1..256 (%lld slices), %zu layouts: ok\n",
              totals.size(), static_cast<long long>(slices), layouts.size());
  return 0;
}
