"""Improved precision / recall (Kynkäänniemi et al. 2019) against a direct numpy reference."""

import numpy as np
import pytest

from ddpm_jax.evaluation import precision_recall as pr


def _reference(real, fake, k):
  """Brute force from the definition: explicit differences, sorted distances, no blocking."""
  def radii(x):
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

  def inside(centres, r, queries):
    d = np.sqrt(((queries[:, None, :] - centres[None, :, :]) ** 2).sum(-1))
    return np.mean([(d[i] <= r).any() for i in range(len(queries))])

  return inside(real, radii(real), fake), inside(fake, radii(fake), real)


@pytest.mark.parametrize('seed,k', [(0, 1), (1, 3), (2, 5)])
def test_matches_the_brute_force_reference(seed, k, monkeypatch):
  monkeypatch.setattr(pr, '_BLOCK', 7)  # several blocks, one ragged
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(40, 6))
  fake = rng.normal(0.8, 0.7, size=(33, 6))
  precision, recall = _reference(real, fake, k)
  got = pr.precision_recall(real, fake, k)
  assert 0 < precision < 1 and 0 < recall < 1
  assert got == {'precision': pytest.approx(precision, abs=0), 'recall': pytest.approx(recall,
                                                                                       abs=0)}


def test_identical_sets_give_one_and_disjoint_clusters_give_zero():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(30, 8)).astype(np.float32)
  assert pr.precision_recall(x, x.copy()) == {'precision': 1.0, 'recall': 1.0}
  far = x + 100.0
  assert pr.precision_recall(x, far) == {'precision': 0.0, 'recall': 0.0}


def test_knn_radii_excludes_the_point_itself_and_checks_k():
  x = np.array([[0.0], [1.0], [3.0], [7.0]])
  np.testing.assert_array_equal(pr.knn_radii(x, 1), [1.0, 1.0, 4.0, 16.0])  # squared distances
  np.testing.assert_array_equal(pr.knn_radii(x, 2), [9.0, 4.0, 9.0, 36.0])
  with pytest.raises(ValueError, match='1 <= k < N = 4'):
    pr.knn_radii(x, 4)
  with pytest.raises(ValueError, match='dimensions'):
    pr.precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))
