#include "cuda_info.h"

namespace mc {

bool cuda_compiled() { return false; }

std::string cuda_build_version() { return ""; }

int cuda_device_count() { return 0; }

}  // namespace mc
