// pybind11 bindings for megacontext._C. The extension does not link against
// torch: tensors cross this boundary as raw data pointers plus sizes (and the
// CUDA stream for device work), so the wheel is independent of the torch build.
#include <pybind11/pybind11.h>

#include "common.h"
#include "cuda_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "megacontext native core (C++ allocator, CUDA kernels).";
  m.attr("ABI_VERSION") = mc::kAbiVersion;

  m.def(
      "build_info",
      []() {
        py::dict d;
        d["abi_version"] = mc::kAbiVersion;
        d["cuda_compiled"] = mc::cuda_compiled();
        d["cuda_version"] = mc::cuda_build_version();
#if defined(__clang__)
        d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
        d["compiler"] = std::string("gcc ") + __VERSION__;
#else
        d["compiler"] = std::string("unknown");
#endif
        return d;
      },
      "Facts about this build: ABI version, whether CUDA kernels were compiled, "
      "the CUDA toolkit version and the host compiler.");

  m.def("cuda_device_count", &mc::cuda_device_count,
        "Number of CUDA devices visible at run time (0 without driver or device).");
}
