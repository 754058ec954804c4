"""Profile prh_fast against a user's checkout of the reference implementation.

``prh-fast bench --against PATH`` imports the reference's ``metrics.py``
(``AlignmentMetrics.measure(name, A, B, **kw)``) and, when present, ``measure_alignment.py``
(``compute_score(x_feats, y_feats, metric, topk, normalize)``) from ``PATH``, runs both
implementations on the same features — generated paired features with shared structure, or the
user's own feature files — and reports times and differences side by side, per metric and for
a layer grid. Each timing is the median of ``repeats`` runs after one untimed warm-up run
(first-call costs such as lazy imports, thread-pool start-up and allocator growth are not
counted for either side), and the machine's load average is recorded before and after: on a
shared machine the ratios are what to read, not the absolute times.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from prh_fast import metrics as fast_metrics
from prh_fast._align import compute_score as fast_compute_score
from prh_fast.errors import InputError

__all__ = ["load_reference", "profile_against", "ProfileReport"]


@dataclass
class ReferenceModules:
    """The reference checkout's modules, as :func:`load_reference` imported them.

    Attributes:
        path: The checkout's folder.
        metrics: Its ``metrics`` module (with ``AlignmentMetrics``).
        measure_alignment: Its ``measure_alignment`` module (with ``compute_score``), or None
            when it is missing or failed to import.
        measure_alignment_error: Why ``measure_alignment`` is None.
        stubs: One note per missing module that was stood in for while importing (only
            ``torchaudio``, whose ``functional.edit_distance`` is all the reference uses).
    """

    path: Path
    metrics: object  # the module with AlignmentMetrics
    measure_alignment: object | None  # the module with compute_score, if importable
    measure_alignment_error: str | None = None
    stubs: list = field(default_factory=list)  # notes on modules stood in for (torchaudio)


@contextlib.contextmanager
def _on_path(path: Path):
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path))


def _levenshtein(seq1, seq2) -> int:
    from prh_fast.reference import levenshtein

    def as_list(s):
        return s.tolist() if hasattr(s, "tolist") else list(s)

    return levenshtein(as_list(seq1), as_list(seq2))


@contextlib.contextmanager
def _torchaudio_stub(notes: list):
    """While the reference is imported: when ``torchaudio`` cannot be imported, a stand-in
    ``torchaudio.functional`` whose ``edit_distance`` is :func:`prh_fast.reference.levenshtein`
    (the reference calls nothing else of torchaudio, and only in ``edit_distance_knn``). The
    stand-in leaves ``sys.modules`` afterwards; the reference keeps its own handle to it."""
    try:
        importlib.import_module("torchaudio.functional")
        yield
        return
    except Exception as exc:  # absent, or present but broken (e.g. built for another torch)
        why = f"{type(exc).__name__}: {exc}"
    ta, taf = types.ModuleType("torchaudio"), types.ModuleType("torchaudio.functional")
    taf.edit_distance = _levenshtein
    ta.functional = taf
    saved = {k: sys.modules.get(k) for k in ("torchaudio", "torchaudio.functional")}
    sys.modules.update({"torchaudio": ta, "torchaudio.functional": taf})
    notes.append(f"torchaudio could not be imported ({why}); the reference's edit_distance_knn "
                 "ran with a stand-in for torchaudio.functional.edit_distance: "
                 "prh_fast.reference.levenshtein")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _import_file(name: str, file: Path):
    spec = importlib.util.spec_from_file_location(f"_prh_reference_{name}", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_reference(path) -> ReferenceModules:
    """Import the reference's ``metrics.py`` and ``measure_alignment.py`` from a checkout.

    Args:
        path: The reference repository's folder.

    Returns:
        A :class:`ReferenceModules`; ``measure_alignment`` is optional (its heavy dependencies
        may be missing), ``metrics.py`` is required.

    Raises:
        ValueError: Not a folder, no ``metrics.py``, an import failure, or no
            ``AlignmentMetrics.measure`` (the message names the file).

    Example:
        >>> import os, tempfile
        >>> from prh_fast.profile import load_reference
        >>> ref = tempfile.mkdtemp()
        >>> with open(os.path.join(ref, "metrics.py"), "w") as f:
        ...     _ = f.write("class AlignmentMetrics:\\n    def measure(*a, **k): return 0.0\\n")
        >>> mods = load_reference(ref)
        >>> mods.measure_alignment is None, mods.measure_alignment_error.endswith("not found")
        (True, True)
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--against: {root} is not a folder (expected a checkout of the "
                         "reference repository)")
    mfile = root / "metrics.py"
    if not mfile.is_file():
        raise InputError(f"--against: {mfile} not found (the reference keeps AlignmentMetrics "
                         "in metrics.py at the repository root)")
    stubs: list = []
    with _on_path(root), _torchaudio_stub(stubs):
        try:
            m = _import_file("metrics", mfile)
        except Exception as exc:
            raise InputError(f"--against: importing {mfile} failed: {exc!r}"
                             f"{_install_hint(exc)}") from exc
        if not hasattr(m, "AlignmentMetrics") or not hasattr(m.AlignmentMetrics, "measure"):
            raise InputError(f"--against: {mfile} has no AlignmentMetrics.measure")
        ma, err = None, None
        afile = root / "measure_alignment.py"
        if afile.is_file():
            try:
                ma = _import_file("measure_alignment", afile)
                if not hasattr(ma, "compute_score"):
                    ma, err = None, f"{afile} has no compute_score"
            except Exception as exc:  # heavy optional deps of the reference may be missing
                err = f"importing {afile} failed: {exc!r}{_install_hint(exc)}"
        else:
            err = f"{afile} not found"
    return ReferenceModules(root, m, ma, err, stubs)


def paired_features(n: int, layers: int, d: int, seed: int = 0):
    """Two ``[N, L, D]`` float32 feature tensors sharing a latent (not pure noise).

    Args:
        n: Samples.
        layers: Layers per model.
        d: Width of every layer.
        seed: Seed of the generator.

    Returns:
        ``(x_feats, y_feats)``.

    Example:
        >>> from prh_fast.profile import paired_features
        >>> x, y = paired_features(16, 2, 8)
        >>> tuple(x.shape), tuple(y.shape)
        ((16, 2, 8), (16, 2, 8))
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 16, generator=g)

    def model():
        h = z @ torch.randn(16, d, generator=g)
        out = torch.empty(n, layers, d)
        for i in range(layers):
            h = torch.tanh(h @ (torch.randn(d, d, generator=g) / d**0.5) + 0.3 * h)
            out[:, i] = h + 0.5 * torch.randn(n, d, generator=g)
        return out

    return model(), model()


def _install_hint(exc: BaseException) -> str:
    """``"; install it: pip install NAME"`` when ``exc`` is a missing module, else ``""``."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        return f"; the reference needs {top!r}: pip install {_PIP_NAMES.get(top, top)}"
    return ""


#: Import names whose pip package is named differently.
_PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "cv2": "opencv-python"}


def _time(fn, repeats: int = 1, warmup: bool = False):
    """``(last result, median seconds, all times)`` of ``repeats`` calls of ``fn`` (after one
    untimed call when ``warmup``)."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def _load() -> float | None:
    """The 1-minute load average (None where the OS does not report it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _as_float(v):
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return float(v)


@dataclass
class ProfileReport:
    """What :func:`profile_against` measured.

    Attributes:
        rows: One dict per metric: times, values, speed-up and absolute difference (or
            ``error`` when the reference failed).
        grid: One dict per grid metric: times, best pairs and whether they agree.
        notes: Lines explaining what was skipped, and how to read the numbers.
        load: The 1-minute load average before and after the runs.
        repeats: Timed runs per measurement (each after one untimed warm-up run).

    Example:
        >>> from prh_fast.profile import ProfileReport
        >>> print(ProfileReport(notes=["layer grid skipped"]).table())
        metric | reference | prh_fast | speed-up | ref value | prh value | abs diff
        ---...
        note: layer grid skipped
    """

    rows: list = field(default_factory=list)
    grid: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    load: tuple = (None, None)
    repeats: int = 1

    def table(self) -> str:
        """The report as a fixed-width text table, one line per metric and grid."""
        lines = [f"{'metric':>18} | {'reference':>10} | {'prh_fast':>10} | {'speed-up':>8} | "
                 f"{'ref value':>10} | {'prh value':>10} | {'abs diff':>8}"]
        lines.append("-" * len(lines[0]))
        for r in self.rows:
            if r.get("error"):
                lines.append(f"{r['metric']:>18} | reference failed: {r['error']}")
                continue
            lines.append(
                f"{r['metric']:>18} | {r['reference_s']:9.3f}s | {r['prh_fast_s']:9.3f}s | "
                f"{r['speedup']:7.1f}x | {r['reference_value']:10.5f} | {r['prh_fast_value']:10.5f}"
                f" | {r['abs_diff']:8.1e}")
        for g in self.grid:
            if g.get("error"):
                lines.append(f"grid {g['metric']}: reference failed: {g['error']}")
                continue
            same = "same pair" if g["same_pair"] else "DIFFERENT pair"
            lines.append(
                f"grid {g['shape']} {g['metric']}: reference {g['reference_s']:.2f}s "
                f"{g['reference_best']}, prh_fast {g['prh_fast_s']:.3f}s {g['prh_fast_best']} "
                f"-> {g['speedup']:.1f}x, {same}")
        lines += [f"note: {n}" for n in self.notes]
        if self.load != (None, None):
            lines.append(f"machine load (1-min average): {self.load[0]} before, {self.load[1]} "
                         f"after; times are medians of {self.repeats} runs after a warm-up")
        return "\n".join(lines)


def profile_against(path, *, x_feats=None, y_feats=None, n: int = 1024, d: int = 256,
                    layers: int = 4, topk: int = 10, metrics=None, grid_metrics=None,
                    normalize: bool = True, repeats: int = 3,
                    warmup: bool = True) -> ProfileReport:
    """Time the reference at ``path`` and prh_fast on the same features, side by side.

    Per metric: the last layers of ``x_feats``/``y_feats`` (L2-normalised when ``normalize``).
    Grid: ``compute_score`` over all layer pairs, for each of ``grid_metrics``.

    Args:
        path: A checkout of the reference repository (see :func:`load_reference`).
        x_feats: ``[N, L, D]`` features of one model (default: :func:`paired_features`).
        y_feats: The other model's features, same ``N``.
        n: Samples of the generated features.
        d: Width of the generated features.
        layers: Layers of the generated features.
        topk: ``topk`` of the kNN metrics.
        metrics: Metric names (default: all eight).
        grid_metrics: Metrics timed over the layer grid (default: ``["mutual_knn"]``).
        normalize: L2-normalise rows, as the reference's ``compute_score`` does.
        repeats: Timed runs of each measurement; the median is reported.
        warmup: One untimed run of each measurement first (both implementations).

    Returns:
        A :class:`ProfileReport`.

    Raises:
        ValueError: The reference cannot be imported (see :func:`load_reference`).

    Example:
        >>> import os, tempfile
        >>> from prh_fast.profile import profile_against
        >>> ref = tempfile.mkdtemp()  # a stand-in checkout that runs the float64 oracle
        >>> with open(os.path.join(ref, "metrics.py"), "w") as f:
        ...     _ = f.write("from prh_fast import reference\\n"
        ...                 "class AlignmentMetrics:\\n"
        ...                 "    measure = staticmethod(reference.measure)\\n")
        >>> report = profile_against(ref, n=64, d=16, layers=2, topk=5,
        ...                          metrics=["mutual_knn", "cka"], repeats=1)
        >>> [(r["metric"], r["abs_diff"] < 1e-5) for r in report.rows]
        [('mutual_knn', True), ('cka', True)]
        >>> report.notes
        ['layer grid skipped: .../measure_alignment.py not found']
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InputError(f"repeats: expected an integer >= 1, got {repeats!r}")
    ref = load_reference(path)
    if x_feats is None or y_feats is None:
        x_feats, y_feats = paired_features(n, layers, d)
    report = ProfileReport(repeats=repeats)
    load_before = _load()
    A, B = x_feats[:, -1], y_feats[:, -1]
    if normalize:
        A, B = F.normalize(A.float(), dim=-1), F.normalize(B.float(), dim=-1)
    names = list(metrics or fast_metrics.SUPPORTED_METRICS)
    for m in names:
        kw = {"topk": topk} if "knn" in m else {}
        fast, t_fast, _ = _time(lambda: fast_metrics.measure(m, A, B, **kw), repeats, warmup)
        row = {"metric": m, "prh_fast_s": t_fast, "prh_fast_value": fast}
        try:
            val, t_ref, _ = _time(lambda: ref.metrics.AlignmentMetrics.measure(m, A, B, **kw),
                                  repeats, warmup)
            val = _as_float(val)
            row.update(reference_s=t_ref, reference_value=val, speedup=t_ref / t_fast,
                       abs_diff=abs(val - fast) if not (math.isnan(val) and math.isnan(fast))
                       else 0.0)
        except Exception as exc:
            row["error"] = repr(exc)
        report.rows.append(row)
    if "edit_distance_knn" in names:
        report.notes += ref.stubs
    if "svcca" in names:
        report.notes.append("svcca: the paper's reference code uses a randomised SVD, so its "
                            "value changes from run to run; prh_fast's is exact")
    if ref.measure_alignment is None:
        report.notes.append(f"layer grid skipped: {ref.measure_alignment_error}")
        report.load = (load_before, _load())
        return report
    for m in list(grid_metrics or ["mutual_knn"]):
        g = {"metric": m, "shape": f"{x_feats.shape[1]}x{y_feats.shape[1]}"}
        fb, t_fast, _ = _time(lambda: fast_compute_score(x_feats, y_feats, m, topk, normalize),
                              repeats, warmup)
        try:
            rb, t_ref, _ = _time(lambda: ref.measure_alignment.compute_score(
                x_feats, y_feats, m, topk, normalize), repeats, warmup)
            g.update(reference_s=t_ref, prh_fast_s=t_fast, speedup=t_ref / t_fast,
                     reference_best=(_as_float(rb[0]), rb[1]), prh_fast_best=fb,
                     same_pair=tuple(rb[1] or ()) == tuple(fb[1] or ()))
        except Exception as exc:
            g["error"] = repr(exc)
        report.grid.append(g)
    report.load = (load_before, _load())
    return report
