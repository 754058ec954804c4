// Streaming top-k selection over score tiles, scattered top-k merges (IVF cells), and
// fixed-order re-scoring (CPU, OpenMP over query rows).
//
// The tile product itself is BLAS (torch.mm on the Python side); this kernel merges a
// [rows, cols] tile, read through arbitrary strides, into each row's running top-k. Most scores
// are rejected by a single compare against the current k-th score. BLAS sums each product in
// an order that depends on the tile (shape, position), so two equal key rows can get scores one
// ulp apart; when the caller passes the tile's query and key rows, every entry that enters a
// list also gets its fixed-order float64 score (rowops.h: dot_fixed), which depends on the two
// rows only. The Python side ranks the final lists by those (prh_fast/knn/_exact.py).
#include <cmath>

#include "../common/rowops.h"
#include "../ops.h"

namespace prh_fast {

namespace {

constexpr int64_t kScan = 16;         // scores per branch-free test of a contiguous row
constexpr int64_t kColumnBlock = 64;  // rows that advance together through a column-major tile

// Whether any of the kScan scores at s could enter a list whose last score is `worst`, or is
// NaN (counted by the scalar loop): `!(x <= worst)` is true exactly for x > worst and for NaN.
// No early exit, so the compiler turns the loop into a few vector compares.
template <typename T>
inline bool block_may_enter(const T* s, T worst) {
  int hit = 0;
  for (int64_t e = 0; e < kScan; ++e) hit |= !(s[e] <= worst);
  return hit != 0;
}

// Same for a column of kColumnBlock consecutive rows, each against its own row's last score.
template <typename T>
inline bool column_may_enter(const T* s, const T* worst) {
  int hit = 0;
  for (int64_t e = 0; e < kColumnBlock; ++e) hit |= !(s[e] <= worst[e]);
  return hit != 0;
}

}  // namespace

template <typename T>
int64_t topk_update_cpu(const T* scores, int64_t rows, int64_t cols, int64_t stride_r,
                        int64_t stride_c, int64_t row0, int64_t col0, T* vals, int64_t* idx,
                        int k, bool exclude_self, const FixedRows<T>& fx) {
  int64_t nans = 0;
  const int64_t abs_r = stride_r < 0 ? -stride_r : stride_r;
  const int64_t abs_c = stride_c < 0 ? -stride_c : stride_c;
  const bool pay = fx.fixed != nullptr;
  if (abs_r >= abs_c || rows < 2) {
    // Row-major tile (the usual case): each row walks its own contiguous scores.
#pragma omp parallel for schedule(static) reduction(+ : nans)
    for (int64_t r = 0; r < rows; ++r) {
      T* v = vals + r * k;
      int64_t* ix = idx + r * k;
      const T* srow = scores + r * stride_r;
      const int64_t self = row0 + r;
      T worst = v[k - 1];
      auto scan_one = [&](const T s, const int64_t cc) {
        if (!(s > worst)) {
          if (s != s) ++nans;
          return;
        }
        const int64_t j = col0 + cc;
        if (exclude_self && j == self) return;
        if (pay)
          topk_insert_payload(v, ix, fx.fixed + r * k, k, s, j,
                              dot_fixed(fx.q + r * fx.q_stride, fx.keys + cc * fx.k_stride, fx.d));
        else
          topk_insert(v, ix, k, s, j);
        worst = v[k - 1];
      };
      int64_t c = 0;
      if (stride_c == 1) {
        // Contiguous row: most blocks of kScan scores hold no entrant and no NaN, which one
        // branch-free test per block (vectorised by the compiler) establishes; only blocks
        // that fail it take the scalar loop below.
        for (; c + kScan <= cols; c += kScan) {
          if (!block_may_enter(srow + c, worst)) continue;
          for (int64_t e = c; e < c + kScan; ++e) scan_one(srow[e], e);
        }
      }
      for (; c < cols; ++c) scan_one(srow[c * stride_c], c);
    }
    return nans;
  }
  // Column-major tile (e.g. a transposed view): walking one row would stride through memory,
  // so a block of rows advances together, column by column, reading each column's run of
  // consecutive rows. Every row still sees its columns in increasing order (same tie rule).
  constexpr int64_t kBlock = kColumnBlock;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) reduction(+ : nans)
  for (int64_t bl = 0; bl < blocks; ++bl) {
    const int64_t r0 = bl * kBlock, r1 = r0 + kBlock < rows ? r0 + kBlock : rows;
    T worst[kBlock];
    for (int64_t r = r0; r < r1; ++r) worst[r - r0] = vals[r * k + k - 1];
    const bool full = stride_r == 1 && r1 - r0 == kBlock;
    for (int64_t c = 0; c < cols; ++c) {
      const T* scol = scores + c * stride_c;
      const int64_t j = col0 + c;
      // A contiguous run of kBlock rows: one branch-free test (vectorised) against the rows'
      // current last scores rejects the whole column for this block in the common case.
      if (full && !column_may_enter(scol + r0, worst)) continue;
      for (int64_t r = r0; r < r1; ++r) {
        const T s = scol[r * stride_r];
        if (!(s > worst[r - r0])) {
          if (s != s) ++nans;
          continue;
        }
        if (exclude_self && j == row0 + r) continue;
        if (pay)
          topk_insert_payload(vals + r * k, idx + r * k, fx.fixed + r * k, k, s, j,
                              dot_fixed(fx.q + r * fx.q_stride, fx.keys + c * fx.k_stride, fx.d));
        else
          topk_insert(vals + r * k, idx + r * k, k, s, j);
        worst[r - r0] = vals[r * k + k - 1];
      }
    }
  }
  return nans;
}

// Tie-aware order of list entries: higher score first, then lower key id; an empty slot
// (id < 0) ranks after every entry.
inline bool ranks_before(double s, int64_t j, double vs, int64_t vj) {
  return s > vs || (s == vs && (vj < 0 || j < vj));
}

int64_t topk_scatter_cpu(const float* scores, int64_t rows, int64_t cols, int64_t stride_r,
                         const float* q, int64_t q_stride, const float* keys, int64_t k_stride,
                         int64_t d, const double* margin, const int64_t* ids,
                         const int64_t* targets, double* vals, int64_t* idx, int k) {
  int64_t nans = 0;
#pragma omp parallel for schedule(static) reduction(+ : nans)
  for (int64_t r = 0; r < rows; ++r) {
    double* v = vals + targets[r] * k;
    int64_t* ix = idx + targets[r] * k;
    const float* srow = scores + r * stride_r;
    const float* qrow = q + r * q_stride;
    // A key whose tile score is below the list's last fixed score by more than the tile's
    // rounding bound cannot enter; the others are ranked by their fixed-order score.
    const double m = margin[r];
    float cut = std::nextafter(static_cast<float>(v[k - 1] - m), -INFINITY);
    auto scan_one = [&](const int64_t c) {
      const float s = srow[c];
      if (!(s >= cut)) {
        if (s != s) ++nans;
        return;
      }
      const double f = dot_fixed(qrow, keys + c * k_stride, d);
      const int64_t j = ids[c];
      if (!ranks_before(f, j, v[k - 1], ix[k - 1])) return;
      int pos = k - 1;
      while (pos > 0 && ranks_before(f, j, v[pos - 1], ix[pos - 1])) {
        v[pos] = v[pos - 1];
        ix[pos] = ix[pos - 1];
        --pos;
      }
      v[pos] = f;
      ix[pos] = j;
      // rounded down, so the float compare never rejects a key the bound admits
      cut = std::nextafter(static_cast<float>(v[k - 1] - m), -INFINITY);
    };
    int64_t c = 0;
    for (; c + kScan <= cols; c += kScan) {
      if (!block_may_enter(srow + c, cut)) continue;
      for (int64_t e = c; e < c + kScan; ++e) scan_one(e);
    }
    for (; c < cols; ++c) scan_one(c);
  }
  return nans;
}

template <typename T>
void pair_dots_cpu(const T* x, int64_t x_stride, const T* y, int64_t y_stride, int64_t d,
                   const int64_t* i, const int64_t* j, int64_t pairs, double* out) {
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < pairs; ++p)
    out[p] = dot_fixed(x + i[p] * x_stride, y + j[p] * y_stride, d);
}

template int64_t topk_update_cpu<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, float*, int64_t*, int, bool,
                                        const FixedRows<float>&);
template int64_t topk_update_cpu<double>(const double*, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, int64_t, double*, int64_t*, int, bool,
                                         const FixedRows<double>&);
template void pair_dots_cpu<float>(const float*, int64_t, const float*, int64_t, int64_t,
                                   const int64_t*, const int64_t*, int64_t, double*);
template void pair_dots_cpu<double>(const double*, int64_t, const double*, int64_t, int64_t,
                                    const int64_t*, const int64_t*, int64_t, double*);

}  // namespace prh_fast
