// SPDX-License-Identifier: MIT
// The pybind11 module `_core`: the only file that sees Python objects. It
// validates every buffer and scalar before any byte is written, copies raw
// pointers into StepArgs, releases the GIL and calls the chosen level.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "scalars.h"
#include "types.h"

namespace py = pybind11;

#ifndef CPUADAM_VERSION
#define CPUADAM_VERSION "0.0.0"
#endif

namespace cpuadam {
namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    if (a.ndim() == 1 || i + 1 < a.ndim()) s += a.ndim() == 1 ? "," : ", ";
  }
  return s + ")";
}

bool same_shape(const py::array& a, const py::array& b) {
  if (a.ndim() != b.ndim()) return false;
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (a.shape(i) != b.shape(i)) return false;
  return true;
}

// Names a buffer in messages: "params[3] in group 1", "exp_avg of params[3] in group 1".
// Names are built only when a message needs one: a step may check 50,000 buffers.
struct Namer {
  int group = 0;
  std::vector<int64_t> indices;  // each tensor's position in its group
  const char* list_name = nullptr;  // set for a plain list: "grads[3]"
  std::string param(size_t i) const {
    int64_t idx = i < indices.size() ? indices[i] : static_cast<int64_t>(i);
    if (list_name != nullptr) return std::string(list_name) + "[" + std::to_string(idx) + "]";
    return "params[" + std::to_string(idx) + "] in group " + std::to_string(group);
  }
  std::string of(const char* what, size_t i) const {
    return what == nullptr ? param(i) : std::string(what) + " of " + param(i);
  }
};

bool is_float32(const py::array& a) {
  // Compares the dtype's type number and byte order, without building a dtype object.
  const auto* descr = reinterpret_cast<const py::detail::PyArrayDescr_Proxy*>(
      py::detail::array_proxy(a.ptr())->descr);
  return descr->type_num == py::detail::npy_api::NPY_FLOAT_ && descr->byteorder != '>';
}

// Checks one buffer, named `what` of tensor i (nullptr: the param itself);
// `like` (if given) is the param whose shape it must have.
py::array check_buffer(py::handle obj, const Namer& namer, const char* what, size_t i, bool written,
                       const py::array* like) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(namer.of(what, i) + ": expected a numpy.ndarray, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!is_float32(a))
    throw py::type_error(namer.of(what, i) + ": expected a float32 array, got " +
                         std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(namer.of(what, i) + ": expected a C-contiguous array");
  if (reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() != 0)
    throw py::value_error(namer.of(what, i) + ": data is not aligned to its element size");
  if (written && !a.writeable())
    throw py::value_error(namer.of(what, i) + ": expected a writeable array, got a read-only one");
  if (like != nullptr && !same_shape(a, *like))
    throw py::value_error(namer.of(what, i) + ": shape " + shape_str(a) + " does not match " +
                          namer.param(i) + "'s shape " + shape_str(*like));
  return a;
}

// A buffer's bytes, and who it is (for a message only).
struct Extent {
  uintptr_t lo, hi;
  const Namer* namer;
  const char* what;
  size_t tensor;
  std::string name() const { return namer->of(what, tensor); }
};

Extent extent_of(const py::array& a, const Namer* namer, const char* what, size_t tensor) {
  auto lo = reinterpret_cast<uintptr_t>(a.data());
  return {lo, lo + static_cast<uintptr_t>(a.nbytes()), namer, what, tensor};
}

// No two written buffers may share a byte, and no grad may share a byte with
// a written buffer: the result would depend on the order elements are visited.
void check_no_overlap(std::vector<Extent> written, const std::vector<Extent>& read) {
  std::sort(written.begin(), written.end(), [](const Extent& x, const Extent& y) { return x.lo < y.lo; });
  for (size_t i = 1; i < written.size(); ++i)
    if (written[i].lo < written[i - 1].hi)
      throw py::value_error(written[i].name() + " shares memory with " + written[i - 1].name() +
                            "; buffers written by a step must not overlap");
  for (const Extent& r : read) {
    auto it = std::upper_bound(written.begin(), written.end(), r.lo,
                               [](uintptr_t lo, const Extent& e) { return lo < e.lo; });
    // The written extent starting at or before r.lo, and the one after it.
    if (it != written.begin() && std::prev(it)->hi > r.lo)
      throw py::value_error(r.name() + " shares memory with " + std::prev(it)->name() +
                            ", which the step writes");
    if (it != written.end() && it->lo < r.hi)
      throw py::value_error(r.name() + " shares memory with " + it->name() + ", which the step writes");
  }
}

std::string num_str(double x) { return py::str(py::float_(x)).cast<std::string>(); }

void check_scalar(double x, const std::string& name, double lo, bool lo_open, double hi, bool hi_open) {
  bool ok = std::isfinite(x) && (lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi);
  if (!ok) {
    std::string range = std::string(lo_open ? "(" : "[") + num_str(lo) + ", " + num_str(hi) +
                        (hi_open ? ")" : "]");
    throw py::value_error("invalid " + name + ": " + num_str(x) + " (expected a finite value in " +
                          range + ")");
  }
}

py::sequence as_list(py::handle obj, const std::string& name) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    throw py::type_error(name + ": expected a list of arrays");
  return py::reinterpret_borrow<py::sequence>(obj);
}

// Validated buffers of one batch; the py::array objects keep the memory alive
// until the call returns.
struct Buffers {
  std::shared_ptr<const Namer> namer;  // on the heap: extents point at it while Buffers move
  std::vector<py::array> keep;
  std::vector<TensorSpan> spans;
  std::vector<int64_t> offsets;
  std::vector<Extent> written, read;
};

// A per-param buffer list of a batch: its dict key, its name in messages and
// the span field it fills. All are written by the step.
struct StateList {
  const char* key;
  const char* what;
  void* TensorSpan::*field;
};

Buffers validate(const py::dict& d, const std::vector<StateList>& lists, Namer namer_value) {
  Buffers b;
  b.namer = std::make_shared<const Namer>(std::move(namer_value));
  const Namer& namer = *b.namer;
  auto field = [&d](const char* key) -> py::handle {
    if (!d.contains(key)) throw py::value_error(std::string("batch is missing '") + key + "'");
    return d[key];
  };
  py::sequence params = as_list(field("params"), "params");
  py::sequence grads = as_list(field("grads"), "grads");
  const size_t n = params.size();
  auto check_len = [n](const py::sequence& s, const std::string& name) {
    if (s.size() != n)
      throw py::value_error(name + " has " + std::to_string(s.size()) + " entries but params has " +
                            std::to_string(n));
  };
  check_len(grads, "grads");
  std::vector<py::sequence> states;
  for (const StateList& l : lists) {
    states.push_back(as_list(field(l.key), l.key));
    check_len(states.back(), l.key);
  }
  if (!namer.indices.empty() && namer.indices.size() != n)
    throw py::value_error("indices has " + std::to_string(namer.indices.size()) +
                          " entries but params has " + std::to_string(n));

  b.keep.reserve(n * (2 + lists.size()));
  b.spans.resize(n);
  b.offsets.resize(n + 1);
  b.offsets[0] = 0;
  for (size_t i = 0; i < n; ++i) {
    py::array p = check_buffer(params[i], namer, nullptr, i, true, nullptr);
    py::array g = check_buffer(grads[i], namer, "grad", i, false, &p);
    TensorSpan& s = b.spans[i];
    s.param = p.mutable_data();
    s.grad = g.data();
    s.numel = p.size();
    if (s.numel > 0) {
      b.written.push_back(extent_of(p, &namer, nullptr, i));
      b.read.push_back(extent_of(g, &namer, "grad", i));
    }
    for (size_t k = 0; k < lists.size(); ++k) {
      py::array a = check_buffer(states[k][i], namer, lists[k].what, i, true, &p);
      s.*(lists[k].field) = a.mutable_data();
      if (s.numel > 0) b.written.push_back(extent_of(a, &namer, lists[k].what, i));
      b.keep.push_back(std::move(a));
    }
    b.offsets[i + 1] = b.offsets[i] + s.numel;
    b.keep.push_back(std::move(p));
    b.keep.push_back(std::move(g));
  }
  check_no_overlap(b.written, b.read);
  return b;
}

EpsMode parse_eps_mode(const std::string& s, const std::string& in_group) {
  if (s == "torch") return EpsMode::Torch;
  if (s == "keras") return EpsMode::Keras;
  throw py::value_error("invalid eps_mode" + in_group + ": '" + s + "' (expected 'torch' or 'keras')");
}

DecayScale parse_decay_mode(const std::string& s, const std::string& in_group) {
  if (s == "lr") return DecayScale::Lr;
  if (s == "independent") return DecayScale::Independent;
  throw py::value_error("invalid decay_mode" + in_group + ": '" + s +
                        "' (expected 'lr' or 'independent')");
}

double get_double(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw py::value_error(std::string("batch is missing '") + key + "'");
  py::handle h = d[key];
  if (py::isinstance<py::bool_>(h) || !(py::isinstance<py::float_>(h) || py::isinstance<py::int_>(h) ||
                                        py::hasattr(h, "__float__")))
    throw py::type_error(std::string(key) + ": expected a real number, got " +
                         std::string(py::str(py::type::of(h).attr("__name__"))));
  return h.cast<double>();
}

// Typed lookups of optional batch keys: a wrong type is a TypeError naming the key.
template <typename T>
T get_or(const py::dict& d, const char* key, T fallback) {
  if (!d.contains(key) || d[key].is_none()) return fallback;
  py::handle h = d[key];
  const char* expected = "a value of the right type";
  if constexpr (std::is_same_v<T, bool>) {
    expected = "a bool";
    if (py::isinstance<py::bool_>(h)) return h.cast<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    expected = "an int";
    if (!py::isinstance<py::bool_>(h) && py::hasattr(h, "__index__")) return h.cast<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    expected = "a str";
    if (py::isinstance<py::str>(h)) return h.cast<T>();
  } else if constexpr (std::is_floating_point_v<T>) {
    return static_cast<T>(get_double(d, key));
  } else {
    expected = "a list of ints";
    try {
      if (py::isinstance<py::list>(h) || py::isinstance<py::tuple>(h)) return h.cast<T>();
    } catch (const py::cast_error&) {
    }
  }
  throw py::type_error(std::string(key) + ": expected " + expected + ", got " +
                       std::string(py::str(py::type::of(h).attr("__name__"))));
}

bool has(const py::dict& d, const char* key) { return d.contains(key) && !d[key].is_none(); }

enum class Optim { Adam, Sgd };

// One batch: tensors of one param group that share a step count, and the
// group's hyperparameters. Validated completely before anything runs.
struct Batch {
  Buffers buffers;
  StepArgs args;
  double base_scale = 1.0;  // maximize's sign times grad_scale
  double clipnorm = 0.0;    // 0: no per-tensor clipping
  // One-element float32/float64 arrays (torch's per-param 'step' tensors) that
  // receive the batch's step count once the update is applied.
  std::vector<py::array> step_buffers;
  std::vector<void*> step_ptrs;  // their data, taken while the GIL is held
  int64_t step = 0;
};

std::vector<py::array> check_step_buffers(const py::dict& d, const std::string& in_group) {
  std::vector<py::array> out;
  if (!d.contains("step_buffers") || d["step_buffers"].is_none()) return out;
  py::sequence seq = as_list(d["step_buffers"], "step_buffers");
  out.reserve(seq.size());
  for (size_t i = 0; i < seq.size(); ++i) {
    py::handle h = seq[i];
    const std::string name = "step_buffers[" + std::to_string(i) + "]" + in_group;
    if (!py::isinstance<py::array>(h)) throw py::type_error(name + ": expected a numpy.ndarray");
    py::array a = py::reinterpret_borrow<py::array>(h);
    const int type_num =
        py::detail::array_descriptor_proxy(py::detail::array_proxy(a.ptr())->descr)->type_num;
    if (type_num != py::detail::npy_api::NPY_FLOAT_ && type_num != py::detail::npy_api::NPY_DOUBLE_)
      throw py::type_error(name + ": expected a float32 or float64 array");
    if (a.size() != 1 || !a.writeable() || !(a.flags() & py::array::c_style))
      throw py::value_error(name + ": expected a writeable array of one element");
    out.push_back(std::move(a));
  }
  return out;
}

Batch make_batch(const py::dict& d, Optim optim) {
  const int group = get_or<int>(d, "group", 0);
  const std::string in_group = " in group " + std::to_string(group);
  Batch b;
  StepArgs& a = b.args;
  StepScalars& sc = a.scalars;
  const double lr = get_double(d, "lr");
  const double weight_decay = get_double(d, "weight_decay");
  check_scalar(lr, "lr" + in_group, 0.0, false, INFINITY, true);
  check_scalar(weight_decay, "weight_decay" + in_group, 0.0, false, INFINITY, true);
  const double grad_scale = has(d, "grad_scale") ? get_double(d, "grad_scale") : 1.0;
  if (!std::isfinite(grad_scale))
    throw py::value_error("invalid grad_scale" + in_group + ": " + num_str(grad_scale) +
                          " (expected a finite value)");
  b.base_scale = get_or<bool>(d, "maximize", false) ? -grad_scale : grad_scale;
  if (has(d, "clipnorm")) {
    b.clipnorm = get_double(d, "clipnorm");
    check_scalar(b.clipnorm, "clipnorm" + in_group, 0.0, true, INFINITY, true);
  }
  sc.clip_value = INFINITY;
  if (has(d, "clipvalue")) {
    const double clipvalue = get_double(d, "clipvalue");
    check_scalar(clipvalue, "clipvalue" + in_group, 0.0, true, INFINITY, true);
    sc.clip_value = static_cast<float>(clipvalue);
  }
  std::vector<StateList> lists;
  if (optim == Optim::Adam) {
    AdamHyper h;
    h.step = get_or<int64_t>(d, "step", 0);
    if (h.step < 1)
      throw py::value_error("invalid step" + in_group + ": " + std::to_string(h.step) +
                            " (steps count from 1)");
    h.lr = lr;
    h.weight_decay = weight_decay;
    h.beta1 = get_double(d, "beta1");
    h.beta2 = get_double(d, "beta2");
    h.eps = get_double(d, "eps");
    check_scalar(h.beta1, "beta1" + in_group, 0.0, false, 1.0, true);
    check_scalar(h.beta2, "beta2" + in_group, 0.0, false, 1.0, true);
    check_scalar(h.eps, "eps" + in_group, 0.0, false, INFINITY, true);
    h.decoupled = get_or<bool>(d, "decoupled", false);
    h.decay_scale = parse_decay_mode(get_or<std::string>(d, "decay_mode", "lr"), in_group);
    h.eps_mode = parse_eps_mode(get_or<std::string>(d, "eps_mode", "torch"), in_group);
    adam_scalars(h, sc);
    a.decay = adam_decay_mode(h);
    a.amsgrad = get_or<bool>(d, "amsgrad", false) ? Amsgrad::On : Amsgrad::Off;
    lists.push_back({"exp_avgs", "exp_avg", &TensorSpan::exp_avg});
    lists.push_back({"exp_avg_sqs", "exp_avg_sq", &TensorSpan::exp_avg_sq});
    if (a.amsgrad == Amsgrad::On)
      lists.push_back({"max_exp_avg_sqs", "max_exp_avg_sq", &TensorSpan::max_exp_avg_sq});
  } else {
    SgdHyper h;
    h.lr = lr;
    h.weight_decay = weight_decay;
    h.momentum = get_or<double>(d, "momentum", 0.0);
    h.dampening = get_or<double>(d, "dampening", 0.0);
    check_scalar(h.momentum, "momentum" + in_group, 0.0, false, INFINITY, true);
    check_scalar(h.dampening, "dampening" + in_group, -INFINITY, true, INFINITY, true);
    sgd_scalars(h, sc);
    a.decay = weight_decay == 0.0 ? DecayMode::None : DecayMode::L2;
    a.nesterov = get_or<bool>(d, "nesterov", false) ? Nesterov::On : Nesterov::Off;
    if (a.nesterov == Nesterov::On && (h.momentum <= 0.0 || h.dampening != 0.0))
      throw py::value_error("nesterov" + in_group + " requires a momentum and zero dampening");
    if (h.momentum != 0.0) {
      a.momentum = get_or<bool>(d, "momentum_first", false) ? Momentum::First : Momentum::On;
      lists.push_back({"momentum_buffers", "momentum_buffer", &TensorSpan::exp_avg});
    }
  }
  if (has(d, "grad_accums")) {
    a.grad_input = GradInput::Accumulated;
    lists.push_back({"grad_accums", "grad_accum", &TensorSpan::grad_accum});
  }
  if (has(d, "emas")) {
    a.ema = Ema::On;
    const double m = get_double(d, "ema_momentum");
    check_scalar(m, "ema_momentum" + in_group, 0.0, false, 1.0, false);
    sc.ema_momentum = static_cast<float>(m);
    sc.one_minus_ema_momentum = static_cast<float>(1.0 - m);
    lists.push_back({"emas", "ema", &TensorSpan::ema});
  }
  b.buffers = validate(d, lists, Namer{group, get_or<std::vector<int64_t>>(d, "indices", {})});
  if (optim == Optim::Adam) {
    b.step = get_or<int64_t>(d, "step", 0);
    b.step_buffers = check_step_buffers(d, in_group);
    for (py::array& a : b.step_buffers) b.step_ptrs.push_back(a.mutable_data());
  }
  return b;
}

std::vector<Batch> parse_batches(py::handle batches_obj, Optim optim) {
  const std::string fn = optim == Optim::Adam ? "adam_step: " : "sgd_step: ";
  if (!py::isinstance<py::list>(batches_obj) && !py::isinstance<py::tuple>(batches_obj))
    throw py::type_error(fn + "expected a list of batch dicts");
  std::vector<Batch> batches;
  for (py::handle item : py::reinterpret_borrow<py::sequence>(batches_obj)) {
    if (!py::isinstance<py::dict>(item)) throw py::type_error(fn + "each batch must be a dict");
    batches.push_back(make_batch(py::reinterpret_borrow<py::dict>(item), optim));
  }
  if (batches.size() > 1) {
    std::vector<Extent> written, read;
    for (const Batch& b : batches) {
      written.insert(written.end(), b.buffers.written.begin(), b.buffers.written.end());
      read.insert(read.end(), b.buffers.read.begin(), b.buffers.read.end());
    }
    check_no_overlap(std::move(written), read);
  }
  for (Batch& b : batches) {
    b.args.tensors = b.buffers.spans.data();
    b.args.num_tensors = static_cast<int64_t>(b.buffers.spans.size());
    b.args.offsets = b.buffers.offsets.data();
    b.args.num_threads = threads_for(b.buffers.offsets.back(), num_threads());
  }
  return batches;
}

// Per-tensor sums of squares of the spans' grads (plus grad_accum where set),
// in double; deterministic (see NormArgs). Call without the GIL.
std::vector<double> sum_squares(const KernelTable& table, const std::vector<TensorSpan>& spans) {
  std::vector<int64_t> block_offsets(spans.size() + 1, 0);
  int64_t elements = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    block_offsets[i + 1] = block_offsets[i] + (spans[i].numel + kNormBlock - 1) / kNormBlock;
    elements += spans[i].numel;
  }
  std::vector<double> block_sums(static_cast<size_t>(block_offsets.back()), 0.0);
  NormArgs n;
  n.tensors = spans.data();
  n.num_tensors = static_cast<int64_t>(spans.size());
  n.block_offsets = block_offsets.data();
  n.block_sums = block_sums.data();
  // A norm pass reads one buffer per element, a step four: more elements per thread.
  n.num_threads = threads_for(elements / 4, num_threads());
  if (block_offsets.back() > 0) table.sum_squares(n);
  std::vector<double> sums(spans.size(), 0.0);
  for (size_t i = 0; i < spans.size(); ++i)
    for (int64_t k = block_offsets[i]; k < block_offsets[i + 1]; ++k) sums[i] += block_sums[k];
  return sums;
}

// The whole step: validate every batch, then (without the GIL) the norm pass
// if clipping or the finiteness check asks for it, then the updates.
py::dict run_step(py::handle batches_obj, Optim optim, py::object global_clipnorm_obj,
                  bool skip_nonfinite) {
  std::vector<Batch> batches = parse_batches(batches_obj, optim);
  double global_clipnorm = 0.0;
  if (!global_clipnorm_obj.is_none()) {
    py::dict holder;
    holder["global_clipnorm"] = global_clipnorm_obj;
    global_clipnorm = get_double(holder, "global_clipnorm");
    check_scalar(global_clipnorm, "global_clipnorm", 0.0, true, INFINITY, true);
  }
  bool need_norms = skip_nonfinite || global_clipnorm > 0.0;
  for (const Batch& b : batches) need_norms = need_norms || b.clipnorm > 0.0;

  const KernelTable& table = active_table();
  bool ran = true, finite = true;
  double global_norm = NAN;
  {
    py::gil_scoped_release release;
    if (need_norms) {
      std::vector<TensorSpan> all;
      for (const Batch& b : batches) all.insert(all.end(), b.buffers.spans.begin(), b.buffers.spans.end());
      std::vector<double> sums = sum_squares(table, all);
      double total = 0.0;
      for (size_t i = 0, t = 0; i < batches.size(); ++i)
        for (size_t k = 0; k < batches[i].buffers.spans.size(); ++k, ++t)
          total += sums[t] * batches[i].base_scale * batches[i].base_scale;
      global_norm = std::sqrt(total);
      finite = std::isfinite(global_norm);
      // Keras: a non-finite global norm turns every clipped grad into NaN.
      double global_coef = 1.0;
      if (global_clipnorm > 0.0)
        global_coef = finite ? global_clipnorm / std::max(global_norm, global_clipnorm) : NAN;
      for (size_t i = 0, t = 0; i < batches.size(); ++i) {
        Batch& b = batches[i];
        for (TensorSpan& s : b.buffers.spans) {
          double coef = global_coef;
          if (b.clipnorm > 0.0) {
            const double norm = std::sqrt(sums[t]) * std::fabs(b.base_scale);
            coef = b.clipnorm / std::max(norm, b.clipnorm);
          }
          s.grad_scale = static_cast<float>(b.base_scale * coef);
          ++t;
        }
      }
    } else {
      for (Batch& b : batches)
        for (TensorSpan& s : b.buffers.spans) s.grad_scale = static_cast<float>(b.base_scale);
    }
    for (Batch& b : batches) {
      // Plain grads (scale 1, nothing to clip) skip two operations per element.
      if (b.args.grad_input == GradInput::Accumulated || b.args.scalars.clip_value != INFINITY) continue;
      bool plain = true;
      for (const TensorSpan& s : b.buffers.spans) plain = plain && s.grad_scale == 1.0f;
      b.args.grad_input = plain ? GradInput::Raw : GradInput::Scaled;
    }
    if (finite || !skip_nonfinite) {
      for (const Batch& b : batches) {
        if (b.buffers.offsets.back() == 0) continue;
        ran = (optim == Optim::Adam ? table.adam_step(b.args) : table.sgd_step(b.args)) && ran;
      }
      for (const Batch& b : batches)
        for (size_t i = 0; i < b.step_ptrs.size(); ++i) {
          if (b.step_buffers[i].itemsize() == 4)
            *static_cast<float*>(b.step_ptrs[i]) = static_cast<float>(b.step);
          else
            *static_cast<double*>(b.step_ptrs[i]) = static_cast<double>(b.step);
        }
    }
  }
  if (!ran) throw py::type_error("no kernel for these dtypes in level " + std::string(table.level));
  py::dict result;
  result["applied"] = finite || !skip_nonfinite;
  result["finite"] = finite;
  result["global_norm"] = need_norms ? py::object(py::float_(global_norm)) : py::object(py::none());
  return result;
}

// grad_accums[i] += grads[i] over batches {'grads', 'grad_accums', 'group', 'indices'}.
void accumulate(py::handle batches_obj) {
  if (!py::isinstance<py::list>(batches_obj) && !py::isinstance<py::tuple>(batches_obj))
    throw py::type_error("accumulate: expected a list of batch dicts");
  std::vector<Buffers> all;
  std::vector<Extent> written, read;
  for (py::handle item : py::reinterpret_borrow<py::sequence>(batches_obj)) {
    if (!py::isinstance<py::dict>(item)) throw py::type_error("accumulate: each batch must be a dict");
    py::dict src = py::reinterpret_borrow<py::dict>(item);
    if (!src.contains("grads") || !src.contains("grad_accums"))
      throw py::value_error("batch must have 'grads' and 'grad_accums'");
    // The accumulators are the written buffers, so they take the params' place.
    py::dict d;
    d["params"] = src["grad_accums"];
    d["grads"] = src["grads"];
    all.push_back(validate(
        d, {}, Namer{get_or<int>(src, "group", 0), get_or<std::vector<int64_t>>(src, "indices", {})}));
    written.insert(written.end(), all.back().written.begin(), all.back().written.end());
    read.insert(read.end(), all.back().read.begin(), all.back().read.end());
  }
  check_no_overlap(std::move(written), read);
  py::gil_scoped_release release;
  for (Buffers& b : all) {
    for (TensorSpan& s : b.spans) {
      s.grad_accum = s.param;
      s.param = nullptr;
    }
    StepArgs a;
    a.tensors = b.spans.data();
    a.num_tensors = static_cast<int64_t>(b.spans.size());
    a.offsets = b.offsets.data();
    a.num_threads = threads_for(b.offsets.back(), num_threads());
    if (b.offsets.back() > 0) active_table().accumulate(a);
  }
}

std::vector<double> sum_squares_py(py::handle grads) {
  py::sequence seq = as_list(grads, "grads");
  std::vector<py::array> keep;
  std::vector<TensorSpan> spans(seq.size());
  Namer namer;
  namer.list_name = "grads";
  for (size_t i = 0; i < seq.size(); ++i) {
    keep.push_back(check_buffer(seq[i], namer, nullptr, i, false, nullptr));
    spans[i].grad = keep.back().data();
    spans[i].numel = keep.back().size();
  }
  py::gil_scoped_release release;
  return sum_squares(active_table(), spans);
}

void stream_pass(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs) {
  py::dict d;
  d["params"] = params;
  d["grads"] = grads;
  d["exp_avgs"] = exp_avgs;
  d["exp_avg_sqs"] = exp_avg_sqs;
  Buffers b = validate(d, {{"exp_avgs", "exp_avg", &TensorSpan::exp_avg},
                           {"exp_avg_sqs", "exp_avg_sq", &TensorSpan::exp_avg_sq}},
                       Namer{});
  StepArgs a;
  a.tensors = b.spans.data();
  a.num_tensors = static_cast<int64_t>(b.spans.size());
  a.offsets = b.offsets.data();
  a.num_threads = threads_for(b.offsets.back(), num_threads());
  if (b.offsets.back() == 0) return;
  py::gil_scoped_release release;
  active_table().stream_pass(a);
}

std::string openmp_description() {
#ifdef _OPENMP
  return "OpenMP " + std::to_string(_OPENMP);
#else
  return "none";
#endif
}

std::string compiler_description() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

py::dict build_info() {
  const DispatchInfo& d = dispatch_info();
  py::dict features;
  features["avx2"] = d.features.avx2;
  features["fma"] = d.features.fma;
  features["f16c"] = d.features.f16c;
  features["avx512f"] = d.features.avx512f;
  features["avx512bw"] = d.features.avx512bw;
  features["avx512vl"] = d.features.avx512vl;
  features["avx512bf16"] = d.features.avx512bf16;
  features["neon"] = d.features.neon;
  py::dict info;
  info["version"] = CPUADAM_VERSION;
  info["compiler"] = compiler_description();
  info["isa_compiled"] = d.compiled;
  info["isa_supported"] = d.supported;
  info["isa_selected"] = d.selected;
  info["isa_forced"] = d.forced;
  info["cpu_features"] = features;
  info["openmp"] = openmp_description();
  info["num_threads"] = num_threads();
  return info;
}

}  // namespace
}  // namespace cpuadam

PYBIND11_MODULE(_core, m) {
  using namespace cpuadam;
  m.doc() = "cpuadam's compiled core: fused optimizer steps over lists of NumPy buffers.";
  try {
    init_dispatch();
  } catch (const std::runtime_error& e) {
    throw py::import_error(e.what());
  }
  m.attr("__version__") = CPUADAM_VERSION;

  m.def(
      "adam_step",
      [](py::handle batches, py::object global_clipnorm, bool skip_nonfinite) {
        return run_step(batches, Optim::Adam, global_clipnorm, skip_nonfinite);
      },
      py::arg("batches"), py::kw_only(), py::arg("global_clipnorm") = py::none(),
      py::arg("skip_nonfinite") = false,
      "One fused Adam/AdamW step, in place, over batches of buffers (one dict per param\n"
      "group and step count). Everything is validated before any byte is written.\n"
      "Returns {'applied', 'finite', 'global_norm'}.");
  m.def(
      "sgd_step",
      [](py::handle batches, py::object global_clipnorm, bool skip_nonfinite) {
        return run_step(batches, Optim::Sgd, global_clipnorm, skip_nonfinite);
      },
      py::arg("batches"), py::kw_only(), py::arg("global_clipnorm") = py::none(),
      py::arg("skip_nonfinite") = false, "One fused SGD (momentum, nesterov) step; as adam_step.");
  m.def("accumulate", &accumulate, py::arg("batches"),
        "grad_accums[i] += grads[i] in place over batches {'grads', 'grad_accums', 'group',\n"
        "'indices'} (a gradient-accumulation call); validated before any write.");
  m.def("sum_squares", &sum_squares_py, py::arg("grads"),
        "Per-array sums of squares in float64, the same bits for any thread count.");
  m.def("stream_pass", &stream_pass, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"),
        "Memory-roofline proxy: reads four buffers and writes three in place, as a step does.");
  m.def("build_info", &build_info, "Version, compiler, ISA levels and threading of this build.");
  m.def("get_num_threads", &num_threads, "Threads each step may use.");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
        set_num_threads(n);
      },
      py::arg("n"), "Sets the threads each step may use, clamped to 4 per available CPU.");
}
