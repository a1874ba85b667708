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
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "dispatch.h"
#include "scalars.h"
#include "types.h"

namespace py = pybind11;

#ifndef CPUADAM_VERSION
#define CPUADAM_VERSION "0.0.0"
#endif

namespace cpuadam {
namespace host {
// The host's copy of the quantizer (scalar code: the same bits as every level's).
#include "quant.h"
}  // namespace host
namespace {

// Batch keys as interned Python strings, made once (with the GIL held): a step
// looks up about thirty keys per batch, and building each key anew cost more than
// the lookup itself.
PyObject* key_object(const char* key) {
  static std::unordered_map<std::string, PyObject*> keys;
  auto it = keys.find(key);
  if (it != keys.end()) return it->second;
  PyObject* s = PyUnicode_InternFromString(key);
  if (s == nullptr) throw py::error_already_set();
  keys.emplace(key, s);
  return s;
}

// d[key] as a borrowed handle, or a null handle when the key is absent.
py::handle lookup(const py::dict& d, const char* key) {
  return py::handle(PyDict_GetItem(d.ptr(), key_object(key)));
}

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
  bool list_in_group = false;       // "step_buffers[3] in group 1"
  std::string param(size_t i) const {
    int64_t idx = i < indices.size() ? indices[i] : static_cast<int64_t>(i);
    if (list_name != nullptr)
      return std::string(list_name) + "[" + std::to_string(idx) + "]" +
             (list_in_group ? " in group " + std::to_string(group) : "");
    return "params[" + std::to_string(idx) + "] in group " + std::to_string(group);
  }
  std::string of(const char* what, size_t i) const {
    return what == nullptr ? param(i) : std::string(what) + " of " + param(i);
  }
};

// Whether the array holds elements of `dtype`. bfloat16 arrives as raw bits
// (uint16/int16, how a torch bfloat16 tensor is seen through NumPy) or as an
// ml_dtypes.bfloat16 array. Type number and byte order are compared without
// building a dtype object; only a user-defined 2-byte dtype is asked its name.
bool has_dtype(const py::array& a, DType dtype) {
  const auto* descr = reinterpret_cast<const py::detail::PyArrayDescr_Proxy*>(
      py::detail::array_proxy(a.ptr())->descr);
  if (descr->byteorder == '>') return false;
  const int type_num = descr->type_num;
  switch (dtype) {
    case DType::Float32: return type_num == py::detail::npy_api::NPY_FLOAT_;
    case DType::Float16: return type_num == 23;  // NPY_HALF
    case DType::Blockwise8: return type_num == py::detail::npy_api::NPY_UBYTE_;
    case DType::BFloat16:
      if (type_num == py::detail::npy_api::NPY_USHORT_ || type_num == py::detail::npy_api::NPY_SHORT_)
        return true;
      // NPY_USERDEF: types registered by other packages, such as ml_dtypes.
      return type_num >= 256 && a.itemsize() == 2 &&
             py::str(a.dtype().attr("name")).cast<std::string>() == "bfloat16";
  }
  return false;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
    case DType::Blockwise8: return "8bit";
  }
  return "?";
}

std::string expected_array(DType dtype) {
  if (dtype == DType::BFloat16) return "a bfloat16 array (uint16/int16 bits or ml_dtypes.bfloat16)";
  if (dtype == DType::Blockwise8) return "a uint8 array of 8-bit codes";
  return std::string("a ") + dtype_name(dtype) + " array";
}

// Checks one buffer, named `what` of tensor i (nullptr: the param itself);
// `like` (if given) is the param whose shape it must have.
py::array check_buffer(py::handle obj, const Namer& namer, const char* what, size_t i, bool written,
                       const py::array* like, DType dtype = DType::Float32) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(namer.of(what, i) + ": expected a numpy.ndarray, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!has_dtype(a, dtype)) {
    const auto* descr = py::detail::array_descriptor_proxy(py::detail::array_proxy(a.ptr())->descr);
    const bool bits = descr->type_num == py::detail::npy_api::NPY_USHORT_ ||
                      descr->type_num == py::detail::npy_api::NPY_SHORT_;
    throw py::type_error(namer.of(what, i) + ": expected " + expected_array(dtype) + ", got " +
                         std::string(py::str(a.dtype())) +
                         (bits ? " (16-bit integers: how a bfloat16 tensor's bits arrive)" : ""));
  }
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

// NumPy's resize(refcheck=False) reallocates an array that owns its data
// whatever views or buffer exports it has, but refuses one with a weak
// reference. A weak reference to the owner of each buffer, held until the call
// returns, keeps the memory the kernel runs over in place without the GIL.
// PyWeakref_NewRef reuses an existing plain reference: one allocation at most.
void pin(const py::array& a, std::vector<py::object>& pins) {
  PyObject* obj = a.ptr();
  const auto& api = py::detail::npy_api::get();
  // A view's base chain ends at the array that owns the data (or at a
  // non-array exporter, which its buffer export already locks).
  while (obj != nullptr && api.PyArray_Check_(obj)) {
    const auto* proxy = py::detail::array_proxy(obj);
    if (proxy->flags & py::detail::npy_api::NPY_ARRAY_OWNDATA_) {
      // Views of one array usually come in a row: one reference serves them all.
      if (!pins.empty() && PyWeakref_GET_OBJECT(pins.back().ptr()) == obj) return;
      PyObject* ref = PyWeakref_NewRef(obj, nullptr);
      if (ref == nullptr) throw py::error_already_set();
      // A weak reference without a callback is in no cycle: nothing to collect.
      if (PyObject_GC_IsTracked(ref)) PyObject_GC_UnTrack(ref);
      pins.push_back(py::reinterpret_steal<py::object>(ref));
      return;
    }
    obj = proxy->base;
  }
}

// Making a call's weak references allocates one collectable object per array,
// and the collector, run every 700 allocations, walked the heap many times
// over in a large step (0.4 us per array at 200,000 arrays). It is paused while
// a call's buffers are checked (the GIL is held throughout) and runs after.
struct GcPause {
#if PY_VERSION_HEX >= 0x030A0000
  int was_enabled = PyGC_Disable();
  ~GcPause() {
    if (was_enabled) PyGC_Enable();
  }
#endif
};

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
  // The step computes in float32: a value finite in double but not in float32 would
  // turn every param it touches into inf or NaN.
  if (std::fabs(x) > static_cast<double>(std::numeric_limits<float>::max()))
    throw py::value_error("invalid " + name + ": " + num_str(x) +
                          " (cannot be converted to float32 without overflow)");
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
  std::vector<py::object> pins;  // see pin()
  std::vector<TensorSpan> spans;
  std::vector<int64_t> offsets;
  std::vector<Extent> written, read;
};

// A per-param buffer list of a batch: its dict key, its name in messages, the
// span field it fills and its element type. All are written by the step.
struct StateList {
  const char* key;
  const char* what;
  void* TensorSpan::*field;
  DType dtype = DType::Float32;
  // An 8-bit state's absmax: float32, one entry per block of kQuantBlock elements.
  bool per_block = false;
};

// `also_written`: extents of other buffers the call writes (step_buffers),
// checked against these in the same pass.
Buffers validate(const py::dict& d, const std::vector<StateList>& lists, Namer namer_value,
                 DType param_dtype = DType::Float32, DType grad_dtype = DType::Float32,
                 const std::vector<Extent>& also_written = {}) {
  GcPause gc_pause;
  Buffers b;
  b.namer = std::make_shared<const Namer>(std::move(namer_value));
  const Namer& namer = *b.namer;
  auto field = [&d](const char* key) -> py::handle {
    py::handle h = lookup(d, key);
    if (!h) throw py::value_error(std::string("batch is missing '") + key + "'");
    return h;
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
    py::array p = check_buffer(params[i], namer, nullptr, i, true, nullptr, param_dtype);
    py::array g = check_buffer(grads[i], namer, "grad", i, false, &p, grad_dtype);
    pin(p, b.pins);
    pin(g, b.pins);
    TensorSpan& s = b.spans[i];
    s.param = p.mutable_data();
    s.grad = g.data();
    s.numel = p.size();
    if (s.numel > 0) {
      b.written.push_back(extent_of(p, &namer, nullptr, i));
      b.read.push_back(extent_of(g, &namer, "grad", i));
    }
    for (size_t k = 0; k < lists.size(); ++k) {
      const bool per_block = lists[k].per_block;
      py::array a = check_buffer(states[k][i], namer, lists[k].what, i, true, per_block ? nullptr : &p,
                                 lists[k].dtype);
      if (per_block) {
        const int64_t blocks = (static_cast<int64_t>(p.size()) + host::kQuantBlock - 1) / host::kQuantBlock;
        if (a.ndim() != 1 || a.shape(0) != blocks)
          throw py::value_error(namer.of(lists[k].what, i) + ": shape " + shape_str(a) + " does not match " +
                                namer.param(i) + "'s " + std::to_string(p.size()) + " elements (expected (" +
                                std::to_string(blocks) + ",), one float32 per block of " +
                                std::to_string(host::kQuantBlock) + ")");
      }
      pin(a, b.pins);
      s.*(lists[k].field) = a.mutable_data();
      if (s.numel > 0) b.written.push_back(extent_of(a, &namer, lists[k].what, i));
      b.keep.push_back(std::move(a));
    }
    b.offsets[i + 1] = b.offsets[i] + s.numel;
    b.keep.push_back(std::move(p));
    b.keep.push_back(std::move(g));
  }
  b.written.insert(b.written.end(), also_written.begin(), also_written.end());
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

std::string get_or_str(const py::dict& d, const char* key, const char* fallback);

// A dtype key of a batch; missing or None is float32.
DType parse_dtype(const py::dict& d, const char* key, const std::string& in_group) {
  const std::string s = get_or_str(d, key, "float32");
  if (s == "float32") return DType::Float32;
  if (s == "bfloat16") return DType::BFloat16;
  if (s == "8bit" && std::string(key) == "state_dtype") return DType::Blockwise8;
  if (s == "float16") return DType::Float16;
  throw py::value_error("invalid " + std::string(key) + in_group + ": '" + s +
                        "' (expected 'float32', 'bfloat16' or 'float16')");
}

ParamUpdate parse_param_update(const std::string& s, const std::string& in_group) {
  if (s == "nearest") return ParamUpdate::Nearest;
  if (s == "stochastic") return ParamUpdate::Stochastic;
  if (s == "kahan") return ParamUpdate::Kahan;
  if (s == "master") return ParamUpdate::Master;
  throw py::value_error("invalid param_update" + in_group + ": '" + s +
                        "' (expected 'nearest', 'stochastic', 'kahan' or 'master')");
}

StateRounding parse_state_rounding(const std::string& s, const std::string& in_group) {
  if (s == "nearest") return StateRounding::Nearest;
  if (s == "stochastic") return StateRounding::Stochastic;
  throw py::value_error("invalid state_rounding" + in_group + ": '" + s + "' (expected 'nearest' or 'stochastic')");
}

// splitmix64's finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom
// number generators", 2014): a bijection of 64-bit words with full avalanche.
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The per-tensor part of the stochastic rounding key, once per tensor on the
// host; the kernel mixes in the element index.
uint64_t rounding_key(int64_t seed, int64_t rounding_step, int64_t stream_id) {
  uint64_t k = mix64(static_cast<uint64_t>(seed) + 0x9E3779B97F4A7C15ull);
  k = mix64(k ^ static_cast<uint64_t>(rounding_step));
  return mix64(k ^ static_cast<uint64_t>(stream_id));
}

double get_double(const py::dict& d, const char* key) {
  py::handle h = lookup(d, key);
  if (!h) throw py::value_error(std::string("batch is missing '") + key + "'");
  if (PyFloat_CheckExact(h.ptr())) return PyFloat_AS_DOUBLE(h.ptr());
  if (py::isinstance<py::bool_>(h) || !(py::isinstance<py::float_>(h) || py::isinstance<py::int_>(h) ||
                                        py::hasattr(h, "__float__")))
    throw py::type_error(std::string(key) + ": expected a real number, got " +
                         std::string(py::str(py::type::of(h).attr("__name__"))));
  return h.cast<double>();
}

// Typed lookups of optional batch keys: a wrong type is a TypeError naming the key.
template <typename T>
T get_or(const py::dict& d, const char* key, T fallback) {
  py::handle h = lookup(d, key);
  if (!h || h.is_none()) return fallback;
  const char* expected = "a value of the right type";
  if constexpr (std::is_same_v<T, bool>) {
    expected = "a bool";
    if (py::isinstance<py::bool_>(h)) return h.cast<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    expected = "an int";
    if (PyLong_CheckExact(h.ptr())) return h.cast<T>();
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

bool has(const py::dict& d, const char* key) {
  py::handle h = lookup(d, key);
  return h && !h.is_none();
}

std::string get_or_str(const py::dict& d, const char* key, const char* fallback) {
  return get_or<std::string>(d, key, fallback);
}

enum class Optim { Adam, Sgd };

// torch's per-param 'step' tensors: one-element float32/float64 arrays, one
// per param of the batch, that receive the batch's step count once the update
// is applied. Written by the call, so checked like every other written buffer.
struct StepBuffers {
  std::shared_ptr<const Namer> namer;  // on the heap: extents point at it
  std::vector<py::array> arrays;
  std::vector<py::object> pins;  // see pin()
  std::vector<void*> ptrs;       // their data, taken while the GIL is held
  std::vector<Extent> extents;
};

StepBuffers check_step_buffers(const py::dict& d, int group) {
  StepBuffers out;
  if (!d.contains("step_buffers") || d["step_buffers"].is_none()) return out;
  GcPause gc_pause;
  Namer namer_value;
  namer_value.group = group;
  namer_value.list_name = "step_buffers";
  namer_value.list_in_group = true;
  out.namer = std::make_shared<const Namer>(std::move(namer_value));
  const Namer& namer = *out.namer;
  py::sequence seq = as_list(d["step_buffers"], "step_buffers");
  // A malformed or missing 'params' is validate()'s to report.
  if (d.contains("params") && (py::isinstance<py::list>(d["params"]) || py::isinstance<py::tuple>(d["params"]))) {
    const size_t n = py::len(d["params"]);
    if (seq.size() != n)
      throw py::value_error("step_buffers in group " + std::to_string(group) + " has " +
                            std::to_string(seq.size()) + " entries but params has " + std::to_string(n));
  }
  out.arrays.reserve(seq.size());
  for (size_t i = 0; i < seq.size(); ++i) {
    py::handle h = seq[i];
    if (!py::isinstance<py::array>(h)) throw py::type_error(namer.param(i) + ": expected a numpy.ndarray");
    py::array a = py::reinterpret_borrow<py::array>(h);
    const auto* descr = py::detail::array_descriptor_proxy(py::detail::array_proxy(a.ptr())->descr);
    if (descr->type_num != py::detail::npy_api::NPY_FLOAT_ && descr->type_num != py::detail::npy_api::NPY_DOUBLE_)
      throw py::type_error(namer.param(i) + ": expected a float32 or float64 array");
    if (descr->byteorder == '>')
      throw py::type_error(namer.param(i) + ": expected a float32 or float64 array in native byte order, got " +
                           std::string(py::str(a.dtype())));
    if (a.size() != 1 || !a.writeable() || !(a.flags() & py::array::c_style))
      throw py::value_error(namer.param(i) + ": expected a writeable array of one element");
    if (reinterpret_cast<uintptr_t>(a.data()) % a.itemsize() != 0)
      throw py::value_error(namer.param(i) + ": data is not aligned to its element size");
    out.extents.push_back(extent_of(a, &namer, nullptr, i));
    pin(a, out.pins);
    out.ptrs.push_back(a.mutable_data());
    out.arrays.push_back(std::move(a));
  }
  return out;
}

// One batch: tensors of one param group that share a step count, and the
// group's hyperparameters. Validated completely before anything runs.
struct Batch {
  Buffers buffers;
  StepArgs args;
  double base_scale = 1.0;  // maximize's sign times grad_scale
  double clipnorm = 0.0;    // 0: no per-tensor clipping
  StepBuffers step_buffers;
  int64_t step = 0;
};

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
  check_scalar(grad_scale, "grad_scale" + in_group, -INFINITY, true, INFINITY, true);
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
  a.param_dtype = parse_dtype(d, "param_dtype", in_group);
  a.grad_dtype = parse_dtype(d, "grad_dtype", in_group);
  a.state_dtype = parse_dtype(d, "state_dtype", in_group);
  // float16 moments are kept for float16 models (torch's arrangement), whose
  // grads are float16 or float32; the kernels carry no bfloat16-grad variant.
  if (a.state_dtype == DType::Float16 && a.grad_dtype == DType::BFloat16)
    throw py::value_error("invalid state_dtype" + in_group +
                          ": 'float16' with bfloat16 grads (float16 states take float32 or "
                          "float16 grads)");
  // Checked for every param dtype, used only for bfloat16/float16 params.
  const ParamUpdate update = parse_param_update(get_or<std::string>(d, "param_update", "nearest"), in_group);
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
    // sqrt(bc2) folded into eps (one division per element) can take a tiny eps below
    // float32's denormals: keep it positive, as torch's unfolded eps stays, so 0/eps is 0.
    if (h.eps > 0.0 && sc.eps == 0.0f) sc.eps = std::numeric_limits<float>::denorm_min();
    a.decay = adam_decay_mode(h);
    a.amsgrad = get_or<bool>(d, "amsgrad", false) ? Amsgrad::On : Amsgrad::Off;
    lists.push_back({"exp_avgs", "exp_avg", &TensorSpan::exp_avg, a.state_dtype});
    lists.push_back({"exp_avg_sqs", "exp_avg_sq", &TensorSpan::exp_avg_sq, a.state_dtype});
    if (a.amsgrad == Amsgrad::On)
      lists.push_back({"max_exp_avg_sqs", "max_exp_avg_sq", &TensorSpan::max_exp_avg_sq, a.state_dtype});
    if (a.state_dtype == DType::Blockwise8) {
      lists.push_back({"exp_avg_absmaxs", "exp_avg_absmax", &TensorSpan::exp_avg_absmax, DType::Float32, true});
      lists.push_back({"exp_avg_sq_absmaxs", "exp_avg_sq_absmax", &TensorSpan::exp_avg_sq_absmax,
                       DType::Float32, true});
      if (a.amsgrad == Amsgrad::On)
        lists.push_back({"max_exp_avg_sq_absmaxs", "max_exp_avg_sq_absmax",
                         &TensorSpan::max_exp_avg_sq_absmax, DType::Float32, true});
    }
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
      lists.push_back({"momentum_buffers", "momentum_buffer", &TensorSpan::exp_avg, a.state_dtype});
      if (a.state_dtype == DType::Blockwise8)
        lists.push_back({"momentum_buffer_absmaxs", "momentum_buffer_absmax", &TensorSpan::exp_avg_absmax,
                         DType::Float32, true});
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
  // float32 params take every update as "nearest" and need no extra buffers.
  a.param_update = a.param_dtype == DType::Float32 ? ParamUpdate::Nearest : update;
  if (a.param_update == ParamUpdate::Master)
    lists.push_back({"masters", "master", &TensorSpan::master, DType::Float32});
  if (a.param_update == ParamUpdate::Kahan)
    lists.push_back({"kahan_comps", "kahan_comp", &TensorSpan::kahan_comp, a.param_dtype});
  a.state_rounding = parse_state_rounding(get_or<std::string>(d, "state_rounding", "nearest"), in_group);
  if (a.state_rounding == StateRounding::Stochastic && a.state_dtype == DType::Float32)
    throw py::value_error("invalid state_rounding" + in_group +
                          ": 'stochastic' rounds 8-bit, bfloat16 and float16 states (state_dtype is 'float32')");
  const bool keyed = a.param_update == ParamUpdate::Stochastic || a.state_rounding == StateRounding::Stochastic;
  int64_t seed = 0, rounding_step = 0;
  std::vector<int64_t> stream_ids;
  if (keyed) {
    for (const char* key : {"seed", "rounding_step", "stream_ids"})
      if (!has(d, key)) throw py::value_error(std::string("batch is missing '") + key + "'");
    seed = get_or<int64_t>(d, "seed", 0);
    if (seed < 0 || seed >= (int64_t{1} << 31))
      throw py::value_error("invalid seed" + in_group + ": " + std::to_string(seed) +
                            " (expected an int in [0, 2**31))");
    rounding_step = get_or<int64_t>(d, "rounding_step", 0);
    if (rounding_step < 0)
      throw py::value_error("invalid rounding_step" + in_group + ": " + std::to_string(rounding_step) +
                            " (expected an int >= 0)");
    stream_ids = get_or<std::vector<int64_t>>(d, "stream_ids", {});
    for (int64_t id : stream_ids)
      if (id < 0)
        throw py::value_error("invalid stream_ids" + in_group + ": " + std::to_string(id) +
                              " (expected ints >= 0)");
  }
  // The step buffers are checked first so that their overlap with the other
  // written buffers is found in validate's one pass.
  if (optim == Optim::Adam) {
    b.step = get_or<int64_t>(d, "step", 0);
    b.step_buffers = check_step_buffers(d, group);
  }
  b.buffers = validate(d, lists, Namer{group, get_or<std::vector<int64_t>>(d, "indices", {})},
                       a.param_dtype, a.grad_dtype, b.step_buffers.extents);
  if (keyed) {
    if (stream_ids.size() != b.buffers.spans.size())
      throw py::value_error("stream_ids has " + std::to_string(stream_ids.size()) +
                            " entries but params has " + std::to_string(b.buffers.spans.size()));
    for (size_t i = 0; i < stream_ids.size(); ++i)
      b.buffers.spans[i].rounding_key = rounding_key(seed, rounding_step, stream_ids[i]);
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
std::vector<double> sum_squares_of(const KernelTable& table, const std::vector<TensorSpan>& spans,
                                   DType grad_dtype) {
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
  n.grad_dtype = grad_dtype;
  // A norm pass reads one buffer per element, a step four: more elements per thread.
  n.num_threads = threads_for(elements / 4, num_threads());
  if (block_offsets.back() > 0) table.sum_squares(n);
  std::vector<double> sums(spans.size(), 0.0);
  for (size_t i = 0; i < spans.size(); ++i)
    for (int64_t k = block_offsets[i]; k < block_offsets[i + 1]; ++k) sums[i] += block_sums[k];
  return sums;
}

// As sum_squares_of, for spans whose grads differ in dtype: one pass per dtype.
std::vector<double> sum_squares(const KernelTable& table, const std::vector<TensorSpan>& spans,
                                const std::vector<DType>& grad_dtypes) {
  std::vector<double> sums(spans.size(), 0.0);
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float16}) {
    std::vector<TensorSpan> some;
    std::vector<size_t> where;
    for (size_t i = 0; i < spans.size(); ++i)
      if (grad_dtypes[i] == dtype) {
        some.push_back(spans[i]);
        where.push_back(i);
      }
    if (some.empty()) continue;
    std::vector<double> part = sum_squares_of(table, some, dtype);
    for (size_t k = 0; k < where.size(); ++k) sums[where[k]] = part[k];
  }
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
      std::vector<DType> grad_dtypes;
      for (const Batch& b : batches) {
        all.insert(all.end(), b.buffers.spans.begin(), b.buffers.spans.end());
        grad_dtypes.insert(grad_dtypes.end(), b.buffers.spans.size(), b.args.grad_dtype);
      }
      std::vector<double> sums = sum_squares(table, all, grad_dtypes);
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
        for (size_t i = 0; i < b.step_buffers.ptrs.size(); ++i) {
          if (b.step_buffers.arrays[i].itemsize() == 4)
            *static_cast<float*>(b.step_buffers.ptrs[i]) = static_cast<float>(b.step);
          else
            *static_cast<double*>(b.step_buffers.ptrs[i]) = static_cast<double>(b.step);
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

// grad_accums[i] += grads[i] over batches {'grads', 'grad_accums', 'grad_dtype',
// 'group', 'indices'}; the accumulators are float32 whatever the grads are.
void accumulate(py::handle batches_obj) {
  if (!py::isinstance<py::list>(batches_obj) && !py::isinstance<py::tuple>(batches_obj))
    throw py::type_error("accumulate: expected a list of batch dicts");
  std::vector<Buffers> all;
  std::vector<DType> grad_dtypes;
  std::vector<Extent> written, read;
  for (py::handle item : py::reinterpret_borrow<py::sequence>(batches_obj)) {
    if (!py::isinstance<py::dict>(item)) throw py::type_error("accumulate: each batch must be a dict");
    py::dict src = py::reinterpret_borrow<py::dict>(item);
    if (!src.contains("grads") || !src.contains("grad_accums"))
      throw py::value_error("batch must have 'grads' and 'grad_accums'");
    // The accumulators are the written buffers, so they take the params' place.
    const int group = get_or<int>(src, "group", 0);
    grad_dtypes.push_back(parse_dtype(src, "grad_dtype", " in group " + std::to_string(group)));
    py::dict d;
    d["params"] = src["grad_accums"];
    d["grads"] = src["grads"];
    all.push_back(validate(d, {}, Namer{group, get_or<std::vector<int64_t>>(src, "indices", {})},
                           DType::Float32, grad_dtypes.back()));
    written.insert(written.end(), all.back().written.begin(), all.back().written.end());
    read.insert(read.end(), all.back().read.begin(), all.back().read.end());
  }
  check_no_overlap(std::move(written), read);
  py::gil_scoped_release release;
  for (size_t k = 0; k < all.size(); ++k) {
    Buffers& b = all[k];
    for (TensorSpan& s : b.spans) {
      s.grad_accum = s.param;
      s.param = nullptr;
    }
    StepArgs a;
    a.tensors = b.spans.data();
    a.num_tensors = static_cast<int64_t>(b.spans.size());
    a.offsets = b.offsets.data();
    a.grad_dtype = grad_dtypes[k];
    a.num_threads = threads_for(b.offsets.back(), num_threads());
    if (b.offsets.back() > 0) active_table().accumulate(a);
  }
}

std::vector<double> sum_squares_py(py::handle grads, const std::string& grad_dtype_name) {
  py::dict holder;
  holder["grad_dtype"] = grad_dtype_name;
  const DType grad_dtype = parse_dtype(holder, "grad_dtype", "");
  py::sequence seq = as_list(grads, "grads");
  std::vector<py::array> keep;
  std::vector<py::object> pins;  // see pin()
  std::vector<TensorSpan> spans(seq.size());
  Namer namer;
  namer.list_name = "grads";
  {
    GcPause gc_pause;
    for (size_t i = 0; i < seq.size(); ++i) {
      keep.push_back(check_buffer(seq[i], namer, nullptr, i, false, nullptr, grad_dtype));
      pin(keep.back(), pins);
      spans[i].grad = keep.back().data();
      spans[i].numel = keep.back().size();
    }
  }
  py::gil_scoped_release release;
  return sum_squares_of(active_table(), spans, grad_dtype);
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

// --- 8-bit states: the maps (host), and the level's quantizer for conversions ----------

const host::QuantTable& quant_table(const std::string& map) {
  if (map == "signed") return host::signed_table();
  if (map == "unsigned") return host::unsigned_table();
  throw py::value_error("invalid map: '" + map + "' (expected 'signed' or 'unsigned')");
}

py::array_t<float> qmap(const std::string& map) {
  const host::QuantTable& t = quant_table(map);
  py::array_t<float> out(256);
  std::copy(t.qmap, t.qmap + 256, out.mutable_data());
  return out;
}

// Codes (the values' shape) and absmax (one per block) of a float32 array, as a step stores them
// (the active level's code, as in a step).
py::tuple quantize_blockwise(py::handle values_obj, const std::string& map) {
  const host::QuantTable& t = quant_table(map);
  Namer namer;
  namer.list_name = "values";
  py::array values = check_buffer(values_obj, namer, nullptr, 0, false, nullptr, DType::Float32);
  const int64_t n = values.size();
  const int64_t blocks = (n + host::kQuantBlock - 1) / host::kQuantBlock;
  std::vector<py::ssize_t> shape(values.shape(), values.shape() + values.ndim());
  py::array_t<uint8_t> codes(shape);
  py::array_t<float> absmax(blocks);
  const float* v = static_cast<const float*>(values.data());
  uint8_t* c = codes.mutable_data();
  float* a = absmax.mutable_data();
  {
    py::gil_scoped_release release;
    active_table().quantize_blocks(v, c, a, n, t.is_signed);
  }
  return py::make_tuple(codes, absmax);
}

// float32 values (the codes' shape): qmap[code] * absmax of the code's block.
py::array_t<float> dequantize_blockwise(py::handle codes_obj, py::handle absmax_obj, const std::string& map) {
  const host::QuantTable& t = quant_table(map);
  Namer namer;
  namer.list_name = "codes";
  py::array codes = check_buffer(codes_obj, namer, nullptr, 0, false, nullptr, DType::Blockwise8);
  namer.list_name = "absmax";
  py::array absmax = check_buffer(absmax_obj, namer, nullptr, 0, false, nullptr, DType::Float32);
  const int64_t n = codes.size();
  const int64_t blocks = (n + host::kQuantBlock - 1) / host::kQuantBlock;
  if (absmax.ndim() != 1 || absmax.shape(0) != blocks)
    throw py::value_error("absmax: shape " + shape_str(absmax) + " does not match the codes' " +
                          std::to_string(n) + " elements (expected (" + std::to_string(blocks) + ",))");
  std::vector<py::ssize_t> shape(codes.shape(), codes.shape() + codes.ndim());
  py::array_t<float> out(shape);
  const uint8_t* c = static_cast<const uint8_t*>(codes.data());
  const float* a = static_cast<const float*>(absmax.data());
  float* v = out.mutable_data();
  {
    py::gil_scoped_release release;
    active_table().dequantize_blocks(c, a, v, n, t.is_signed);
  }
  return out;
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
  m.def("sum_squares", &sum_squares_py, py::arg("grads"), py::kw_only(),
        py::arg("grad_dtype") = "float32",
        "Per-array sums of squares in float64, the same bits for any thread count; the grads\n"
        "are float32, bfloat16 or float16 as grad_dtype says.");
  m.def("stream_pass", &stream_pass, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"),
        "Memory-roofline proxy: reads four buffers and writes three in place, as a step does.");
  m.def("qmap", &qmap, py::arg("map"),
        "The 256 float32 values of the 'signed' (exp_avg, momentum_buffer) or 'unsigned'\n"
        "(exp_avg_sq, max_exp_avg_sq) dynamic map of 8-bit states, ascending.");
  m.def("quantize_blockwise", &quantize_blockwise, py::arg("values"), py::arg("map"),
        "(codes, absmax) of a float32 array: blocks of 256 consecutive elements, absmax the\n"
        "block's largest |value|, code the nearest map value to value / absmax (ties: lower).");
  m.def("dequantize_blockwise", &dequantize_blockwise, py::arg("codes"), py::arg("absmax"),
        py::arg("map"), "qmap[code] * absmax of each element's block, as float32.");
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
