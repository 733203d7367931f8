// Torch binding of the multi-tensor optimizer kernels (the *_py functions): checks, dtype buckets, device scalars.
// Registered on dlkernels._C by register_optim (csrc/extension.cpp). Python passes the current CUDA stream as an int
// (torch.cuda.current_stream().cuda_stream), so this file needs no CUDA headers.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "common/binding.h"
#include "optim/optim_kernels.cuh"

namespace dlkernels {
namespace optim {
namespace {

using TensorList = std::vector<at::Tensor>;

// The tensors of one dtype, as the kernels' address lists.
struct Bucket {
  ScalarType dtype;
  std::vector<std::vector<void*>> lists;
  std::vector<float*> steps;
  std::vector<int64_t> numels;

  TensorLists view(bool with_steps) const {
    TensorLists v{};
    v.dtype = dtype;
    v.num_lists = static_cast<int>(lists.size());
    v.num_tensors = static_cast<int>(numels.size());
    for (size_t l = 0; l < lists.size(); ++l) v.lists[l] = lists[l].data();
    v.steps = with_steps ? steps.data() : nullptr;
    v.numels = numels.data();
    return v;
  }
};

// lists[0] are the params; every other list must match them tensor by tensor. Steps: float32 scalars, or empty.
std::vector<Bucket> bucket_by_dtype(const std::vector<const TensorList*>& lists, const TensorList& steps,
                                    const char* op) {
  static const char* names[] = {"params", "grads", "state", "state", "state"};
  const TensorList& params = *lists[0];
  TORCH_CHECK(lists.size() <= 5, "dlkernels._C.", op, ": too many tensor lists");
  TORCH_CHECK(steps.empty() || steps.size() == params.size(), "dlkernels._C.", op, ": ", steps.size(),
              " steps for ", params.size(), " params");
  const at::Device device = params.at(0).device();
  TORCH_CHECK(device.is_cuda(), "dlkernels._C.", op, ": params must be CUDA tensors, got ", device);
  std::vector<Bucket> buckets;
  for (size_t t = 0; t < params.size(); ++t) {
    const ScalarType dtype = kernel_dtype(params[t].scalar_type(), op, "params");
    Bucket* bucket = nullptr;
    for (auto& b : buckets) {
      if (b.dtype == dtype) bucket = &b;
    }
    if (bucket == nullptr) {
      buckets.push_back(Bucket{dtype, std::vector<std::vector<void*>>(lists.size()), {}, {}});
      bucket = &buckets.back();
    }
    for (size_t l = 0; l < lists.size(); ++l) {
      TORCH_CHECK(lists[l]->size() == params.size(), "dlkernels._C.", op, ": ", names[l], " has ",
                  lists[l]->size(), " tensors, params ", params.size());
      const at::Tensor& x = (*lists[l])[t];
      TORCH_CHECK(x.device() == device, "dlkernels._C.", op, ": ", names[l], "[", t, "] is on ", x.device(),
                  ", params[0] on ", device);
      TORCH_CHECK(x.scalar_type() == params[t].scalar_type(), "dlkernels._C.", op, ": ", names[l], "[", t,
                  "] is ", x.scalar_type(), ", its param ", params[t].scalar_type());
      TORCH_CHECK(x.numel() == params[t].numel() && x.is_contiguous(), "dlkernels._C.", op, ": ", names[l], "[",
                  t, "] must be contiguous with its param's size");
      bucket->lists[l].push_back(x.data_ptr());
    }
    if (!steps.empty()) {
      const at::Tensor& step = steps[t];
      TORCH_CHECK(step.device() == device && step.scalar_type() == at::kFloat && step.numel() == 1,
                  "dlkernels._C.", op, ": steps[", t, "] must be a float32 scalar on ", device);
      bucket->steps.push_back(step.data_ptr<float>());
    }
    bucket->numels.push_back(params[t].numel());
  }
  return buckets;
}

// A 1-element float32 copy of `t` on `device` (the tensor itself when it already is one), or nullptr.
const float* device_scalar(const std::optional<at::Tensor>& t, at::Device device, TensorList& keep_alive,
                           const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1, "dlkernels._C: ", name, " must have one element, got ", t->numel());
  keep_alive.push_back(t->to(device, at::kFloat).contiguous());
  return keep_alive.back().data_ptr<float>();
}

void check(int code, const char* op) {
  TORCH_CHECK(code == 0, "dlkernels._C.", op, ": CUDA error: ", error_string(code));
}

Stream as_stream(int64_t stream) { return reinterpret_cast<Stream>(static_cast<intptr_t>(stream)); }

// The kernels' last-block counter for (device, stream): zero between launches (each launch's last block resets it),
// so steps need no memset; one per stream, as launches on one stream never overlap. Kept for the process's life.
unsigned int* stream_counter(at::Device device, int64_t stream) {
  static std::mutex mutex;
  static auto* counters = new std::map<std::pair<int, int64_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  auto& counter = (*counters)[{device.index(), stream}];
  if (!counter.defined()) {
    counter = at::zeros({1}, at::TensorOptions().device(device).dtype(at::kInt));
  }
  return reinterpret_cast<unsigned int*>(counter.data_ptr<int>());
}

void adam_step_py(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs, const TensorList& steps, double lr,
               const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
               double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
               int64_t stream) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  std::vector<const TensorList*> lists = {&params, &grads, &exp_avgs, &exp_avg_sqs};
  if (amsgrad) lists.push_back(&max_exp_avg_sqs);
  TORCH_CHECK(!steps.empty(), "dlkernels._C.adam_step: steps are required");
  const auto buckets = bucket_by_dtype(lists, steps, "adam_step");
  TensorList keep_alive;
  const DeviceScalars scalars{device_scalar(lr_tensor, device, keep_alive, "lr_tensor"),
                              device_scalar(grad_scale, device, keep_alive, "grad_scale"),
                              device_scalar(found_inf, device, keep_alive, "found_inf")};
  const AdamOptions options{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay};
  for (const auto& bucket : buckets) {
    check(optim::adam_step(bucket.view(true), scalars, options, stream_counter(device, stream),
                           as_stream(stream)),
          "adam_step");
  }
}

void sgd_step_py(const TensorList& params, const TensorList& grads, const TensorList& momentum_buffers,
              bool first_step, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize,
              const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
              int64_t stream) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  std::vector<const TensorList*> lists = {&params, &grads};
  if (!momentum_buffers.empty()) lists.push_back(&momentum_buffers);
  const auto buckets = bucket_by_dtype(lists, {}, "sgd_step");
  TensorList keep_alive;
  const DeviceScalars scalars{device_scalar(lr_tensor, device, keep_alive, "lr_tensor"),
                              device_scalar(grad_scale, device, keep_alive, "grad_scale"),
                              device_scalar(found_inf, device, keep_alive, "found_inf")};
  const SgdOptions options{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  for (const auto& bucket : buckets) {
    check(optim::sgd_step(bucket.view(false), scalars, options, as_stream(stream)), "sgd_step");
  }
}

void swats_step_py(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                const TensorList& exp_avg_sqs, const TensorList& momentum_buffers, const TensorList& steps,
                const at::Tensor& switch_state, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                double beta2, double eps, double weight_decay, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, bool finalize, int64_t stream) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::DeviceGuard guard(device);
  TORCH_CHECK(switch_state.device() == device && switch_state.scalar_type() == at::kDouble &&
                  switch_state.numel() == 6 && switch_state.is_contiguous(),
              "dlkernels._C.swats_step: switch_state must be 6 contiguous float64 values on ", device);
  const auto buckets =
      bucket_by_dtype({&params, &grads, &exp_avgs, &exp_avg_sqs, &momentum_buffers}, steps, "swats_step");
  TensorList keep_alive;
  const DeviceScalars scalars{device_scalar(lr_tensor, device, keep_alive, "lr_tensor"),
                              device_scalar(grad_scale, device, keep_alive, "grad_scale"),
                              device_scalar(found_inf, device, keep_alive, "found_inf")};
  for (size_t i = 0; i < buckets.size(); ++i) {
    const SwatsOptions options{lr,           beta1, beta2, eps, weight_decay, switch_state.data_ptr<double>(),
                               finalize && i + 1 == buckets.size()};
    check(optim::swats_step(buckets[i].view(true), scalars, options, stream_counter(device, stream),
                            as_stream(stream)),
          "swats_step");
  }
}

}  // namespace

void register_optim(pybind11::module_& m) {
  m.def("adam_step", &adam_step_py, "Adam/AdamW step over lists of CUDA tensors (one launch per dtype)");
  m.def("sgd_step", &sgd_step_py, "SGD step over lists of CUDA tensors (one launch per dtype)");
  m.def("swats_step", &swats_step_py, "SWATS step over one param group's CUDA tensors (one launch per dtype)");
}

}  // namespace optim
}  // namespace dlkernels
