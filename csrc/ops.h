// Declarations of the native CPU (and, when built, CUDA) entry points. Only bindings.cpp
// includes pybind11; these functions take raw pointers and validated sizes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace prh_fast {

enum class SetMetric { Mutual, Cycle, Lcs, Edit };

// Parses "mutual" | "cycle" | "lcs" | "edit"; throws std::invalid_argument naming `metric`.
SetMetric parse_set_metric(const std::string& name);

// Running top-k update of query rows row0.. against key columns col0.. (see topk_cpu.cpp).
// Returns the number of NaN scores met (they are never inserted).
template <typename T>
int64_t topk_update_cpu(const T* scores, int64_t rows, int64_t cols, int64_t stride_r,
                        int64_t stride_c, int64_t row0, int64_t col0, T* vals, int64_t* idx,
                        int k, bool exclude_self);

// Ascending sorted copy of each length-k row plus original positions.
void sorted_copies(const int64_t* lists, int64_t rows, int k, int64_t* sv, int32_t* sp);

// [La, Lb] means of the per-row raw value (see setops_cpu.cpp).
void neighbour_scores_cpu(SetMetric m, const int64_t* a, int64_t La, const int64_t* b,
                          int64_t Lb, int64_t N, int k, double* out);
// Per-row raw values of one pair of layers.
void neighbour_rows_cpu(SetMetric m, const int64_t* a, const int64_t* b, int64_t N, int k,
                        int64_t* out);

// The five CKNNA sums (see cknna_cpu.cpp): out = {Σ P_ij Q_ji, 1ᵀP1, 1ᵀQ1, 1ᵀPQ1, 1ᵀQP1}.
void cknna_terms_cpu(const int64_t* ia, const double* sa, int ka, const int64_t* ib,
                     const double* sb, int kb, int64_t N, double* out);

int omp_threads();
void set_omp_threads(int n);

#ifdef PRH_FAST_WITH_CUDA
// Device pointers, launched on `stream` (a cudaStream_t passed as an integer).
void neighbour_scores_cuda(SetMetric m, const int64_t* a, int64_t La, const int64_t* b,
                           int64_t Lb, int64_t N, int k, double* out, std::uintptr_t stream);
size_t cknna_workspace_bytes(int64_t N);
void cknna_terms_cuda(const int64_t* ia, const double* sa, int ka, const int64_t* ib,
                      const double* sb, int kb, int64_t N, double* out, void* workspace,
                      std::uintptr_t stream);
#endif

}  // namespace prh_fast
