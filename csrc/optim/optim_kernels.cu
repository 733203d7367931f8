// Multi-tensor Adam/AdamW, SGD and SWATS kernels (see optim_kernels.cuh and multi_tensor.cuh). Torch-free.
#include "optim/optim_kernels.cuh"

#include <algorithm>
#include <cmath>

#include "optim/multi_tensor.cuh"

namespace dlkernels {
namespace optim {
namespace {

constexpr unsigned kGradBit = 1u << 1;

// Per-launch values every block needs. The per-tensor bias corrections 1 - beta^step are derived in the kernel from
// the tensor's step count as -expm1f(step * log(beta)), log(beta) computed once on the host in double: a few fp32
// instructions per thread (no fp64 pow), accurate to ~2e-7 relative at any step (expm1 keeps the digits of
// 1 - beta2^1 = 1e-3 that 1 - powf would lose). A table of them would need a second launch or a host sync (the steps
// live on the device), which graph capture and the one-launch step rule out.
struct LaunchScalars {
  DeviceScalars device;
  double lr, beta1, beta2, eps, weight_decay;
  float log_beta1, log_beta2;
};

LaunchScalars launch_scalars(const DeviceScalars& device, double lr, double beta1, double beta2, double eps,
                             double weight_decay) {
  return LaunchScalars{device, lr, beta1, beta2, eps, weight_decay, static_cast<float>(std::log(beta1)),
                       static_cast<float>(std::log(beta2))};
}

__device__ __forceinline__ double read_lr(const LaunchScalars& s) {
  return s.device.lr != nullptr ? static_cast<double>(*s.device.lr) : s.lr;
}

// 1 - beta^step, with log_beta = log(beta).
__device__ __forceinline__ float bias_correction(float log_beta, float step) { return -expm1f(step * log_beta); }

__device__ __forceinline__ bool step_skipped(const DeviceScalars& s) {
  return s.found_inf != nullptr && *s.found_inf != 0.0f;
}

template <int kLists>
__device__ __forceinline__ void increment_steps(const TensorListMeta<kLists>& meta) {
  for (int t = threadIdx.x; t < meta.num_tensors; t += blockDim.x) {
    *meta.steps[t] += 1.0f;
  }
}

template <int kLists>
struct AdamOp {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  float neg_step_size, bias_correction2_sqrt, decay_factor, grad_scale;
  bool maximize, decoupled, has_weight_decay, small_lerp_weight, unscale;

  __device__ __forceinline__ void operator()(float (&x)[kLists]) const {
    float param = x[0];
    float grad = x[1];
    if (unscale) {
      grad = grad / grad_scale;
      x[1] = grad;
    }
    if (maximize) grad = -grad;
    // torch's for-loop order and NaN/Inf pattern: no decay term at all without weight decay (a -inf param stays
    // -inf), exp_avg by torch.lerp's formula, a NaN-propagating max, the step as param + (-step_size * m) / denom.
    if (has_weight_decay) {
      if (decoupled) {
        param = param * decay_factor;
      } else {
        grad = grad + weight_decay * param;
      }
    }
    const float exp_avg = lerp_as_torch(x[2], grad, one_minus_beta1, beta1, small_lerp_weight);
    const float exp_avg_sq = x[3] * beta2 + one_minus_beta2 * grad * grad;
    float second_moment = exp_avg_sq;
    if constexpr (kLists == 5) {
      second_moment = nan_max(x[4], exp_avg_sq);
      x[4] = second_moment;
    }
    const float denom = sqrtf(second_moment) / bias_correction2_sqrt + eps;
    x[0] = param + (neg_step_size * exp_avg) / denom;
    x[2] = exp_avg;
    x[3] = exp_avg_sq;
  }
};

template <typename T, int kLists>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ TensorListMeta<kLists> meta, const LaunchScalars s, bool maximize,
                bool decoupled, unsigned int* counter) {
  if (step_skipped(s.device)) return;
  const int t = find_tensor(meta, blockIdx.x);
  const int64_t begin = chunk_begin(meta, t);
  const int64_t end = chunk_end(meta, t, begin);
  const float step = *meta.steps[t] + 1.0f;  // the counters are incremented at the end
  const double lr = read_lr(s);
  AdamOp<kLists> op;
  op.beta1 = static_cast<float>(s.beta1);
  op.one_minus_beta1 = static_cast<float>(1.0 - s.beta1);
  op.beta2 = static_cast<float>(s.beta2);
  op.one_minus_beta2 = static_cast<float>(1.0 - s.beta2);
  op.eps = static_cast<float>(s.eps);
  op.weight_decay = static_cast<float>(s.weight_decay);
  op.neg_step_size = -static_cast<float>(lr) / bias_correction(s.log_beta1, step);
  op.bias_correction2_sqrt = sqrtf(bias_correction(s.log_beta2, step));
  op.decay_factor = static_cast<float>(1.0 - lr * s.weight_decay);
  op.has_weight_decay = s.weight_decay != 0.0;
  op.small_lerp_weight = fabs(1.0 - s.beta1) < 0.5;
  op.unscale = s.device.grad_scale != nullptr;
  op.grad_scale = op.unscale ? *s.device.grad_scale : 1.0f;
  op.maximize = maximize;
  op.decoupled = decoupled;
  T* ptrs[kLists];
#pragma unroll
  for (int l = 0; l < kLists; ++l) ptrs[l] = static_cast<T*>(meta.addresses[l][t]);
  const unsigned all = (1u << kLists) - 1;
  for_each_element<T, kLists>(ptrs, all, op.unscale ? all : all & ~kGradBit, begin, end, op);
  if (last_block_done(counter)) increment_steps(meta);
}

template <int kLists>
struct SgdOp {
  float lr, momentum, one_minus_dampening, weight_decay, grad_scale;
  bool nesterov, maximize, first_step, has_weight_decay, unscale;

  __device__ __forceinline__ void operator()(float (&x)[kLists]) const {
    float grad = x[1];
    if (unscale) {
      grad = grad / grad_scale;
      x[1] = grad;
    }
    if (maximize) grad = -grad;
    if (has_weight_decay) grad = grad + weight_decay * x[0];  // as torch: no term without decay
    if constexpr (kLists == 3) {
      const float buffer = first_step ? grad : x[2] * momentum + one_minus_dampening * grad;
      x[2] = buffer;
      grad = nesterov ? grad + momentum * buffer : buffer;
    }
    x[0] = x[0] + -lr * grad;
  }
};

template <typename T, int kLists>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const __grid_constant__ TensorListMeta<kLists> meta, const LaunchScalars s, float momentum,
               float one_minus_dampening, bool nesterov, bool maximize, bool first_step) {
  if (step_skipped(s.device)) return;
  const int t = find_tensor(meta, blockIdx.x);
  const int64_t begin = chunk_begin(meta, t);
  const int64_t end = chunk_end(meta, t, begin);
  SgdOp<kLists> op;
  op.lr = static_cast<float>(read_lr(s));
  op.momentum = momentum;
  op.one_minus_dampening = one_minus_dampening;
  op.weight_decay = static_cast<float>(s.weight_decay);
  op.has_weight_decay = s.weight_decay != 0.0;
  op.unscale = s.device.grad_scale != nullptr;
  op.grad_scale = op.unscale ? *s.device.grad_scale : 1.0f;
  op.nesterov = nesterov;
  op.maximize = maximize;
  op.first_step = first_step;
  T* ptrs[kLists];
#pragma unroll
  for (int l = 0; l < kLists; ++l) ptrs[l] = static_cast<T*>(meta.addresses[l][t]);
  const unsigned all = (1u << kLists) - 1;
  // A first step writes the buffer without reading it.
  const unsigned load = (kLists == 3 && first_step) ? all & ~(1u << 2) : all;
  for_each_element<T, kLists>(ptrs, load, op.unscale ? all : all & ~kGradBit, begin, end, op);
}

enum SwatsSlot { kPhase = 0, kLambda, kSgdLr, kGroupStep, kSumPG, kSumPP };

struct SwatsOp {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, adam_step_size, sgd_step_size, grad_scale;
  bool sgd_phase, has_weight_decay, unscale;
  float sum_pg = 0.0f, sum_pp = 0.0f;  // this thread's share of p.g and p.p for the Adam step p

  __device__ __forceinline__ void operator()(float (&x)[5]) {
    float grad = x[1];
    if (unscale) {
      grad = grad / grad_scale;
      x[1] = grad;
    }
    if (has_weight_decay) grad = grad + weight_decay * x[0];  // as torch's Adam: no term without decay
    if (sgd_phase) {
      const float buffer = x[4] * beta1 + grad;
      x[4] = buffer;
      x[0] = x[0] - sgd_step_size * buffer;
    } else {
      const float exp_avg = x[2] * beta1 + one_minus_beta1 * grad;
      const float exp_avg_sq = x[3] * beta2 + one_minus_beta2 * grad * grad;
      const float update = -adam_step_size * exp_avg / (sqrtf(exp_avg_sq) + eps);
      sum_pg += update * grad;
      sum_pp += update * update;
      x[0] = x[0] + update;
      x[2] = exp_avg;
      x[3] = exp_avg_sq;
    }
  }
};

// After the group's last launch: gamma = p.p / -p.g, lambda = beta2 lambda + (1-beta2) gamma and the switch to SGD
// at lambda/(1-beta2^k) once |lambda/(1-beta2^k) - gamma| < eps, from the group's second step on.
__device__ void swats_update_switch(double* state, double beta2, double eps) {
  const double group_step = state[kGroupStep] + 1.0;
  state[kGroupStep] = group_step;
  const double sum_pg = state[kSumPG];
  const double sum_pp = state[kSumPP];
  state[kSumPG] = 0.0;
  state[kSumPP] = 0.0;
  if (state[kPhase] != 0.0 || sum_pg == 0.0) return;
  const double gamma = sum_pp / -sum_pg;
  const double lambda = beta2 * state[kLambda] + (1.0 - beta2) * gamma;
  state[kLambda] = lambda;
  const double corrected = lambda / (1.0 - pow(beta2, group_step));
  if (group_step > 1.0 && fabs(corrected - gamma) < eps) {
    state[kPhase] = 1.0;
    state[kSgdLr] = corrected;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swats_kernel(const __grid_constant__ TensorListMeta<5> meta, const LaunchScalars s, double* switch_state,
                 bool finalize, unsigned int* counter) {
  if (step_skipped(s.device)) return;
  const int t = find_tensor(meta, blockIdx.x);
  const int64_t begin = chunk_begin(meta, t);
  const int64_t end = chunk_end(meta, t, begin);
  const float step = *meta.steps[t] + 1.0f;
  SwatsOp op;
  op.beta1 = static_cast<float>(s.beta1);
  op.one_minus_beta1 = static_cast<float>(1.0 - s.beta1);
  op.beta2 = static_cast<float>(s.beta2);
  op.one_minus_beta2 = static_cast<float>(1.0 - s.beta2);
  op.eps = static_cast<float>(s.eps);
  op.weight_decay = static_cast<float>(s.weight_decay);
  op.adam_step_size = static_cast<float>(read_lr(s)) * sqrtf(bias_correction(s.log_beta2, step)) /
                      bias_correction(s.log_beta1, step);
  op.has_weight_decay = s.weight_decay != 0.0;
  op.sgd_step_size = static_cast<float>((1.0 - s.beta1) * switch_state[kSgdLr]);
  op.sgd_phase = switch_state[kPhase] != 0.0;
  op.unscale = s.device.grad_scale != nullptr;
  op.grad_scale = op.unscale ? *s.device.grad_scale : 1.0f;
  T* ptrs[5];
#pragma unroll
  for (int l = 0; l < 5; ++l) ptrs[l] = static_cast<T*>(meta.addresses[l][t]);
  const unsigned lists = op.sgd_phase ? 0b10011u : 0b01111u;  // SGD: param, grad, buffer; Adam: param, grad, m, v
  for_each_element<T, 5>(ptrs, lists, op.unscale ? lists : lists & ~kGradBit, begin, end, op);
  if (!op.sgd_phase) {
    const float block_pg = block_sum(op.sum_pg);
    const float block_pp = block_sum(op.sum_pp);
    if (threadIdx.x == 0) {
      atomicAdd(&switch_state[kSumPG], static_cast<double>(block_pg));
      atomicAdd(&switch_state[kSumPP], static_cast<double>(block_pp));
    }
  }
  if (last_block_done(counter)) {
    increment_steps(meta);
    if (finalize && threadIdx.x == 0) swats_update_switch(switch_state, s.beta2, s.eps);
  }
}

// Splits `tensors` into buckets of kMaxTensors and calls launch(meta, grid, is_last_bucket) for each non-empty one.
template <int kLists, typename Launch>
cudaError_t for_each_bucket(const TensorLists& tensors, Launch launch) {
  TensorListMeta<kLists> meta;
  for (int first = 0; first < tensors.num_tensors; first += kMaxTensors) {
    const int count = std::min(kMaxTensors, tensors.num_tensors - first);
    int64_t chunks = 0;
    for (int i = 0; i < count; ++i) {
      const int t = first + i;
      for (int l = 0; l < kLists; ++l) meta.addresses[l][i] = tensors.lists[l][t];
      meta.steps[i] = tensors.steps != nullptr ? tensors.steps[t] : nullptr;
      meta.numels[i] = tensors.numels[t];
      meta.chunk_starts[i] = static_cast<int32_t>(chunks);
      chunks += (tensors.numels[t] + kChunkSize - 1) / kChunkSize;
    }
    if (chunks > INT32_MAX) return cudaErrorInvalidValue;
    meta.chunk_starts[count] = static_cast<int32_t>(chunks);
    meta.num_tensors = count;
    const bool last_bucket = first + kMaxTensors >= tensors.num_tensors;
    if (chunks > 0) {
      launch(meta, static_cast<unsigned>(chunks), last_bucket);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

template <typename Fn>
cudaError_t dispatch_dtype(ScalarType dtype, Fn fn) {
  switch (dtype) {
    case ScalarType::kFloat32:
      return fn(float{});
    case ScalarType::kFloat16:
      return fn(__half{});
    case ScalarType::kBFloat16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int adam_step(const TensorLists& tensors, const DeviceScalars& scalars, const AdamOptions& o, unsigned int* counter,
              Stream stream) {
  const int lists = o.amsgrad ? 5 : 4;
  if (tensors.num_lists != lists || tensors.steps == nullptr) return cudaErrorInvalidValue;
  const LaunchScalars s = launch_scalars(scalars, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay);
  return dispatch_dtype(tensors.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (o.amsgrad) {
      return for_each_bucket<5>(tensors, [&](const TensorListMeta<5>& meta, unsigned grid, bool) {
        adam_kernel<T, 5><<<grid, kThreads, 0, stream>>>(meta, s, o.maximize, o.decoupled_weight_decay, counter);
      });
    }
    return for_each_bucket<4>(tensors, [&](const TensorListMeta<4>& meta, unsigned grid, bool) {
      adam_kernel<T, 4><<<grid, kThreads, 0, stream>>>(meta, s, o.maximize, o.decoupled_weight_decay, counter);
    });
  });
}

int sgd_step(const TensorLists& tensors, const DeviceScalars& scalars, const SgdOptions& o, Stream stream) {
  const bool has_momentum = tensors.num_lists == 3;
  if (tensors.num_lists != 2 && !has_momentum) return cudaErrorInvalidValue;
  const LaunchScalars s = launch_scalars(scalars, o.lr, 0.5, 0.5, 0.0, o.weight_decay);  // no betas in SGD
  const float momentum = static_cast<float>(o.momentum);
  const float one_minus_dampening = static_cast<float>(1.0 - o.dampening);
  return dispatch_dtype(tensors.dtype, [&](auto zero) {
    using T = decltype(zero);
    if (has_momentum) {
      return for_each_bucket<3>(tensors, [&](const TensorListMeta<3>& meta, unsigned grid, bool) {
        sgd_kernel<T, 3><<<grid, kThreads, 0, stream>>>(meta, s, momentum, one_minus_dampening, o.nesterov,
                                                       o.maximize, o.first_step);
      });
    }
    return for_each_bucket<2>(tensors, [&](const TensorListMeta<2>& meta, unsigned grid, bool) {
      sgd_kernel<T, 2><<<grid, kThreads, 0, stream>>>(meta, s, momentum, one_minus_dampening, o.nesterov, o.maximize,
                                                     o.first_step);
    });
  });
}

int swats_step(const TensorLists& tensors, const DeviceScalars& scalars, const SwatsOptions& o, unsigned int* counter,
               Stream stream) {
  if (tensors.num_lists != 5 || tensors.steps == nullptr || o.switch_state == nullptr) return cudaErrorInvalidValue;
  const LaunchScalars s = launch_scalars(scalars, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay);
  return dispatch_dtype(tensors.dtype, [&](auto zero) {
    using T = decltype(zero);
    return for_each_bucket<5>(tensors, [&](const TensorListMeta<5>& meta, unsigned grid, bool last_bucket) {
      swats_kernel<T><<<grid, kThreads, 0, stream>>>(meta, s, o.switch_state, o.finalize && last_bucket, counter);
    });
  });
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace optim
}  // namespace dlkernels
