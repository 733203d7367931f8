// The one Python module of the CUDA extension, dlkernels._C: each op family registers its functions here.
#include <torch/extension.h>

#define DLKERNELS_STRINGIFY_(x) #x
#define DLKERNELS_STRINGIFY(x) DLKERNELS_STRINGIFY_(x)

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
#ifdef DLKERNELS_TORCH_VERSION  // the torch it was built against (setup.py), checked by dlkernels/_backend.py
  m.attr("torch_version") = DLKERNELS_STRINGIFY(DLKERNELS_TORCH_VERSION);
#endif
  dlkernels::optim::register_optim(m);
  dlkernels::lstm::register_lstm(m);
}
