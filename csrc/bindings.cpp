// pybind11 bindings for megacontext._C. The extension does not link against
// torch: tensors cross this boundary as raw data pointers plus sizes (and the
// CUDA stream for device work), so the wheel is independent of the torch build.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "allocator.h"
#include "common.h"
#include "cuda_info.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

mc::alloc::Params params_from(int64_t block_size, int32_t top, int64_t num_tokens, int64_t w_max,
                              int64_t p0, int64_t n_diff, int64_t cooldown,
                              int64_t min_residency, double tau_expand, double tau_collapse,
                              const std::vector<int64_t>& st_off,
                              const std::vector<int64_t>& st_size) {
  if (st_off.size() != st_size.size())
    throw std::invalid_argument("state offsets and sizes differ in length");
  return mc::alloc::make_params(block_size, top, num_tokens, w_max, p0, n_diff, cooldown,
                                min_residency, tau_expand, tau_collapse, st_off.data(),
                                st_size.data(), static_cast<int>(st_off.size()));
}

}  // namespace

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

  m.attr("ALLOC_SCRATCH_BYTES_PER_ENTRY") = mc::alloc::kScratchBytesPerEntry;
  m.attr("ALLOC_ACTION_COLS") = mc::alloc::kActionCols;

  m.def(
      "focus_step_cpu",
      [](std::uintptr_t levels, std::uintptr_t nodes, std::uintptr_t scores, int64_t n,
         std::uintptr_t state, const std::vector<int64_t>& st_off,
         const std::vector<int64_t>& st_size, int64_t block_size, int32_t top,
         int64_t num_tokens, int64_t w_max, int64_t p0, int64_t n_diff, int64_t cooldown,
         int64_t min_residency, double tau_expand, double tau_collapse,
         std::uintptr_t out_levels, int64_t out_cap, std::uintptr_t out_nodes,
         std::uintptr_t actions, int64_t actions_cap, int64_t emulate_threads) {
        const auto p = params_from(block_size, top, num_tokens, w_max, p0, n_diff, cooldown,
                                   min_residency, tau_expand, tau_collapse, st_off, st_size);
        if (n < 0) throw std::invalid_argument("n must be >= 0");
        if (out_cap < mc::alloc::out_capacity(p, n))
          throw std::invalid_argument("output capacity too small");
        if (actions_cap < mc::alloc::actions_capacity(p, n))
          throw std::invalid_argument("action capacity too small");
        mc::alloc::StepResult r;
        {
          py::gil_scoped_release release;
          r = mc::alloc::focus_step_host(p, ptr<const int32_t>(levels), ptr<const int64_t>(nodes),
                                         ptr<const float>(scores), n, ptr<int64_t>(state),
                                         ptr<int32_t>(out_levels), ptr<int64_t>(out_nodes),
                                         ptr<double>(actions), emulate_threads);
        }
        return py::make_tuple(r.new_n, r.n_actions);
      },
      py::arg("levels"), py::arg("nodes"), py::arg("scores"), py::arg("n"), py::arg("state"),
      py::arg("st_off"), py::arg("st_size"), py::arg("block_size"), py::arg("top"),
      py::arg("num_tokens"), py::arg("w_max"), py::arg("p0"), py::arg("n_diff"),
      py::arg("cooldown"), py::arg("min_residency"), py::arg("tau_expand"),
      py::arg("tau_collapse"), py::arg("out_levels"), py::arg("out_cap"), py::arg("out_nodes"),
      py::arg("actions"), py::arg("actions_cap"), py::arg("emulate_threads") = 0,
      "One focus-allocator step on the host over raw buffers (levels int32 [n], nodes "
      "int64 [n], scores float32 [n], state int64, out_levels int32 [out_cap], out_nodes "
      "int64 [out_cap], actions float64 [actions_cap, 6]). Returns (new_n, n_actions). "
      "emulate_threads > 0 (a power of two) selects candidates the way the CUDA kernel "
      "does, sequentially (tests).");

#if defined(MC_WITH_CUDA)
  m.def(
      "focus_step_cuda",
      [](std::uintptr_t levels, std::uintptr_t nodes, std::uintptr_t scores, int64_t n,
         std::uintptr_t state, const std::vector<int64_t>& st_off,
         const std::vector<int64_t>& st_size, int64_t block_size, int32_t top,
         int64_t num_tokens, int64_t w_max, int64_t p0, int64_t n_diff, int64_t cooldown,
         int64_t min_residency, double tau_expand, double tau_collapse,
         std::uintptr_t out_levels, int64_t out_cap, std::uintptr_t out_nodes,
         std::uintptr_t actions, int64_t actions_cap, std::uintptr_t counts,
         std::uintptr_t scratch, int64_t scratch_bytes, std::uintptr_t stream) {
        const auto p = params_from(block_size, top, num_tokens, w_max, p0, n_diff, cooldown,
                                   min_residency, tau_expand, tau_collapse, st_off, st_size);
        if (n < 0) throw std::invalid_argument("n must be >= 0");
        if (out_cap < mc::alloc::out_capacity(p, n))
          throw std::invalid_argument("output capacity too small");
        if (actions_cap < mc::alloc::actions_capacity(p, n))
          throw std::invalid_argument("action capacity too small");
        if (scratch_bytes < n * mc::alloc::kScratchBytesPerEntry)
          throw std::invalid_argument("scratch buffer too small");
        mc::alloc::focus_step_device(p, ptr<const int32_t>(levels), ptr<const int64_t>(nodes),
                                     ptr<const float>(scores), n, ptr<int64_t>(state),
                                     ptr<int32_t>(out_levels), ptr<int64_t>(out_nodes),
                                     ptr<double>(actions), ptr<int64_t>(counts),
                                     ptr<uint8_t>(scratch), stream);
      },
      "Enqueue one focus-allocator step on a CUDA stream (device buffers as for "
      "focus_step_cpu, plus counts int64 [2] <- (new_n, n_actions) and a scratch buffer). "
      "Does not synchronise.");
#endif
}
