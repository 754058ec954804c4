"""Heatmaps of alignment results (matplotlib's ``Agg`` canvas on a bare ``Figure``: no pyplot,
so a user's backend and open figures are left alone; matplotlib is imported only when a plot is
made, so ``import prh_fast`` never needs it).

- ``plot_grid(grid_result, path)``: model x model best scores, one annotated cell per pair.
- ``plot_layers(scores, path, x_name, y_name, metric, best_pair=None)``: layer x layer scores of
  one model pair with the best pair outlined.
"""
from __future__ import annotations

import numpy as np

from prh_fast._io import atomic_write

__all__ = ["plot_grid", "plot_layers", "colour_range"]

#: Annotate each cell with its value up to this many rows / columns.
MAX_ANNOTATED = 20


def _figure(w, h):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path) -> str:
    """PNG to a temporary file beside ``path``, then ``os.replace`` (never half-written)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110,
                                                   bbox_inches="tight"))


#: The range of metrics bounded by construction (``lcs_knn``: 0 to ``topk``).
_NATURAL_RANGE = {"mutual_knn": (0.0, 1.0), "cycle_knn": (0.0, 1.0), "cka": (0.0, 1.0),
                  "unbiased_cka": (0.0, 1.0), "cknna": (0.0, 1.0), "svcca": (0.0, 1.0)}


def colour_range(mat, metric=None, topk=None) -> tuple:
    """``(vmin, vmax)`` of a heatmap's colour scale: the finite values' range; when they are
    all (nearly) one value -- a one-model-by-one-model grid, a constant matrix -- the metric's
    natural range if it holds them, else a band of 10% (at least 0.05) around the value, so
    the scale never collapses to a point.

    Example:
        >>> colour_range([[0.3]], "mutual_knn"), colour_range([[3.0]], "lcs_knn", topk=10)
        ((0.0, 1.0), (0.0, 10.0))
        >>> colour_range([[2.5]])
        (2.25, 2.75)
    """
    m = np.asarray(mat, dtype=np.float64)
    finite = m[np.isfinite(m)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo > 1e-9 * max(1.0, abs(hi)):
        return lo, hi
    natural = (0.0, float(topk)) if metric == "lcs_knn" and topk else _NATURAL_RANGE.get(metric)
    if natural is not None and natural[0] <= lo and hi <= natural[1]:
        return natural
    pad = max(0.1 * abs(lo), 0.05)
    return lo - pad, hi + pad


def _heatmap(ax, fig, mat, label, metric=None, topk=None):
    vmin, vmax = colour_range(mat, metric, topk)
    im = ax.imshow(np.ma.masked_invalid(mat), cmap="viridis", vmin=vmin, vmax=vmax,
                   aspect="auto", interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(label)
    cb.ax.ticklabel_format(useOffset=False)  # plain tick values, no "+2.5" offset label
    return im, vmin, vmax


def _annotate(ax, mat, vmin, vmax, digits):
    mid = (vmin + vmax) / 2
    for a in range(mat.shape[0]):
        for b in range(mat.shape[1]):
            v = mat[a, b]
            if not np.isfinite(v):
                continue
            # dark text on the bright end of viridis, white on the dark end
            ax.text(b, a, f"{v:.{digits}f}", ha="center", va="center", fontsize=8,
                    color="black" if v > mid else "white")


def _metric_label(metric, topk):
    return f"{metric} (k={topk})" if topk is not None and "knn" in metric else metric


def plot_grid(grid_result, path) -> str:
    """Heatmap of a model grid's best scores, one annotated cell per model pair.

    Args:
        grid_result: A :class:`prh_fast.GridResult` (or anything with ``scores`` ``[Mx, My]``,
            ``x_names``, ``y_names``, ``metric`` and ``topk``).
        path: The PNG file to write (atomically).

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> import os, tempfile, types
        >>> from prh_fast.plots import plot_grid
        >>> grid = types.SimpleNamespace(scores=[[0.5, 0.2], [0.1, 0.4]], x_names=["a", "b"],
        ...                              y_names=["c", "d"], metric="mutual_knn", topk=10)
        >>> path = plot_grid(grid, os.path.join(tempfile.mkdtemp(), "grid.png"))
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    mat = np.asarray(grid_result.scores, dtype=np.float64)
    mx, my = mat.shape
    xn, yn = list(grid_result.x_names), list(grid_result.y_names)
    longest = max(len(s) for s in xn + yn)
    w = min(40.0, max(4.5, 2.5 + 0.65 * my + 0.07 * longest))
    h = min(40.0, max(3.4, 1.8 + 0.5 * mx + 0.07 * longest))
    fig, ax = _figure(w, h)
    label = _metric_label(grid_result.metric, grid_result.topk)
    _, vmin, vmax = _heatmap(ax, fig, mat, label, grid_result.metric, grid_result.topk)
    ax.set_xticks(range(my))
    ax.set_xticklabels(yn, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(mx))
    ax.set_yticklabels(xn, fontsize=9)
    ax.set_xlabel("y models")
    ax.set_ylabel("x models")
    if mx <= MAX_ANNOTATED and my <= MAX_ANNOTATED:
        _annotate(ax, mat, vmin, vmax, 3 if max(mx, my) <= 10 else 2)
    ax.set_title(f"best layer-pair alignment: {label}")
    fig.tight_layout()
    return _save(fig, path)


def plot_layers(scores, path, x_name: str, y_name: str, metric: str, best_pair=None,
                topk=None) -> str:
    """Heatmap of one model pair's layer x layer scores, the best pair outlined in red.

    Args:
        scores: ``[Lx, Ly]`` array or tensor (rows: x layers).
        path: The PNG file to write (atomically).
        x_name: The x model's name.
        y_name: The y model's name.
        metric: The metric's name (the colour bar's label).
        best_pair: ``(i, j)`` to outline, or None.
        topk: Shown in the label of kNN metrics.

    Returns:
        ``path``.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from prh_fast.plots import plot_layers
        >>> scores = np.arange(12, dtype=float).reshape(3, 4) / 12
        >>> path = plot_layers(scores, os.path.join(tempfile.mkdtemp(), "pair.png"), "x", "y",
        ...                    "cka", best_pair=(2, 3))
        >>> os.path.basename(path)
        'pair.png'
    """
    from matplotlib.patches import Rectangle

    if hasattr(scores, "detach"):
        scores = scores.detach().cpu().numpy()
    mat = np.asarray(scores, dtype=np.float64)
    lx, ly = mat.shape
    w = min(30.0, max(4.5, 3.0 + 0.32 * ly))
    h = min(30.0, max(3.4, 2.2 + 0.28 * lx))
    fig, ax = _figure(max(w, 4.5), max(h, 3.5))
    label = _metric_label(metric, topk)
    _, vmin, vmax = _heatmap(ax, fig, mat, label, metric, topk)
    ax.set_xlabel(f"{y_name} layer")
    ax.set_ylabel(f"{x_name} layer")
    step_x = max(1, int(np.ceil(ly / 24)))
    step_y = max(1, int(np.ceil(lx / 24)))
    ax.set_xticks(range(0, ly, step_x))
    ax.set_yticks(range(0, lx, step_y))
    if lx <= 12 and ly <= 12:
        _annotate(ax, mat, vmin, vmax, 2)
    title = f"{x_name} vs {y_name}: {label}"
    if best_pair is not None and best_pair[0] is not None and int(best_pair[0]) >= 0:
        i, j = int(best_pair[0]), int(best_pair[1])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red",
                           linewidth=2.0))
        title += f"\nbest {mat[i, j]:.3f} at layers ({i}, {j})"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
