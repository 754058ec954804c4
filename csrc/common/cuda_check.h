// Error checking for CUDA runtime calls and kernel launches: failures become
// std::runtime_error (RuntimeError in Python) carrying the CUDA error string and location.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "limits.h"  // kCudaMaxK, used by every kernel that includes this header

#define PRH_CUDA_CHECK(expr)                                                               \
  do {                                                                                     \
    cudaError_t err__ = (expr);                                                            \
    if (err__ != cudaSuccess)                                                              \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err__) +   \
                               " at " __FILE__ ":" + std::to_string(__LINE__) + " (" #expr ")"); \
  } while (0)

#define PRH_CUDA_CHECK_LAUNCH() PRH_CUDA_CHECK(cudaGetLastError())
