// Helpers shared by the torch bindings of the op families.
#pragma once

#include <torch/extension.h>

#include "common/types.cuh"

namespace dlkernels {

// The kernels' dtype of a torch storage dtype; `what` names the argument in the error.
inline ScalarType kernel_dtype(at::ScalarType dtype, const char* op, const char* what) {
  switch (dtype) {
    case at::kFloat:
      return ScalarType::kFloat32;
    case at::kHalf:
      return ScalarType::kFloat16;
    case at::kBFloat16:
      return ScalarType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "dlkernels._C.", op, ": ", what, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace dlkernels
