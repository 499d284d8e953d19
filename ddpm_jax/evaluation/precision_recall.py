"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models", §3), on the same Inception pool_3 features as the FID.

Each set's manifold is the union of balls around its feature vectors, the ball of a point reaching
its k-th nearest neighbour in the same set (Eq. 1, the point itself not counted). Precision is the
fraction of generated samples inside the real manifold, recall the fraction of real samples inside
the generated one (Eq. 2). iDDPM reports them with k = 5 (the paper's default). Everything is in
float64; distances are computed in blocks, so 50k x 50k pairs never sit in memory at once.
"""

from __future__ import annotations

import numpy as np

DEFAULT_K = 5  # iDDPM §4 / Kynkäänniemi et al. §3
_BLOCK = 1024  # rows per block of the pairwise distance matrix (1024 x N float64)


def _features(x: np.ndarray, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f'{name}: got shape {x.shape}, expected [N, D]')
  return x


def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  """||a_i - b_j||^2 [len(a), len(b)] by the expansion ||a||^2 + ||b||^2 - 2 a.b, clipped at 0 (the
  expansion can round below 0 for near-identical rows)."""
  d = np.sum(a * a, axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = DEFAULT_K) -> np.ndarray:
  """Squared distance from each row to its k-th nearest other row, float64 [N] (Eq. 1)."""
  x = _features(features, 'features')
  if not 1 <= k < x.shape[0]:
    raise ValueError(f'k: got {k}, expected 1 <= k < N = {x.shape[0]}')
  sq = np.sum(x * x, axis=1)
  radii = np.empty(x.shape[0])
  for start in range(0, x.shape[0], _BLOCK):
    d = _squared_distances(x[start:start + _BLOCK], x, sq)
    # The k+1-th smallest of each row: the smallest is the point itself (distance 0).
    radii[start:start + _BLOCK] = np.partition(d, k, axis=1)[:, k]
  return radii


def coverage_fraction(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray) -> float:
  """Fraction of `queries` rows inside at least one ball (centre manifold[i], squared radius
  radii[i]) (Eq. 2: f(phi, Phi) averaged over the queries)."""
  manifold, queries = _features(manifold, 'manifold'), _features(queries, 'queries')
  sq = np.sum(manifold * manifold, axis=1)
  inside = 0
  for start in range(0, queries.shape[0], _BLOCK):
    d = _squared_distances(queries[start:start + _BLOCK], manifold, sq)
    inside += int(np.sum(np.any(d <= radii[None, :], axis=1)))
  return inside / queries.shape[0]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = DEFAULT_K) -> dict[str, float]:
  """{'precision', 'recall'} of generated features `fake` [M, D] against real features [N, D].

  Precision: share of fake samples within the k-NN ball of some real sample; recall: share of real
  samples within the k-NN ball of some fake sample.
  """
  real, fake = _features(real, 'real'), _features(fake, 'fake')
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'precision_recall: real has {real.shape[1]} dimensions, fake {fake.shape[1]}')
  return {'precision': coverage_fraction(real, knn_radii(real, k), fake),
          'recall': coverage_fraction(fake, knn_radii(fake, k), real)}
