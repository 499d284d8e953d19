"""The digits metric: classifier quality, cache reuse, determinism, what the distance separates."""

import os

import numpy as np
import pytest

from ddpm_jax.data.digits import load_digits_split
from ddpm_jax.evaluation import digits_metric as dm


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """A directory with the classifier trained once for the whole module."""
  path = str(tmp_path_factory.mktemp('workdir'))
  dm.load_or_train_digits_classifier(path)
  return path


@pytest.fixture
def no_training(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError('the digits classifier was retrained although it is cached')
  monkeypatch.setattr(dm, 'train_digits_classifier', fail)


def _noise(seed, num=360):
  return np.random.default_rng(seed).integers(0, 256, (num, 8, 8, 1), dtype=np.uint8)


def test_classifier_is_accurate_and_stored_as_plain_arrays(cache_dir, no_training):
  clf = dm.load_or_train_digits_classifier(cache_dir)
  assert float(clf.test_accuracy) > 0.9
  images, labels = load_digits_split('test')
  logits = dm.classifier_logits(clf, dm.classifier_features(clf, images))
  assert np.mean(np.argmax(logits, 1) == labels) == pytest.approx(float(clf.test_accuracy))
  with np.load(os.path.join(cache_dir, dm.CLASSIFIER_FILE), allow_pickle=False) as data:
    assert data['w_hidden'].shape == (64, 64) and data['w_out'].shape == (64, 10)


def test_floor_is_small_and_noise_is_far(cache_dir, no_training):
  noise = dm.digits_metrics(_noise(0), cache_dir)
  floor = noise['floor_frechet_distance']
  assert 0 < floor < 2.0
  assert noise['frechet_distance'] > 20 * floor
  train_images, _ = load_digits_split('train')
  real = dm.digits_metrics(train_images[-360:], cache_dir)  # real digits, mostly not the floor's
  assert real['floor_frechet_distance'] == floor
  assert real['frechet_distance'] < 2 * floor
  assert real['num_samples'] == 360 and noise['num_samples'] == 360


def test_classifier_inception_score(cache_dir, no_training):
  test_images, _ = load_digits_split('test')
  real = dm.digits_metrics(test_images, cache_dir)
  assert real['classifier_is'] == pytest.approx(real['test_classifier_is'])
  assert 8.0 < real['classifier_is'] <= 10.0          # 10 classes, confidently and evenly predicted
  assert abs(real['frechet_distance']) < 1e-6          # the test split against itself
  one_digit = np.repeat(test_images[:1], 200, axis=0)  # mode collapse: a single image
  collapsed = dm.digits_metrics(one_digit, cache_dir)
  assert collapsed['classifier_is'] == pytest.approx(1.0, abs=1e-9)
  assert collapsed['frechet_distance'] > 10 * real['floor_frechet_distance']


def test_training_is_deterministic(cache_dir, tmp_path):
  other = str(tmp_path / 'fresh')
  first, second = dm.load_or_train_digits_classifier(cache_dir), dm.load_or_train_digits_classifier(
      other)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  samples = _noise(1, 120)
  assert dm.digits_metrics(samples, other) == dm.digits_metrics(samples, cache_dir)


def test_bad_samples_and_bad_cache_raise(cache_dir, tmp_path, no_training):
  with pytest.raises(ValueError, match=r'samples: got float32 \(10, 8, 8, 1\)'):
    dm.digits_metrics(np.zeros((10, 8, 8, 1), np.float32), cache_dir)
  with pytest.raises(ValueError, match=r'samples: got uint8 \(10, 28, 28, 1\)'):
    dm.digits_metrics(np.zeros((10, 28, 28, 1), np.uint8), cache_dir)
  np.savez(tmp_path / dm.CLASSIFIER_FILE, w_hidden=np.zeros((64, 32)))
  with pytest.raises(ValueError, match='digits_classifier.npz.*w_hidden is .64, 32.'):
    dm.digits_metrics(_noise(2, 10), str(tmp_path))
