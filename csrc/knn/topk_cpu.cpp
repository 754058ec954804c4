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

template int64_t topk_update_cpu<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, float*, int64_t*, int, bool);
template int64_t topk_update_cpu<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, double*, int64_t*, int, bool);

}  // namespace prh_fast
