// The one Python module of the CUDA extension, dlkernels._C: each op family registers its functions here.
#include <torch/extension.h>

namespace dlkernels {
namespace optim {
void register_optim(pybind11::module_& m);
}  // namespace optim
namespace lstm {
void register_lstm(pybind11::module_& m);
}  // namespace lstm
}  // namespace dlkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlkernels CUDA C++ kernels";
  dlkernels::optim::register_optim(m);
  dlkernels::lstm::register_lstm(m);
}
