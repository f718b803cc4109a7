// Shared definitions for code compiled both by the host C++ compiler and by nvcc.
// Anything marked MC_HD is one implementation used by the CPU and the GPU backends,
// so the CPU tests exercise the exact decision logic the CUDA kernel runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MC_HD __host__ __device__
#define MC_DEVICE_BUILD 1
#else
#define MC_HD
#define MC_DEVICE_BUILD 0
#endif

namespace mc {

// Version of the _C ABI seen from Python; bump when an exported signature changes
// (2: the allocator takes its parameters as one StepParams struct).
constexpr int kAbiVersion = 2;

}  // namespace mc
