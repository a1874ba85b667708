// SPDX-License-Identifier: MIT
// Per-step host math: bias corrections, step size and eps, once per step in double.
#pragma once

#include <cstdint>

#include "types.h"

namespace cpuadam {

enum class EpsMode : int { Torch = 0, Keras = 1 };
enum class DecayScale : int { Lr = 0, Independent = 1 };

struct AdamHyper {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  int64_t step = 1;  // counts from 1
  bool decoupled = false;  // AdamW
  DecayScale decay_scale = DecayScale::Lr;
  EpsMode eps_mode = EpsMode::Torch;
};

struct SgdHyper {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
};

// Fills the Adam (or SGD) fields of s; the fields shared by every optimizer
// (clip_value, EMA) are set by the caller.
void adam_scalars(const AdamHyper& h, StepScalars& s);
void sgd_scalars(const SgdHyper& h, StepScalars& s);
DecayMode adam_decay_mode(const AdamHyper& h);

}  // namespace cpuadam
