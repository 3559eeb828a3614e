"""Batched per-group Cholesky and triangular kernels: every group's small factorization at once, as arrays.

With one grouping factor (or the finest factor of several) Λ'Z'ZΛ + I is block-diagonal over the G groups;
these kernels factor and solve all G blocks of size q × q in one pass of array arithmetic (the 1×1 and 2×2
factors written out, batched ``np.linalg.cholesky`` for q ≥ 3) instead of G small LAPACK calls. Arrays are
term-major, ``(q, q, G)`` for the factors and ``(q, G)`` or ``(q, G, k)`` for right-hand sides, so each
slice over the groups is contiguous. Shared by ``fit.lmm.onefactor`` and ``fit.lmm.multifactor``.
"""

from __future__ import annotations

import math

import numpy as np


LOG_2PI = math.log(2.0 * math.pi)


def factor_groups(ZtZ: np.ndarray, ZtXy: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per group: L_g (Cholesky of Λ'Z_g'Z_gΛ + I) and L_g⁻¹ Λ' Z_g'[X_g y_g]; and log|M| = Σ log|M_g|.

    ``ZtZ`` (q, q, G) and ``ZtXy`` (q, G, p + 1) are a ``CrossProducts``' per-group sums (term-major).
    """
    q, G, k = ZtXy.shape
    if q == 1:
        l11 = lam[0, 0]
        m = l11 * l11 * ZtZ[0, 0] + 1.0
        d = np.sqrt(m)
        R = ((l11 / d)[:, None] * ZtXy[0])[None]
        return d[None, None], R, float(np.log(m).sum())
    if q == 2:
        l11, l21, l22 = lam[0, 0], lam[1, 0], lam[1, 1]
        a, b, c = ZtZ[0, 0], ZtZ[1, 0], ZtZ[1, 1]
        k21 = b * l11 + c * l21  # (Z'Z Λ)[1, 0]
        m11 = l11 * (a * l11 + b * l21) + l21 * k21 + 1.0
        m22 = l22 * l22 * c + 1.0
        chol = np.empty((2, 2, G))
        L11 = np.sqrt(m11, out=chol[0, 0])
        L21 = np.divide(l22 * k21, L11, out=chol[1, 0])
        d22 = m22 - L21 * L21
        L22 = np.sqrt(d22, out=chol[1, 1])
        chol[0, 1] = 0.0
        # R_0 = (l11 W_0 + l21 W_1) / L11,   R_1 = (l22 W_1 − L21 R_0) / L22,   W_i = Z_i'[X y] per group
        R = np.empty((2, G, k))
        np.multiply((l11 / L11)[:, None], ZtXy[0], out=R[0])
        if l21 != 0.0:
            R[0] += (l21 / L11)[:, None] * ZtXy[1]
        np.multiply((l22 / L22)[:, None], ZtXy[1], out=R[1])
        R[1] -= (L21 / L22)[:, None] * R[0]
        return chol, R, float(np.log(m11).sum() + np.log(d22).sum())
    M = np.einsum("ai,abg,bj->gij", lam, ZtZ, lam, optimize=True) + np.eye(q)
    chol = np.ascontiguousarray(np.linalg.cholesky(M).transpose(1, 2, 0))
    logdet = 2.0 * float(sum(np.log(chol[i, i]).sum() for i in range(q)))
    B = np.tensordot(lam.T, ZtXy, axes=(1, 0))  # Λ' Z_g'[X_g y_g], (q, G, p + 1)
    return chol, forward_groups(chol, B), logdet


def forward_groups(chol: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Solve L_g X_g = B_g for all groups at once: chol (q, q, G), B (q, G) or (q, G, k) → like B."""
    q, lift = chol.shape[0], _per_group(B)
    X = np.empty(B.shape)
    for i in range(q):
        acc = np.array(B[i])
        for j in range(i):
            acc -= chol[i, j][lift] * X[j]
        X[i] = acc / chol[i, i][lift]
    return X


def backward_groups(chol: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Solve L_g' X_g = B_g for all groups at once: chol (q, q, G), B (q, G) or (q, G, k) → like B."""
    q, lift = chol.shape[0], _per_group(B)
    X = np.empty(B.shape)
    for i in reversed(range(q)):
        acc = np.array(B[i])
        for j in range(i + 1, q):
            acc -= chol[j, i][lift] * X[j]
        X[i] = acc / chol[i, i][lift]
    return X


def _per_group(B: np.ndarray) -> tuple[slice | None, ...]:
    """The index that lines a per-group vector (G,) up with one row B[i] of shape (G,) or (G, k)."""
    return (slice(None),) + (None,) * (B.ndim - 2)
