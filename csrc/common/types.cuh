// What every torch-free kernel header shares with its binding: a CUDA stream without the CUDA headers
// (CUstream_st* is cudaStream_t) and the storage dtypes the kernels take.
#pragma once

struct CUstream_st;

namespace dlkernels {

using Stream = CUstream_st*;

enum class ScalarType { kFloat32, kFloat16, kBFloat16 };

}  // namespace dlkernels
