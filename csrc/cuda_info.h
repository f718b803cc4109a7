// Thin, torch-free access to the CUDA runtime. Implemented in cuda_info.cu when
// the extension is built with CUDA, and in cuda_info_none.cpp otherwise.
#pragma once

#include <string>

namespace mc {

// True when this build of _C contains compiled CUDA kernels.
bool cuda_compiled();
// CUDA toolkit version the kernels were compiled with ("" without CUDA).
std::string cuda_build_version();
// Number of CUDA devices visible at run time; 0 without a driver, a device or CUDA.
int cuda_device_count();

}  // namespace mc
