// Persistent LSTM recurrence (one layer, one direction, the whole sequence in one cooperative launch): the torch-free
// host API of lstm_persistent.cu. See LSTM_CONTRACT.md for the tensors' meanings; bench/NOTES.md for the design.
//
// Each of `blocks` CTAs (one per SM) owns `hidden_per_block` (HC) hidden units. Its slice of W_hh stays in shared
// memory for the whole sequence (forward: the 4*HC gate rows of its units, backward: the HC columns of its units),
// loaded once. Per step, every CTA reads the previous step's h (forward) or pre-activation gate gradients (backward)
// of all batch rows from a ping-pong exchange buffer in global memory (L2), multiplies it with its slice (tensor
// cores for fp16/bf16, FMA for fp32, fp32 accumulation), applies the cell math of its units and writes its part of
// the next exchange buffer; one grid-wide barrier (cooperative groups' grid.sync) separates the steps.
//
// The header needs no CUDA headers (the torch binding includes it): streams are CUstream_st* (cudaStream_t) and
// results are cudaError_t values as int (0: success; error_string names the others).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/types.cuh"

namespace dlkernels {
namespace lstm {

// How the kernels split a hidden size over the device, or why they cannot (`reason` non-null).
struct Plan {
  int hidden_per_block = 0;                 // HC: 4 or 8
  int blocks = 0;                           // hidden / HC, all co-resident (one cooperative grid)
  int k_chunk_forward = 0;                  // columns of h per shared-memory tile (divides hidden)
  int k_chunk_backward = 0;                 // columns of grad_gates per tile (divides 4 * hidden)
  std::size_t smem_forward = 0;             // dynamic shared memory per CTA, bytes
  std::size_t smem_backward = 0;
  const char* reason = nullptr;             // non-null: unsupported, and why
};

// The plan for `hidden` units of `dtype` on CUDA device `device` (cached per device; the first call per kernel
// queries occupancy). Requires compute capability >= 8.0 and cooperative launch support, hidden % 128 == 0, and
// hidden / HC <= co-resident CTAs for HC = 8 at most. *error receives a CUDA error code (0 if none).
Plan plan_for(int hidden, ScalarType dtype, int device, int* error);

// All pointers are device pointers to contiguous tensors; `storage` ones hold `dtype` values, the rest fp32/int32.
// h0 and the exchange buffers must be 16-byte aligned (read with 16-byte asynchronous copies).
// lengths outside [0, T] act as clamped to it.
struct ForwardArgs {
  const void* x_proj;  // (T, B, 4H) storage
  const void* w_hh;    // (4H, H) storage
  const void* h0;      // (B, H) storage
  const float* c0;     // (B, H)
  const int* lengths;  // (B,) or nullptr: every row has T steps
  void* y;             // (T, B, H) storage
  void* h_n;           // (B, H) storage
  float* c_n;          // (B, H)
  float* gates;        // (T, B, 4H) post-activation gates, or nullptr (inference)
  float* c_all;        // (T, B, H) cell state after each step, or nullptr (inference)
  void* exchange;      // (2, B, H) storage scratch: h of the previous step, read by every CTA
  int steps, batch, hidden;
};

struct BackwardArgs {
  const float* grad_y;    // (T, B, H)
  const float* grad_h_n;  // (B, H)
  const float* grad_c_n;  // (B, H)
  const void* w_hh;       // (4H, H) storage
  const float* gates;     // (T, B, 4H) from the forward
  const float* c_all;     // (T, B, H) from the forward
  const float* c0;        // (B, H)
  const int* lengths;     // (B,) or nullptr
  float* grad_gates;      // (T, B, 4H) gradient of the pre-activation gates
  float* grad_h0;         // (B, H)
  float* grad_c0;         // (B, H)
  void* exchange;         // (2, B, 4H) storage scratch: grad_gates of the later step, read by every CTA
  int steps, batch, hidden;
};

// One cooperative launch each on `stream`; steps >= 1 and batch >= 1; `plan` from plan_for for the same
// (hidden, dtype, device), the device current.
int forward(const ForwardArgs& args, ScalarType dtype, const Plan& plan, Stream stream);
int backward(const BackwardArgs& args, ScalarType dtype, const Plan& plan, Stream stream);
const char* error_string(int code);

}  // namespace lstm
}  // namespace dlkernels
