// Argument checks for the API files: RISKPO_CHECK(cond, pieces...) is
// TORCH_CHECK with the message built as one std::string.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Device.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

#include "float_type.h"

namespace riskpo {
namespace check {

// Never an ostream: on the GPU image (torch 2.11, GCC 13) streaming an integer
// from extension code (c10::str inside TORCH_CHECK) crashed in
// std::ostream::_M_insert<long>, turning every argument error into a segfault.
// A single std::string argument reaches TORCH_CHECK untouched.
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(std::string_view s) { return std::string(s.data(), s.size()); }
inline std::string piece(int64_t v) { return std::to_string(v); }
inline std::string piece(double v) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", v);
  return buffer;
}
inline std::string piece(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += piece(args)), ...);
  return out;
}

}  // namespace check
}  // namespace riskpo

#define RISKPO_CHECK(cond, ...) TORCH_CHECK(cond, ::riskpo::check::message(__VA_ARGS__))

namespace riskpo {

// The kernels' storage type of `t`; an error naming `op` and `name` otherwise.
inline FloatType float_type_of(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kDouble: return FloatType::kFloat64;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default:
      RISKPO_CHECK(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
                   t.scalar_type());
  }
}

// Math runs in float64 for float64 inputs and in float32 otherwise.
inline at::ScalarType accumulation_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace riskpo

namespace riskpo {

// The tensor's storage is allocated and holds all its elements: FSDP frees a
// resharded parameter's storage (untyped_storage().resize_(0)), and a kernel
// reading such a tensor would segfault. torch's own ops refuse it too.
inline void check_storage(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) return;
  RISKPO_CHECK(t.has_storage() && !t.is_meta(), op, ": ", name,
               " has no data (a meta tensor or a tensor without storage)");
  int64_t last = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const int64_t needed = (last + 1) * static_cast<int64_t>(t.element_size());
  const int64_t held = static_cast<int64_t>(t.storage().nbytes());
  RISKPO_CHECK(held >= needed && t.storage().data() != nullptr, op, ": ", name,
               " has no allocated storage for its ", t.sizes(), " elements (its storage holds ",
               held, " bytes, ", needed, " needed; was it freed, e.g. a resharded FSDP parameter?)");
}

// What torch asks of a tensor before an in-place write: not part of an autograd
// graph while grad mode is on, and not an inference tensor outside inference mode.
inline void check_writable(const char* op, const char* name, const at::Tensor& t) {
  RISKPO_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), op, ": ", name,
               " requires grad, and writing into it in place would corrupt its autograd graph; "
               "pass a tensor that does not require grad (or run under torch.no_grad())");
  RISKPO_CHECK(!(t.is_inference() && !c10::InferenceMode::is_enabled()), op, ": ", name,
               " is an inference tensor, which cannot be written in place outside "
               "torch.inference_mode()");
}

// A floating-point (real) per-row input such as an upstream gradient: integer,
// bool or complex values would be cast silently.
inline void check_real_floating(const char* op, const char* name, const at::Tensor& t) {
  RISKPO_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
               " must be floating point (real), got ", t.scalar_type());
}

}  // namespace riskpo
