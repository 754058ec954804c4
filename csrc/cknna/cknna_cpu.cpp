// CKNNA's five HSIC sums from two neighbour lists, O(N·k) memory (CPU, OpenMP over rows).
//
// With M_i = set(ia_i) ∩ set(ib_i), P = M∘K and Q = M∘L (N x N, not symmetric, zero diagonal):
//   out[0] = Σ_ij P_ij Q_ji   out[1] = 1ᵀP1   out[2] = 1ᵀQ1
//   out[3] = 1ᵀPQ1 = Σ_j colsum(P)_j rowsum(Q)_j   out[4] = 1ᵀQP1 = Σ_j colsum(Q)_j rowsum(P)_j
// Row sums and the transpose term are per row (rowops.h: cknna_row); column sums are a scatter,
// done serially in row order so that every result is deterministic.
#include <algorithm>
#include <vector>

#include "../common/rowops.h"
#include "../ops.h"

namespace prh_fast {

namespace {
struct SortedLists {
  std::vector<int64_t> v;
  std::vector<int32_t> p;
};
SortedLists maybe_sorted(const int64_t* lists, int64_t N, int k) {
  SortedLists s;
  if (k <= kLinearScanMaxK) return s;
  s.v.resize(N * k);
  s.p.resize(N * k);
  sorted_copies(lists, N, k, s.v.data(), s.p.data());
  return s;
}
}  // namespace

// Below this many list entries in a chunk the rows are processed on one thread.
constexpr int64_t kSerialEntries = int64_t(1) << 16;

void cknna_terms_cpu(const int64_t* ia, const double* sa, int ka, const int64_t* ib,
                     const double* sb, int kb, int64_t N, double* out) {
  const SortedLists sA = maybe_sorted(ia, N, ka), sB = maybe_sorted(ib, N, kb);
  const int64_t* sav = sA.v.empty() ? nullptr : sA.v.data();
  const int32_t* sap = sA.p.empty() ? nullptr : sA.p.data();
  const int64_t* sbv = sB.v.empty() ? nullptr : sB.v.data();
  const int32_t* sbp = sB.p.empty() ? nullptr : sB.p.data();
  std::vector<double> row_p(N), row_q(N), row_t(N), col_p(N, 0.0), col_q(N, 0.0);
  const int m_max = std::min(ka, kb);
  // Rows are processed in chunks: the per-row work runs in parallel and records each row's
  // masked entries; the column scatter then runs serially in row order. Every sum therefore
  // has a fixed order: results are bit-identical whatever the thread count.
  // A chunk holds at most 2^20 masked entries (24 MiB of scratch), whatever N is.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 20) / m_max));
  std::vector<int64_t> js(chunk * m_max);
  std::vector<double> ps(chunk * m_max), qs(chunk * m_max);
  std::vector<int> count(chunk);
  for (int64_t c0 = 0; c0 < N; c0 += chunk) {
    const int64_t c1 = std::min(N, c0 + chunk);
    // Small chunks run on one thread: waking the pool costs more than their rows.
#pragma omp parallel for schedule(static) if ((c1 - c0) * (ka + kb) > kSerialEntries)
    for (int64_t i = c0; i < c1; ++i) {
      const int64_t r = i - c0;
      CknnaRowSums sums;
      count[r] = cknna_row(i, ia + i * ka, sa + i * ka, ka, ib + i * kb, sb + i * kb, kb, sav,
                           sap, sbv, sbp, ia, ib, sa, sb, js.data() + r * m_max,
                           ps.data() + r * m_max, qs.data() + r * m_max, &sums);
      row_p[i] = sums.row_p;
      row_q[i] = sums.row_q;
      row_t[i] = sums.t;
    }
    for (int64_t r = 0; r < c1 - c0; ++r)
      for (int u = 0; u < count[r]; ++u) {
        col_p[js[r * m_max + u]] += ps[r * m_max + u];
        col_q[js[r * m_max + u]] += qs[r * m_max + u];
      }
  }
  double t = 0, sp = 0, sq = 0, pq = 0, qp = 0;
  for (int64_t j = 0; j < N; ++j) {
    t += row_t[j];
    sp += row_p[j];
    sq += row_q[j];
    pq += col_p[j] * row_q[j];
    qp += col_q[j] * row_p[j];
  }
  out[0] = t;
  out[1] = sp;
  out[2] = sq;
  out[3] = pq;
  out[4] = qp;
}

}  // namespace prh_fast
