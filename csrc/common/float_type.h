// The storage types the kernels accept, shared by the CPU and CUDA sides (no
// torch headers here: the CUDA files build with plain nvcc).
#pragma once

namespace riskpo {

enum class FloatType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace riskpo
