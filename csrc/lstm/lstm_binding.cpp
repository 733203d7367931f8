// Torch binding of the persistent LSTM kernels (LSTM_CONTRACT.md): argument checks, output allocation, the current
// CUDA stream. Registered on dlkernels._C by register_lstm (csrc/extension.cpp). Only device-generic c10 headers: the
// file also compiles against a CPU torch (tests/test_build.py).
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <tuple>

#include "common/binding.h"
#include "lstm/lstm_persistent.cuh"

namespace dlkernels {
namespace lstm {
namespace {

bool is_storage_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_cuda(int code, const char* op) {
  TORCH_CHECK(code == 0, "dlkernels._C.", op, ": CUDA error: ", error_string(code));
}

// name: a contiguous tensor of `shape` and `dtype` on `device`.
void check_tensor(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef shape,
                  at::ScalarType dtype, at::Device device) {
  TORCH_CHECK(t.device() == device, "dlkernels._C.", op, ": ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "dlkernels._C.", op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "dlkernels._C.", op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "dlkernels._C.", op, ": ", name, " must be contiguous");
}

// lengths: empty (every row runs all steps) or (B,) int32 on `device`; returns its pointer or nullptr.
const int* lengths_ptr(const at::Tensor& lengths, const char* op, int64_t batch, at::Device device) {
  if (lengths.numel() == 0) return nullptr;
  check_tensor(lengths, op, "lengths", {batch}, at::kInt, device);
  return lengths.data_ptr<int>();
}

// The kernels read h0 with 16-byte copies; a contiguous view at an odd offset gets an aligned copy.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

Plan checked_plan(int64_t hidden, at::ScalarType dtype, at::Device device, int64_t batch, const char* op) {
  int error = 0;
  const Plan plan = plan_for(static_cast<int>(hidden), kernel_dtype(dtype, op, "dtype"), device.index(), &error);
  check_cuda(error, op);
  TORCH_CHECK(plan.reason == nullptr, "dlkernels._C.", op, ": unsupported shape hidden_size=", hidden,
              ", batch=", batch, ", dtype=", dtype, " on ", device, ": ", plan.reason,
              " (ask lstm_persistent_supported first)");
  return plan;
}

// torch's current CUDA stream on `device` (native_handle: the cudaStream_t).
Stream current_stream(at::Device device) {
  const c10::impl::VirtualGuardImpl impl(device.type());
  return static_cast<Stream>(impl.getStream(device).native_handle());
}

bool lstm_persistent_supported(int64_t hidden_size, int64_t batch, at::ScalarType dtype, int64_t device_index) {
  if (!is_storage_dtype(dtype) || batch < 0 || hidden_size <= 0 || hidden_size > (1 << 20)) return false;
  int error = 0;
  const ScalarType kernel = kernel_dtype(dtype, "lstm_persistent_supported", "dtype");
  const Plan plan = plan_for(static_cast<int>(hidden_size), kernel, static_cast<int>(device_index), &error);
  return error == 0 && plan.reason == nullptr;  // a device the runtime cannot query cannot run the kernels
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_persistent_forward(
    const at::Tensor& x_proj, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& lengths, bool training) {
  constexpr const char* op = "lstm_persistent_forward";
  TORCH_CHECK(x_proj.is_cuda(), "dlkernels._C.", op, ": x_proj must be a CUDA tensor, got ", x_proj.device());
  TORCH_CHECK(x_proj.dim() == 3 && x_proj.size(2) % 4 == 0, "dlkernels._C.", op,
              ": x_proj must have shape (T, B, 4H), got ", x_proj.sizes());
  const at::Device device = x_proj.device();
  const at::ScalarType dtype = x_proj.scalar_type();
  const int64_t steps = x_proj.size(0), batch = x_proj.size(1), hidden = x_proj.size(2) / 4;
  check_tensor(x_proj, op, "x_proj", {steps, batch, 4 * hidden}, dtype, device);
  check_tensor(w_hh, op, "w_hh", {4 * hidden, hidden}, dtype, device);
  check_tensor(h0, op, "h0", {batch, hidden}, dtype, device);
  check_tensor(c0, op, "c0", {batch, hidden}, at::kFloat, device);
  const int* lengths_data = lengths_ptr(lengths, op, batch, device);
  const Plan plan = checked_plan(hidden, dtype, device, batch, op);
  const c10::DeviceGuard guard(device);

  const auto storage = x_proj.options();
  const auto fp32 = storage.dtype(at::kFloat);
  at::Tensor y = at::empty({steps, batch, hidden}, storage);
  at::Tensor gates = training ? at::empty({steps, batch, 4 * hidden}, fp32) : at::empty({0}, fp32);
  at::Tensor c_all = training ? at::empty({steps, batch, hidden}, fp32) : at::empty({0}, fp32);
  if (steps == 0 || batch == 0) return {y, h0.clone(), c0.clone(), gates, c_all};
  at::Tensor h_n = at::empty({batch, hidden}, storage);
  at::Tensor c_n = at::empty({batch, hidden}, fp32);
  at::Tensor exchange = at::empty({2, batch, hidden}, storage);
  const at::Tensor h0_aligned = aligned16(h0);

  ForwardArgs args{};
  args.x_proj = x_proj.data_ptr();
  args.w_hh = w_hh.data_ptr();
  args.h0 = h0_aligned.data_ptr();
  args.c0 = c0.data_ptr<float>();
  args.lengths = lengths_data;
  args.y = y.data_ptr();
  args.h_n = h_n.data_ptr();
  args.c_n = c_n.data_ptr<float>();
  args.gates = training ? gates.data_ptr<float>() : nullptr;
  args.c_all = training ? c_all.data_ptr<float>() : nullptr;
  args.exchange = exchange.data_ptr();
  args.steps = static_cast<int>(steps);
  args.batch = static_cast<int>(batch);
  args.hidden = static_cast<int>(hidden);
  check_cuda(forward(args, kernel_dtype(dtype, op, "dtype"), plan, current_stream(device)), op);
  return {y, h_n, c_n, gates, c_all};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_persistent_backward(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& w_hh,
    const at::Tensor& gates, const at::Tensor& c_all, const at::Tensor& c0, const at::Tensor& lengths) {
  constexpr const char* op = "lstm_persistent_backward";
  TORCH_CHECK(grad_y.is_cuda(), "dlkernels._C.", op, ": grad_y must be a CUDA tensor, got ", grad_y.device());
  TORCH_CHECK(grad_y.dim() == 3, "dlkernels._C.", op, ": grad_y must have shape (T, B, H), got ",
              grad_y.sizes());
  TORCH_CHECK(w_hh.dim() == 2, "dlkernels._C.", op, ": w_hh must have shape (4H, H), got ", w_hh.sizes());
  const at::Device device = grad_y.device();
  const int64_t steps = grad_y.size(0), batch = grad_y.size(1), hidden = grad_y.size(2);
  const at::ScalarType dtype = w_hh.scalar_type();
  check_tensor(grad_y, op, "grad_y", {steps, batch, hidden}, at::kFloat, device);
  check_tensor(grad_h_n, op, "grad_h_n", {batch, hidden}, at::kFloat, device);
  check_tensor(grad_c_n, op, "grad_c_n", {batch, hidden}, at::kFloat, device);
  check_tensor(w_hh, op, "w_hh", {4 * hidden, hidden}, dtype, device);
  check_tensor(gates, op, "gates", {steps, batch, 4 * hidden}, at::kFloat, device);
  check_tensor(c_all, op, "c_all", {steps, batch, hidden}, at::kFloat, device);
  check_tensor(c0, op, "c0", {batch, hidden}, at::kFloat, device);
  const int* lengths_data = lengths_ptr(lengths, op, batch, device);
  const Plan plan = checked_plan(hidden, dtype, device, batch, op);
  const c10::DeviceGuard guard(device);

  const auto fp32 = grad_y.options();
  at::Tensor grad_gates = at::empty({steps, batch, 4 * hidden}, fp32);
  if (steps == 0 || batch == 0) return {grad_gates, grad_h_n.clone(), grad_c_n.clone()};
  at::Tensor grad_h0 = at::empty({batch, hidden}, fp32);
  at::Tensor grad_c0 = at::empty({batch, hidden}, fp32);
  at::Tensor exchange = at::empty({2, batch, 4 * hidden}, w_hh.options());

  BackwardArgs args{};
  args.grad_y = grad_y.data_ptr<float>();
  args.grad_h_n = grad_h_n.data_ptr<float>();
  args.grad_c_n = grad_c_n.data_ptr<float>();
  args.w_hh = w_hh.data_ptr();
  args.gates = gates.data_ptr<float>();
  args.c_all = c_all.data_ptr<float>();
  args.c0 = c0.data_ptr<float>();
  args.lengths = lengths_data;
  args.grad_gates = grad_gates.data_ptr<float>();
  args.grad_h0 = grad_h0.data_ptr<float>();
  args.grad_c0 = grad_c0.data_ptr<float>();
  args.exchange = exchange.data_ptr();
  args.steps = static_cast<int>(steps);
  args.batch = static_cast<int>(batch);
  args.hidden = static_cast<int>(hidden);
  check_cuda(backward(args, kernel_dtype(dtype, op, "dtype"), plan, current_stream(device)), op);
  return {grad_gates, grad_h0, grad_c0};
}

}  // namespace

void register_lstm(pybind11::module_& m) {
  m.def("lstm_persistent_supported", &lstm_persistent_supported, pybind11::arg("hidden_size"),
        pybind11::arg("batch"), pybind11::arg("dtype"), pybind11::arg("device_index"),
        "True iff the persistent LSTM kernels (forward and backward) can run this shape with every CTA co-resident");
  m.def("lstm_persistent_forward", &lstm_persistent_forward, pybind11::arg("x_proj"), pybind11::arg("w_hh"),
        pybind11::arg("h0"), pybind11::arg("c0"), pybind11::arg("lengths"), pybind11::arg("training"),
        "Persistent LSTM forward over a whole sequence: (y, h_n, c_n, gates, c_all)");
  m.def("lstm_persistent_backward", &lstm_persistent_backward, pybind11::arg("grad_y"), pybind11::arg("grad_h_n"),
        pybind11::arg("grad_c_n"), pybind11::arg("w_hh"), pybind11::arg("gates"), pybind11::arg("c_all"),
        pybind11::arg("c0"), pybind11::arg("lengths"),
        "Persistent LSTM backward through time: (grad_gates, grad_h0, grad_c0)");
}

}  // namespace lstm
}  // namespace dlkernels
