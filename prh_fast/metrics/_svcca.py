"""Exact, deterministic SVCCA (docs/metrics.md, "svcca").

Columns are standardised (mean 0, divided by the unbiased std + 1e-8). The top ``r`` left
singular vectors of the standardised ``A_s`` are ``U_A = A_s V_A Λ_A^{-1/2}`` with ``(Λ_A, V_A)``
the top eigenpairs of ``G_A = A_sᵀA_s``. ``U_A`` is orthonormal with centred columns, so the
canonical correlations between ``U_A`` and ``U_B`` are the singular values of ``U_Aᵀ U_B``; the
score is their mean. Each layer's ``[N, r]`` basis is formed once (in float64), so a grid of
layers costs one eigendecomposition per layer and one ``r x r`` SVD per pair; nothing of size
``N x N`` is formed. :func:`svcca_scores` is the one scorer: ``prh_fast.metrics.svcca`` is its
``1 x 1`` case, ``prh_fast.align`` its grid; the store accumulators
(``prh_fast.store._moments``) are its streaming form, through the same :func:`_top_eig`.

Cost per layer: three reads of the data (mean, range, the scaled copy), the ``D x D`` Gram
product (which also gives the column variances), the top-``r`` eigenspace and one ``[N, D] x
[D, r]`` product. The eigenspace comes from a block Krylov method whose answer is certified:
a bound on its distance to the exact top-``r`` eigenspace, from the residual and a
Cholesky-proven upper bound on the ``(r+1)``-th eigenvalue, must be below ``1e-10``; where it
is not (a degenerate or nearly degenerate ``r``-th eigenvalue, a small matrix) the full
``torch.linalg.eigh`` answers. Either way the result is deterministic.
"""
from __future__ import annotations

import math

import torch

from prh_fast.errors import InputError

#: Below this many columns the full eigendecomposition is cheap enough to use directly.
_KRYLOV_MIN_DIM = 320
#: Certified bound on ``||sin Θ||_F`` between the computed top-``r`` eigenspace and the exact
#: one that the Krylov solver must reach (else the full eigendecomposition is used).
_SUBSPACE_TOL = 1e-10
_EPS64 = torch.finfo(torch.float64).eps
_EXTRA = 8


def _gram(Y: torch.Tensor) -> torch.Tensor:
    """``YᵀY``, computing only the block upper triangle (in up to four row blocks, about 5/8 of
    the full product's work for wide ``Y``) and mirroring it."""
    d = Y.shape[1]
    k = max(1, min(4, d // 192))
    if k == 1:
        return Y.T @ Y
    e = [d * i // k for i in range(k + 1)]
    out = torch.empty((d, d), dtype=Y.dtype, device=Y.device)
    for a, b in zip(e[:-1], e[1:]):
        torch.mm(Y[:, a:b].T, Y[:, a:], out=out[a:b, a:])
        out[b:, a:b] = out[a:b, b:].T
    return out


def _standardised_gram(X: torch.Tensor, dtype: torch.dtype):
    """``(Y [N, D] dtype, m [D], q [D], G [D, D])`` (all but ``Y`` float64) with
    ``(Y - m) · diag(q)`` the standardised ``X`` (``(X - mean) / (std + 1e-8)`` per column,
    unbiased std as ``torch.std`` in the reference) up to one power of two, and ``G`` its Gram
    matrix ``q_i q_j ((Y - m)ᵀ(Y - m))_ij``.

    ``Y`` is ``X`` centred with each column multiplied by the power of two that puts its
    largest ``|x - mean|`` in about ``[0.5, 1)`` (exact), written in ``dtype`` in one pass; ``m``
    is what is left of its column means. Float32 input in float32 is centred in float32 (the
    data is read without a float64 copy) and ``m`` corrects the product; other inputs are
    centred in float64 (``m = 0``). The product ``YᵀY`` is taken in ``dtype``; its diagonal gives
    the column sums of squares, so the std costs no pass of its own, and no entry of ``Y`` or of
    ``YᵀY`` can overflow or underflow whatever the scale of a column (~1e200, ~1e-200,
    constant). The column weights ``q`` (the standardisation, undoing the powers of two) are
    applied to the ``D x D`` product in float64, with one common power of two that puts the
    largest in ``[0.5, 1)``: the basis ``(Y - m) q V Λ^{-1/2}`` does not depend on it."""
    n = X.shape[0]
    f32 = X.dtype == dtype == torch.float32
    mu = X.mean(dim=0) if f32 else X.mean(dim=0, dtype=torch.float64)
    mu64 = mu.double()
    amax = torch.maximum(X.amax(dim=0).double() - mu64, mu64 - X.amin(dim=0).double())
    e = torch.frexp(amax).exponent
    # float32 centring needs the powers of two (and their products) in the float32 range
    f32 = f32 and bool(((e > -100) & (e < 100)).all())
    if not f32:
        mu = mu64
    p = torch.ldexp(torch.ones_like(mu), -e)
    Y = torch.addcmul(-mu * p, X, p, out=torch.empty(X.shape, dtype=dtype, device=X.device))
    G = _gram(Y).double()
    if f32:
        m = Y.sum(dim=0).double() / n
        G.sub_(torch.outer(m, m).mul_(n))
    else:
        m = torch.zeros_like(mu64)
    std = G.diagonal().clamp_min(0.0).sqrt() / p.double() / math.sqrt(max(n - 1, 1))
    q = 1.0 / ((std + 1e-8) * p.double())
    top = float(q.max()) if q.numel() else 0.0
    if top > 0:
        q = torch.ldexp(q, torch.tensor(-math.frexp(top)[1], dtype=torch.int64, device=q.device))
    G.mul_(q[:, None]).mul_(q[None, :])
    return Y, m, q, G


def _times(Y: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``Y @ W`` in float64 (``W`` float64), converting ``Y`` a row block at a time (no float64
    copy of the whole ``Y``)."""
    if Y.dtype == torch.float64:
        return Y @ W
    out = torch.empty((Y.shape[0], W.shape[1]), dtype=torch.float64, device=Y.device)
    step = max(1, (1 << 18) // max(1, Y.shape[1]))
    for a in range(0, Y.shape[0], step):
        torch.mm(Y[a:a + step].double(), W, out=out[a:a + step])
    return out


def _raise_rank(r: int, name: str):
    raise InputError(
        f"cca_dim: {r} exceeds the numerical rank of {name} after standardisation "
        f"(its {r}-th singular value is ~0)"
    )


def _rank_tol(top: float, n: int) -> float:
    # relative to the largest eigenvalue: standardised columns of features far below the 1e-8
    # of the standardisation (~1e-30) have tiny but well-defined spectra
    return top * n * _EPS64 * 16


def _top_eig_full(G: torch.Tensor, r: int, name: str):
    evals, evecs = torch.linalg.eigh(G)  # ascending
    evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
    if not float(evals[0]) > 0 or float(evals[-1]) <= _rank_tol(float(evals[0]), G.shape[0]):
        _raise_rank(r, name)
    return evals, evecs


def _certify(G: torch.Tensor, U: torch.Tensor, theta: torch.Tensor, theta_next: float):
    """A bound on ``||sin Θ||_F`` between ``span(U)`` and the top-``r`` eigenspace of the
    symmetric ``G``, or ``None`` when it cannot be certified.

    ``U`` ``[n, r]`` has orthonormal columns with Rayleigh quotients ``theta`` (descending);
    ``theta_next`` is the next Ritz value of the search space (a lower bound on
    ``λ_{r+1}``). With ``σ = theta_next + (θ_r - theta_next) / 4``:

    - ``λ_{r+1}(G) <= σ``: by Weyl's inequality ``λ_{r+1}(G) <= λ_1(G - U Θ Uᵀ)`` (the
      subtracted matrix has rank ``r``), and a successful Cholesky factorisation of
      ``(σ - η) I - (G - U Θ Uᵀ)`` shows ``λ_1(G - U Θ Uᵀ) < σ``; ``η`` covers the rounding of
      forming and factorising the matrix.
    - Davis–Kahan's sin Θ theorem: the eigenvalues of ``Uᵀ G U`` are ``>= θ_r - ρ`` and the
      other eigenvalues of ``G`` are ``<= σ``, so ``||sin Θ||_F <= ρ / (θ_r - ρ - σ)``, with
      ``ρ`` the computed ``||G U - U Θ||_F`` plus ``4 √n ε θ_1 √r`` for its own rounding (the
      residual of ``Uᵀ G U`` itself is no larger than that of ``Θ``).

    The bound is rigorous for the computed quantities up to rounding; ``η`` is a worst-case
    allowance, the residual's is the typical (``√n``) size of rounding in a float64 product.
    """
    n, r = U.shape
    theta_r = float(theta[-1])
    gap = theta_r - theta_next
    if not gap > 0:
        return None
    sigma = theta_next + 0.25 * gap
    R = G @ U - U * theta
    eta = 8 * (n + 1) * _EPS64 * (float(theta[0]) + abs(sigma))
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    orth = float(torch.linalg.matrix_norm(U.T @ U - eye, ord="fro"))
    if orth > 1e-12:
        return None
    M = torch.addmm(G, U * theta, U.T, alpha=-1.0).neg_()
    M.diagonal().add_(sigma - eta)
    if int(torch.linalg.cholesky_ex(M).info) != 0:
        return None
    rho = (float(torch.linalg.matrix_norm(R, ord="fro"))
           + 4 * (n * r) ** 0.5 * _EPS64 * float(theta[0]))
    delta = theta_r - rho - sigma
    return rho / delta * (1 + 2 * orth) if delta > 0 else None


def _top_eig_krylov(G: torch.Tensor, r: int, tol: float = _SUBSPACE_TOL):
    """Top ``r`` eigenpairs of the symmetric PSD ``G`` by block Lanczos (full
    reorthogonalisation, Rayleigh–Ritz), with a certified subspace error ``<= tol``; ``None``
    when the certificate is not reached (the caller then uses the full eigendecomposition).

    The basis ``V`` grows by blocks of ``r + 8`` columns up to half of ``G``'s order; the
    projected matrix ``H = Vᵀ G V`` grows with it (one new block column per step). From the
    fourth block on, Ritz pairs are computed at the steps where the residual estimate, falling
    about geometrically, may have reached the tolerance; once it has, :func:`_certify` has the
    last word (an eigenvalue bound that fails ends the attempt; a bound above the tolerance
    lets the basis grow). It gives up early when the extrapolation lies far beyond the budget.
    The start block is a fixed-seed Gaussian, so results are deterministic. The returned
    eigenvalues are Rayleigh quotients of the returned vectors (``Vᵀ G V = diag(λ)`` up to
    rounding), which is what the orthonormal basis ``X V Λ^{-1/2}`` needs."""
    n = G.shape[0]
    b = r + _EXTRA
    nblocks = max(2, (n // 2) // b)
    m = nblocks * b
    V = torch.empty((n, m), dtype=torch.float64, device=G.device)
    GV = torch.empty_like(V)
    H = torch.empty((m, m), dtype=torch.float64, device=G.device)
    gen = torch.Generator().manual_seed(0x5CCA)
    V[:, :b] = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64)).Q
    check, last = 4, None  # next block to check at; (block, estimate) of the last check
    for j in range(1, nblocks + 1):
        c = j * b
        new = slice(c - b, c)
        torch.mm(G, V[:, new], out=GV[:, new])
        torch.mm(V[:, :c].T, GV[:, new], out=H[:c, new])
        H[new, :c - b] = H[:c - b, new].T
        if j >= check or j == nblocks:
            Hc = H[:c, :c]
            theta, Y = torch.linalg.eigh((Hc + Hc.T) * 0.5)
            theta, Yr = theta.flip(0), Y[:, c - r:].flip(1)
            top = float(theta[0])
            if not top > 0 or float(theta[r - 1]) <= 2 * _rank_tol(top, n):
                return None  # (near) rank deficiency: decided by the full eigendecomposition
            gap = float(theta[r - 1] - theta[r])
            if gap > 0:
                U = V[:, :c] @ Yr
                res = float(torch.linalg.matrix_norm(GV[:, :c] @ Yr - U * theta[:r], ord="fro"))
                est = (res + 4 * (n * r) ** 0.5 * _EPS64 * top) / (0.75 * gap)
                if est <= tol:
                    bound = _certify(G, U, theta[:r].clone(), float(theta[r]))
                    if bound is None:
                        return None  # an eigenvalue the Krylov space missed, or lost orthogonality
                    if bound <= tol:
                        return theta[:r].clone(), U
                check = j + 1
                if last is not None and 0 < est < last[1]:
                    # the estimate falls about geometrically: skip the checks it will not pass
                    rate = math.log(est / last[1]) / (j - last[0])
                    check = j + max(1, int(math.log(tol / est) / rate))
                    if check > 3 * nblocks:
                        return None  # hopeless within the budget (a flat top of the spectrum)
                last = (j, est)
        if j == nblocks:
            return None
        # block classical Gram-Schmidt, twice ("twice is enough"), then an orthonormal basis
        # of what is left; the certificate checks the orthonormality it relies on
        W = GV[:, new] - V[:, :c] @ H[:c, new]
        W -= V[:, :c] @ (V[:, :c].T @ W)
        V[:, c:c + b] = torch.linalg.qr(W).Q
    return None


def _top_eig(G: torch.Tensor, r: int, name: str):
    """``(λ [r] descending, V [n, r])``: the top ``r`` eigenpairs of the symmetric PSD float64
    ``G``. Large matrices use the certified block Krylov solver, the rest (and whatever it
    cannot certify) the full ``torch.linalg.eigh``; both span the exact top-``r`` eigenspace
    to within ``1e-10`` (``||sin Θ||_F``) where it is well defined.

    Raises:
        InputError: the ``r``-th eigenvalue is ~0 relative to the largest (``name`` says
            whose Gram matrix it is).
    """
    if G.shape[0] >= _KRYLOV_MIN_DIM and r < G.shape[0] // 4:
        got = _top_eig_krylov(G, r)
        if got is not None:
            return got
    return _top_eig_full(G, r, name)


def layer_basis(x: torch.Tensor, cca_dim: int, dtype: torch.dtype | None = None,
                name: str = "layer") -> torch.Tensor:
    """The ``[N, r]`` float64 orthonormal basis ``U = X_s V Λ^{-1/2}`` of one layer's top
    ``r = cca_dim`` left singular vectors after standardisation (columns centred).

    The basis is permutation-equivariant: the basis of ``x[perm]`` is this one's rows in the
    order ``perm`` (up to rounding and to the sign and rotation freedom inside the subspace,
    which the canonical correlations do not see).

    Args:
        x: ``[N, D]`` tensor.
        cca_dim: ``r``, at most ``min(N - 1, D)`` (checked by the caller).
        dtype: the dtype of the standardised features and their Gram matrix; ``None``: ``x``'s.
        name: how an error names the layer.

    Returns:
        The ``[N, r]`` float64 basis.

    Raises:
        InputError: ``cca_dim`` exceeds the layer's numerical rank.

    Example:
        >>> import torch
        >>> x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> U = layer_basis(x, 3)
        >>> torch.allclose(U.T @ U, torch.eye(3, dtype=torch.float64))
        True
    """
    Y, m, q, G = _standardised_gram(x, x.dtype if dtype is None else dtype)
    lam, V = _top_eig(G, cca_dim, name)
    W = q[:, None] * V / lam.sqrt()
    return _times(Y, W) - m @ W  # [N, r] orthonormal, centred columns


def layer_bases(xs: list, ys: list, cca_dim: int, dtype=None, x_names=None, y_names=None):
    """``(ux, uy)``: :func:`layer_basis` of every layer of both sides (errors name a layer as
    ``x_names[i]`` / ``y_names[j]``, default ``"x layer i"`` / ``"y layer j"``).

    Example:
        >>> import torch
        >>> x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> ux, uy = layer_bases([x], [x, x], 2)
        >>> len(ux), len(uy), tuple(ux[0].shape)
        (1, 2, (20, 2))
    """
    x_names = x_names or [f"x layer {i}" for i in range(len(xs))]
    y_names = y_names or [f"y layer {j}" for j in range(len(ys))]
    return ([layer_basis(x, cca_dim, dtype, name) for x, name in zip(xs, x_names)],
            [layer_basis(y, cca_dim, dtype, name) for y, name in zip(ys, y_names)])


def svcca_scores(xs: list, ys: list, cca_dim: int, dtype: torch.dtype | None = None, *,
                 x_names=None, y_names=None, bases=None) -> torch.Tensor:
    """SVCCA of every layer pair, ``[Lx, Ly]`` float64: the one SVCCA scorer.

    Each layer's top ``cca_dim`` left singular vectors are formed once as the ``[N, r]``
    orthonormal basis ``U = X_s V Λ^{-1/2}`` (the product in float64); each pair's score is
    the mean of the singular values of ``U_xᵀ U_y`` (an ``r x r`` SVD), clipped to
    ``[0, 1]``.

    Args:
        xs, ys: lists of ``[N, D]`` tensors (the same ``N``).
        cca_dim: ``r``, at most ``min(N - 1, D)`` of every layer (checked by the caller).
        dtype: the dtype of the standardised features and their Gram matrices; ``None``:
            each layer's own dtype.
        x_names, y_names: how errors name each layer (default ``"x layer i"``,
            ``"y layer j"``).
        bases: ``(ux, uy)``, the layers' :func:`layer_basis` lists when the caller already
            formed them (the permutation null shares them); ``None``: formed here.

    Returns:
        The ``[Lx, Ly]`` float64 tensor of scores.

    Raises:
        InputError: ``cca_dim`` exceeds a layer's numerical rank.

    Example:
        >>> import torch
        >>> from prh_fast.metrics._svcca import svcca_scores
        >>> x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> round(float(svcca_scores([x], [2 * x], 3)[0, 0]), 3)
        1.0
    """
    ux, uy = bases if bases is not None else layer_bases(xs, ys, cca_dim, dtype, x_names,
                                                         y_names)
    out = torch.empty((len(xs), len(ys)), dtype=torch.float64)
    for i, a in enumerate(ux):
        for j, b in enumerate(uy):
            out[i, j] = float(torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0).mean())
    return out
