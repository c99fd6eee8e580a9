"""Marginal Fisher Analysis (Yan et al., "Graph Embedding and Extensions", TPAMI 2007), the
feature-fusion step of the CNN/MFA seed system, in numpy and scipy.

MFA describes a labelled set by two graphs over its samples:

- intrinsic graph W_c: i and j are joined when one is among the other's ``k_intrinsic``
  nearest neighbours *of the same class* (class compactness);
- penalty graph W_p: for every class c, the ``k_penalty`` closest pairs (i, j) with i in c
  and j outside it are joined (the class's margin).

With L = D - W (D the degree matrix) and samples as rows of X, a direction w scores
w^T X^T L_p X w / w^T X^T L_c X w: large when marginal pairs are far apart and neighbours
of one class close. The best k directions are the top k generalised eigenvectors of

    (X^T L_p X) w = lambda (X^T L_c X + r I) w,

solved by ``scipy.linalg.eigh``. The ridge r = ``regularization`` * trace(X^T L_c X) / d is
there because X^T L_c X is singular whenever the dimension exceeds what the neighbour
graph spans (the original work removes that null space with PCA first; a relative ridge
does the same job without a second hyperparameter and follows the data's scale).
L 1 = 0, so the scatter matrices do not depend on where X is centred.

:class:`MFAFusion` is the fusion as the seed uses it: per-feature standardisation (the
hand-crafted audio and video features live on unrelated scales), concatenation, MFA.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.linalg
from scipy import sparse


def mfa_graphs(
    x: np.ndarray, y: np.ndarray, k_intrinsic: int, k_penalty: int
) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """The symmetric 0/1 adjacency matrices (W_c, W_p) of MFA's graphs, sparse (n, n).

    Distances are computed one class block at a time and the graphs hold O(n k) edges, so
    memory grows as n * (largest class), not n^2: CREMA-D's 7442 clips fit comfortably.
    """
    n = len(x)
    intrinsic: tuple[list, list] = ([], [])
    penalty: tuple[list, list] = ([], [])
    for c in np.unique(y):
        inside = np.flatnonzero(y == c)
        outside = np.flatnonzero(y != c)
        within = _squared_distances(x[inside], x[inside])
        np.fill_diagonal(within, np.inf)
        k = min(k_intrinsic, len(inside) - 1)
        if k > 0:
            nearest = np.argpartition(within, k - 1, axis=1)[:, :k]
            intrinsic[0].append(np.repeat(inside, k))
            intrinsic[1].append(inside[nearest.ravel()])
        if len(outside) == 0:
            continue
        between = _squared_distances(x[inside], x[outside]).ravel()
        k = min(k_penalty, between.size)
        i, j = np.unravel_index(np.argpartition(between, k - 1)[:k], (len(inside), len(outside)))
        penalty[0].append(inside[i])
        penalty[1].append(outside[j])
    return _symmetric_graph(intrinsic, n), _symmetric_graph(penalty, n)


def _symmetric_graph(edges: tuple[list, list], n: int) -> sparse.csr_matrix:
    rows = np.concatenate(edges[0]) if edges[0] else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(edges[1]) if edges[1] else np.zeros(0, dtype=np.int64)
    # Both directions; an edge found from both ends is summed by the conversion, then reset to 1.
    graph = sparse.coo_matrix((np.ones(2 * len(rows)), (np.r_[rows, cols], np.r_[cols, rows])), shape=(n, n)).tocsr()
    graph.data[:] = 1.0
    return graph


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def _laplacian_form(x: np.ndarray, graph: sparse.csr_matrix) -> np.ndarray:
    """X^T (D - W) X without forming the dense (n, n) Laplacian."""
    degree = np.asarray(graph.sum(1)).ravel()
    return (x.T * degree) @ x - x.T @ (graph @ x)


class MarginalFisherAnalysis:
    """Fit on (n, d) samples and labels; ``transform`` projects onto ``n_components``
    directions, the most discriminative first. After ``fit``: ``mean_`` (d,),
    ``components_`` (d, n_components), ``eigenvalues_`` (n_components,) descending, the
    penalty-to-intrinsic ratio each direction attains (components are scaled to
    w^T (X^T L_c X + r I) w = 1)."""

    def __init__(self, n_components: int, *, k_intrinsic: int = 5, k_penalty: int = 20, regularization: float = 1e-3):
        if n_components < 1 or k_intrinsic < 1 or k_penalty < 1:
            raise ValueError("n_components, k_intrinsic and k_penalty must be positive")
        if regularization <= 0:
            raise ValueError("regularization must be positive (the intrinsic scatter is singular in general), "
                             f"got {regularization}")
        self.n_components, self.k_intrinsic, self.k_penalty = n_components, k_intrinsic, k_penalty
        self.regularization = regularization

    def scatter_matrices(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(X^T L_p X, X^T L_c X + r I): the two sides of the generalised eigenproblem."""
        intrinsic, penalty = mfa_graphs(x, y, self.k_intrinsic, self.k_penalty)
        s_p, s_c = _laplacian_form(x, penalty), _laplacian_form(x, intrinsic)
        ridge = self.regularization * max(np.trace(s_c), np.finfo(float).tiny) / x.shape[1]
        return s_p, s_c + ridge * np.eye(x.shape[1])

    def fit(self, x, y) -> "MarginalFisherAnalysis":
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y).ravel()
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"x must be (n, d) with one label per row, got {x.shape} and {y.shape}")
        if len(np.unique(y)) < 2:
            raise ValueError("MFA needs at least two classes")
        d = x.shape[1]
        if self.n_components > d:
            raise ValueError(f"n_components ({self.n_components}) exceeds the dimension ({d})")
        self.mean_ = x.mean(0)
        s_p, s_c = self.scatter_matrices(x - self.mean_, y)
        values, vectors = scipy.linalg.eigh(s_p, s_c, subset_by_index=[d - self.n_components, d - 1])
        self.eigenvalues_ = values[::-1].copy()
        self.components_ = vectors[:, ::-1].copy()
        return self

    def transform(self, x) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean_) @ self.components_


class MFAFusion:
    """Feature-level fusion: standardise each feature (statistics of the fitting set),
    concatenate the modalities' blocks, project with MFA. ``fit(blocks, y)`` and
    ``transform(blocks)`` take one (n, d_m) array per modality, in a fixed order."""

    def __init__(self, n_components: int, **mfa_options):
        self.mfa = MarginalFisherAnalysis(n_components, **mfa_options)

    def fit(self, blocks: Sequence[np.ndarray], y) -> "MFAFusion":
        x = np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks], axis=1)
        self.mean_ = x.mean(0)
        std = x.std(0)
        # A constant feature carries nothing; scale 1 keeps it at 0 instead of dividing by 0.
        self.scale_ = np.where(std > 0, std, 1.0)
        self.mfa.fit((x - self.mean_) / self.scale_, y)
        return self

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(center (d,), projection (d, k)) with transform(blocks) = (concat(blocks) - center) @ projection."""
        center = self.mean_ + self.scale_ * self.mfa.mean_
        return center, self.mfa.components_ / self.scale_[:, None]

    def transform(self, blocks: Sequence[np.ndarray]) -> np.ndarray:
        x = np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks], axis=1)
        center, projection = self.affine()
        return (x - center) @ projection
