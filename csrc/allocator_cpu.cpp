// Host backend of the focus allocator: the shared core (allocator_core.h) driven by
// sorted candidate queues.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
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

namespace {

// An integer field must hold an integer exactly representable in float64.
template <class T>
T field_value(double v, const char* name) {
  if constexpr (std::is_integral_v<T>) {
    constexpr double kExact = 9007199254740992.0;  // 2^53
    if (!(std::isfinite(v) && v == std::trunc(v) && std::fabs(v) <= kExact))
      bad(std::string("step parameter ") + name + " must be an integer, got " +
          std::to_string(v));
    if (v < static_cast<double>(std::numeric_limits<T>::min()) ||
        v > static_cast<double>(std::numeric_limits<T>::max()))
      bad(std::string("step parameter ") + name + " out of range: " + std::to_string(v));
    return static_cast<T>(v);
  } else {
    return static_cast<T>(v);
  }
}

}  // namespace

Params unpack_params(const double* packed, int64_t len) {
  if (len < kNumScalarParams)
    bad("packed step parameters: expected at least " + std::to_string(kNumScalarParams) +
        " values (" + std::to_string(kNumScalarParams) + " scalars, then st_off and st_size), got " +
        std::to_string(len));
  Params p{};
  int f = 0;
#define MC_PARAM_UNPACK(name, member, type) p.member = field_value<type>(packed[f++], #name);
  MC_STEP_PARAM_SCALARS(MC_PARAM_UNPACK)
#undef MC_PARAM_UNPACK
  const int64_t bs = p.bs, top = p.top;
  if (bs < 2) bad("block_size must be >= 2, got " + std::to_string(bs));
  if (top < 1 || top >= kMaxLevels)
    bad("top level must be in [1, " + std::to_string(kMaxLevels - 1) + "], got " +
        std::to_string(top));
  const int64_t want = kNumScalarParams + 2 * (top + 1);
  if (len != want)
    bad("packed step parameters: expected " + std::to_string(want) + " values (" +
        std::to_string(kNumScalarParams) + " scalars, then st_off and st_size with top + 1 = " +
        std::to_string(top + 1) + " values each), got " + std::to_string(len));
  const double* st_off = packed + kNumScalarParams;
  const double* st_size = st_off + top + 1;
  if (p.num_tokens < 0) bad("num_tokens must be >= 0");
  if (p.w_max <= 0) bad("w_max must be > 0");
  if (p.p0 < 0 || p.p0 > p.num_tokens) bad("protected start out of [0, num_tokens]");
  if (p.n_diff < 0 || p.cooldown < 0 || p.min_residency < 0)
    bad("n_diff, cooldown and min_residency must be >= 0");
  p.span[0] = 1;
  for (int l = 1; l <= top; ++l) {
    if (p.span[l - 1] > (int64_t{1} << 62) / bs) bad("block_size**levels overflows int64");
    p.span[l] = p.span[l - 1] * bs;
  }
  for (int l = 1; l <= top; ++l) {
    p.st_off[l] = field_value<int64_t>(st_off[l], "st_off");
    p.st_size[l] = field_value<int64_t>(st_size[l], "st_size");
    if (p.st_off[l] < 1 || p.st_size[l] < 0) bad("bad state layout at level " + std::to_string(l));
  }
  return p;
}

std::vector<double> pack_params(const Params& p) {
  std::vector<double> out;
  out.reserve(kNumScalarParams + 2 * (p.top + 1));
#define MC_PARAM_PACK(name, member, type) out.push_back(static_cast<double>(p.member));
  MC_STEP_PARAM_SCALARS(MC_PARAM_PACK)
#undef MC_PARAM_PACK
  for (int l = 0; l <= p.top; ++l) out.push_back(static_cast<double>(l >= 1 ? p.st_off[l] : 0));
  for (int l = 0; l <= p.top; ++l) out.push_back(static_cast<double>(l >= 1 ? p.st_size[l] : 0));
  return out;
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
