// Entry points of the focus allocator backends (host: allocator_cpu.cpp, device:
// allocator_cuda.cu). Both take raw addresses of contiguous tensors owned by the
// caller (torch), so the extension never links against torch.
#pragma once

#include <cstdint>
#include <vector>

#include "allocator_core.h"

namespace mc {
namespace alloc {

// Params from the packed float64 list (the scalars in MC_STEP_PARAM_SCALARS order,
// then st_off and st_size, top + 1 values each): checks the length, that integer
// fields hold integers, and every value's range, and fills the derived spans.
// Throws std::invalid_argument naming the bad field and value.
Params unpack_params(const double* packed, int64_t len);

// The inverse of unpack_params (integers are exact in float64 up to 2^53).
std::vector<double> pack_params(const Params& p);

// Capacities the caller must provide for ``n`` input entries.
inline int64_t out_capacity(const Params& p, int64_t n) { return n + p.n_diff * (p.bs - 1); }
inline int64_t actions_capacity(const Params& p, int64_t n) { return n / p.bs + p.n_diff + 1; }
// Scratch bytes per entry: escore, cscore (double), eflag, cflag, mark (uint8).
constexpr int64_t kScratchBytesPerEntry = 8 + 8 + 1 + 1 + 1;

struct StepResult {
  int64_t new_n;
  int64_t n_actions;
};

// One step on the host. Reads levels/nodes/scores, updates state in place (the
// hysteresis slots and the step counter state[0]), writes the new WC into
// out_levels/out_nodes and the action rows into actions. emulate_threads = 0 uses
// heap queues; a power of two runs the CUDA kernel's block-wide selection
// sequentially with that many threads (for tests).
StepResult focus_step_host(const Params& p, const int32_t* levels, const int64_t* nodes,
                           const float* scores, int64_t n, int64_t* state, int32_t* out_levels,
                           int64_t* out_nodes, double* actions, int64_t emulate_threads = 0);

#if defined(MC_WITH_CUDA)
// One step on the device, enqueued on ``stream`` (a cudaStream_t as an integer);
// returns without synchronising. counts[0] = new n, counts[1] = number of actions
// (device memory). scratch holds n * kScratchBytesPerEntry bytes.
void focus_step_device(const Params& p, const int32_t* levels, const int64_t* nodes,
                       const float* scores, int64_t n, int64_t* state, int32_t* out_levels,
                       int64_t* out_nodes, double* actions, int64_t* counts, uint8_t* scratch,
                       std::uintptr_t stream);
#endif

}  // namespace alloc
}  // namespace mc
