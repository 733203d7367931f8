// Fused optimizer steps over lists of tensors (Adam/AdamW, SGD with momentum, SWATS): the torch-free host API of
// optim_kernels.cu. One launch per bucket of up to kMaxTensors tensors of one dtype, i.e. normally one per param
// group. Step counters, a tensor learning rate, AMP's grad_scale and found_inf and the SWATS phase are read from
// device memory, so a step needs no host synchronization and can be captured in a CUDA graph.
//
// The header needs no CUDA headers (the torch binding includes it): streams are CUstream_st* (cudaStream_t) and
// results are cudaError_t values as int (0: success; error_string names the others).
#pragma once

#include <cstdint>

#include "common/types.cuh"

namespace dlkernels {
namespace optim {

// lists[l][t]: the address of tensor t of list l (list 0: params, 1: grads, then the optimizer states in the order
// each step documents). All tensors of one call share `dtype` and are contiguous; numels[t] elements each.
struct TensorLists {
  ScalarType dtype;
  int num_lists;
  int num_tensors;
  void* const* lists[5];
  float* const* steps;  // per-tensor float32 step counters, incremented by the step (nullptr for SGD)
  const int64_t* numels;
};

// Device scalars, each nullptr when absent: lr (overrides the host lr), grad_scale (grads are divided by it and
// written back unscaled), found_inf (non-zero: the whole step, step counters included, is skipped).
struct DeviceScalars {
  const float* lr;
  const float* grad_scale;
  const float* found_inf;
};

// Lists: params, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs when amsgrad].
struct AdamOptions {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize, decoupled_weight_decay;
};

// Lists: params, grads[, momentum_buffers when momentum != 0].
struct SgdOptions {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

// Lists: params, grads, exp_avgs, exp_avg_sqs, momentum_buffers. switch_state: the group's 6 float64 values
// [phase, lambda, sgd_lr, group_step, sum_pg, sum_pp] (sums 0 between steps). A group split over several calls
// (several dtypes) sets `finalize` on its last call only: that one updates the estimate and the phase.
struct SwatsOptions {
  double lr, beta1, beta2, eps, weight_decay;
  double* switch_state;
  bool finalize;
};

// `counter`: a device unsigned int, 0 before the call and left 0 after it (the kernels find their last block with
// it); calls that may run concurrently need distinct counters.
int adam_step(const TensorLists& tensors, const DeviceScalars& scalars, const AdamOptions& options,
              unsigned int* counter, Stream stream);
int sgd_step(const TensorLists& tensors, const DeviceScalars& scalars, const SgdOptions& options, Stream stream);
int swats_step(const TensorLists& tensors, const DeviceScalars& scalars, const SwatsOptions& options,
               unsigned int* counter, Stream stream);
const char* error_string(int code);

}  // namespace optim
}  // namespace dlkernels
