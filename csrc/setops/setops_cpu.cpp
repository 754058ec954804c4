// Neighbour-set scores between kNN lists over every pair of layers (CPU, OpenMP over rows).
//
// For layers p of A ([La, N, k]) and q of B ([Lb, N, k]), out[p, q] = mean over rows i of
//   mutual: |set(a_i) ∩ set(b_i)|      cycle: [i ∈ ∪_{j ∈ b_i} a_j]
//   lcs:    LCS(a_i, b_i)              edit:  Levenshtein(a_i, b_i)
// The per-row logic is in common/rowops.h, shared with the CUDA kernels. Long lists get
// per-layer sorted copies so membership tests are binary searches (thresholds: rowops.h).
#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/rowops.h"
#include "../ops.h"

namespace prh_fast {

SetMetric parse_set_metric(const std::string& name) {
  if (name == "mutual") return SetMetric::Mutual;
  if (name == "cycle") return SetMetric::Cycle;
  if (name == "lcs") return SetMetric::Lcs;
  if (name == "edit") return SetMetric::Edit;
  throw std::invalid_argument("metric: expected 'mutual', 'cycle', 'lcs' or 'edit', got '" +
                              name + "'");
}

int omp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void set_omp_threads(int n) {
#ifdef _OPENMP
  if (n > 0) omp_set_num_threads(n);
#else
  (void)n;
#endif
}

void sorted_copies(const int64_t* lists, int64_t rows, int k, int64_t* sv, int32_t* sp) {
  // Fast path: pack (value, position) into one 64-bit key, so the sort moves plain integers.
  // Needs k <= 2^16 and values < 2^47 (neighbour indices are validated to lie in [0, N)).
  constexpr int kPosBits = 16;
  bool packable = k <= (1 << kPosBits);
  for (int64_t t = 0; packable && t < rows * k; ++t) packable = lists[t] < (int64_t(1) << 47);
#pragma omp parallel
  {
    std::vector<int32_t> order(packable ? 0 : k);
    std::vector<uint64_t> keys(packable ? k : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t* a = lists + r * k;
      if (packable) {
        for (int t = 0; t < k; ++t) keys[t] = (uint64_t(a[t]) << kPosBits) | uint64_t(t);
        std::sort(keys.begin(), keys.end());
        for (int t = 0; t < k; ++t) {
          sv[r * k + t] = static_cast<int64_t>(keys[t] >> kPosBits);
          sp[r * k + t] = static_cast<int32_t>(keys[t] & ((uint64_t(1) << kPosBits) - 1));
        }
        continue;
      }
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [a](int32_t x, int32_t y) { return a[x] < a[y]; });
      for (int t = 0; t < k; ++t) {
        sv[r * k + t] = a[order[t]];
        sp[r * k + t] = order[t];
      }
    }
  }
}

namespace {

struct Sorted {
  std::vector<int64_t> v;
  std::vector<int32_t> p;
  const int64_t* vals(int64_t off) const { return v.empty() ? nullptr : v.data() + off; }
  const int32_t* pos(int64_t off) const { return p.empty() ? nullptr : p.data() + off; }
};

Sorted make_sorted(const int64_t* lists, int64_t rows, int k, bool wanted) {
  Sorted s;
  if (!wanted) return s;
  s.v.resize(rows * k);
  s.p.resize(rows * k);
  sorted_copies(lists, rows, k, s.v.data(), s.p.data());
  return s;
}

// Sorted copies of the A-lists: cycle looks up other rows' lists (see rowops.h for the
// thresholds); lcs looks up b's entries in a; edit keeps linear look-ups (bit-parallel form up
// to k = 64, then the O(k^2) DP, which needs none). Sorted B-lists serve only mutual's merge.
bool want_sorted_a(SetMetric m, int k) {
  if (m == SetMetric::Cycle) return k > kLinearScanMaxK;
  if (m == SetMetric::Edit) return false;
  return k > kLinearPairMaxK;
}
bool want_sorted_b(SetMetric m, int k) { return m == SetMetric::Mutual && k > kLinearPairMaxK; }

// Raw value of row i for one pair of layers. `a_layer`/`b_layer` point at [N, k] lists.
inline int64_t row_value(SetMetric m, int64_t i, const int64_t* a_layer, const int64_t* b_layer,
                         const Sorted& sa, int64_t a_off, const Sorted& sb, int64_t b_off, int k,
                         int* scratch) {
  const int64_t* a = a_layer + i * k;
  const int64_t* b = b_layer + i * k;
  switch (m) {
    case SetMetric::Mutual:
      if (!sa.v.empty())
        return count_common_sorted(sa.vals(a_off + i * k), sb.vals(b_off + i * k), k);
      return count_common_linear(a, b, k);
    case SetMetric::Cycle:
      return cycle_hit(i, b, a_layer, sa.vals(a_off), sa.pos(a_off), k);
    case SetMetric::Lcs:
      return lcs_distinct(a, sa.vals(a_off + i * k), sa.pos(a_off + i * k), b, k, scratch);
    case SetMetric::Edit:
      return edit_distance(a, sa.vals(a_off + i * k), sa.pos(a_off + i * k), b, k, scratch);
  }
  return 0;
}

}  // namespace

void neighbour_scores_cpu(SetMetric m, const int64_t* a, int64_t La, const int64_t* b,
                          int64_t Lb, int64_t N, int k, double* out) {
  const Sorted sa = make_sorted(a, La * N, k, want_sorted_a(m, k));
  const Sorted sb = make_sorted(b, Lb * N, k, want_sorted_b(m, k));
  // One parallel region over every (pair, row): a region per pair would wake the thread pool
  // La * Lb times, which costs more than a pair's rows when N * k is small (a grid of short
  // lists, or the thousands of relabelled grids of a permutation null). Totals are integers:
  // the sums do not depend on how rows are split.
  const int64_t P = La * Lb;
  std::vector<int64_t> totals(static_cast<size_t>(P), 0);
#pragma omp parallel
  {
    std::vector<int> scratch(k + 1);
    std::vector<int64_t> mine(static_cast<size_t>(P), 0);
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < P * N; ++t) {
      const int64_t pq = t / N, i = t - pq * N;
      const int64_t a_off = (pq / Lb) * N * k, b_off = (pq % Lb) * N * k;
      mine[pq] += row_value(m, i, a + a_off, b + b_off, sa, a_off, sb, b_off, k, scratch.data());
    }
#pragma omp critical
    for (int64_t pq = 0; pq < P; ++pq) totals[pq] += mine[pq];
  }
  for (int64_t pq = 0; pq < P; ++pq)
    out[pq] = static_cast<double>(totals[pq]) / static_cast<double>(N);
}

void neighbour_rows_cpu(SetMetric m, const int64_t* a, const int64_t* b, int64_t N, int k,
                        int64_t* out) {
  const Sorted sa = make_sorted(a, N, k, want_sorted_a(m, k));
  const Sorted sb = make_sorted(b, N, k, want_sorted_b(m, k));
#pragma omp parallel
  {
    std::vector<int> scratch(k + 1);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i)
      out[i] = row_value(m, i, a, b, sa, 0, sb, 0, k, scratch.data());
  }
}

}  // namespace prh_fast
