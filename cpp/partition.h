// SPDX-License-Identifier: MIT
// Equal per-thread slices of the concatenated element range of many tensors.
// Included only from kernel_isa.cpp, inside its per-level namespace.
#pragma once

#include <cstdint>

// Slices start on multiples of this many elements (64 bytes of float32), so
// threads never share a cache line of the concatenated range's interior.
constexpr int64_t kSliceAlign = 16;

struct Slice {
  int64_t begin;
  int64_t end;
};

inline Slice thread_slice(int64_t total, int thread, int num_threads) {
  int64_t per = (total + num_threads - 1) / num_threads;
  per = (per + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
  int64_t begin = per * thread;
  int64_t end = begin + per;
  if (begin > total) begin = total;
  if (end > total) end = total;
  return {begin, end};
}

// Index of the tensor holding element `pos`: the last i with offsets[i] <= pos,
// skipping empty tensors. offsets has num_tensors + 1 entries, offsets[0] == 0.
inline int64_t tensor_at(const int64_t* offsets, int64_t num_tensors, int64_t pos) {
  int64_t lo = 0, hi = num_tensors;  // answer in [lo, hi)
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= pos) lo = mid; else hi = mid;
  }
  return lo;
}

// Calls fn(tensor_index, first_element, count) for every piece of [begin, end)
// that falls inside one tensor, in order.
template <typename Fn>
inline void for_each_piece(const int64_t* offsets, int64_t num_tensors, Slice s, Fn&& fn) {
  if (s.begin >= s.end) return;
  for (int64_t t = tensor_at(offsets, num_tensors, s.begin); t < num_tensors; ++t) {
    int64_t lo = offsets[t] > s.begin ? offsets[t] : s.begin;
    int64_t hi = offsets[t + 1] < s.end ? offsets[t + 1] : s.end;
    if (lo >= s.end) break;
    if (hi > lo) fn(t, lo - offsets[t], hi - lo);
  }
}
