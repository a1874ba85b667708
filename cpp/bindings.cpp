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
#include <stdexcept>
#include <string>
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
struct Namer {
  int group;
  const std::vector<int64_t>& indices;
  std::string param(size_t i) const {
    int64_t idx = i < indices.size() ? indices[i] : static_cast<int64_t>(i);
    return "params[" + std::to_string(idx) + "] in group " + std::to_string(group);
  }
  std::string of(const char* what, size_t i) const { return std::string(what) + " of " + param(i); }
};

DType dtype_of(const py::array& a, bool* known) {
  *known = true;
  const py::dtype dt = a.dtype();
  if (dt.is(py::dtype::of<float>()) || dt.equal(py::dtype::of<float>())) return DType::Float32;
  *known = false;
  return DType::Float32;
}

// Checks one buffer; `like` (if given) supplies the shape it must have.
py::array check_buffer(py::handle obj, const std::string& name, bool written,
                       const py::array* like, const std::string& like_name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + ": expected a numpy.ndarray, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  bool known = false;
  dtype_of(a, &known);
  if (!known)
    throw py::type_error(name + ": expected a float32 array, got " + std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(name + ": expected a C-contiguous array");
  if (reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() != 0)
    throw py::value_error(name + ": data is not aligned to its element size");
  if (written && !a.writeable())
    throw py::value_error(name + ": expected a writeable array, got a read-only one");
  if (like != nullptr && !same_shape(a, *like))
    throw py::value_error(name + ": shape " + shape_str(a) + " does not match " + like_name +
                          "'s shape " + shape_str(*like));
  return a;
}

struct Extent {
  uintptr_t lo, hi;
  std::string name;
};

// No two written buffers may share a byte, and no grad may share a byte with
// a written buffer: the result would depend on the order elements are visited.
void check_no_overlap(std::vector<Extent> written, const std::vector<Extent>& read) {
  std::sort(written.begin(), written.end(), [](const Extent& x, const Extent& y) { return x.lo < y.lo; });
  for (size_t i = 1; i < written.size(); ++i)
    if (written[i].lo < written[i - 1].hi)
      throw py::value_error(written[i].name + " shares memory with " + written[i - 1].name +
                            "; buffers written by a step must not overlap");
  for (const Extent& r : read) {
    auto it = std::upper_bound(written.begin(), written.end(), r.lo,
                               [](uintptr_t lo, const Extent& e) { return lo < e.lo; });
    // The written extent starting at or before r.lo, and the one after it.
    if (it != written.begin() && std::prev(it)->hi > r.lo)
      throw py::value_error(r.name + " shares memory with " + std::prev(it)->name +
                            ", which the step writes");
    if (it != written.end() && it->lo < r.hi)
      throw py::value_error(r.name + " shares memory with " + it->name + ", which the step writes");
  }
}

Extent extent_of(const py::array& a, std::string name) {
  auto lo = reinterpret_cast<uintptr_t>(a.data());
  return {lo, lo + static_cast<uintptr_t>(a.nbytes()), std::move(name)};
}

void check_scalar(double x, const char* name, double lo, bool lo_open, double hi, bool hi_open) {
  bool ok = std::isfinite(x) && (lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi);
  if (!ok) {
    std::string range = std::string(lo_open ? "(" : "[") + py::str(py::float_(lo)).cast<std::string>() +
                        ", " + py::str(py::float_(hi)).cast<std::string>() + (hi_open ? ")" : "]");
    throw py::value_error(std::string("invalid ") + name + ": " +
                          py::str(py::float_(x)).cast<std::string>() + " (expected a finite value in " +
                          range + ")");
  }
}

py::sequence as_list(py::handle obj, const char* name) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    throw py::type_error(std::string(name) + ": expected a list of arrays");
  return py::reinterpret_borrow<py::sequence>(obj);
}

// Validated buffers of one call; the py::array objects keep the memory alive
// until the call returns.
struct Buffers {
  std::vector<py::array> keep;
  std::vector<TensorSpan> spans;
  std::vector<int64_t> offsets;
  std::vector<Extent> written, read;
};

Buffers validate(py::handle params_obj, py::handle grads_obj, py::handle exp_avgs_obj,
                 py::handle exp_avg_sqs_obj, py::handle max_exp_avg_sqs_obj, bool amsgrad,
                 const Namer& namer) {
  py::sequence params = as_list(params_obj, "params");
  py::sequence grads = as_list(grads_obj, "grads");
  py::sequence exp_avgs = as_list(exp_avgs_obj, "exp_avgs");
  py::sequence exp_avg_sqs = as_list(exp_avg_sqs_obj, "exp_avg_sqs");
  const size_t n = params.size();
  auto check_len = [n](const py::sequence& s, const char* name) {
    if (s.size() != n)
      throw py::value_error(std::string(name) + " has " + std::to_string(s.size()) +
                            " entries but params has " + std::to_string(n));
  };
  check_len(grads, "grads");
  check_len(exp_avgs, "exp_avgs");
  check_len(exp_avg_sqs, "exp_avg_sqs");
  py::sequence maxes;
  if (amsgrad) {
    maxes = as_list(max_exp_avg_sqs_obj, "max_exp_avg_sqs");
    check_len(maxes, "max_exp_avg_sqs");
  }
  if (!namer.indices.empty() && namer.indices.size() != n)
    throw py::value_error("indices has " + std::to_string(namer.indices.size()) +
                          " entries but params has " + std::to_string(n));

  Buffers b;
  b.keep.reserve(n * (amsgrad ? 5 : 4));
  b.spans.resize(n);
  b.offsets.resize(n + 1);
  b.offsets[0] = 0;
  std::vector<Extent>& written = b.written;
  std::vector<Extent>& read = b.read;
  for (size_t i = 0; i < n; ++i) {
    const std::string pname = namer.param(i);
    py::array p = check_buffer(params[i], pname, true, nullptr, "");
    py::array g = check_buffer(grads[i], namer.of("grad", i), false, &p, pname);
    py::array m = check_buffer(exp_avgs[i], namer.of("exp_avg", i), true, &p, pname);
    py::array v = check_buffer(exp_avg_sqs[i], namer.of("exp_avg_sq", i), true, &p, pname);
    TensorSpan& s = b.spans[i];
    s.param = p.mutable_data();
    s.grad = g.data();
    s.exp_avg = m.mutable_data();
    s.exp_avg_sq = v.mutable_data();
    s.numel = p.size();
    if (s.numel > 0) {
      written.push_back(extent_of(p, pname));
      written.push_back(extent_of(m, namer.of("exp_avg", i)));
      written.push_back(extent_of(v, namer.of("exp_avg_sq", i)));
      read.push_back(extent_of(g, namer.of("grad", i)));
    }
    if (amsgrad) {
      py::array mx = check_buffer(maxes[i], namer.of("max_exp_avg_sq", i), true, &p, pname);
      s.max_exp_avg_sq = mx.mutable_data();
      if (s.numel > 0) written.push_back(extent_of(mx, namer.of("max_exp_avg_sq", i)));
      b.keep.push_back(std::move(mx));
    }
    b.offsets[i + 1] = b.offsets[i] + s.numel;
    b.keep.push_back(std::move(p));
    b.keep.push_back(std::move(g));
    b.keep.push_back(std::move(m));
    b.keep.push_back(std::move(v));
  }
  check_no_overlap(written, read);
  return b;
}

EpsMode parse_eps_mode(const std::string& s) {
  if (s == "torch") return EpsMode::Torch;
  if (s == "keras") return EpsMode::Keras;
  throw py::value_error("invalid eps_mode: '" + s + "' (expected 'torch' or 'keras')");
}

DecayScale parse_decay_mode(const std::string& s) {
  if (s == "lr") return DecayScale::Lr;
  if (s == "independent") return DecayScale::Independent;
  throw py::value_error("invalid decay_mode: '" + s + "' (expected 'lr' or 'independent')");
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

template <typename T>
T get_or(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) && !d[key].is_none() ? d[key].cast<T>() : fallback;
}

// One batch: tensors of one param group that share a step count, and the
// group's hyperparameters. Validated completely before anything runs.
struct Batch {
  Buffers buffers;
  StepArgs args;
};

Batch make_batch(const py::dict& d) {
  const int group = get_or<int>(d, "group", 0);
  const std::string in_group = " in group " + std::to_string(group);
  AdamHyper h;
  h.step = get_or<int64_t>(d, "step", 0);
  if (h.step < 1)
    throw py::value_error("invalid step" + in_group + ": " + std::to_string(h.step) +
                          " (steps count from 1)");
  h.lr = get_double(d, "lr");
  h.beta1 = get_double(d, "beta1");
  h.beta2 = get_double(d, "beta2");
  h.eps = get_double(d, "eps");
  h.weight_decay = get_double(d, "weight_decay");
  h.grad_scale = d.contains("grad_scale") ? get_double(d, "grad_scale") : 1.0;
  const std::string lr_name = "lr" + in_group, b1 = "beta1" + in_group, b2 = "beta2" + in_group;
  const std::string eps_name = "eps" + in_group, wd = "weight_decay" + in_group;
  check_scalar(h.lr, lr_name.c_str(), 0.0, false, INFINITY, true);
  check_scalar(h.beta1, b1.c_str(), 0.0, false, 1.0, true);
  check_scalar(h.beta2, b2.c_str(), 0.0, false, 1.0, true);
  check_scalar(h.eps, eps_name.c_str(), 0.0, false, INFINITY, true);
  check_scalar(h.weight_decay, wd.c_str(), 0.0, false, INFINITY, true);
  if (!std::isfinite(h.grad_scale))
    throw py::value_error("invalid grad_scale" + in_group + ": " +
                          py::str(py::float_(h.grad_scale)).cast<std::string>() +
                          " (expected a finite value)");
  h.maximize = get_or<bool>(d, "maximize", false);
  h.decoupled = get_or<bool>(d, "decoupled", false);
  h.decay_scale = parse_decay_mode(get_or<std::string>(d, "decay_mode", "lr"));
  h.eps_mode = parse_eps_mode(get_or<std::string>(d, "eps_mode", "torch"));
  const bool amsgrad = get_or<bool>(d, "amsgrad", false);
  std::vector<int64_t> indices = get_or<std::vector<int64_t>>(d, "indices", {});
  Namer namer{group, indices};
  auto field = [&d](const char* key) -> py::handle {
    if (!d.contains(key)) throw py::value_error(std::string("batch is missing '") + key + "'");
    return d[key];
  };
  Batch b;
  b.buffers = validate(field("params"), field("grads"), field("exp_avgs"), field("exp_avg_sqs"),
                       amsgrad ? field("max_exp_avg_sqs") : py::handle(py::none()), amsgrad, namer);
  StepArgs& a = b.args;
  a.scalars = adam_scalars(h);
  a.decay = adam_decay_mode(h);
  a.amsgrad = amsgrad ? Amsgrad::On : Amsgrad::Off;
  return b;
}

// Extents of every buffer in every batch, for the cross-batch overlap check.
void check_batches_disjoint(const std::vector<Batch>& batches) {
  if (batches.size() < 2) return;  // each batch checked itself
  std::vector<Extent> written, read;
  for (size_t k = 0; k < batches.size(); ++k) {
    for (const auto& e : batches[k].buffers.written) written.push_back(e);
    for (const auto& e : batches[k].buffers.read) read.push_back(e);
  }
  check_no_overlap(std::move(written), read);
}

void adam_step(py::handle batches_obj) {
  if (!py::isinstance<py::list>(batches_obj) && !py::isinstance<py::tuple>(batches_obj))
    throw py::type_error("adam_step: expected a list of batch dicts");
  py::sequence seq = py::reinterpret_borrow<py::sequence>(batches_obj);
  std::vector<Batch> batches;
  batches.reserve(seq.size());
  for (py::handle item : seq) {
    if (!py::isinstance<py::dict>(item)) throw py::type_error("adam_step: each batch must be a dict");
    batches.push_back(make_batch(py::reinterpret_borrow<py::dict>(item)));
  }
  check_batches_disjoint(batches);
  for (Batch& b : batches) {
    b.args.tensors = b.buffers.spans.data();
    b.args.num_tensors = static_cast<int64_t>(b.buffers.spans.size());
    b.args.offsets = b.buffers.offsets.data();
    b.args.num_threads = threads_for(b.buffers.offsets.back(), num_threads());
  }
  const KernelTable& table = active_table();
  bool ran = true;
  {
    py::gil_scoped_release release;
    for (const Batch& b : batches)
      if (b.buffers.offsets.back() > 0) ran = table.adam_step(b.args) && ran;
  }
  if (!ran) throw py::type_error("no kernel for these dtypes in level " + std::string(table.level));
}

void stream_pass(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs) {
  std::vector<int64_t> no_indices;
  Namer namer{0, no_indices};
  Buffers b = validate(params, grads, exp_avgs, exp_avg_sqs, py::none(), false, namer);
  StreamArgs a;
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

  m.def("adam_step", &adam_step, py::arg("batches"),
        "One fused Adam/AdamW step, in place, over batches of buffers (one dict per param\n"
        "group and step count). Everything is validated before any byte is written.");
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
      py::arg("n"), "Sets the threads each step may use (default: OpenMP's).");
}
