"""prh_fast's benchmarks, run from the repository root as modules of this package, e.g.
``python -m benchmarks.bench_knn``. Each ``bench_<op>`` checks correctness first, then times on
the shared harness (:mod:`benchmarks._harness`) and writes JSON to ``benchmarks/results``; data
come from :mod:`prh_fast.testing`."""
