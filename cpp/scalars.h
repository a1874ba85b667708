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
  double grad_scale = 1.0;
  int64_t step = 1;  // counts from 1
  bool maximize = false;
  bool decoupled = false;  // AdamW
  DecayScale decay_scale = DecayScale::Lr;
  EpsMode eps_mode = EpsMode::Torch;
};

StepScalars adam_scalars(const AdamHyper& h);
DecayMode adam_decay_mode(const AdamHyper& h);

}  // namespace cpuadam
