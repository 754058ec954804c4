// CKNNA's five sums on the GPU, one thread per row, reusing rowops.h's cknna_row (the code the
// CPU tests cover). Row sums go to a workspace, column sums are atomic scatters, and a second
// kernel reduces Σ_j colsum·rowsum. Built when CMake finds nvcc.
#include <cstdint>

#include "../common/cuda_check.h"
#include "../common/rowops.h"
#include "../ops.h"

namespace prh_fast {
namespace {

// workspace layout: row_p[N], row_q[N], col_p[N], col_q[N] (doubles)
__global__ void cknna_rows_kernel(const int64_t* ia, const double* sa, int ka, const int64_t* ib,
                                  const double* sb, int kb, int64_t N, double* ws, double* out) {
  double* row_p = ws;
  double* row_q = ws + N;
  double* col_p = ws + 2 * N;
  double* col_q = ws + 3 * N;
  int64_t js[kCudaMaxK];
  double ps[kCudaMaxK], qs[kCudaMaxK];
  double t_local = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N;
       i += (int64_t)gridDim.x * blockDim.x) {
    CknnaRowSums sums;
    const int m = cknna_row(i, ia + i * ka, sa + i * ka, ka, ib + i * kb, sb + i * kb, kb,
                            nullptr, nullptr, nullptr, nullptr, ia, ib, sa, sb, js, ps, qs, &sums);
    row_p[i] = sums.row_p;
    row_q[i] = sums.row_q;
    t_local += sums.t;
    for (int u = 0; u < m; ++u) {
      atomicAdd(col_p + js[u], ps[u]);
      atomicAdd(col_q + js[u], qs[u]);
    }
  }
  atomicAdd(out, t_local);
}

__global__ void cknna_reduce_kernel(const double* ws, int64_t N, double* out) {
  const double* row_p = ws;
  const double* row_q = ws + N;
  const double* col_p = ws + 2 * N;
  const double* col_q = ws + 3 * N;
  double sp = 0, sq = 0, pq = 0, qp = 0;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < N;
       j += (int64_t)gridDim.x * blockDim.x) {
    sp += row_p[j];
    sq += row_q[j];
    pq += col_p[j] * row_q[j];
    qp += col_q[j] * row_p[j];
  }
  atomicAdd(out + 1, sp);
  atomicAdd(out + 2, sq);
  atomicAdd(out + 3, pq);
  atomicAdd(out + 4, qp);
}

}  // namespace

size_t cknna_workspace_bytes(int64_t N) { return static_cast<size_t>(4 * N) * sizeof(double); }

void cknna_terms_cuda(const int64_t* ia, const double* sa, int ka, const int64_t* ib,
                      const double* sb, int kb, int64_t N, double* out, void* workspace,
                      std::uintptr_t stream_ptr) {
  if (ka > kCudaMaxK || kb > kCudaMaxK)
    throw std::invalid_argument("k: the CUDA CKNNA kernel supports k <= " +
                                std::to_string(kCudaMaxK));
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_ptr);
  double* ws = static_cast<double*>(workspace);
  PRH_CUDA_CHECK(cudaMemsetAsync(ws, 0, cknna_workspace_bytes(N), stream));
  PRH_CUDA_CHECK(cudaMemsetAsync(out, 0, 5 * sizeof(double), stream));
  const int threads = 128;
  const int64_t want = (N + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  cknna_rows_kernel<<<blocks, threads, 0, stream>>>(ia, sa, ka, ib, sb, kb, N, ws, out);
  PRH_CUDA_CHECK_LAUNCH();
  cknna_reduce_kernel<<<blocks, threads, 0, stream>>>(ws, N, out);
  PRH_CUDA_CHECK_LAUNCH();
}

}  // namespace prh_fast
