// SPDX-License-Identifier: MIT
// Loads and stores between storage element types and the float32 arithmetic.
// Included only from kernel_isa.cpp, inside its per-level namespace, so that
// nothing here is shared (and merged by the linker) between ISA levels.
#pragma once

// Storage types are plain structs/ints so the core never needs a compiler's
// half-precision extension; float32 is the identity.
inline float load_float(float x) { return x; }

template <typename T>
inline T store_float(float x);

template <>
inline float store_float<float>(float x) {
  return x;
}
