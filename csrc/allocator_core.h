// The focus allocator's decision logic, written once for the host and the device.
//
// Every function here is MC_HD: the C++ backend (allocator_cpu.cpp) runs it on the
// host, the CUDA backend (allocator_cuda.cu) runs the very same code inside one
// thread block. Only the way the next-best candidate is *found* differs (a sorted
// array on the host, a block-wide arg-best on the device); the candidates, masks,
// order, alternation, budget rule, invalidation and the rewrite of the working
// context are these functions. The Python reference (megacontext/allocator.py) is
// the specification; docs/allocator.md states the rules.
//
// Data layout (all row-major, no padding):
//   levels  int32 [n]   LOD of each entry        nodes  int64 [n]  node index
//   scores  float [n]   LensNet utility          state  int64 [1 + sum(st_size)]
//   state[0] is the step counter t; state[st_off[l] + b] is the step at which gist
//   node (l, b) was last expanded or collapsed into (kNever = never).
#pragma once

#include <cstdint>

#include "common.h"

namespace mc {
namespace alloc {

constexpr int kMaxLevels = 8;  // levels 0..top with top <= 7
constexpr int64_t kNever = -1;
constexpr int kActionCols = 6;  // step, kind, level, node, score, cost_delta

enum Kind : int { kExpand = 0, kCollapse = 1 };
enum Mark : uint8_t { kKeep = 0, kExpanded = 1, kHead = 2, kMember = 3 };

// The step's scalar parameters, in the order they cross Python -> C++: the Python
// ``StepParams`` dataclass has these fields in this order (tests/test_focus_allocator.py
// checks), ``_C.STEP_PARAM_FIELDS`` lists them, and the packed float64 list that the
// ``megacontext::focus_step`` op takes holds them in this order followed by ``st_off``
// and ``st_size`` (top + 1 values each). X(python name, Params member, C++ type).
#define MC_STEP_PARAM_SCALARS(X)                                                     \
  X(block_size, bs, int64_t)         /* children per node */                         \
  X(top, top, int32_t)               /* top level (tree.levels) */                   \
  X(num_tokens, num_tokens, int64_t) /* T */                                          \
  X(w_max, w_max, int64_t)                                                           \
  X(p0, p0, int64_t)                 /* first protected token */                     \
  X(n_diff, n_diff, int64_t)                                                         \
  X(cooldown, cooldown, int64_t)                                                     \
  X(min_residency, min_residency, int64_t)                                           \
  X(tau_expand, tau_expand, double)                                                  \
  X(tau_collapse, tau_collapse, double)

struct Params {
#define MC_PARAM_MEMBER(name, member, type) type member;
  MC_STEP_PARAM_SCALARS(MC_PARAM_MEMBER)
#undef MC_PARAM_MEMBER
  int64_t span[kMaxLevels];     // bs^l, l = 0..top (derived)
  int64_t st_off[kMaxLevels];   // state offset of level l (l >= 1)
  int64_t st_size[kMaxLevels];  // state slots of level l (l >= 1)
};

// Field names in crossing order: the scalars, then the two per-level arrays.
constexpr const char* kStepParamFields[] = {
#define MC_PARAM_NAME(name, member, type) #name,
    MC_STEP_PARAM_SCALARS(MC_PARAM_NAME)
#undef MC_PARAM_NAME
        "st_off",
    "st_size"};
constexpr int kNumStepParamFields = sizeof(kStepParamFields) / sizeof(kStepParamFields[0]);
constexpr int kNumScalarParams = kNumStepParamFields - 2;

// Columns of an action row, in order (the Python ``Action`` fields).
constexpr const char* kActionFields[] = {"step", "kind", "level", "node", "score", "cost_delta"};
static_assert(sizeof(kActionFields) / sizeof(kActionFields[0]) == kActionCols,
              "kActionFields names every action column");

// One step's views. Loop bookkeeping (cost, taken, n_actions) lives in the policy
// functions' locals so that every device thread carries the same copy.
struct Arrays {
  const int32_t* levels;
  const int64_t* nodes;
  const float* scores;
  int64_t n;
  int64_t* state;
  double* escore;  // expand score of entry i (valid when eflag[i])
  double* cscore;  // collapse score of the group headed by entry i (valid when cflag[i])
  uint8_t* eflag;
  uint8_t* cflag;
  uint8_t* mark;
  double* actions;  // [actions_cap, kActionCols]
  int64_t actions_cap;
};

struct Cand {
  double score;
  int64_t start;  // span of the candidate (the gist, or the parent of the group)
  int64_t end;
  int64_t entry;  // the gist's entry, or the group's first entry
  int32_t level;  // level of the entries that change (gist level / children level)
  int64_t node;   // node of the entry at ``entry``
};

MC_HD inline int64_t last_change(const Params& p, const int64_t* state, int level,
                                 int64_t node) {
  if (level < 1 || level > p.top || node < 0 || node >= p.st_size[level]) return kNever;
  return state[p.st_off[level] + node];
}

MC_HD inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The step at which the entry (level, node) appeared in the WC: the later of a
// collapse into it and an expand of its parent (kNever: present since the start).
MC_HD inline int64_t created(const Params& p, const int64_t* state, int level, int64_t node) {
  int64_t c = level >= 1 ? last_change(p, state, level, node) : kNever;
  if (level < p.top) c = max64(c, last_change(p, state, level + 1, node / p.bs));
  return c;
}

MC_HD inline bool too_recent(int64_t t, int64_t when, int64_t window) {
  return when != kNever && t - when < window;
}

// Expand candidate at entry i: a gist above the threshold, outside the protected
// tail, past its cooldown and, when it was created by a collapse (flipping back),
// past its minimum residency.
MC_HD inline bool eval_expand(const Params& p, const Arrays& a, int64_t i, int64_t t,
                              double* score) {
  const int level = a.levels[i];
  if (level < 1 || level > p.top) return false;
  const double s = static_cast<double>(a.scores[i]);
  if (!(s > p.tau_expand)) return false;  // also rejects NaN
  const int64_t node = a.nodes[i];
  if (node < 0 || node >= p.st_size[level]) return false;  // memory safety on bad input
  const int64_t end = (node + 1) * p.span[level];
  if (end > p.p0) return false;
  if (too_recent(t, created(p, a.state, level, node), p.cooldown)) return false;
  const int64_t self = last_change(p, a.state, level, node);
  const int64_t parent = level < p.top ? last_change(p, a.state, level + 1, node / p.bs) : kNever;
  if (self != kNever && self > parent && t - self < p.min_residency) return false;
  *score = s;
  return true;
}

// Collapse candidate headed by entry i: entries i..i+bs-1 are exactly the bs
// children of one parent at level <= top, outside the protected tail, none created
// within the cooldown, and the parent's expand (if any) at least min_residency old.
// Its score is the mean of the children's scores, summed in order in double.
// No threshold here: the over-budget phase takes any legal collapse.
MC_HD inline bool eval_collapse(const Params& p, const Arrays& a, int64_t i, int64_t t,
                                double* score) {
  const int level = a.levels[i];
  if (level < 0 || level >= p.top) return false;
  const int64_t node = a.nodes[i];
  if (node % p.bs != 0 || i + p.bs > a.n) return false;
  for (int64_t j = 1; j < p.bs; ++j) {
    if (a.levels[i + j] != level || a.nodes[i + j] != node + j) return false;
  }
  const int64_t parent = node / p.bs;
  if (node < 0 || parent >= p.st_size[level + 1]) return false;  // memory safety on bad input
  if ((parent + 1) * p.span[level + 1] > p.p0) return false;
  const int64_t pchange = last_change(p, a.state, level + 1, parent);
  for (int64_t j = 0; j < p.bs; ++j) {
    int64_t c = level >= 1 ? last_change(p, a.state, level, node + j) : kNever;
    c = max64(c, pchange);
    if (too_recent(t, c, p.cooldown)) return false;
  }
  if (too_recent(t, pchange, p.min_residency)) return false;
  double acc = 0.0;
  for (int64_t j = 0; j < p.bs; ++j) acc += static_cast<double>(a.scores[i + j]);
  const double mean = acc / static_cast<double>(p.bs);
  if (mean != mean) return false;  // NaN: not a candidate
  *score = mean;
  return true;
}

// Phase A for one entry: fill its expand and collapse slots.
MC_HD inline void eval_entry(const Params& p, const Arrays& a, int64_t i, int64_t t) {
  double s = 0.0;
  a.eflag[i] = eval_expand(p, a, i, t, &s) ? 1 : 0;
  a.escore[i] = s;
  s = 0.0;
  a.cflag[i] = eval_collapse(p, a, i, t, &s) ? 1 : 0;
  a.cscore[i] = s;
  a.mark[i] = kKeep;
}

MC_HD inline Cand make_cand(const Params& p, const Arrays& a, int64_t i, int kind) {
  Cand c;
  c.entry = i;
  c.level = a.levels[i];
  c.node = a.nodes[i];
  if (kind == kExpand) {
    c.score = a.escore[i];
    c.start = c.node * p.span[c.level];
    c.end = c.start + p.span[c.level];
  } else {
    c.score = a.cscore[i];
    const int64_t parent = c.node / p.bs;
    c.start = parent * p.span[c.level + 1];
    c.end = c.start + p.span[c.level + 1];
  }
  return c;
}

// Strict total order of one queue (distinct candidates have disjoint spans, so
// their ends differ): expand = highest score, then newest (largest end), then
// start; collapse = lowest score, then oldest (smallest end), then start.
MC_HD inline bool better(int kind, const Cand& x, const Cand& y) {
  if (kind == kExpand) {
    if (x.score != y.score) return x.score > y.score;
    if (x.end != y.end) return x.end > y.end;
    return x.start > y.start;
  }
  if (x.score != y.score) return x.score < y.score;
  if (x.end != y.end) return x.end < y.end;
  return x.start < y.start;
}

// The device's arg-best, in two shared pieces. Thread ``tid`` of ``nthreads`` scans
// entries tid, tid + nthreads, ... for the best live candidate of a queue (-1: none);
// a tree reduction then combines the threads' winners pairwise with pick_better.
// The host can run the same two functions sequentially (BlockEmulationSelect in
// allocator_cpu.cpp) so the CPU tests cover them too.
MC_HD inline int64_t thread_best(const Params& p, const Arrays& a, int kind, int64_t tid,
                                 int64_t nthreads) {
  const uint8_t* flag = kind == kExpand ? a.eflag : a.cflag;
  int64_t mine = -1;
  for (int64_t i = tid; i < a.n; i += nthreads) {
    if (!flag[i]) continue;
    if (mine < 0 || better(kind, make_cand(p, a, i, kind), make_cand(p, a, mine, kind))) mine = i;
  }
  return mine;
}

MC_HD inline int64_t pick_better(const Params& p, const Arrays& a, int kind, int64_t x,
                                 int64_t y) {
  if (y < 0) return x;
  if (x < 0) return y;
  return better(kind, make_cand(p, a, y, kind), make_cand(p, a, x, kind)) ? y : x;
}

// Apply one action (on the device: by one thread). Marks the entries for the
// rewrite, removes the candidates whose spans overlap it, records the hysteresis
// state and appends the action row.
MC_HD inline void apply_action(const Params& p, const Arrays& a, const Cand& c, int kind,
                               int64_t t, int64_t action_index) {
  double* row = a.actions + action_index * kActionCols;
  row[0] = static_cast<double>(t);
  row[1] = static_cast<double>(kind);
  if (kind == kExpand) {
    a.mark[c.entry] = kExpanded;
    a.eflag[c.entry] = 0;
    // The only collapse group that contains this gist is headed by its first sibling.
    const int64_t head = c.entry - c.node % p.bs;
    if (head >= 0) a.cflag[head] = 0;
    a.state[p.st_off[c.level] + c.node] = t;
    row[2] = static_cast<double>(c.level);
    row[3] = static_cast<double>(c.node);
    row[5] = static_cast<double>(p.bs - 1);
  } else {
    a.mark[c.entry] = kHead;
    a.cflag[c.entry] = 0;
    for (int64_t j = 0; j < p.bs; ++j) {
      if (j) a.mark[c.entry + j] = kMember;
      a.eflag[c.entry + j] = 0;
    }
    const int64_t parent = c.node / p.bs;
    a.state[p.st_off[c.level + 1] + parent] = t;
    row[2] = static_cast<double>(c.level + 1);
    row[3] = static_cast<double>(parent);
    row[5] = static_cast<double>(-(p.bs - 1));
  }
  row[4] = c.score;
}

// The policy, phase B. ``Sel`` finds the best live candidate of a queue
// (``best(kind, &cand)``) and applies actions (``apply(cand, kind, t, index)``);
// everything else (the order of decisions) is here. Returns the number of actions.
//   1. over budget: collapse, lowest score first, ignoring the threshold and
//      n_diff, until the cost fits or no legal collapse is left;
//   2. up to n_diff actions, alternating expand and collapse (expand first); an
//      expand that would exceed w_max is preceded by thresholded collapses until
//      it fits (each counts toward n_diff); a queue that is empty yields its turn;
//      stop at n_diff actions or when no action is possible.
template <class Sel>
MC_HD inline int64_t run_policy(const Params& p, int64_t n, int64_t t, Sel& sel) {
  const int64_t delta = p.bs - 1;
  int64_t cost = n;
  int64_t count = 0;
  Cand c;
  while (cost > p.w_max && sel.best(kCollapse, &c)) {
    sel.apply(c, kCollapse, t, count++);
    cost -= delta;
  }
  int64_t taken = 0;
  bool expand_turn = true;
  while (taken < p.n_diff) {
    bool acted = false;
    if (expand_turn) {
      expand_turn = false;
      while (taken < p.n_diff) {
        Cand e;
        if (!sel.best(kExpand, &e)) break;
        if (cost + delta <= p.w_max) {
          sel.apply(e, kExpand, t, count++);
          cost += delta;
          ++taken;
          acted = true;
          break;
        }
        Cand k;
        if (!sel.best(kCollapse, &k) || !(k.score < -p.tau_collapse)) break;
        sel.apply(k, kCollapse, t, count++);
        cost -= delta;
        ++taken;
        acted = true;
      }
      if (acted) continue;
    } else {
      expand_turn = true;
    }
    Cand k;
    if (sel.best(kCollapse, &k) && k.score < -p.tau_collapse) {
      sel.apply(k, kCollapse, t, count++);
      cost -= delta;
      ++taken;
      continue;
    }
    // No thresholded collapse left: only an expand that fits can still happen.
    Cand e;
    if (!sel.best(kExpand, &e) || cost + delta > p.w_max) break;
  }
  return count;
}

// Phase C: entries each old entry becomes, and writing them at offset ``off``.
MC_HD inline int64_t out_count(const Params& p, const Arrays& a, int64_t i) {
  switch (a.mark[i]) {
    case kExpanded:
      return p.bs;
    case kMember:
      return 0;
    default:
      return 1;
  }
}

MC_HD inline void write_out(const Params& p, const Arrays& a, int64_t i, int64_t off,
                            int32_t* out_levels, int64_t* out_nodes) {
  const int32_t level = a.levels[i];
  const int64_t node = a.nodes[i];
  switch (a.mark[i]) {
    case kExpanded:
      for (int64_t j = 0; j < p.bs; ++j) {
        out_levels[off + j] = level - 1;
        out_nodes[off + j] = node * p.bs + j;
      }
      break;
    case kHead:
      out_levels[off] = level + 1;
      out_nodes[off] = node / p.bs;
      break;
    case kMember:
      break;
    default:
      out_levels[off] = level;
      out_nodes[off] = node;
  }
}

// Phase C on the device: thread ``tid`` rewrites the contiguous chunk [lo, hi) of
// the input; a block scan of the chunks' out_count totals gives its offset.
MC_HD inline void chunk_bounds(int64_t n, int64_t tid, int64_t nthreads, int64_t* lo,
                               int64_t* hi) {
  const int64_t chunk = (n + nthreads - 1) / nthreads;
  *lo = tid * chunk < n ? tid * chunk : n;
  *hi = *lo + chunk < n ? *lo + chunk : n;
}

MC_HD inline int64_t chunk_count(const Params& p, const Arrays& a, int64_t lo, int64_t hi) {
  int64_t total = 0;
  for (int64_t i = lo; i < hi; ++i) total += out_count(p, a, i);
  return total;
}

MC_HD inline void write_chunk(const Params& p, const Arrays& a, int64_t lo, int64_t hi,
                              int64_t off, int32_t* out_levels, int64_t* out_nodes) {
  for (int64_t i = lo; i < hi; ++i) {
    write_out(p, a, i, off, out_levels, out_nodes);
    off += out_count(p, a, i);
  }
}

}  // namespace alloc
}  // namespace mc
