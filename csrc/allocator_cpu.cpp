// Host backend of the focus allocator: the shared core (allocator_core.h) driven by
// sorted candidate queues.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "allocator.h"

namespace mc {
namespace alloc {

namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// Queues as binary heaps under the shared order (best on top): building one is
// O(n) and a step pops only a few candidates, so no full sort is needed. A
// candidate that an applied action removed (its flag cleared) is discarded when
// it reaches the top. The order is strict and total, so this finds exactly the
// candidate a full sort (or the device's arg-best) would.
struct HostSelect {
  const Params& p;
  const Arrays& a;
  std::vector<Cand> heap[2];

  static bool worse_expand(const Cand& x, const Cand& y) { return better(kExpand, y, x); }
  static bool worse_collapse(const Cand& x, const Cand& y) { return better(kCollapse, y, x); }

  HostSelect(const Params& params, const Arrays& arrays) : p(params), a(arrays) {
    for (int64_t i = 0; i < a.n; ++i) {
      if (a.eflag[i]) heap[kExpand].push_back(make_cand(p, a, i, kExpand));
      if (a.cflag[i]) heap[kCollapse].push_back(make_cand(p, a, i, kCollapse));
    }
    std::make_heap(heap[kExpand].begin(), heap[kExpand].end(), worse_expand);
    std::make_heap(heap[kCollapse].begin(), heap[kCollapse].end(), worse_collapse);
  }

  bool best(int kind, Cand* out) {
    const uint8_t* flag = kind == kExpand ? a.eflag : a.cflag;
    auto& h = heap[kind];
    auto worse = kind == kExpand ? worse_expand : worse_collapse;
    while (!h.empty() && !flag[h.front().entry]) {
      std::pop_heap(h.begin(), h.end(), worse);
      h.pop_back();
    }
    if (h.empty()) return false;
    *out = h.front();
    return true;
  }

  void apply(const Cand& c, int kind, int64_t t, int64_t index) {
    apply_action(p, a, c, kind, t, index);
  }
};

// The device's selection (allocator_cuda.cu) run sequentially: ``nthreads``
// strided thread scans, then the pairwise tree reduction. Slow (O(n) per pop);
// used by the tests to exercise thread_best/pick_better on the CPU.
struct BlockEmulationSelect {
  const Params& p;
  const Arrays& a;
  int64_t nthreads;
  std::vector<int64_t> slot;

  BlockEmulationSelect(const Params& params, const Arrays& arrays, int64_t threads)
      : p(params), a(arrays), nthreads(threads), slot(threads) {}

  bool best(int kind, Cand* out) {
    for (int64_t tid = 0; tid < nthreads; ++tid) slot[tid] = thread_best(p, a, kind, tid, nthreads);
    for (int64_t s = nthreads / 2; s > 0; s >>= 1)
      for (int64_t tid = 0; tid < s; ++tid)
        slot[tid] = pick_better(p, a, kind, slot[tid], slot[tid + s]);
    if (slot[0] < 0) return false;
    *out = make_cand(p, a, slot[0], kind);
    return true;
  }

  void apply(const Cand& c, int kind, int64_t t, int64_t index) {
    apply_action(p, a, c, kind, t, index);
  }
};

}  // namespace

Params make_params(int64_t bs, int32_t top, int64_t num_tokens, int64_t w_max, int64_t p0,
                   int64_t n_diff, int64_t cooldown, int64_t min_residency, double tau_expand,
                   double tau_collapse, const int64_t* st_off, const int64_t* st_size,
                   int n_state_levels) {
  if (bs < 2) bad("block_size must be >= 2, got " + std::to_string(bs));
  if (top < 1 || top >= kMaxLevels)
    bad("top level must be in [1, " + std::to_string(kMaxLevels - 1) + "], got " +
        std::to_string(top));
  if (n_state_levels != top + 1)
    bad("state offsets/sizes must have top + 1 = " + std::to_string(top + 1) +
        " entries, got " + std::to_string(n_state_levels));
  if (num_tokens < 0) bad("num_tokens must be >= 0");
  if (w_max <= 0) bad("w_max must be > 0");
  if (p0 < 0 || p0 > num_tokens) bad("protected start out of [0, num_tokens]");
  if (n_diff < 0 || cooldown < 0 || min_residency < 0)
    bad("n_diff, cooldown and min_residency must be >= 0");
  Params p{};
  p.bs = bs;
  p.top = top;
  p.num_tokens = num_tokens;
  p.w_max = w_max;
  p.p0 = p0;
  p.n_diff = n_diff;
  p.cooldown = cooldown;
  p.min_residency = min_residency;
  p.tau_expand = tau_expand;
  p.tau_collapse = tau_collapse;
  p.span[0] = 1;
  for (int l = 1; l <= top; ++l) {
    if (p.span[l - 1] > (int64_t{1} << 62) / bs) bad("block_size**levels overflows int64");
    p.span[l] = p.span[l - 1] * bs;
  }
  for (int l = 1; l <= top; ++l) {
    if (st_off[l] < 1 || st_size[l] < 0) bad("bad state layout at level " + std::to_string(l));
    p.st_off[l] = st_off[l];
    p.st_size[l] = st_size[l];
  }
  return p;
}

StepResult focus_step_host(const Params& p, const int32_t* levels, const int64_t* nodes,
                           const float* scores, int64_t n, int64_t* state, int32_t* out_levels,
                           int64_t* out_nodes, double* actions, int64_t emulate_threads) {
  if (emulate_threads < 0 || (emulate_threads & (emulate_threads - 1)) != 0)
    bad("emulate_threads must be 0 or a power of two");
  std::vector<double> escore(n), cscore(n);
  std::vector<uint8_t> eflag(n), cflag(n), mark(n);
  Arrays a{levels, nodes, scores, n, state, escore.data(), cscore.data(), eflag.data(),
           cflag.data(), mark.data(), actions, actions_capacity(p, n)};
  const int64_t t = state[0];
  for (int64_t i = 0; i < n; ++i) {
    if (levels[i] < 0 || levels[i] > p.top)
      bad("entry " + std::to_string(i) + ": level " + std::to_string(levels[i]) +
          " outside [0, top]");
    eval_entry(p, a, i, t);
  }
  int64_t n_actions;
  if (emulate_threads > 0) {
    BlockEmulationSelect sel(p, a, emulate_threads);
    n_actions = run_policy(p, n, t, sel);
  } else {
    HostSelect sel(p, a);
    n_actions = run_policy(p, n, t, sel);
  }
  int64_t off = 0;
  if (emulate_threads > 0) {
    // The kernel's chunked rewrite: per-thread totals, exclusive offsets, writes.
    for (int64_t tid = 0; tid < emulate_threads; ++tid) {
      int64_t lo, hi;
      chunk_bounds(n, tid, emulate_threads, &lo, &hi);
      write_chunk(p, a, lo, hi, off, out_levels, out_nodes);
      off += chunk_count(p, a, lo, hi);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      write_out(p, a, i, off, out_levels, out_nodes);
      off += out_count(p, a, i);
    }
  }
  state[0] = t + 1;
  return {off, n_actions};
}

}  // namespace alloc
}  // namespace mc
