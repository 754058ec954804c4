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

// The rows behind a score tile, for fixed-order scores of the entries that enter the lists:
// query row r is q + r * q_stride, key column c is keys + c * k_stride, both of length d;
// fixed[r * k + t] is entry t's score (moved along with vals / idx). fixed == nullptr: none.
template <typename T>
struct FixedRows {
  const T* q = nullptr;
  int64_t q_stride = 0;
  const T* keys = nullptr;
  int64_t k_stride = 0;
  int64_t d = 0;
  double* fixed = nullptr;
};

// Running top-k update of query rows row0.. against key columns col0.. (see topk_cpu.cpp).
// Returns the number of NaN scores met (they are never inserted).
template <typename T>
int64_t topk_update_cpu(const T* scores, int64_t rows, int64_t cols, int64_t stride_r,
                        int64_t stride_c, int64_t row0, int64_t col0, T* vals, int64_t* idx,
                        int k, bool exclude_self, const FixedRows<T>& fx);

// Merge row r of a [rows, cols] float32 score tile (row stride stride_r, unit column stride;
// column c is key ids[c], in any order) into the running list targets[r] of vals / idx
// [R, k] (float64), in place. The tile scores only filter: a key enters when its fixed-order
// float64 score dot_fixed(q row r, keys row c) ranks before the list's last entry, and a tile
// score more than margin[r] below that entry's score (the tile product's rounding bound)
// skips the key. Lists are ordered by fixed score desc, ties by key id asc, empty slots
// (-inf / -1) last; the result depends neither on the order in which keys arrive nor on the
// tile's rounding. targets must be distinct and in 0..R-1. Returns the NaN scores met.
int64_t topk_scatter_cpu(const float* scores, int64_t rows, int64_t cols, int64_t stride_r,
                         const float* q, int64_t q_stride, const float* keys, int64_t k_stride,
                         int64_t d, const double* margin, const int64_t* ids,
                         const int64_t* targets, double* vals, int64_t* idx, int k);

// out[p] = dot_fixed(x row i[p], y row j[p]) (rowops.h), for p < pairs.
template <typename T>
void pair_dots_cpu(const T* x, int64_t x_stride, const T* y, int64_t y_stride, int64_t d,
                   const int64_t* i, const int64_t* j, int64_t pairs, double* out);

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
