"""Batched per-group Cholesky and triangular kernels: every group's small factorization at once, as arrays.

With one grouping factor (or the finest factor of several) Λ'Z'ZΛ + I is block-diagonal over the G groups;
these kernels factor and solve all G blocks of size q × q in one pass of array arithmetic (the 1×1 and 2×2
factors written out, batched ``np.linalg.cholesky`` for q ≥ 3) instead of G small LAPACK calls. Arrays are
term-major, ``(q, q, G)`` for the factors and ``(q, G)`` or ``(q, G, k)`` for right-hand sides, so each
slice over the groups is contiguous. Shared by ``fit.lmm.onefactor`` and ``fit.lmm.multifactor``;
``GroupFactorBuffers`` is ``factor_groups`` for q ≤ 2 into buffers reused across an optimizer's evaluations.
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


class GroupFactorBuffers:
    """``factor_groups`` for q ≤ 2 into buffers allocated once: for an optimizer's many evaluations.

    The same floating-point operations in the same order as ``factor_groups`` (so the same bits: an
    optimizer's path, and the estimates, do not move), but each step runs over contiguous per-group vectors
    (Z'[X y] is held column by column, ``(q, p + 1, G)``) instead of broadcasting a per-group scale over the
    short rows of ``(G, p + 1)`` blocks, several times slower in numpy; nothing of size G is allocated per
    call. ``at`` returns ``(chol, R, logdet)`` as ``factor_groups`` does, in buffers the next call overwrites.
    """

    def __init__(self, ZtZ: np.ndarray, ZtXy: np.ndarray) -> None:
        q, G, k = ZtXy.shape
        if q > 2:
            raise ValueError(f"GroupFactorBuffers handles 1 or 2 random effects per group, not {q}")
        self.q, self.k = q, k
        self.ZtZ = ZtZ
        self.columns = np.ascontiguousarray(ZtXy.transpose(0, 2, 1))  # (q, k, G)
        self.chol = np.zeros((q, q, G))
        self.R = np.empty((q, G, k))
        self.work = np.empty((8, G))

    def at(self, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """L_g, L_g⁻¹ Λ' Z_g'[X_g y_g] and log|M| at Λ, bit for bit ``factor_groups(ZtZ, ZtXy, lam)``."""
        if self.q == 1:
            return self._at_one(lam[0, 0])
        return self._at_two(lam[0, 0], lam[1, 0], lam[1, 1])

    def _at_one(self, l11: np.floating) -> tuple[np.ndarray, np.ndarray, float]:
        m, scale = self.work[0], self.work[1]
        np.multiply(l11 * l11, self.ZtZ[0, 0], out=m)
        m += 1.0
        d = np.sqrt(m, out=self.chol[0, 0])
        np.divide(l11, d, out=scale)
        for a in range(self.k):
            np.multiply(scale, self.columns[0, a], out=self.R[0, :, a])
        return self.chol, self.R, float(np.log(m).sum())

    def _at_two(self, l11: np.floating, l21: np.floating, l22: np.floating) -> tuple[np.ndarray, np.ndarray, float]:
        a, b, c = self.ZtZ[0, 0], self.ZtZ[1, 0], self.ZtZ[1, 1]
        k21, m11, t, u, s01, s02, s11, s12 = self.work
        # k21 = b l11 + c l21;  m11 = l11 (a l11 + b l21) + l21 k21 + 1;  m22 = l22² c + 1 (as factor_groups)
        np.multiply(b, l11, out=k21)
        np.multiply(c, l21, out=t)
        k21 += t
        np.multiply(a, l11, out=m11)
        np.multiply(b, l21, out=t)
        m11 += t
        np.multiply(l11, m11, out=m11)
        np.multiply(l21, k21, out=t)
        m11 += t
        m11 += 1.0
        L11 = np.sqrt(m11, out=self.chol[0, 0])
        np.multiply(l22, k21, out=t)
        L21 = np.divide(t, L11, out=self.chol[1, 0])
        np.multiply(l22 * l22, c, out=u)  # m22
        u += 1.0
        np.multiply(L21, L21, out=t)
        d22 = np.subtract(u, t, out=u)
        L22 = np.sqrt(d22, out=self.chol[1, 1])
        logdet = float(np.log(m11).sum() + np.log(d22).sum())
        # R_0 = (l11 / L11) W_0 [+ (l21 / L11) W_1],  R_1 = (l22 / L22) W_1 − (L21 / L22) R_0, column by column
        np.divide(l11, L11, out=s01)
        np.divide(l21, L11, out=s02)
        np.divide(l22, L22, out=s11)
        np.divide(L21, L22, out=s12)
        W, R = self.columns, self.R
        r0, r1 = k21, m11  # free now
        for col in range(self.k):
            np.multiply(s01, W[0, col], out=r0)
            if l21 != 0.0:
                np.multiply(s02, W[1, col], out=t)
                r0 += t
            R[0, :, col] = r0
            np.multiply(s11, W[1, col], out=r1)
            np.multiply(s12, r0, out=t)
            r1 -= t
            R[1, :, col] = r1
        return self.chol, self.R, logdet
