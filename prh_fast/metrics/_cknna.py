"""CKNNA in O(N·k) from two neighbour lists (docs/metrics.md, "cknna").

``M_P[i, j] = 1`` for ``j`` in row ``i``'s top-k, ``M = M_K ∘ M_L``, and the similarity is an
HSIC estimator of the masked, non-symmetric matrices ``P = M∘K``, ``Q = M∘L``. As the reference,
the diagonal competes for the top-k unless ``unbiased=True`` (:func:`cknna_excludes_self`); the
lists come from one search per layer (:func:`cknna_lists`), with the row's own entry merged in
when it is eligible. The sums below work either way (an entry ``(i, i)`` is its own transpose).
Only the ``N·k`` masked entries are touched; the five sums the estimators need are

``Σ_ij P_ij Q_ji`` (the transpose term: nonzero only where j ∈ M_i and i ∈ M_j), ``1ᵀP1``,
``1ᵀQ1``, ``1ᵀPQ1`` and ``1ᵀQP1`` (column sums of one times row sums of the other).

Which implementation computes them is the backend registry's choice (``prh_fast.knn._backends``,
as for the neighbour-set scores): the native kernel on CPU, the torch version below elsewhere,
and ``cknna_terms_cuda`` -- the CUDA kernel (``csrc/cknna/cknna_cuda.cu``) -- for CUDA lists
when the backend is ``"cuda"``.
"""
from __future__ import annotations

import torch

from prh_fast import _native
from prh_fast.errors import BackendUnavailableError, InputError
from prh_fast.metrics._kernel import hsic_from_sums
from prh_fast.metrics._neighbours import row_membership


def cknna_excludes_self(unbiased, exclude_self) -> bool:
    """Whether row ``i``'s own entry is kept out of its top-k: the reference masks the diagonal
    only when ``unbiased``; ``exclude_self`` (True / False) overrides, ``None`` follows it."""
    if exclude_self is None:
        return bool(unbiased)
    if not isinstance(exclude_self, bool):
        raise InputError(f"exclude_self: expected None, True or False, got {exclude_self!r}")
    return exclude_self


def cknna_lists(X, k: int, backend, exclude_self: bool, *, return_report: bool = False):
    """One layer's CKNNA lists ``(idx [N, k], float64 similarities [N, k])`` -- and the search's
    report with ``return_report``. ``exclude_self=False``: the top-k of the whole row of
    ``X Xᵀ``, diagonal included (``knn(..., include_self=True)``)."""
    from prh_fast.knn import _search

    idx, vals, report, _ = _search(X, k, backend=backend, include_self=not exclude_self)
    return (idx, vals, report) if return_report else (idx, vals)


def cknna_values(idx, vals, unbiased: bool, distance_agnostic: bool):
    """The masked kernel's entries at the listed positions, float64: the similarities, or ones
    (``distance_agnostic``: the mask itself). The unbiased estimator works on zero-diagonal
    kernels, so a row's own entry (listed when self competes) is 0 there: it keeps its place
    in the top-k but adds nothing."""
    v = torch.ones_like(vals, dtype=torch.float64) if distance_agnostic else vals.double()
    if unbiased:
        me = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
        v = v.masked_fill(idx == me, 0.0)
    return v


def cknna_terms(ia, sa, ib, sb, *, backend=None):
    """The five float64 sums for lists ``ia [N, ka]`` / scores ``sa`` and ``ib`` / ``sb``.

    Args:
        ia, ib: ``[N, ka]``, ``[N, kb]`` int64 neighbour lists on one device.
        sa, sb: their masked kernel values (``cknna_values``), same shapes.
        backend: the computation's backend (``None``: the configured one, else auto); the
            registry maps it to the native CPU, torch or CUDA implementation (``"cuda"``:
            the CUDA kernel, for CUDA lists).

    Returns:
        ``(Σ P_ij Q_ji, 1ᵀP1, 1ᵀQ1, 1ᵀPQ1, 1ᵀQP1)`` as Python floats.

    Raises:
        InputError: a backend that does not take these lists (``"cuda"`` with CPU lists or
            ``k > CUDA_MAX_K``).
        BackendUnavailableError: a backend asked for by name that cannot run here.

    Example:
        >>> i = torch.tensor([[1], [0]])
        >>> s = torch.tensor([[0.5], [0.5]], dtype=torch.float64)
        >>> cknna_terms(i, s, i, s, backend="torch")
        (0.5, 1.0, 1.0, 0.5, 0.5)
    """
    from prh_fast.knn._backends import resolve

    impl = resolve(backend, ia.device, op="setops", k=max(ia.shape[-1], ib.shape[-1])).setops
    if impl == "cuda":
        return cknna_terms_cuda(ia, sa, ib, sb)
    if impl == "cpu":
        t = _native.native().cknna_terms(
            ia.contiguous().numpy(), sa.to(torch.float64).contiguous().numpy(),
            ib.contiguous().numpy(), sb.to(torch.float64).contiguous().numpy(),
        )
        return tuple(float(v) for v in t)
    return cknna_terms_torch(ia, sa.to(torch.float64), ib, sb.to(torch.float64))


def cknna_terms_cuda(ia, sa, ib, sb):
    """The five sums by the CUDA kernel, for lists and scores on one CUDA device.

    Args:
        ia, sa, ib, sb: as :func:`cknna_terms`, on one CUDA device, ``1 <= k <= CUDA_MAX_K``.

    Returns:
        The five sums as Python floats.

    Raises:
        InputError: inputs that are not on one CUDA device, bad shapes, ``k`` or entries.
        BackendUnavailableError: ``prh_fast._C`` was built without CUDA kernels.

    Example:
        >>> i = torch.zeros(4, 1, dtype=torch.int64)
        >>> cknna_terms_cuda(i, i.double(), i, i.double())  # CPU lists
        Traceback (most recent call last):
        ...
        prh_fast.errors.InputError: ia, sa, ib, sb: expected one CUDA device, got ['cpu']
    """
    from prh_fast.knn._backends import CUDA_MAX_K, device_type
    from prh_fast.metrics._neighbours import check_lists_in_range, cuda_stream

    n = ia.shape[0]
    if ia.dim() != 2 or ib.dim() != 2 or ib.shape[0] != n or sa.shape != ia.shape \
            or sb.shape != ib.shape:
        raise InputError(f"ia, sa, ib, sb: expected [N, ka], [N, ka], [N, kb], [N, kb], got "
                         f"{tuple(ia.shape)}, {tuple(sa.shape)}, {tuple(ib.shape)}, "
                         f"{tuple(sb.shape)}")
    devs = {t.device for t in (ia, sa, ib, sb)}
    if len(devs) != 1 or device_type(ia.device) != "cuda":
        raise InputError(f"ia, sa, ib, sb: expected one CUDA device, got {sorted(map(str, devs))}")
    if not _native.HAS_CUDA_KERNELS:  # after the input checks: bad input is named first
        raise BackendUnavailableError("prh_fast._C was built without CUDA kernels (rebuild "
                                      "with PRH_FAST_CUDA=1 and nvcc on PATH)")
    if not (1 <= ia.shape[1] <= CUDA_MAX_K and 1 <= ib.shape[1] <= CUDA_MAX_K) or n < 1:
        raise InputError(f"k: the CUDA CKNNA kernel takes 1 <= k <= {CUDA_MAX_K}, got "
                         f"{ia.shape[1]} and {ib.shape[1]}")
    ia, ib = ia.to(torch.int64).contiguous(), ib.to(torch.int64).contiguous()
    sa, sb = sa.to(torch.float64).contiguous(), sb.to(torch.float64).contiguous()
    check_lists_in_range(ia, n, "ia")
    check_lists_in_range(ib, n, "ib")
    C = _native.native()
    with cuda_stream(ia.device) as stream:
        ws = torch.empty(C.cuda_cknna_workspace_bytes(n), dtype=torch.uint8, device=ia.device)
        out = torch.empty(5, dtype=torch.float64, device=ia.device)
        C.cuda_cknna_terms(ia.data_ptr(), sa.data_ptr(), ib.data_ptr(), sb.data_ptr(), n,
                           ia.shape[1], ib.shape[1], out.data_ptr(), ws.data_ptr(), stream)
        return tuple(float(v) for v in out.cpu())


def cknna_terms_torch(ia, sa, ib, sb):
    n = ia.shape[0]
    dev = ia.device
    # Entries of P: (i, j=ia[i,t], K_ij) where j also appears in ib[i]; likewise Q.
    in_b = row_membership(ia, ib)
    in_a = row_membership(ib, ia)
    rows = torch.arange(n, device=dev)
    p_i = rows.unsqueeze(1).expand_as(ia)[in_b]
    p_j, p_v = ia[in_b], sa[in_b]
    q_i = rows.unsqueeze(1).expand_as(ib)[in_a]
    q_j, q_v = ib[in_a], sb[in_a]
    zeros = torch.zeros(n, dtype=torch.float64, device=dev)
    row_p = zeros.index_add(0, p_i, p_v)
    col_p = zeros.index_add(0, p_j, p_v)
    row_q = zeros.index_add(0, q_i, q_v)
    col_q = zeros.index_add(0, q_j, q_v)
    # Transpose term: for each P entry (i, j), the Q entry (j, i), found by key search.
    q_key = q_i * n + q_j
    order = torch.argsort(q_key)
    q_key, q_vs = q_key[order], q_v[order]
    want = p_j * n + p_i
    pos = torch.searchsorted(q_key, want).clamp_max(max(q_key.numel() - 1, 0))
    if q_key.numel():
        hit = q_key[pos] == want
        t_pq = float((p_v[hit] * q_vs[pos[hit]]).sum())
    else:
        t_pq = 0.0
    return (t_pq, float(p_v.sum()), float(q_v.sum()), float(col_p @ row_q),
            float(col_q @ row_p))


def cknna_sim(n: int, p, q, unbiased: bool, backend=None) -> float:
    """``sim(P, Q) = hsic(M∘P, M∘Q)`` from two sides' ``(lists, values)``, ``M`` the mutual
    mask of the two lists: the one CKNNA scorer behind ``metrics.cknna``, ``align``'s grids
    and the streamed grid.

    Args:
        n: number of samples.
        p, q: ``(indices [N, k], values [N, k])`` of each side (``cknna_values`` output).
        unbiased: the unbiased HSIC estimator.
        backend: set-op backend name (see ``prh_fast.knn``); ``None``: the configured one.

    Returns:
        The (un)biased HSIC of the masked kernels, a float.
    """
    t, sp, sq, pq, qp = cknna_terms(p[0], p[1], q[0], q[1], backend=backend)
    return hsic_from_sums(n, t, sp, sq, pq, unbiased=bool(unbiased), dot_rows_t=qp)
