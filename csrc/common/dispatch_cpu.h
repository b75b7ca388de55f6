// CPU dispatch on a FloatType: calls fn(T{}) with the C++ element type.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "float_type.h"

namespace riskpo {

template <typename Fn>
void with_float_type(FloatType type, Fn&& fn) {
  switch (type) {
    case FloatType::kFloat32: return fn(float{});
    case FloatType::kFloat64: return fn(double{});
    case FloatType::kFloat16: return fn(c10::Half{});
    case FloatType::kBFloat16: return fn(c10::BFloat16{});
  }
}

}  // namespace riskpo
