"""Batched per-group Cholesky and triangular kernels: every group's small factorization at once, as arrays.

With one grouping factor (or the finest factor of several) Λ'Z'ZΛ + I is block-diagonal over the G groups;
these kernels factor and solve all G blocks of size q × q in one pass of array arithmetic (the 1×1 and 2×2
factors written out, batched ``np.linalg.cholesky`` for q ≥ 3) instead of G small LAPACK calls. Arrays are
term-major, ``(q, q, G)`` for the factors and ``(q, G)`` or ``(q, G, k)`` for right-hand sides, so each
slice over the groups is contiguous. Shared by ``fit.lmm.onefactor`` and ``fit.lmm.multifactor``;
``GroupGram`` is what an optimizer's evaluation needs of ``factor_groups`` for q ≤ 2 (log|M| and Σ R_g'R_g),
block by block in buffers reused across the evaluations.
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


def forward_shared(chol: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Solve L_g X_g = B for all groups at once, B (q, m) the same for every group: chol (q, q, G) → (q, m, G),
    each X[i, j] a contiguous vector over the groups (no per-group copy of B)."""
    q, m = B.shape
    X = np.empty((q, m, chol.shape[2]))
    for j in range(m):
        for i in range(q):
            acc = np.full(chol.shape[2], B[i, j])
            for l in range(i):
                acc -= chol[i, l] * X[l, j]
            np.divide(acc, chol[i, i], out=X[i, j])
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


#: Groups per block of ``GroupGram``: a block's Z'[X y] and R rows, (q, p + 1, BLOCK) each, stay in the
#: core's cache between the passes over them (measured at 27,000 and 270,000 groups: 8,192-32,768 do equally).
GRAM_BLOCK = 16_384


class GroupGram:
    """What a deviance evaluation needs of the groups for q ≤ 2, log|M| and Σ_g R_g'R_g at Λ, block by block
    in buffers allocated once: for an optimizer's many evaluations.

    ``factor_groups``' arithmetic (the same values up to the order of the sums of log|M| and R'R), run over
    ``GRAM_BLOCK`` groups at a time: a block's rows of R (R_g = L_g⁻¹ Λ' Z_g'[X_g y_g], held (p + 1, q · block),
    so that each step is one array operation over contiguous rows) go straight into a symmetric rank-k product
    while they are in cache. Forming R for all groups and reading it back cost 3-4x more at 270,000 subjects,
    where R (26 MB for p = 5, q = 2) no longer fits in the cache; nothing of size G is allocated per call.
    """

    def __init__(self, ZtZ: np.ndarray, ZtXy: np.ndarray, block: int = GRAM_BLOCK) -> None:
        q, G, k = ZtXy.shape
        if q > 2:
            raise ValueError(f"GroupGram handles 1 or 2 random effects per group, not {q}")
        self.q, self.k, self.G, self.block = q, k, G, max(1, min(block, G))
        self.ZtZ = ZtZ
        self.columns = np.ascontiguousarray(ZtXy.transpose(0, 2, 1))  # (q, k, G): Z_i'[X y] column by column
        self.rows = np.empty((k, q * self.block))
        self.scratch = np.empty((k, self.block))
        self.work = np.empty((8, self.block))

    def at(self, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """log|M| = Σ_g log|Λ'Z_g'Z_gΛ + I| and Σ_g R_g'R_g ((p + 1) × (p + 1)) at Λ."""
        gram = np.zeros((self.k, self.k))
        logdet = 0.0
        for start in range(0, self.G, self.block):
            stop = min(start + self.block, self.G)
            if self.q == 1:
                rows, part = self._block_one(lam[0, 0], start, stop)
            else:
                rows, part = self._block_two(lam[0, 0], lam[1, 0], lam[1, 1], start, stop)
            gram += rows @ rows.T
            logdet += part
        return logdet, gram

    def _block_one(self, l11: float, start: int, stop: int) -> tuple[np.ndarray, float]:
        """R rows of groups start..stop for one random effect: (l11 / √m) Z'[X y], m = l11² Z'Z + 1."""
        n = stop - start
        m, scale = self.work[0, :n], self.work[1, :n]
        np.multiply(l11 * l11, self.ZtZ[0, 0, start:stop], out=m)
        m += 1.0
        np.sqrt(m, out=scale)
        np.divide(l11, scale, out=scale)
        rows = self.rows[:, :n]
        np.multiply(self.columns[0, :, start:stop], scale, out=rows)
        return rows, float(np.log(m).sum())

    def _block_two(self, l11: float, l21: float, l22: float, start: int, stop: int) -> tuple[np.ndarray, float]:
        """Rows of an upper-triangular factor of Λ M_g⁻¹ Λ' applied to W = Z'[X y], groups start..stop.

        Σ_g R_g'R_g only needs some R_g with R_g'R_g = W_g'Λ M_g⁻¹Λ'W_g, not ``factor_groups``' R_g = L_g⁻¹Λ'W_g:
        with M_g = U_g U_g' (U_g upper triangular, factored from its last row up), R_g = U_g⁻¹Λ'W_g and U_g⁻¹Λ' is
        upper triangular, so R_1 = t11 W_1 is one product over the block instead of three (measured: the
        block's step 0.24 → 0.17 ms at 16,384 groups, p + 1 = 6), and log|M_g| = log(u11² m22) one logarithm:
          m22 = l22² c + 1,  m12 = l22 k21 (k21 = b l11 + c l21),  m11 = l11 (a l11 + b l21) + l21 k21 + 1,
          u22 = √m22,  u12 = m12 / u22,  u11² = m11 − u12²,
          R_0 = t00 W_0 + t01 W_1,  R_1 = t11 W_1:  t00 = l11 / u11,  t11 = l22 / u22,  t01 = (l21 − u12 t11) / u11.
        """
        n = stop - start
        a, b, c = self.ZtZ[0, 0, start:stop], self.ZtZ[1, 0, start:stop], self.ZtZ[1, 1, start:stop]
        k21, m11, m22, u12, t00, t01, t11, t = (w[:n] for w in self.work)
        np.multiply(b, l11, out=k21)
        np.multiply(c, l21, out=t)
        k21 += t
        np.multiply(a, l11, out=m11)
        np.multiply(b, l21, out=t)
        m11 += t
        m11 *= l11
        np.multiply(k21, l21, out=t)
        m11 += t
        m11 += 1.0
        np.multiply(c, l22 * l22, out=m22)
        m22 += 1.0
        u22 = np.sqrt(m22, out=t11)
        np.multiply(k21, l22, out=u12)
        u12 /= u22  # u12 = m12 / u22
        np.multiply(u12, u12, out=t)
        m11 -= t  # u11²
        np.multiply(m11, m22, out=t)
        part = float(np.log(t, out=t).sum())  # log|M_g| = log(u11² u22²)
        u11 = np.sqrt(m11, out=m11)
        np.divide(l22, u22, out=t11)
        np.divide(l11, u11, out=t00)
        np.multiply(u12, t11, out=t01)
        np.subtract(l21, t01, out=t01)
        t01 /= u11
        rows = self.rows[:, :2 * n]
        R0, R1 = rows[:, :n], rows[:, n:]
        W0, W1 = self.columns[0, :, start:stop], self.columns[1, :, start:stop]
        np.multiply(W0, t00, out=R0)
        R0 += np.multiply(W1, t01, out=self.scratch[:, :n])
        np.multiply(W1, t11, out=R1)
        return rows, part
