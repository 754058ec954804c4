// CKNNA's five HSIC sums from two neighbour lists, O(N·k) memory (CPU, OpenMP over rows).
//
// With M_i = set(ia_i) ∩ set(ib_i), P = M∘K and Q = M∘L (N x N, not symmetric, zero diagonal):
//   out[0] = Σ_ij P_ij Q_ji   out[1] = 1ᵀP1   out[2] = 1ᵀQ1
//   out[3] = 1ᵀPQ1 = Σ_j colsum(P)_j rowsum(Q)_j   out[4] = 1ᵀQP1 = Σ_j colsum(Q)_j rowsum(P)_j
// Row sums and the transpose term are per row (rowops.h: cknna_row); column sums are a scatter,
// done with atomic adds (summation order may vary run to run at the 1e-16 level).
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

void cknna_terms_cpu(const int64_t* ia, const double* sa, int ka, const int64_t* ib,
                     const double* sb, int kb, int64_t N, double* out) {
  const SortedLists sA = maybe_sorted(ia, N, ka), sB = maybe_sorted(ib, N, kb);
  const int64_t* sav = sA.v.empty() ? nullptr : sA.v.data();
  const int32_t* sap = sA.p.empty() ? nullptr : sA.p.data();
  const int64_t* sbv = sB.v.empty() ? nullptr : sB.v.data();
  const int32_t* sbp = sB.p.empty() ? nullptr : sB.p.data();
  std::vector<double> row_p(N), row_q(N), col_p(N, 0.0), col_q(N, 0.0);
  double t_total = 0.0;
  const int m_max = std::min(ka, kb);
#pragma omp parallel reduction(+ : t_total)
  {
    std::vector<int64_t> js(m_max);
    std::vector<double> ps(m_max), qs(m_max);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      CknnaRowSums sums;
      const int m = cknna_row(i, ia + i * ka, sa + i * ka, ka, ib + i * kb, sb + i * kb, kb,
                              sav, sap, sbv, sbp, ia, ib, sa, sb, js.data(), ps.data(),
                              qs.data(), &sums);
      row_p[i] = sums.row_p;
      row_q[i] = sums.row_q;
      t_total += sums.t;
      for (int u = 0; u < m; ++u) {
#pragma omp atomic
        col_p[js[u]] += ps[u];
#pragma omp atomic
        col_q[js[u]] += qs[u];
      }
    }
  }
  double sp = 0, sq = 0, pq = 0, qp = 0;
  for (int64_t j = 0; j < N; ++j) {
    sp += row_p[j];
    sq += row_q[j];
    pq += col_p[j] * row_q[j];
    qp += col_q[j] * row_p[j];
  }
  out[0] = t_total;
  out[1] = sp;
  out[2] = sq;
  out[3] = pq;
  out[4] = qp;
}

}  // namespace prh_fast
