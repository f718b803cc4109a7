#include <cuda_runtime.h>

#include "cuda_info.h"

namespace mc {

bool cuda_compiled() { return true; }

std::string cuda_build_version() { return MC_CUDA_VERSION; }

int cuda_device_count() {
  int n = 0;
  // No driver or no device is a normal state on CPU machines: report 0 and clear
  // the sticky error so later runtime calls are not poisoned by it.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace mc
