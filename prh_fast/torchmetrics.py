"""Alignment metrics as ``torchmetrics.Metric`` classes (optional extra:
``pip install prh_fast[torchmetrics]``).

Each class takes paired features batch by batch, ``update(x, y)`` with ``x [B, Dx]`` and
``y [B, Dy]`` (row ``i`` of ``x`` and of ``y`` describe the same sample), and ``compute()``
returns the metric of ``prh_fast.metrics`` on all rows seen (on every rank, after
torchmetrics' synchronisation), as a 0-d float64 tensor. Like ``prh_fast.metrics``, nothing
here normalises rows: pass the features as the metric should see them.

Memory:

- :class:`CKA`, :class:`UnbiasedCKA` and :class:`SVCCA` keep float64 moment sums with ``"sum"``
  reductions: ``Σ x``, ``Σ y``, ``XᵀX``, ``YᵀY``, ``XᵀY`` and, for the unbiased estimator, the
  row-norm sums ``Σ a``, ``Σ a²``, ``Σ a x``, ``Σ b``, ``Σ b²``, ``Σ b y``, ``Σ a b``,
  ``Σ a y``, ``Σ b x`` (``a_i = ||x_i||²``, ``b_i = ||y_i||²``):
  ``Dx² + Dy² + Dx·Dy + O(Dx + Dy)`` float64 values whatever the number of batches (14.2 MB
  at ``Dx = Dy = 768``). The statistics are those of ``prh_fast.store`` (docs/metrics.md,
  "Kernel metrics"); they equal the in-memory metric on
  the concatenated float64 features to ~1e-9 relative. The sums are taken about the origin, so
  features that sit far from the origin next to their spread (mean / std ratio ``ρ`` per
  column) lose about ``ρ²`` (CKA, SVCCA) or ``ρ⁴`` (unbiased CKA) times float64's precision
  (measured against the metric: ~1e-10 relative at ``ρ = 100``, ~3e-6 for unbiased CKA at
  ``ρ = 1000``). The sums cannot be taken about the data's own mean (each rank would use a
  different one, and sums about different points do not add); ``center_x`` / ``center_y``
  name a common point instead (any vector near the mean, e.g. one from a reference batch, the
  same on every rank), which removes the loss.
- :class:`MutualKNN`, :class:`CycleKNN` and :class:`CKNNA` need every row at once: they hold
  a copy of every batch (``"cat"`` states), ``N x (Dx + Dy)`` values in the input dtype,
  and score them with prh_fast's engine.

The dimensions ``dim_x`` / ``dim_y`` of the moment metrics may be given up front (the states
are then allocated at construction); when left ``None`` they are taken from the first batch.
On several ranks, either give them or have every rank update at least once before
``compute()``: torchmetrics sums states of equal shapes only.

``metric(x, y)`` (torchmetrics' ``forward``) adds the batch and also returns the metric of that
batch alone, so the batch must be large enough for the metric on its own (more than ``topk``
rows for the neighbour metrics, 4 for unbiased HSIC, more than ``cca_dim`` for SVCCA); with
smaller batches call ``update(x, y)`` and log the metric object (Lightning then calls
``compute()`` and ``reset()`` at the end of the epoch).

Example:
    >>> import torch
    >>> from prh_fast.torchmetrics import CKA, MutualKNN
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(96, 16, generator=g)
    >>> y = x @ torch.randn(16, 12, generator=g)
    >>> metrics = {"cka": CKA(), "mutual_knn": MutualKNN(topk=5)}
    >>> for a in range(0, 96, 32):
    ...     for m in metrics.values():
    ...         step_value = m(x[a:a + 32], y[a:a + 32])
    >>> from prh_fast.metrics import cka, mutual_knn
    >>> abs(float(metrics["cka"].compute()) - cka(x, y)) < 1e-6
    True
    >>> float(metrics["mutual_knn"].compute()) == mutual_knn(x, y, topk=5)
    True
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

try:
    from torchmetrics import Metric
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "prh_fast.torchmetrics needs the torchmetrics package: pip install prh_fast[torchmetrics]"
    ) from _err

from prh_fast._validate import as_features, as_pair, as_tensor, check_positive_int
from prh_fast.errors import InputError
from prh_fast.metrics import cknna, cycle_knn, mutual_knn
from prh_fast.metrics._kernel import cka_ratio
from prh_fast.metrics._ties import check_ties
from prh_fast.store._moments import _pair_hsic, _self_hsic, _svcca_basis

if TYPE_CHECKING:
    from prh_fast._validate import Features
    from prh_fast.knn import AnnParams

__all__ = ["MutualKNN", "CycleKNN", "CKNNA", "CKA", "UnbiasedCKA", "SVCCA"]

_F64 = torch.float64


def _batch(x, y, dims=None):
    """Validated ``(x, y)`` of one batch (detached); ``dims``: the ``(Dx, Dy)`` seen so far."""
    x, y = as_pair(x, y, names=("x", "y"))
    if dims is not None:
        for t, d, name in ((x, dims[0], "x"), (y, dims[1], "y")):
            if d is not None and t.shape[1] != d:
                raise InputError(f"{name}: expected {d} features per row (as in earlier batches "
                                 f"or dim_{name}), got shape {tuple(t.shape)}")
    return x, y


def _center(c, name: str, dim):
    """A float64 ``[D]`` centre vector (or ``None``), checked against the declared ``dim``."""
    if c is None:
        return None
    t = as_features(as_tensor(c, name).reshape(1, -1), name).reshape(-1).to(_F64).clone()
    if dim is not None and t.shape[0] != dim:
        raise InputError(f"{name}: expected {dim} values (the feature dimension), got "
                         f"{t.shape[0]}")
    return t


def _result(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=_F64, device=device)


class _Base(Metric):
    full_state_update = False
    is_differentiable = False
    higher_is_better = True


# ------------------------------------------------------------------------------------------
# moment metrics
# ------------------------------------------------------------------------------------------
class _Moments(_Base):
    """Float64 moment sums of paired batches (see the module docstring)."""

    _unbiased = False

    def __init__(self, dim_x: int | None = None, dim_y: int | None = None, *,
                 center_x: Features | None = None, center_y: Features | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        dims = (None if dim_x is None else check_positive_int(dim_x, "dim_x"),
                None if dim_y is None else check_positive_int(dim_y, "dim_y"))
        centers = (_center(center_x, "center_x", dims[0]), _center(center_y, "center_y", dims[1]))
        self._dims = tuple(d if c is None else c.shape[0] for d, c in zip(dims, centers))
        # buffers (not states): moved with the metric, never reduced or reset
        self.register_buffer("center_x", centers[0], persistent=False)
        self.register_buffer("center_y", centers[1], persistent=False)
        dx, dy = (0 if d is None else d for d in self._dims)
        self.add_state("n", default=torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        for name, shape in self._shapes(dx, dy).items():
            self.add_state(name, default=torch.zeros(shape, dtype=_F64), dist_reduce_fx="sum")

    def _shapes(self, dx: int, dy: int) -> dict:
        shapes = {"sx": (dx,), "sy": (dy,), "gx": (dx, dx), "gy": (dy, dy), "cxy": (dx, dy)}
        if self._unbiased:
            shapes.update(sa=(), saa=(), sax=(dx,), sb=(), sbb=(), sby=(dy,), sab=(),
                          say=(dy,), sbx=(dx,))
        return shapes

    def _seen_dims(self):
        # an undeclared dimension has a 0-sized state until the first batch
        return (self.gx.shape[0] or self._dims[0], self.gy.shape[0] or self._dims[1])

    def update(self, x: Features, y: Features) -> None:
        """Add one batch of paired features.

        Args:
            x: ``[B, Dx]`` features of the first model (tensor or array).
            y: ``[B, Dy]`` features of the second model, row ``i`` paired with ``x``'s.

        Raises:
            InputError: naming ``x`` or ``y`` (rank, row count, width, NaN/Inf).
        """
        x, y = _batch(x, y, self._seen_dims())
        dev = self.n.device
        if self.gx.shape[0] != x.shape[1] or self.gy.shape[0] != y.shape[1]:
            # first batch without declared dimensions: allocate the states
            for name, shape in self._shapes(x.shape[1], y.shape[1]).items():
                setattr(self, name, torch.zeros(shape, dtype=_F64, device=dev))
        x = x.to(device=dev, dtype=_F64)
        y = y.to(device=dev, dtype=_F64)
        if self.center_x is not None:
            x = x - self.center_x.to(device=dev, dtype=_F64)
        if self.center_y is not None:
            y = y - self.center_y.to(device=dev, dtype=_F64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.gx.addmm_(x.T, x)
        self.gy.addmm_(y.T, y)
        self.cxy.addmm_(x.T, y)
        if self._unbiased:
            a = (x * x).sum(1)
            b = (y * y).sum(1)
            self.sa += a.sum()
            self.saa += a @ a
            self.sax += a @ x
            self.sb += b.sum()
            self.sbb += b @ b
            self.sby += b @ y
            self.sab += a @ b
            self.say += a @ y
            self.sbx += b @ x

    def _reduce_states(self, incoming_state: dict) -> None:
        # torchmetrics' forward (and merge_state) adds other states to these; states never
        # allocated (no batch yet, dimensions not declared) hold nothing to add
        if any(incoming_state[k].shape != getattr(self, k).shape for k in self._defaults):
            if float(incoming_state["n"]) == 0:
                return
            if float(self.n) == 0:
                for k in self._defaults:
                    setattr(self, k, incoming_state[k].to(self.n.device).clone())
                return
        super()._reduce_states(incoming_state)

    def _stats(self, minimum: int, what: str):
        n = int(round(float(self.n)))
        if n < minimum:
            raise InputError(f"{what} needs N >= {minimum} samples in total, got N = {n} "
                             f"(x/y: update with more rows)")
        bad = [s for s, g in (("x", self.gx), ("y", self.gy))
               if not bool(torch.isfinite(g).all())]
        if bad:
            raise InputError(f"{'/'.join(bad)}: the float64 sums of squares overflow (features "
                             f"too large to square); normalise the rows")
        u = self._unbiased
        sx = SimpleNamespace(s=self.sx, G=self.gx)
        sy = SimpleNamespace(s=self.sy, G=self.gy)
        p = SimpleNamespace(C=self.cxy)
        if u:
            sx.sa, sx.saa, sx.sax = self.sa, self.saa, self.sax
            sy.sa, sy.saa, sy.sax = self.sb, self.sbb, self.sby
            p.sab, p.say, p.sbx = self.sab, self.say, self.sbx
        return n, sx, sy, p


class CKA(_Moments):
    """Linear CKA (biased HSIC) over all batches, from ``O((Dx + Dy)²)`` moment states.

    ``compute()`` equals ``prh_fast.metrics.cka(X, Y)`` on the concatenated batches (float64
    evaluation; ``kernel_metric="ip"``). An RBF kernel has no moment form: ``kernel_metric=
    "rbf"`` is refused (score RBF CKA with ``prh_fast.metrics.cka`` on held features).

    Args:
        dim_x: ``Dx``, or ``None`` to take it from the first batch.
        dim_y: ``Dy``, or ``None`` to take it from the first batch.
        kernel_metric: ``"ip"`` only.
        center_x: optional ``[Dx]`` vector subtracted from every row of ``x`` before the sums
            (the metric does not change; see the module docstring on precision). Use the
            same vector on every rank, e.g. a mean of reference features.
        center_y: the same for ``y`` (``[Dy]``).
        **kwargs: ``torchmetrics.Metric`` options (``dist_sync_on_step``, ``process_group``,
            ...).

    Raises:
        InputError: ``kernel_metric`` other than ``"ip"``, bad ``dim_x`` / ``dim_y`` /
            ``center_x`` / ``center_y``.

    Example:
        >>> import torch
        >>> from prh_fast.torchmetrics import CKA
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 8, generator=g)
        >>> m = CKA()
        >>> for a in range(0, 64, 16):
        ...     m.update(x[a:a + 16], 2 * x[a:a + 16])
        >>> round(float(m.compute()), 6)
        1.0
    """

    def __init__(self, dim_x: int | None = None, dim_y: int | None = None, *,
                 kernel_metric: str = "ip", center_x: Features | None = None,
                 center_y: Features | None = None, **kwargs: Any) -> None:
        if kernel_metric != "ip":
            raise InputError(f"kernel_metric: {kernel_metric!r} has no moment form; the "
                             f"streaming CKA supports 'ip' (linear) only")
        super().__init__(dim_x, dim_y, center_x=center_x, center_y=center_y, **kwargs)

    def compute(self) -> torch.Tensor:
        """The CKA of all rows seen (0-d float64 tensor).

        Raises:
            InputError: fewer than 2 (4 for the unbiased estimator) rows in total.
        """
        u = self._unbiased
        n, sx, sy, p = self._stats(4 if u else 2, "unbiased HSIC" if u else "cka")
        value = cka_ratio(_pair_hsic(sx, sy, p, n, u), _self_hsic(sx, n, u),
                          _self_hsic(sy, n, u))
        return _result(value, self.n.device)


class UnbiasedCKA(CKA):
    """Linear CKA with the unbiased HSIC estimator, from ``O((Dx + Dy)²)`` moment states.

    ``compute()`` equals ``prh_fast.metrics.unbiased_cka(X, Y)`` on the concatenated batches
    (needs ``N >= 4`` rows in total). Arguments as :class:`CKA`.

    Example:
        >>> import torch
        >>> from prh_fast.torchmetrics import UnbiasedCKA
        >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        >>> m = UnbiasedCKA(dim_x=8, dim_y=8)
        >>> m.update(x[:31], x[:31]); m.update(x[31:], x[31:])
        >>> round(float(m.compute()), 6)
        1.0
    """

    _unbiased = True


class SVCCA(_Moments):
    """SVCCA over all batches, from ``O((Dx + Dy)²)`` moment states.

    The standardised Gram matrices and cross-product follow from the centred moments, so
    ``compute()`` equals ``prh_fast.metrics.svcca(X, Y, cca_dim)`` on the concatenated batches.

    Args:
        cca_dim: the subspaces' dimension, ``1 <= cca_dim <= min(N - 1, Dx, Dy)`` (checked
            against ``N`` at ``compute()``).
        dim_x: ``Dx``, or ``None`` to take it from the first batch.
        dim_y: ``Dy``, or ``None`` to take it from the first batch.
        center_x, center_y: optional ``[Dx]`` / ``[Dy]`` vectors subtracted from the rows
            before the sums (as :class:`CKA`).
        **kwargs: ``torchmetrics.Metric`` options.

    Raises:
        InputError: a bad ``cca_dim``, ``dim_x``, ``dim_y``, ``center_x`` or ``center_y``.

    Example:
        >>> import torch
        >>> from prh_fast.torchmetrics import SVCCA
        >>> x = torch.randn(60, 6, generator=torch.Generator().manual_seed(0))
        >>> m = SVCCA(cca_dim=3)
        >>> y = x[:, [1, 0, 2, 3, 4, 5]]
        >>> m.update(x[:25], y[:25]); m.update(x[25:], y[25:])
        >>> round(float(m.compute()), 6)
        1.0
    """

    def __init__(self, cca_dim: int = 10, dim_x: int | None = None, dim_y: int | None = None,
                 *, center_x: Features | None = None, center_y: Features | None = None,
                 **kwargs: Any) -> None:
        r = check_positive_int(cca_dim, "cca_dim")
        super().__init__(dim_x, dim_y, center_x=center_x, center_y=center_y, **kwargs)
        self.cca_dim = r

    def compute(self) -> torch.Tensor:
        """The SVCCA of all rows seen (0-d float64 tensor).

        Raises:
            InputError: ``cca_dim`` above ``min(N - 1, Dx, Dy)`` or the features' rank.
        """
        n, sx, sy, p = self._stats(2, "svcca")
        dx, dy = sx.G.shape[0], sy.G.shape[0]
        r = check_positive_int(self.cca_dim, "cca_dim", minimum=1,
                               maximum=max(1, min(n - 1, dx, dy)))
        bx, wx = _svcca_basis(sx, n, r, "x")
        by, wy = _svcca_basis(sy, n, r, "y")
        Cc = p.C - torch.outer(sx.s, sy.s) / n
        M = bx.T @ (Cc * wx[:, None] * wy[None, :]) @ by
        return _result(float(torch.linalg.svdvals(M).clamp(0.0, 1.0).mean()), self.n.device)


# ------------------------------------------------------------------------------------------
# neighbour metrics: concatenated features
# ------------------------------------------------------------------------------------------
class _Held(_Base):
    """Concatenated paired features (``"cat"`` states)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("x", default=[], dist_reduce_fx="cat")
        self.add_state("y", default=[], dist_reduce_fx="cat")

    def update(self, x: Features, y: Features) -> None:
        """Keep one batch of paired features.

        Args:
            x: ``[B, Dx]`` features of the first model (tensor or array).
            y: ``[B, Dy]`` features of the second model, row ``i`` paired with ``x``'s.

        Raises:
            InputError: naming ``x`` or ``y`` (rank, row count, width, NaN/Inf).
        """
        dims = None
        if self.x:
            dims = (self.x[0].shape[1], self.y[0].shape[1])
        x, y = _batch(x, y, dims)
        self.x.append(x.detach().clone())
        self.y.append(y.detach().clone())

    def _all(self):
        xs, ys = self.x, self.y
        if isinstance(xs, torch.Tensor):  # after a distributed sync: already concatenated
            return xs, ys
        if not xs:
            raise InputError("x/y: compute() before any update()")
        dt = torch.promote_types(xs[0].dtype, ys[0].dtype)
        for t in list(xs) + list(ys):
            dt = torch.promote_types(dt, t.dtype)
        return torch.cat([t.to(dt) for t in xs]), torch.cat([t.to(dt) for t in ys])


class MutualKNN(_Held):
    """Mutual k-nearest-neighbour alignment over all batches (holds the features).

    ``compute()`` equals ``prh_fast.metrics.mutual_knn(X, Y, topk, ties=ties, backend=backend)``
    on the concatenated batches. Memory: ``N x (Dx + Dy)`` values.

    Args:
        topk: neighbours per sample (``1 <= topk <= N - 1`` at ``compute()``).
        ties: ``"rule"`` or ``"expected"`` (see ``prh_fast.metrics.mutual_knn``).
        backend: neighbour-search backend (``None``: the default).
        **kwargs: ``torchmetrics.Metric`` options.

    Raises:
        InputError: a bad ``topk`` or ``ties``.

    Example:
        >>> import torch
        >>> from prh_fast.torchmetrics import MutualKNN
        >>> x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
        >>> m = MutualKNN(topk=5)
        >>> m.update(x[:15], 3 * x[:15]); m.update(x[15:], 3 * x[15:])
        >>> float(m.compute())
        1.0
    """

    def __init__(self, topk: int = 10, *, ties: str = "rule",
                 backend: str | AnnParams | None = None, **kwargs: Any) -> None:
        k, t = check_positive_int(topk, "topk"), check_ties(ties)
        super().__init__(**kwargs)
        self.topk, self.ties, self.backend = k, t, backend

    def compute(self) -> torch.Tensor:
        """The mutual-kNN score of all rows seen (0-d float64 tensor)."""
        x, y = self._all()
        return _result(mutual_knn(x, y, self.topk, ties=self.ties, backend=self.backend),
                       x.device)


class CycleKNN(_Held):
    """Cycle k-nearest-neighbour alignment over all batches (holds the features).

    ``compute()`` equals ``prh_fast.metrics.cycle_knn(X, Y, topk, backend=backend)`` on the
    concatenated batches. Memory: ``N x (Dx + Dy)`` values.

    Args:
        topk: neighbours per sample (``1 <= topk <= N - 1`` at ``compute()``).
        backend: neighbour-search backend (``None``: the default).
        **kwargs: ``torchmetrics.Metric`` options.

    Raises:
        InputError: a bad ``topk``.

    Example:
        >>> import torch
        >>> from prh_fast.torchmetrics import CycleKNN
        >>> x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> m = CycleKNN(topk=5)
        >>> m.update(x[:10], x[:10]); m.update(x[10:], x[10:])
        >>> round(float(m.compute()), 3)
        0.967
    """

    def __init__(self, topk: int = 10, *, backend: str | AnnParams | None = None,
                 **kwargs: Any) -> None:
        k = check_positive_int(topk, "topk")
        super().__init__(**kwargs)
        self.topk, self.backend = k, backend

    def compute(self) -> torch.Tensor:
        """The cycle-kNN score of all rows seen (0-d float64 tensor)."""
        x, y = self._all()
        return _result(cycle_knn(x, y, self.topk, backend=self.backend), x.device)


class CKNNA(_Held):
    """CKA restricted to mutual nearest neighbours, over all batches (holds the features).

    ``compute()`` equals ``prh_fast.metrics.cknna(X, Y, topk, distance_agnostic, unbiased,
    backend=backend, exclude_self=exclude_self)`` on the concatenated batches. Memory:
    ``N x (Dx + Dy)`` values.

    Args:
        topk: neighbours per sample (``2 <= topk <= N - 1`` at ``compute()``); ``None``:
            ``N - 1``.
        distance_agnostic: score the 0/1 masks instead of the masked kernels.
        unbiased: the unbiased HSIC estimator.
        backend: neighbour-search backend (``None``: the default).
        exclude_self: whether a row's own entry competes for its top-k (see
            ``prh_fast.metrics.cknna``).
        **kwargs: ``torchmetrics.Metric`` options.

    Raises:
        InputError: a bad ``topk``.

    Example:
        >>> import torch
        >>> from prh_fast.torchmetrics import CKNNA
        >>> x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
        >>> m = CKNNA(topk=10)
        >>> m.update(x[:20], x[:20]); m.update(x[20:], x[20:])
        >>> round(float(m.compute()), 3)
        1.0
    """

    def __init__(self, topk: int | None = 10, distance_agnostic: bool = False,
                 unbiased: bool = True, *, backend: str | AnnParams | None = None,
                 exclude_self: bool | None = None, **kwargs: Any) -> None:
        k = None if topk is None else check_positive_int(topk, "topk", minimum=2)
        super().__init__(**kwargs)
        self.topk = k
        self.distance_agnostic = bool(distance_agnostic)
        self.unbiased = bool(unbiased)
        self.backend = backend
        self.exclude_self = exclude_self

    def compute(self) -> torch.Tensor:
        """The CKNNA score of all rows seen (0-d float64 tensor)."""
        x, y = self._all()
        return _result(cknna(x, y, self.topk, self.distance_agnostic, self.unbiased,
                             backend=self.backend, exclude_self=self.exclude_self), x.device)
