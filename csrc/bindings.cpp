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

// The buffer sizes a step over ``n`` entries needs (std::invalid_argument otherwise).
void check_sizes(const mc::alloc::Params& p, int64_t n, int64_t out_cap, int64_t actions_cap) {
  if (n < 0) throw std::invalid_argument("n must be >= 0");
  if (out_cap < mc::alloc::out_capacity(p, n))
    throw std::invalid_argument("output capacity too small");
  if (actions_cap < mc::alloc::actions_capacity(p, n))
    throw std::invalid_argument("action capacity too small");
}

template <std::size_t N>
py::tuple names(const char* const (&list)[N]) {
  py::tuple out(N);
  for (std::size_t i = 0; i < N; ++i) out[i] = py::str(list[i]);
  return out;
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
  m.attr("ALLOC_ACTION_FIELDS") = names(mc::alloc::kActionFields);
  m.attr("ALLOC_MAX_TOP") = mc::alloc::kMaxLevels - 1;
  m.attr("STEP_PARAM_FIELDS") = names(mc::alloc::kStepParamFields);

  using mc::alloc::Params;
  py::class_<Params> params(
      m, "StepParams",
      "The allocator's parameters for one step (C++ mc::alloc::Params), validated. Build "
      "it with StepParams.from_packed(values): the fields of STEP_PARAM_FIELDS in order, "
      "st_off and st_size spread (top + 1 values each), as float64.");
  params.def_static(
      "from_packed",
      [](const std::vector<double>& packed) {
        return mc::alloc::unpack_params(packed.data(), static_cast<int64_t>(packed.size()));
      },
      py::arg("packed"),
      "Validate a packed list and build the struct (ValueError naming the bad field).");
  params.def("packed", &mc::alloc::pack_params, "The inverse of from_packed.");
#define MC_PARAM_PROPERTY(name, member, type) \
  params.def_property_readonly(#name, [](const Params& p) { return p.member; });
  MC_STEP_PARAM_SCALARS(MC_PARAM_PROPERTY)
#undef MC_PARAM_PROPERTY
  params.def_property_readonly("st_off", [](const Params& p) {
    std::vector<int64_t> out(p.top + 1, 0);
    for (int l = 1; l <= p.top; ++l) out[l] = p.st_off[l];
    return out;
  });
  params.def_property_readonly("st_size", [](const Params& p) {
    std::vector<int64_t> out(p.top + 1, 0);
    for (int l = 1; l <= p.top; ++l) out[l] = p.st_size[l];
    return out;
  });
  params.def("out_capacity", &mc::alloc::out_capacity, py::arg("n"),
             "Entries of the output buffers a step over n entries needs.");
  params.def("actions_capacity", &mc::alloc::actions_capacity, py::arg("n"),
             "Action rows a step over n entries needs.");

  m.def(
      "focus_step_cpu",
      [](std::uintptr_t levels, std::uintptr_t nodes, std::uintptr_t scores, int64_t n,
         std::uintptr_t state, const Params& p, std::uintptr_t out_levels, int64_t out_cap,
         std::uintptr_t out_nodes, std::uintptr_t actions, int64_t actions_cap,
         int64_t emulate_threads) {
        check_sizes(p, n, out_cap, actions_cap);
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
      py::arg("params"), py::arg("out_levels"), py::arg("out_cap"), py::arg("out_nodes"),
      py::arg("actions"), py::arg("actions_cap"), py::arg("emulate_threads") = 0,
      "One focus-allocator step on the host over raw buffers (levels int32 [n], nodes "
      "int64 [n], scores float32 [n], state int64, params a StepParams, out_levels int32 "
      "[out_cap], out_nodes int64 [out_cap], actions float64 [actions_cap, "
      "ALLOC_ACTION_COLS]). Returns (new_n, n_actions). emulate_threads > 0 (a power of "
      "two) selects candidates the way the CUDA kernel does, sequentially (tests).");

#if defined(MC_WITH_CUDA)
  m.def(
      "focus_step_cuda",
      [](std::uintptr_t levels, std::uintptr_t nodes, std::uintptr_t scores, int64_t n,
         std::uintptr_t state, const Params& p, std::uintptr_t out_levels, int64_t out_cap,
         std::uintptr_t out_nodes, std::uintptr_t actions, int64_t actions_cap,
         std::uintptr_t counts, std::uintptr_t scratch, int64_t scratch_bytes,
         std::uintptr_t stream) {
        check_sizes(p, n, out_cap, actions_cap);
        if (scratch_bytes < n * mc::alloc::kScratchBytesPerEntry)
          throw std::invalid_argument("scratch buffer too small");
        mc::alloc::focus_step_device(p, ptr<const int32_t>(levels), ptr<const int64_t>(nodes),
                                     ptr<const float>(scores), n, ptr<int64_t>(state),
                                     ptr<int32_t>(out_levels), ptr<int64_t>(out_nodes),
                                     ptr<double>(actions), ptr<int64_t>(counts),
                                     ptr<uint8_t>(scratch), stream);
      },
      py::arg("levels"), py::arg("nodes"), py::arg("scores"), py::arg("n"), py::arg("state"),
      py::arg("params"), py::arg("out_levels"), py::arg("out_cap"), py::arg("out_nodes"),
      py::arg("actions"), py::arg("actions_cap"), py::arg("counts"), py::arg("scratch"),
      py::arg("scratch_bytes"), py::arg("stream"),
      "Enqueue one focus-allocator step on a CUDA stream (device buffers as for "
      "focus_step_cpu, plus counts int64 [2] <- (new_n, n_actions) and a scratch buffer). "
      "Does not synchronise.");
#endif
}
