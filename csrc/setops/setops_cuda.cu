// Neighbour-set scores over every pair of layers on the GPU. The per-row logic is the same
// rowops.h code the CPU path runs (and its tests cover); here one thread handles one row of one
// layer pair (blockIdx.y = pair), sums are reduced per block and added atomically.
//
// Built when CMake finds nvcc.
#include <cstdint>

#include "../common/cuda_check.h"
#include "../common/rowops.h"
#include "../ops.h"

namespace prh_fast {
namespace {

__global__ void setops_kernel(int metric, const int64_t* __restrict__ a, const int64_t* __restrict__ b,
                              int64_t Lb, int64_t N, int k,
                              unsigned long long* __restrict__ counts) {
  const int64_t pair = blockIdx.y;
  const int64_t p = pair / Lb, q = pair % Lb;
  const int64_t* a_layer = a + p * N * k;
  const int64_t* b_layer = b + q * N * k;
  int scratch[kCudaMaxK + 1];
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t* ai = a_layer + i * k;
    const int64_t* bi = b_layer + i * k;
    int v = 0;
    switch (metric) {
      case 0: v = count_common_linear(ai, bi, k); break;
      case 1: v = cycle_hit(i, bi, a_layer, nullptr, nullptr, k); break;
      case 2: v = lcs_distinct(ai, nullptr, nullptr, bi, k, scratch); break;
      default: v = edit_distance(ai, nullptr, nullptr, bi, k, scratch); break;
    }
    local += static_cast<unsigned long long>(v);
  }
  __shared__ unsigned long long block_sum;
  if (threadIdx.x == 0) block_sum = 0;
  __syncthreads();
  atomicAdd(&block_sum, local);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(counts + pair, block_sum);
}

__global__ void counts_to_means(const unsigned long long* counts, int64_t pairs, int64_t N,
                                double* out) {
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t < pairs) out[t] = static_cast<double>(counts[t]) / static_cast<double>(N);
}

}  // namespace

void neighbour_scores_cuda(SetMetric m, const int64_t* a, int64_t La, const int64_t* b,
                           int64_t Lb, int64_t N, int k, double* out, std::uintptr_t stream_ptr) {
  if (k > kCudaMaxK)
    throw std::invalid_argument("k: the CUDA neighbour-set kernels support k <= " +
                                std::to_string(kCudaMaxK) + ", got " + std::to_string(k));
  if (La * Lb > 65535)
    throw std::invalid_argument("La, Lb: at most 65535 layer pairs per CUDA call");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  const int64_t pairs = La * Lb;
  unsigned long long* counts = nullptr;
  PRH_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&counts),
                                 pairs * sizeof(unsigned long long), stream));
  PRH_CUDA_CHECK(cudaMemsetAsync(counts, 0, pairs * sizeof(unsigned long long), stream));
  const int threads = 128;
  const int64_t want = (N + threads - 1) / threads;
  const dim3 grid(static_cast<unsigned>(want < 1024 ? want : 1024), static_cast<unsigned>(pairs));
  setops_kernel<<<grid, threads, 0, stream>>>(static_cast<int>(m), a, b, Lb, N, k, counts);
  PRH_CUDA_CHECK_LAUNCH();
  counts_to_means<<<static_cast<unsigned>((pairs + 255) / 256), 256, 0, stream>>>(counts, pairs,
                                                                                  N, out);
  PRH_CUDA_CHECK_LAUNCH();
  PRH_CUDA_CHECK(cudaFreeAsync(counts, stream));
}

}  // namespace prh_fast
