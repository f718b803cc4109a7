// Device backend of the focus allocator: one thread block runs a whole step.
//
//   phase A  every thread evaluates its entries with the shared eval_entry;
//   phase B  all threads run the shared run_policy in lockstep; DeviceSelect finds
//            the best live candidate with a block-wide arg-best under the shared
//            order and broadcasts it, thread 0 applies actions;
//   phase C  each thread counts the output of a contiguous chunk (shared
//            out_count), a block scan gives the offsets, write_out writes.
// Nothing is copied to the host: the new WC, the action rows, the counts and the
// hysteresis state (including the step counter) stay in device memory.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "allocator.h"

namespace mc {
namespace alloc {

namespace {

constexpr int kThreads = 1024;

struct DeviceSelect {
  const Params& p;
  const Arrays& a;
  int64_t* slot;  // shared memory, kThreads entries

  __device__ bool best(int kind, Cand* out) {
    const int tid = threadIdx.x;
    slot[tid] = thread_best(p, a, kind, tid, blockDim.x);
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (tid < s) slot[tid] = pick_better(p, a, kind, slot[tid], slot[tid + s]);
      __syncthreads();
    }
    const int64_t winner = slot[0];
    __syncthreads();  // slot is rewritten by the next call
    if (winner < 0) return false;
    *out = make_cand(p, a, winner, kind);
    return true;
  }

  __device__ void apply(const Cand& c, int kind, int64_t t, int64_t index) {
    if (threadIdx.x == 0) apply_action(p, a, c, kind, t, index);
    __syncthreads();  // flags and marks written by thread 0 are visible to the block
  }
};

__global__ void __launch_bounds__(kThreads)
    focus_step_kernel(Params p, Arrays a, int32_t* out_levels, int64_t* out_nodes,
                      int64_t* counts) {
  __shared__ int64_t slot[kThreads];
  const int tid = threadIdx.x;
  const int64_t t = a.state[0];

  for (int64_t i = tid; i < a.n; i += blockDim.x) eval_entry(p, a, i, t);
  __syncthreads();

  DeviceSelect sel{p, a, slot};
  const int64_t n_actions = run_policy(p, a.n, t, sel);

  // Phase C: chunked counts, inclusive Hillis-Steele scan over the threads.
  int64_t lo, hi;
  chunk_bounds(a.n, tid, blockDim.x, &lo, &hi);
  const int64_t total = chunk_count(p, a, lo, hi);
  slot[tid] = total;
  __syncthreads();
  for (int s = 1; s < blockDim.x; s <<= 1) {
    const int64_t add = tid >= s ? slot[tid - s] : 0;
    __syncthreads();
    slot[tid] += add;
    __syncthreads();
  }
  write_chunk(p, a, lo, hi, slot[tid] - total, out_levels, out_nodes);
  if (tid == blockDim.x - 1) {
    counts[0] = slot[tid];
    counts[1] = n_actions;
    a.state[0] = t + 1;
  }
}

}  // namespace

void focus_step_device(const Params& p, const int32_t* levels, const int64_t* nodes,
                       const float* scores, int64_t n, int64_t* state, int32_t* out_levels,
                       int64_t* out_nodes, double* actions, int64_t* counts, uint8_t* scratch,
                       std::uintptr_t stream) {
  Arrays a{};
  a.levels = levels;
  a.nodes = nodes;
  a.scores = scores;
  a.n = n;
  a.state = state;
  a.escore = reinterpret_cast<double*>(scratch);
  a.cscore = a.escore + n;
  a.eflag = reinterpret_cast<uint8_t*>(a.cscore + n);
  a.cflag = a.eflag + n;
  a.mark = a.cflag + n;
  a.actions = actions;
  a.actions_cap = actions_capacity(p, n);
  focus_step_kernel<<<1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      p, a, out_levels, out_nodes, counts);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("focus_step kernel launch failed: ") +
                             cudaGetErrorString(err));
}

}  // namespace alloc
}  // namespace mc
