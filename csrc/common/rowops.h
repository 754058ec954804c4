// Per-row combinatorial logic shared by the CPU (OpenMP) and CUDA kernels.
//
// Every function here is a plain inline function over raw pointers, with scratch memory passed
// in by the caller (no std:: containers, no allocation), so the same code runs on the host and
// on the device (PRH_HD = __host__ __device__ under nvcc). The CPU tests therefore cover the
// logic the GPU runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PRH_HD __host__ __device__ __forceinline__
#else
#define PRH_HD inline
#endif

namespace prh_fast {

// When membership tests switch from linear scans to sorted copies + binary search (CPU).
// Sorting a row costs ~15 ns per entry (branch mispredictions) while a linear scan is a
// predictable compare loop, so the switch pays only when it saves many scans:
//  - look-ups in other rows' lists (cycle, CKNNA's transpose term: cache misses dominate):
//    sorted copies beyond kLinearScanMaxK;
//  - comparing the two lists of the same row (mutual, lcs, edit): linear up to
//    kLinearPairMaxK; measured on x86-64 with N = 1e5, 1 or 4 layers per side, linear still
//    won at k = 96 (e.g. mutual 2.7 us vs 3.2-5.4 us per row and pair).
constexpr int kLinearScanMaxK = 32;
constexpr int kLinearPairMaxK = 128;

// ---------------------------------------------------------------------------------------------
// Running top-k: vals[0..k) sorted by descending score, ties by ascending index.
// Precondition: s > vals[k-1] (the caller tests that first: the common case is one compare).
// Because keys arrive in increasing index order, a new entry goes AFTER every existing entry
// with an equal score: the lower-index tie rule holds without comparing indices.
template <typename T>
PRH_HD void topk_insert(T* vals, int64_t* idx, int k, T s, int64_t j) {
  int pos = k - 1;
  while (pos > 0 && s > vals[pos - 1]) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = s;
  idx[pos] = j;
}

// Same, with a float64 payload per entry (the candidate's fixed-order score) moved along.
template <typename T>
PRH_HD void topk_insert_payload(T* vals, int64_t* idx, double* pay, int k, T s, int64_t j,
                                double p) {
  int pos = k - 1;
  while (pos > 0 && s > vals[pos - 1]) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    pay[pos] = pay[pos - 1];
    --pos;
  }
  vals[pos] = s;
  idx[pos] = j;
  pay[pos] = p;
}

// Inner product of two rows of length d, accumulated in float64 in one fixed order: four
// partial sums over the positions l = 0, 1, 2, 3 (mod 4), each in increasing l, combined as
// (s0 + s1) + (s2 + s3). The order depends on d only, never on where the rows sit in memory
// or in a tile, so equal rows get bit-equal scores (exact duplicates tie exactly). Products
// of float32 values are exact in float64.
template <typename T>
PRH_HD double dot_fixed(const T* a, const T* b, int64_t d) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t l = 0;
  for (; l + 4 <= d; l += 4) {
    s0 += (double)a[l] * (double)b[l];
    s1 += (double)a[l + 1] * (double)b[l + 1];
    s2 += (double)a[l + 2] * (double)b[l + 2];
    s3 += (double)a[l + 3] * (double)b[l + 3];
  }
  if (l < d) s0 += (double)a[l] * (double)b[l];
  if (l + 1 < d) s1 += (double)a[l + 1] * (double)b[l + 1];
  if (l + 2 < d) s2 += (double)a[l + 2] * (double)b[l + 2];
  return (s0 + s1) + (s2 + s3);
}

// ---------------------------------------------------------------------------------------------
// Membership and positions.
PRH_HD int find_linear(const int64_t* a, int k, int64_t v) {
  for (int t = 0; t < k; ++t)
    if (a[t] == v) return t;
  return -1;
}

// `sv` sorted ascending, `sp` the original positions of its entries; returns position or -1.
PRH_HD int find_sorted(const int64_t* sv, const int32_t* sp, int k, int64_t v) {
  int lo = 0, hi = k;
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (sv[mid] < v) lo = mid + 1; else hi = mid;
  }
  return (lo < k && sv[lo] == v) ? sp[lo] : -1;
}

// Position of v in list a (sorted copy used when given, i.e. sv != nullptr).
PRH_HD int find_pos(const int64_t* a, const int64_t* sv, const int32_t* sp, int k, int64_t v) {
  return sv ? find_sorted(sv, sp, k, v) : find_linear(a, k, v);
}

// ---------------------------------------------------------------------------------------------
// |set(a) ∩ set(b)| for lists of distinct entries.
// Entries are distinct, so the count is the number of equal (s, t) pairs: a branch-free double
// loop the compiler can vectorise.
PRH_HD int count_common_linear(const int64_t* a, const int64_t* b, int k) {
  int c = 0;
  for (int s = 0; s < k; ++s) {
    const int64_t v = b[s];
    for (int t = 0; t < k; ++t) c += a[t] == v;
  }
  return c;
}

// Same on ascending sorted copies: one merge pass.
PRH_HD int count_common_sorted(const int64_t* sa, const int64_t* sb, int k) {
  int i = 0, j = 0, c = 0;
  while (i < k && j < k) {
    if (sa[i] < sb[j]) ++i;
    else if (sb[j] < sa[i]) ++j;
    else { ++c; ++i; ++j; }
  }
  return c;
}

// cycle: 1 if `self` appears in the A-list of any B-neighbour of `self`.
// knn_a: the whole [N, k] A-lists of the layer; sorted copies (sav/sap) optional.
PRH_HD int cycle_hit(int64_t self, const int64_t* b, const int64_t* knn_a, const int64_t* sav,
                     const int32_t* sap, int k) {
  for (int s = 0; s < k; ++s) {
    const int64_t j = b[s];
    const int64_t off = j * (int64_t)k;
    if (find_pos(knn_a + off, sav ? sav + off : nullptr, sap ? sap + off : nullptr, k, self) >= 0)
      return 1;
  }
  return 0;
}

// Longest common subsequence of two lists of distinct entries: map each b[s] found in a to its
// position in a; the LCS is the longest strictly increasing subsequence of those positions
// (patience sorting, O(k log k)). `tails` needs k ints.
PRH_HD int lcs_distinct(const int64_t* a, const int64_t* sav, const int32_t* sap,
                        const int64_t* b, int k, int* tails) {
  int len = 0;
  for (int s = 0; s < k; ++s) {
    const int p = find_pos(a, sav, sap, k, b[s]);
    if (p < 0) continue;
    int lo = 0, hi = len;  // first tail >= p
    while (lo < hi) {
      int mid = (lo + hi) >> 1;
      if (tails[mid] < p) lo = mid + 1; else hi = mid;
    }
    tails[lo] = p;
    if (lo == len) ++len;
  }
  return len;
}

// Levenshtein distance (unit insert/delete/substitute) between two length-k lists, one DP row
// of k+1 ints as scratch. O(k^2) time.
PRH_HD int levenshtein(const int64_t* a, const int64_t* b, int k, int* row) {
  for (int s = 0; s <= k; ++s) row[s] = s;
  for (int t = 1; t <= k; ++t) {
    int diag = row[0];  // D[t-1][0]
    row[0] = t;
    const int64_t at = a[t - 1];
    for (int s = 1; s <= k; ++s) {
      const int up = row[s];  // D[t-1][s]
      int best = diag + (at == b[s - 1] ? 0 : 1);
      const int del = up + 1, ins = row[s - 1] + 1;
      if (del < best) best = del;
      if (ins < best) best = ins;
      row[s] = best;
      diag = up;
    }
  }
  return row[k];
}

// Levenshtein distance by bit-parallel DP (Myers 1999, in Hyyrö's 2001 formulation for the
// global distance), for k <= 64: the k cells of a DP column live in one 64-bit word as vertical
// +1/-1 deltas. The match mask of b[s] is the position of b[s] in a (entries of a list are
// distinct, so at most one bit), found by find_pos: O(k) word operations plus k look-ups.
// Bits above k-1 hold garbage, which never reaches the low bits (carries and shifts go up).
PRH_HD int levenshtein_bits(const int64_t* a, const int64_t* sav, const int32_t* sap,
                            const int64_t* b, int k) {
  const uint64_t top = uint64_t(1) << (k - 1);
  uint64_t pv = ~uint64_t(0), mv = 0;
  int score = k;
  for (int s = 0; s < k; ++s) {
    const int p = find_pos(a, sav, sap, k, b[s]);
    const uint64_t eq = p >= 0 ? uint64_t(1) << p : 0;
    const uint64_t xv = eq | mv;
    const uint64_t xh = (((eq & pv) + pv) ^ pv) | eq;
    uint64_t ph = mv | ~(xh | pv);
    uint64_t mh = pv & xh;
    if (ph & top) ++score;
    else if (mh & top) --score;
    ph = (ph << 1) | 1;  // row 0 of the DP is D[0][s] = s: a +1 horizontal delta enters
    mh <<= 1;
    pv = mh | ~(xv | ph);
    mv = ph & xv;
  }
  return score;
}

// Levenshtein distance between two length-k lists: bit-parallel for k <= 64, otherwise the
// O(k) memory DP (`row` needs k+1 ints).
PRH_HD int edit_distance(const int64_t* a, const int64_t* sav, const int32_t* sap,
                         const int64_t* b, int k, int* row) {
  return k <= 64 ? levenshtein_bits(a, sav, sap, b, k) : levenshtein(a, b, k, row);
}

// ---------------------------------------------------------------------------------------------
// CKNNA, one row i. M_i = set(ia_i) ∩ set(ib_i); P = M∘K, Q = M∘L (K_ij from row i of the
// A-scores, L_ij from row i of the B-scores). Accumulates the row's contributions:
//   row_p = Σ_j P_ij, row_q = Σ_j Q_ij, t = Σ_j P_ij Q_ji (needs j ∈ M_i and i ∈ M_j, with
//   Q_ji read from row j's B-list), and reports each (j, P_ij, Q_ij) through the callback-free
//   arrays out_j/out_p/out_q (length >= min(ka, kb)) for the column sums; returns their count.
struct CknnaRowSums {
  double row_p, row_q, t;
};

PRH_HD int cknna_row(int64_t i, const int64_t* ia, const double* sa, int ka,
                     const int64_t* ib, const double* sb, int kb,
                     const int64_t* sav, const int32_t* sap,   // sorted copies of A-lists, or null
                     const int64_t* sbv, const int32_t* sbp,   // sorted copies of B-lists, or null
                     const int64_t* knn_a_all, const int64_t* knn_b_all,
                     const double* sa_all, const double* sb_all,
                     int64_t* out_j, double* out_p, double* out_q, CknnaRowSums* sums) {
  (void)sa_all;
  int m = 0;
  double rp = 0.0, rq = 0.0, t = 0.0;
  const int64_t oa = i * (int64_t)ka, ob = i * (int64_t)kb;
  for (int u = 0; u < ka; ++u) {
    const int64_t j = ia[u];
    const int pb = find_pos(ib, sbv ? sbv + ob : nullptr, sbp ? sbp + ob : nullptr, kb, j);
    if (pb < 0) continue;
    const double p = sa[u], q = sb[pb];
    rp += p;
    rq += q;
    out_j[m] = j; out_p[m] = p; out_q[m] = q; ++m;
    // Transpose term: P_ij Q_ji is nonzero when i ∈ M_j too.
    const int64_t ja = j * (int64_t)ka, jb = j * (int64_t)kb;
    const int qa = find_pos(knn_a_all + ja, sav ? sav + ja : nullptr, sap ? sap + ja : nullptr, ka, i);
    if (qa < 0) continue;
    const int qb = find_pos(knn_b_all + jb, sbv ? sbv + jb : nullptr, sbp ? sbp + jb : nullptr, kb, i);
    if (qb < 0) continue;
    t += p * sb_all[jb + qb];
  }
  (void)oa;
  sums->row_p = rp; sums->row_q = rq; sums->t = t;
  return m;
}

}  // namespace prh_fast
