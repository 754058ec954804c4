// Streaming top-k selection over score tiles (CPU, OpenMP over query rows).
//
// The tile product itself is BLAS (torch.mm on the Python side); this kernel merges a
// [rows, cols] tile, read through arbitrary strides, into each row's running top-k. Most scores
// are rejected by a single compare against the current k-th score.
#include <cmath>

#include "../common/rowops.h"
#include "../ops.h"

namespace prh_fast {

template <typename T>
int64_t topk_update_cpu(const T* scores, int64_t rows, int64_t cols, int64_t stride_r,
                        int64_t stride_c, int64_t row0, int64_t col0, T* vals, int64_t* idx,
                        int k, bool exclude_self) {
  int64_t nans = 0;
  const int64_t abs_r = stride_r < 0 ? -stride_r : stride_r;
  const int64_t abs_c = stride_c < 0 ? -stride_c : stride_c;
  if (abs_r >= abs_c || rows < 2) {
    // Row-major tile (the usual case): each row walks its own contiguous scores.
#pragma omp parallel for schedule(static) reduction(+ : nans)
    for (int64_t r = 0; r < rows; ++r) {
      T* v = vals + r * k;
      int64_t* ix = idx + r * k;
      const T* srow = scores + r * stride_r;
      const int64_t self = row0 + r;
      T worst = v[k - 1];
      for (int64_t c = 0; c < cols; ++c) {
        const T s = srow[c * stride_c];
        if (!(s > worst)) {
          if (s != s) ++nans;
          continue;
        }
        const int64_t j = col0 + c;
        if (exclude_self && j == self) continue;
        topk_insert(v, ix, k, s, j);
        worst = v[k - 1];
      }
    }
    return nans;
  }
  // Column-major tile (e.g. a transposed view): walking one row would stride through memory,
  // so a block of rows advances together, column by column, reading each column's run of
  // consecutive rows. Every row still sees its columns in increasing order (same tie rule).
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) reduction(+ : nans)
  for (int64_t bl = 0; bl < blocks; ++bl) {
    const int64_t r0 = bl * kBlock, r1 = r0 + kBlock < rows ? r0 + kBlock : rows;
    T worst[kBlock];
    for (int64_t r = r0; r < r1; ++r) worst[r - r0] = vals[r * k + k - 1];
    for (int64_t c = 0; c < cols; ++c) {
      const T* scol = scores + c * stride_c;
      const int64_t j = col0 + c;
      for (int64_t r = r0; r < r1; ++r) {
        const T s = scol[r * stride_r];
        if (!(s > worst[r - r0])) {
          if (s != s) ++nans;
          continue;
        }
        if (exclude_self && j == row0 + r) continue;
        topk_insert(vals + r * k, idx + r * k, k, s, j);
        worst[r - r0] = vals[r * k + k - 1];
      }
    }
  }
  return nans;
}

template int64_t topk_update_cpu<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, float*, int64_t*, int, bool);
template int64_t topk_update_cpu<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, double*, int64_t*, int, bool);

}  // namespace prh_fast
