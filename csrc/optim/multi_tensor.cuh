// Multi-tensor apply: every tensor of a parameter group updated by one launch. Torch-free.
//
// The host packs the addresses of up to kMaxTensors tensors per list (param, grad, optimizer states), their sizes,
// their step counters and a prefix sum of their chunk counts into one kernel parameter (CUDA 12.1+ allows 32 KB of
// parameters); block b finds its tensor by binary search over the prefix sum and updates chunk b - start[t] of it.
// Elements are loaded and stored 16 bytes at a time where every list's chunk is 16-byte aligned, one at a time
// otherwise; the math is always fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dlkernels {
namespace optim {

constexpr int kMaxTensors = 384;
constexpr int kChunkSize = 32768;  // elements per block
constexpr int kThreads = 512;

template <int kLists>
struct TensorListMeta {
  void* addresses[kLists][kMaxTensors];
  float* steps[kMaxTensors];  // per-tensor step counters (nullptr for optimizers without steps)
  int64_t numels[kMaxTensors];
  int32_t chunk_starts[kMaxTensors + 1];  // chunk_starts[t]: first block of tensor t; [num_tensors]: grid size
  int32_t num_tensors;
};

// The tensor whose chunks contain block `block`: the last t with chunk_starts[t] <= block.
template <int kLists>
__device__ __forceinline__ int find_tensor(const TensorListMeta<kLists>& meta, int32_t block) {
  int lo = 0, hi = meta.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.chunk_starts[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// This block's element range [chunk_begin, chunk_end) in tensor t.
template <int kLists>
__device__ __forceinline__ int64_t chunk_begin(const TensorListMeta<kLists>& meta, int t) {
  return static_cast<int64_t>(static_cast<int32_t>(blockIdx.x) - meta.chunk_starts[t]) * kChunkSize;
}

template <int kLists>
__device__ __forceinline__ int64_t chunk_end(const TensorListMeta<kLists>& meta, int t, int64_t begin) {
  const int64_t end = begin + kChunkSize;
  return end < meta.numels[t] ? end : meta.numels[t];
}

// Explicit conversions: torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int kLists>
__device__ __forceinline__ void load_vectors(T* const __restrict__ (&ptrs)[kLists], unsigned load_mask, int64_t i,
                                             Vec<T, 16 / sizeof(T)> (&in)[kLists]) {
#pragma unroll
  for (int l = 0; l < kLists; ++l) {
    if (load_mask & (1u << l)) {
      in[l] = *reinterpret_cast<const Vec<T, 16 / sizeof(T)>*>(ptrs[l] + i);
    }
  }
}

// Runs op(float (&x)[kLists]) on every element in [begin, end) of the tensor whose list addresses are `ptrs`.
// Only lists in load_mask are read (others read as 0) and only lists in store_mask are written back.
//
// The lists never overlap one another (distinct tensors; the Python op splits a param listed twice into rounds), so
// the pointers are __restrict__ and the vector loop loads the next 16-byte group of every list before it computes and
// stores the current one: the loads of the next iteration are in flight during the math and the stores.
template <typename T, int kLists, typename Op>
__device__ __forceinline__ void for_each_element(T* const* ptr_list, unsigned load_mask, unsigned store_mask,
                                                 int64_t begin, int64_t end, Op& op) {
  constexpr int kVec = 16 / sizeof(T);
  T* __restrict__ ptrs[kLists];
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < kLists; ++l) {
    ptrs[l] = ptr_list[l];
    if ((load_mask | store_mask) & (1u << l)) {
      aligned = aligned && (reinterpret_cast<uintptr_t>(ptrs[l] + begin) % 16 == 0);
    }
  }
  int64_t scalar_begin = begin;
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    const int64_t stride = static_cast<int64_t>(blockDim.x) * kVec;
    scalar_begin = vec_end;
    int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec;
    Vec<T, kVec> in[kLists];
    if (i < vec_end) load_vectors<T, kLists>(ptrs, load_mask, i, in);
    for (; i < vec_end; i += stride) {
      Vec<T, kVec> next[kLists];
      if (i + stride < vec_end) load_vectors<T, kLists>(ptrs, load_mask, i + stride, next);
      Vec<T, kVec> out[kLists];
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float x[kLists];
#pragma unroll
        for (int l = 0; l < kLists; ++l) {
          x[l] = (load_mask & (1u << l)) ? to_float(in[l].v[e]) : 0.0f;
        }
        op(x);
#pragma unroll
        for (int l = 0; l < kLists; ++l) {
          out[l].v[e] = from_float<T>(x[l]);
        }
      }
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if (store_mask & (1u << l)) {
          *reinterpret_cast<Vec<T, kVec>*>(ptrs[l] + i) = out[l];
        }
        in[l] = next[l];
      }
    }
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    float x[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      x[l] = (load_mask & (1u << l)) ? to_float(ptrs[l][i]) : 0.0f;
    }
    op(x);
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (store_mask & (1u << l)) {
        ptrs[l][i] = from_float<T>(x[l]);
      }
    }
  }
}

// torch.maximum: NaN when either operand is NaN (fmaxf returns the other operand).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }

// torch.lerp's formula, for the same NaN/Inf pattern: from `start` when the weight is below 0.5, else from `end`.
__device__ __forceinline__ float lerp_as_torch(float start, float end, float weight, float one_minus_weight,
                                               bool small_weight) {
  return small_weight ? start + weight * (end - start) : end - (end - start) * one_minus_weight;
}

// True in every thread of the block that finishes last in the grid (all other blocks' writes are visible to it).
// The counter must be 0 before the launch; the last block sets it back to 0.
__device__ __forceinline__ bool last_block_done(unsigned int* counter) {
  __shared__ bool is_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned int done = atomicAdd(counter, 1u);
    is_last = (done == gridDim.x - 1);
    if (is_last) {
      *counter = 0;
    }
  }
  __syncthreads();
  if (is_last) {
    __threadfence();
  }
  return is_last;
}

// Sum of `value` over the block, valid in thread 0.
__device__ __forceinline__ float block_sum(float value) {
  __shared__ float warp_sums[32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = 0.0f;
  if (warp == 0) {
    value = lane < (blockDim.x + 31) / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

}  // namespace optim
}  // namespace dlkernels
