// Limits shared by the kernels and the Python layer. Kept free of CUDA headers so that the
// bindings can export them (as attributes of prh_fast._C) in every build configuration.
#pragma once

namespace prh_fast {
// The CUDA neighbour-set and CKNNA kernels keep per-thread scratch in local arrays of this
// many entries, so they take neighbour lists of at most this length (exported as
// prh_fast._C.CUDA_MAX_K).
constexpr int kCudaMaxK = 256;
}  // namespace prh_fast
