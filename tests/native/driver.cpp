// SPDX-License-Identifier: MIT
// Runs one ISA level's kernel table on fixed inputs and prints a hash of the
// output bytes, so builds for different CPUs (x86-64 avx2, aarch64 neon) can
// be compared bit for bit. Built by tools/check_aarch64.sh.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../cpp/scalars.h"
#include "../../cpp/types.h"

#ifndef CPUADAM_DRIVER_LEVEL
#error "CPUADAM_DRIVER_LEVEL must name the level linked in"
#endif

namespace cpuadam {
namespace CPUADAM_DRIVER_LEVEL {
KernelTable kernel_table();
}
}  // namespace cpuadam

namespace {

using namespace cpuadam;

// Sizes around every vector width (for 8-bit states: short and partial blocks),
// one large enough to split between threads.
const std::vector<int64_t> kSizes = {1, 3, 7, 8, 15, 17, 31, 33, 63, 65, 1000, 40009};

uint64_t fnv1a(uint64_t h, const std::vector<float>& v) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(float); ++i) h = (h ^ bytes[i]) * 1099511628211ULL;
  return h;
}

// Values from integers: the same floats on every machine, no libm involved.
struct Lcg {
  uint64_t state;
  float next(float scale) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const int32_t r = static_cast<int32_t>(state >> 40) - (1 << 23);
    return scale * static_cast<float>(r) / static_cast<float>(1 << 23);
  }
};

struct Buffers {
  std::vector<std::vector<float>> param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq;
  std::vector<TensorSpan> spans;
  std::vector<int64_t> offsets{0};

  explicit Buffers(uint64_t seed) {
    Lcg rng{seed};
    for (int64_t n : kSizes) {
      param.emplace_back(n);
      grad.emplace_back(n);
      exp_avg.emplace_back(n);
      exp_avg_sq.emplace_back(n);
      max_exp_avg_sq.emplace_back(n);
      for (int64_t i = 0; i < n; ++i) {
        param.back()[i] = rng.next(1.f);
        exp_avg.back()[i] = rng.next(0.1f);
        const float v = rng.next(0.1f);
        exp_avg_sq.back()[i] = v * v;
        max_exp_avg_sq.back()[i] = 2.f * v * v;
      }
    }
    for (size_t t = 0; t < kSizes.size(); ++t) {
      TensorSpan s;
      s.param = param[t].data();
      s.grad = grad[t].data();
      s.exp_avg = exp_avg[t].data();
      s.exp_avg_sq = exp_avg_sq[t].data();
      s.max_exp_avg_sq = max_exp_avg_sq[t].data();
      s.numel = kSizes[t];
      s.grad_scale = 0.7f;
      spans.push_back(s);
      offsets.push_back(offsets.back() + kSizes[t]);
    }
  }

  void fill_grads(Lcg& rng) {
    for (auto& g : grad)
      for (auto& x : g) x = rng.next(2.f);
  }

  uint64_t hash() const {
    uint64_t h = 14695981039346656037ULL;
    for (const auto* list : {&param, &exp_avg, &exp_avg_sq, &max_exp_avg_sq})
      for (const auto& v : *list) h = fnv1a(h, v);
    return h;
  }
};

StepArgs args_for(const Buffers& b, int num_threads) {
  StepArgs a;
  a.tensors = b.spans.data();
  a.num_tensors = static_cast<int64_t>(b.spans.size());
  a.offsets = b.offsets.data();
  a.grad_input = GradInput::Scaled;
  a.num_threads = num_threads;
  a.scalars.clip_value = INFINITY;
  return a;
}

// AdamW with amsgrad (torch eps), then Adam with L2 decay (keras eps): 10 steps each.
uint64_t run_adam(const KernelTable& table, int num_threads) {
  Buffers b(1);
  Lcg rng{2};
  for (int variant = 0; variant < 2; ++variant) {
    for (int64_t step = 1; step <= 10; ++step) {
      b.fill_grads(rng);
      AdamHyper h;
      h.lr = 1e-2;
      h.weight_decay = 0.02;
      h.step = step;
      h.decoupled = variant == 0;
      h.eps_mode = variant == 0 ? EpsMode::Torch : EpsMode::Keras;
      h.eps = 1e-6;
      StepArgs a = args_for(b, num_threads);
      adam_scalars(h, a.scalars);
      a.decay = adam_decay_mode(h);
      a.amsgrad = variant == 0 ? Amsgrad::On : Amsgrad::Off;
      if (!table.adam_step(a)) return 0;
    }
  }
  return b.hash();
}

// SGD with nesterov momentum and L2 decay: the first step, then 9 more.
uint64_t run_sgd(const KernelTable& table, int num_threads) {
  Buffers b(3);
  Lcg rng{4};
  for (int step = 1; step <= 10; ++step) {
    b.fill_grads(rng);
    SgdHyper h;
    h.lr = 1e-2;
    h.momentum = 0.9;
    h.dampening = 0.1;
    h.weight_decay = 0.01;
    StepArgs a = args_for(b, num_threads);
    sgd_scalars(h, a.scalars);
    a.decay = DecayMode::L2;
    a.momentum = step == 1 ? Momentum::First : Momentum::On;
    a.nesterov = Nesterov::On;
    if (!table.sgd_step(a)) return 0;
  }
  return b.hash();
}

// Ten AdamW steps with amsgrad over b, whose states are of the given dtype and rounding.
bool adamw_amsgrad_steps(const KernelTable& table, Buffers& b, Lcg& rng, int num_threads, DType state_dtype,
                         StateRounding rounding) {
  for (int64_t step = 1; step <= 10; ++step) {
    b.fill_grads(rng);
    AdamHyper hyper;
    hyper.lr = 1e-2;
    hyper.weight_decay = 0.02;
    hyper.step = step;
    hyper.decoupled = true;
    hyper.eps = 1e-8;
    StepArgs a = args_for(b, num_threads);
    adam_scalars(hyper, a.scalars);
    a.decay = adam_decay_mode(hyper);
    a.amsgrad = Amsgrad::On;
    a.state_dtype = state_dtype;
    a.state_rounding = rounding;
    if (!table.adam_step(a)) return false;
  }
  return true;
}

template <typename T>
uint64_t fnv1a_bytes(uint64_t h, const std::vector<T>& v) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(v.data());
  for (size_t i = 0; i < v.size() * sizeof(T); ++i) h = (h ^ bytes[i]) * 1099511628211ULL;
  return h;
}

using Slots = void* TensorSpan::* const[3];
Slots kStates = {&TensorSpan::exp_avg, &TensorSpan::exp_avg_sq, &TensorSpan::max_exp_avg_sq};
Slots kAbsmax = {&TensorSpan::exp_avg_absmax, &TensorSpan::exp_avg_sq_absmax, &TensorSpan::max_exp_avg_sq_absmax};

int64_t same(int64_t n) { return n; }
int64_t blocks(int64_t n) { return (n + 255) / 256; }

// Three zero buffers of T per tensor (elements_per(numel) each), wired into b's spans at slots.
template <typename T>
std::vector<std::vector<T>> fresh(Buffers& b, int64_t (*elements_per)(int64_t), Slots& slots) {
  std::vector<std::vector<T>> out;
  for (size_t t = 0; t < kSizes.size(); ++t)
    for (int k = 0; k < 3; ++k) {
      out.emplace_back(static_cast<size_t>(elements_per(kSizes[t])), T{0});
      b.spans[t].*slots[k] = out.back().data();
    }
  return out;
}

void set_rounding_keys(Buffers& b, uint64_t key) {
  for (size_t t = 0; t < kSizes.size(); ++t) b.spans[t].rounding_key = key * (t + 1);
}

// 8-bit states (block-wise codes, one absmax per 256), from fresh states, with
// nearest codes, then again with stochastic codes.
uint64_t run_adam_8bit(const KernelTable& table, int num_threads) {
  uint64_t h = 14695981039346656037ULL;
  for (StateRounding rounding : {StateRounding::Nearest, StateRounding::Stochastic}) {
    Buffers b(5);
    Lcg rng{6};
    auto codes = fresh<uint8_t>(b, same, kStates);
    auto absmax = fresh<float>(b, blocks, kAbsmax);
    set_rounding_keys(b, 0x0123456789ABCDEFull);
    if (!adamw_amsgrad_steps(table, b, rng, num_threads, DType::Blockwise8, rounding)) return 0;
    for (const auto& v : b.param) h = fnv1a(h, v);
    for (const auto& c : codes) h = fnv1a_bytes(h, c);
    for (const auto& v : absmax) h = fnv1a(h, v);
  }
  return h;
}

// bfloat16 states rounded stochastically.
uint64_t run_adam_bf16_states(const KernelTable& table, int num_threads) {
  Buffers b(7);
  Lcg rng{8};
  auto states = fresh<uint16_t>(b, same, kStates);
  set_rounding_keys(b, 0x0F1E2D3C4B5A6978ull);
  if (!adamw_amsgrad_steps(table, b, rng, num_threads, DType::BFloat16, StateRounding::Stochastic)) return 0;
  uint64_t h = 14695981039346656037ULL;
  for (const auto& v : b.param) h = fnv1a(h, v);
  for (const auto& v : states) h = fnv1a_bytes(h, v);
  return h;
}

}  // namespace

int main() {
  const KernelTable table = cpuadam::CPUADAM_DRIVER_LEVEL::kernel_table();
  const uint64_t adam1 = run_adam(table, 1), adam2 = run_adam(table, 2);
  const uint64_t sgd1 = run_sgd(table, 1), sgd2 = run_sgd(table, 2);
  const uint64_t q1 = run_adam_8bit(table, 1), q2 = run_adam_8bit(table, 2);
  const uint64_t r1 = run_adam_bf16_states(table, 1), r2 = run_adam_bf16_states(table, 2);
  if (adam1 != adam2 || sgd1 != sgd2 || q1 != q2 || r1 != r2) {
    std::printf("level %s: results differ between 1 and 2 threads\n", table.level);
    return 1;
  }
  std::printf("level %s adam %016llx sgd %016llx adam-8bit %016llx adam-bf16-sr %016llx\n", table.level,
              static_cast<unsigned long long>(adam1), static_cast<unsigned long long>(sgd1),
              static_cast<unsigned long long>(q1), static_cast<unsigned long long>(r1));
  return 0;
}
