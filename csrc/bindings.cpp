// The only pybind11 file: validates every argument (std::invalid_argument -> ValueError naming
// the argument) and hands raw pointers to the kernels. No torch: CPU entry points take NumPy
// arrays; CUDA entry points take device pointers and a stream as integers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "common/limits.h"
#include "ops.h"

namespace py = pybind11;

#include "build_info.h"

namespace prh_fast {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s << (d ? ", " : "") << a.shape(d);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

void check_ndim(const py::array& a, int nd, const char* name, const char* what) {
  if (a.ndim() != nd)
    fail(std::string(name) + ": expected a " + std::to_string(nd) + "-D array " + what +
         ", got " + std::to_string(a.ndim()) + "-D with shape " + shape_str(a));
}

template <typename T>
void check_dtype(const py::array& a, const char* name, const char* tname) {
  if (!a.dtype().is(py::dtype::of<T>()))
    fail(std::string(name) + ": expected dtype " + tname + ", got " +
         std::string(py::str(a.dtype())));
}

void check_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style)) fail(std::string(name) + ": must be C-contiguous");
}

// Every neighbour index must lie in [0, N): indices address memory in the kernels.
void check_indices(const int64_t* p, int64_t count, int64_t N, const char* name) {
  for (int64_t t = 0; t < count; ++t)
    if (p[t] < 0 || p[t] >= N)
      fail(std::string(name) + ": neighbour index " + std::to_string(p[t]) +
           " out of range [0, " + std::to_string(N) + ")");
}

py::array_t<int64_t> lists_arg(const py::array& a, int nd, const char* name, const char* what) {
  check_ndim(a, nd, name, what);
  check_dtype<int64_t>(a, name, "int64");
  check_c_contiguous(a, name);
  return py::array_t<int64_t>::ensure(a);
}

// --------------------------------------------------------------------------------------------

// A 2-D array of rows of dtype T (`tname`) with unit column stride; its row stride in items.
template <typename T>
int64_t rows_arg(const py::array& a, const char* name, const char* what, const char* tname) {
  check_ndim(a, 2, name, what);
  check_dtype<T>(a, name, tname);
  const py::ssize_t item = static_cast<py::ssize_t>(sizeof(T));
  if (a.shape(1) > 1 && a.strides(1) != item)
    fail(std::string(name) + ": rows must be contiguous (unit column stride)");
  if (a.strides(0) % item || a.strides(0) < 0)
    fail(std::string(name) + ": the row stride must be a non-negative multiple of the item size");
  return a.strides(0) / item;
}

// The query rows `q` and key rows `keys` behind a [rows, cols] tile.
void check_tile_rows(const py::array& q, const py::array& keys, int64_t rows, int64_t cols) {
  if (q.shape(0) != rows || keys.shape(0) != cols)
    fail("q, keys: expected " + std::to_string(rows) + " query rows and " +
         std::to_string(cols) + " key rows (the tile's shape), got " + shape_str(q) + " and " +
         shape_str(keys));
  if (q.shape(1) != keys.shape(1))
    fail("q, keys: must have the same number of columns, got " + shape_str(q) + " and " +
         shape_str(keys));
}

// Running top-k lists `vals` / `idx` [R, k] updated in place (vals' dtype is checked by the
// caller): 2-D, C-contiguous, writeable, the same shape, k >= 1.
void check_running_lists(const py::array& vals, const py::array& idx) {
  check_ndim(vals, 2, "vals", "[rows, k]");
  check_ndim(idx, 2, "idx", "[rows, k]");
  check_dtype<int64_t>(idx, "idx", "int64");
  check_c_contiguous(vals, "vals");
  check_c_contiguous(idx, "idx");
  if (!vals.writeable() || !idx.writeable()) fail("vals, idx: must be writeable");
  if (vals.shape(0) != idx.shape(0) || vals.shape(1) != idx.shape(1))
    fail("vals and idx: must have the same shape, got " + shape_str(vals) + " and " +
         shape_str(idx));
  if (vals.shape(1) < 1) fail("k: the running lists must hold at least 1 entry");
}

// Rows behind a tile for fixed-order scores: `q` [rows, D] and `keys` [cols, D] (row-major,
// unit column stride, dtype T) and `fixed` [rows, k] float64, or all three None.
template <typename T>
FixedRows<T> fixed_rows_arg(const py::object& q, const py::object& keys, const py::object& fixed,
                            int64_t rows, int64_t cols, int64_t k) {
  FixedRows<T> fx;
  const bool given[3] = {!q.is_none(), !keys.is_none(), !fixed.is_none()};
  if (!given[0] && !given[1] && !given[2]) return fx;
  if (!(given[0] && given[1] && given[2])) fail("q, keys, fixed: pass all three or none");
  const char* tn = sizeof(T) == 4 ? "float32 (same as scores)" : "float64 (same as scores)";
  const py::array qa = py::reinterpret_borrow<py::array>(q);
  const py::array ka = py::reinterpret_borrow<py::array>(keys);
  py::array fa = py::reinterpret_borrow<py::array>(fixed);
  const int64_t qs = rows_arg<T>(qa, "q", "[rows, D] of query rows", tn);
  const int64_t ks = rows_arg<T>(ka, "keys", "[cols, D] of key rows", tn);
  check_ndim(fa, 2, "fixed", "[rows, k] of fixed-order scores");
  check_dtype<double>(fa, "fixed", "float64");
  check_c_contiguous(fa, "fixed");
  if (!fa.writeable()) fail("fixed: must be writeable");
  check_tile_rows(qa, ka, rows, cols);
  if (fa.shape(0) != rows || fa.shape(1) != k)
    fail("fixed: must have the shape of vals, got " + shape_str(fa));
  fx.q = static_cast<const T*>(qa.data());
  fx.q_stride = qs;
  fx.keys = static_cast<const T*>(ka.data());
  fx.k_stride = ks;
  fx.d = qa.shape(1);
  fx.fixed = static_cast<double*>(fa.mutable_data());
  return fx;
}

template <typename T>
void topk_update_typed(const py::array& scores, int64_t row0, int64_t col0, py::array& vals,
                       py::array& idx, bool exclude_self, const py::object& q,
                       const py::object& keys, const py::object& fixed) {
  check_dtype<T>(vals, "vals", sizeof(T) == 4 ? "float32 (same as scores)"
                                              : "float64 (same as scores)");
  const int64_t rows = scores.shape(0), cols = scores.shape(1), k = vals.shape(1);
  const py::ssize_t item = static_cast<py::ssize_t>(sizeof(T));
  if (scores.strides(0) % item || scores.strides(1) % item)
    fail("scores: strides must be multiples of the item size");
  const FixedRows<T> fx = fixed_rows_arg<T>(q, keys, fixed, rows, cols, k);
  const T* s = static_cast<const T*>(scores.data());
  T* v = static_cast<T*>(vals.mutable_data());
  int64_t* ix = static_cast<int64_t*>(idx.mutable_data());
  int64_t nans;
  {
    py::gil_scoped_release release;
    nans = topk_update_cpu<T>(s, rows, cols, scores.strides(0) / item, scores.strides(1) / item,
                              row0, col0, v, ix, static_cast<int>(k), exclude_self, fx);
  }
  if (nans) fail("scores: contains " + std::to_string(nans) + " NaN value(s)");
}

void topk_update(const py::array& scores, int64_t row0, int64_t col0, py::array vals,
                 py::array idx, bool exclude_self, const py::object& q, const py::object& keys,
                 const py::object& fixed) {
  check_ndim(scores, 2, "scores", "[rows, cols]");
  check_running_lists(vals, idx);
  if (vals.shape(0) != scores.shape(0))
    fail("vals, idx: must have one row per row of scores (" + std::to_string(scores.shape(0)) +
         "), got " + shape_str(vals) + " and " + shape_str(idx));
  if (row0 < 0 || col0 < 0) fail("row0, col0: must be >= 0");
  if (scores.dtype().is(py::dtype::of<float>()))
    topk_update_typed<float>(scores, row0, col0, vals, idx, exclude_self, q, keys, fixed);
  else if (scores.dtype().is(py::dtype::of<double>()))
    topk_update_typed<double>(scores, row0, col0, vals, idx, exclude_self, q, keys, fixed);
  else
    fail("scores: expected dtype float32 or float64, got " + std::string(py::str(scores.dtype())));
}

void topk_scatter(const py::array& scores, const py::array& q, const py::array& keys,
                  const py::array& margin, const py::array& ids, const py::array& targets,
                  py::array vals, py::array idx) {
  const int64_t ss = rows_arg<float>(scores, "scores", "[rows, cols] of tile scores", "float32");
  const int64_t qs = rows_arg<float>(q, "q", "[rows, D] of query rows", "float32");
  const int64_t ks = rows_arg<float>(keys, "keys", "[cols, D] of key rows", "float32");
  const int64_t rows = scores.shape(0), cols = scores.shape(1);
  check_tile_rows(q, keys, rows, cols);
  check_ndim(margin, 1, "margin", "[rows] of rounding bounds");
  check_dtype<double>(margin, "margin", "float64");
  check_c_contiguous(margin, "margin");
  if (margin.shape(0) != rows)
    fail("margin: expected one bound per row of scores (" + std::to_string(rows) + "), got " +
         shape_str(margin));
  check_running_lists(vals, idx);
  check_dtype<double>(vals, "vals", "float64");
  auto ii = lists_arg(ids, 1, "ids", "[cols] of key ids");
  auto tt = lists_arg(targets, 1, "targets", "[rows] of list rows");
  if (ii.shape(0) != cols)
    fail("ids: expected one id per column of scores (" + std::to_string(cols) + "), got " +
         shape_str(ii));
  if (tt.shape(0) != rows)
    fail("targets: expected one list row per row of scores (" + std::to_string(rows) +
         "), got " + shape_str(tt));
  const int64_t* t = tt.data();
  const int64_t R = vals.shape(0);
  for (int64_t r = 0; r < rows; ++r)
    if (t[r] < 0 || t[r] >= R)
      fail("targets: list row " + std::to_string(t[r]) + " out of range [0, " +
           std::to_string(R) + ")");
  const double* m = static_cast<const double*>(margin.data());
  for (int64_t r = 0; r < rows; ++r)
    if (!(m[r] >= 0.0)) fail("margin: must be >= 0 (and not NaN)");
  int64_t nans;
  {
    py::gil_scoped_release release;
    nans = topk_scatter_cpu(static_cast<const float*>(scores.data()), rows, cols, ss,
                            static_cast<const float*>(q.data()), qs,
                            static_cast<const float*>(keys.data()), ks, q.shape(1), m,
                            ii.data(), t, static_cast<double*>(vals.mutable_data()),
                            static_cast<int64_t*>(idx.mutable_data()),
                            static_cast<int>(vals.shape(1)));
  }
  if (nans) fail("scores: contains " + std::to_string(nans) + " NaN value(s)");
}

template <typename T>
py::array_t<double> pair_dots_typed(const py::array& x, const py::array& y,
                                    const py::array_t<int64_t>& i, const py::array_t<int64_t>& j) {
  const char* tn = sizeof(T) == 4 ? "float32 (same as x)" : "float64 (same as x)";
  const int64_t xs = rows_arg<T>(x, "x", "[n, D] of rows", tn);
  const int64_t ys = rows_arg<T>(y, "y", "[m, D] of rows", tn);
  const int64_t pairs = i.shape(0);
  check_indices(i.data(), pairs, x.shape(0), "i");
  check_indices(j.data(), pairs, y.shape(0), "j");
  py::array_t<double> out(pairs);
  double* o = out.mutable_data();
  const T* xp = static_cast<const T*>(x.data());
  const T* yp = static_cast<const T*>(y.data());
  const int64_t d = x.shape(1);
  {
    py::gil_scoped_release release;
    pair_dots_cpu<T>(xp, xs, yp, ys, d, i.data(), j.data(), pairs, o);
  }
  return out;
}

py::array_t<double> pair_dots(const py::array& x, const py::array& y, const py::array& i,
                              const py::array& j) {
  check_ndim(x, 2, "x", "[n, D] of rows");
  check_ndim(y, 2, "y", "[m, D] of rows");
  if (x.shape(1) != y.shape(1))
    fail("x, y: must have the same number of columns, got " + shape_str(x) + " and " +
         shape_str(y));
  auto ii = lists_arg(i, 1, "i", "[P] of row indices of x");
  auto jj = lists_arg(j, 1, "j", "[P] of row indices of y");
  if (ii.shape(0) != jj.shape(0))
    fail("i, j: must have the same length, got " + shape_str(ii) + " and " + shape_str(jj));
  if (x.dtype().is(py::dtype::of<float>())) return pair_dots_typed<float>(x, y, ii, jj);
  if (x.dtype().is(py::dtype::of<double>())) return pair_dots_typed<double>(x, y, ii, jj);
  fail("x: expected dtype float32 or float64, got " + std::string(py::str(x.dtype())));
}

py::array_t<double> neighbour_scores(const std::string& metric, const py::array& knn_a,
                                     const py::array& knn_b) {
  const SetMetric m = parse_set_metric(metric);
  auto a = lists_arg(knn_a, 3, "knn_a", "[L, N, k] of neighbour lists");
  auto b = lists_arg(knn_b, 3, "knn_b", "[L, N, k] of neighbour lists");
  if (a.shape(1) != b.shape(1) || a.shape(2) != b.shape(2))
    fail("knn_a and knn_b: must share N and k, got " + shape_str(a) + " and " + shape_str(b));
  const int64_t La = a.shape(0), Lb = b.shape(0), N = a.shape(1), k = a.shape(2);
  if (La < 1 || Lb < 1 || N < 1) fail("knn_a, knn_b: need at least one layer and one row");
  if (k < 1) fail("k: neighbour lists must hold at least 1 entry, got k = 0");
  check_indices(a.data(), La * N * k, N, "knn_a");
  check_indices(b.data(), Lb * N * k, N, "knn_b");
  py::array_t<double> out({La, Lb});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    neighbour_scores_cpu(m, a.data(), La, b.data(), Lb, N, static_cast<int>(k), o);
  }
  return out;
}

py::array_t<int64_t> neighbour_row_values(const std::string& metric, const py::array& knn_a,
                                          const py::array& knn_b) {
  const SetMetric m = parse_set_metric(metric);
  auto a = lists_arg(knn_a, 2, "knn_a", "[N, k] of neighbour lists");
  auto b = lists_arg(knn_b, 2, "knn_b", "[N, k] of neighbour lists");
  if (a.shape(0) != b.shape(0) || a.shape(1) != b.shape(1))
    fail("knn_a and knn_b: must have the same shape, got " + shape_str(a) + " and " +
         shape_str(b));
  const int64_t N = a.shape(0), k = a.shape(1);
  if (N < 1) fail("knn_a: needs at least one row");
  if (k < 1) fail("k: neighbour lists must hold at least 1 entry, got k = 0");
  check_indices(a.data(), N * k, N, "knn_a");
  check_indices(b.data(), N * k, N, "knn_b");
  py::array_t<int64_t> out(N);
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    neighbour_rows_cpu(m, a.data(), b.data(), N, static_cast<int>(k), o);
  }
  return out;
}

py::tuple cknna_terms(const py::array& knn_a, const py::array& score_a, const py::array& knn_b,
                      const py::array& score_b) {
  auto ia = lists_arg(knn_a, 2, "knn_a", "[N, ka] of neighbour lists");
  auto ib = lists_arg(knn_b, 2, "knn_b", "[N, kb] of neighbour lists");
  check_ndim(score_a, 2, "score_a", "[N, ka] of similarities");
  check_ndim(score_b, 2, "score_b", "[N, kb] of similarities");
  check_dtype<double>(score_a, "score_a", "float64");
  check_dtype<double>(score_b, "score_b", "float64");
  check_c_contiguous(score_a, "score_a");
  check_c_contiguous(score_b, "score_b");
  const int64_t N = ia.shape(0), ka = ia.shape(1), kb = ib.shape(1);
  if (ib.shape(0) != N) fail("knn_a and knn_b: must have the same number of rows N");
  if (score_a.shape(0) != N || score_a.shape(1) != ka)
    fail("score_a: must have the shape of knn_a " + shape_str(ia) + ", got " + shape_str(score_a));
  if (score_b.shape(0) != N || score_b.shape(1) != kb)
    fail("score_b: must have the shape of knn_b " + shape_str(ib) + ", got " + shape_str(score_b));
  if (N < 1) fail("knn_a: needs at least one row");
  if (ka < 1 || kb < 1) fail("k: neighbour lists must hold at least 1 entry");
  check_indices(ia.data(), N * ka, N, "knn_a");
  check_indices(ib.data(), N * kb, N, "knn_b");
  double out[5];
  {
    py::gil_scoped_release release;
    cknna_terms_cpu(ia.data(), static_cast<const double*>(score_a.data()), static_cast<int>(ka),
                    ib.data(), static_cast<const double*>(score_b.data()), static_cast<int>(kb),
                    N, out);
  }
  return py::make_tuple(out[0], out[1], out[2], out[3], out[4]);
}

py::dict build_info() {
  py::dict d;
  d["version"] = PRH_FAST_VERSION;
#ifdef PRH_FAST_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = PRH_FAST_CUDA_ARCHS;
  d["cuda_version"] = PRH_FAST_CUDA_VERSION;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
  d["cuda_version"] = py::none();
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["omp_max_threads"] = omp_threads();
  d["compiler"] = PRH_FAST_COMPILER;
  d["cxx_flags"] = PRH_FAST_CXX_FLAGS;
  d["build_type"] = PRH_FAST_BUILD_TYPE;
  return d;
}

#ifdef PRH_FAST_WITH_CUDA
template <typename T>
T* dev_ptr(std::uintptr_t p, const char* name) {
  if (p == 0) fail(std::string(name) + ": null device pointer");
  return reinterpret_cast<T*>(p);
}

void cuda_neighbour_scores(const std::string& metric, std::uintptr_t a, std::uintptr_t b,
                           int64_t La, int64_t Lb, int64_t N, int64_t k, std::uintptr_t out,
                           std::uintptr_t stream) {
  const SetMetric m = parse_set_metric(metric);
  if (La < 1 || Lb < 1 || N < 1) fail("La, Lb, N: must be >= 1");
  if (k < 1) fail("k: must be >= 1");
  neighbour_scores_cuda(m, dev_ptr<const int64_t>(a, "knn_a"), La,
                        dev_ptr<const int64_t>(b, "knn_b"), Lb, N, static_cast<int>(k),
                        dev_ptr<double>(out, "out"), stream);
}

void cuda_cknna_terms(std::uintptr_t ia, std::uintptr_t sa, std::uintptr_t ib,
                      std::uintptr_t sb, int64_t N, int64_t ka, int64_t kb, std::uintptr_t out,
                      std::uintptr_t workspace, std::uintptr_t stream) {
  if (N < 1) fail("N: must be >= 1");
  if (ka < 1 || kb < 1) fail("k: must be >= 1");
  cknna_terms_cuda(dev_ptr<const int64_t>(ia, "knn_a"), dev_ptr<const double>(sa, "score_a"),
                   static_cast<int>(ka), dev_ptr<const int64_t>(ib, "knn_b"),
                   dev_ptr<const double>(sb, "score_b"), static_cast<int>(kb), N,
                   dev_ptr<double>(out, "out"), dev_ptr<void>(workspace, "workspace"), stream);
}
#endif

}  // namespace
}  // namespace prh_fast

PYBIND11_MODULE(_C, m) {
  using namespace prh_fast;
  m.doc() = "prh_fast native kernels (C++17/OpenMP; CUDA when built). No torch dependency.";
  m.def("topk_update", &topk_update, py::arg("scores"), py::arg("row0"), py::arg("col0"),
        py::arg("vals"), py::arg("idx"), py::arg("exclude_self"), py::arg("q") = py::none(),
        py::arg("keys") = py::none(), py::arg("fixed") = py::none(),
        "Merge a [rows, cols] score tile (any strides) into running top-k lists, in place.\n"
        "Rows are queries row0.., columns keys col0..; lists sorted by score desc, ties by\n"
        "index asc; empty slots hold -inf / -1. Keys must arrive in increasing index order.\n"
        "With q [rows, D], keys [cols, D] (the tile's rows) and fixed [rows, k] float64, every\n"
        "entry that enters a list also gets its fixed-order float64 inner product in fixed.");
  m.def("topk_scatter", &topk_scatter, py::arg("scores"), py::arg("q"), py::arg("keys"),
        py::arg("margin"), py::arg("ids"), py::arg("targets"), py::arg("vals"), py::arg("idx"),
        "Merge row r of a [rows, cols] float32 tile of scores of query rows q against key rows\n"
        "keys (column c is key ids[c], any order) into running top-k list targets[r] of\n"
        "vals (float64) / idx [R, k], in place. Keys are ranked by their fixed-order float64\n"
        "inner product (see pair_dots), desc, ties by id asc; the tile scores only skip keys\n"
        "more than margin[r] below the list's last score. targets must be distinct.");
  m.def("pair_dots", &pair_dots, py::arg("x"), py::arg("y"), py::arg("i"), py::arg("j"),
        "float64 [P]: out[p] = <x[i[p]], y[j[p]]> accumulated in float64 in one fixed order\n"
        "that depends on D only (equal rows give bit-equal results wherever they sit).");
  m.def("neighbour_scores", &neighbour_scores, py::arg("metric"), py::arg("knn_a"),
        py::arg("knn_b"),
        "[La, Lb] means over rows of a per-row raw value between [La, N, k] and [Lb, N, k]\n"
        "lists: 'mutual' (|a∩b|), 'cycle' (i ∈ ∪ a_j for j in b_i), 'lcs', 'edit' (Levenshtein).");
  m.def("neighbour_row_values", &neighbour_row_values, py::arg("metric"), py::arg("knn_a"),
        py::arg("knn_b"), "Per-row raw values [N] (int64) for one pair of [N, k] lists.");
  m.def("cknna_terms", &cknna_terms, py::arg("knn_a"), py::arg("score_a"), py::arg("knn_b"),
        py::arg("score_b"),
        "CKNNA sums (Σ P_ij Q_ji, 1ᵀP1, 1ᵀQ1, 1ᵀPQ1, 1ᵀQP1) for P = M∘K, Q = M∘L.");
  m.def("build_info", &build_info, "What this module was compiled with.");
  m.def("set_num_threads", &set_omp_threads, py::arg("n"), "Set the OpenMP thread count.");
  // Exported in every build: the Python layer checks k against it before any launch.
  m.attr("CUDA_MAX_K") = kCudaMaxK;
#ifdef PRH_FAST_WITH_CUDA
  m.attr("has_cuda_kernels") = true;
  m.def("cuda_neighbour_scores", &cuda_neighbour_scores, py::arg("metric"), py::arg("knn_a_ptr"),
        py::arg("knn_b_ptr"), py::arg("La"), py::arg("Lb"), py::arg("N"), py::arg("k"),
        py::arg("out_ptr"), py::arg("stream"),
        "CUDA version of neighbour_scores on device pointers (out: float64 [La, Lb]).");
  m.def("cuda_cknna_workspace_bytes", &cknna_workspace_bytes, py::arg("N"));
  m.def("cuda_cknna_terms", &cuda_cknna_terms, py::arg("knn_a_ptr"), py::arg("score_a_ptr"),
        py::arg("knn_b_ptr"), py::arg("score_b_ptr"), py::arg("N"), py::arg("ka"),
        py::arg("kb"), py::arg("out_ptr"), py::arg("workspace_ptr"), py::arg("stream"),
        "CUDA version of cknna_terms (out: float64[5] on the device).");
#else
  m.attr("has_cuda_kernels") = false;
#endif
}
