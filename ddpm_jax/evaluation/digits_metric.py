"""A sample-quality metric for the 8x8 digits, which are too small for the Inception network.

The FID recipe of DDPM §4.1 with a domain classifier in place of InceptionV3: a one-hidden-layer
MLP (64 -> 64 ReLU -> 10, scikit-learn's MLPClassifier, seed 0) is trained once on the digits
'train' split and cached as plain arrays (.npz, no pickle). Its 64-d hidden activations play the
role of pool_3 and its softmax the role of the Inception logits:
- 'frechet_distance': generated samples vs the held-out 'test' split (360 images);
- 'floor_frechet_distance': a random 360-image subset of the 'train' split (seed 0) vs 'test': what
  a perfect model would score with this many samples (the Fréchet distance is biased upwards for
  small N), so a model is judged by how close it gets to the floor, not to 0;
- 'classifier_is' (and '_std'): Inception Score from the classifier's softmax, with
  min(10, N // 100) splits (at least 1) so every split has at least 100 samples for 10 classes;
  'test_classifier_is' is the same on the real test split, for reference;
- 'test_accuracy' of the classifier, and 'num_samples'.
Training (single BLAS thread, ~5 s) is deterministic for a fixed seed on a given machine (BLAS
kernels may differ across machines);
the cached file fixes the classifier for all later evaluations.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import numpy as np

from ddpm_jax import workdir
from ddpm_jax.data.digits import load_digits_split
from ddpm_jax.evaluation import fid

CLASSIFIER_FILE = 'digits_classifier.npz'
HIDDEN_UNITS = 64
NUM_CLASSES = 10
NUM_PIXELS = 64   # 8 x 8 x 1
SEED = 0


class DigitsClassifier(NamedTuple):
  """MLP weights: hidden = relu(x w_hidden + b_hidden), logits = hidden w_out + b_out; x: [0, 1]."""
  w_hidden: np.ndarray   # [64 pixels, 64]
  b_hidden: np.ndarray   # [64]
  w_out: np.ndarray      # [64, 10]
  b_out: np.ndarray      # [10]
  test_accuracy: np.ndarray  # [] accuracy on the 'test' split, measured when trained


_SHAPES = {'w_hidden': (NUM_PIXELS, HIDDEN_UNITS), 'b_hidden': (HIDDEN_UNITS,),
           'w_out': (HIDDEN_UNITS, NUM_CLASSES), 'b_out': (NUM_CLASSES,), 'test_accuracy': ()}


def _pixels(images: np.ndarray, name: str = 'samples') -> np.ndarray:
  """uint8 [N, 8, 8, 1] -> float64 [N, 64] in [0, 1], the classifier's input."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.shape[1:] != (8, 8, 1) or images.shape[0] < 2:
    raise ValueError(f'{name}: got {images.dtype} {images.shape}, expected uint8 [N, 8, 8, 1] with '
                     'N >= 2 (digits on the 0..255 grid)')
  return images.reshape(images.shape[0], NUM_PIXELS).astype(np.float64) / 255.0


def classifier_features(clf: DigitsClassifier, images: np.ndarray) -> np.ndarray:
  """Penultimate (hidden ReLU) activations float64 [N, 64] of uint8 images [N, 8, 8, 1]."""
  return np.maximum(_pixels(images) @ clf.w_hidden + clf.b_hidden, 0.0)


def classifier_logits(clf: DigitsClassifier, features: np.ndarray) -> np.ndarray:
  """Logits [N, 10] from `classifier_features` (their softmax is MLPClassifier's predict_proba)."""
  return features @ clf.w_out + clf.b_out


def _accuracy(clf: DigitsClassifier, images: np.ndarray, labels: np.ndarray) -> float:
  logits = classifier_logits(clf, classifier_features(clf, images))
  return float(np.mean(np.argmax(logits, axis=1) == labels))


def train_digits_classifier(seed: int = SEED) -> DigitsClassifier:
  """Trains the MLP on the digits 'train' split (Adam, scikit-learn defaults, `seed` for init and
  shuffling) and measures its accuracy on the 'test' split."""
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=g-import-not-at-top
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  images, labels = load_digits_split('train')
  mlp = MLPClassifier(hidden_layer_sizes=(HIDDEN_UNITS,), max_iter=1000, random_state=seed)
  # One BLAS thread: for a 1437 x 64 problem threads only contend (10x slower on a busy machine),
  # and single-threaded reductions make the result reproducible.
  with warnings.catch_warnings(), threadpool_limits(1):
    warnings.simplefilter('ignore', ConvergenceWarning)  # the test accuracy is what we check
    mlp.fit(_pixels(images, 'digits train split'), labels)
  clf = DigitsClassifier(mlp.coefs_[0], mlp.intercepts_[0], mlp.coefs_[1], mlp.intercepts_[1],
                         np.array(0.0))
  return clf._replace(test_accuracy=np.array(_accuracy(clf, *load_digits_split('test'))))


def load_or_train_digits_classifier(cache_dir: str) -> DigitsClassifier:
  """The classifier cached at <cache_dir>/digits_classifier.npz; trained and saved if absent."""
  path = os.path.join(cache_dir, CLASSIFIER_FILE)
  # A damaged cache is set aside with a warning and retrained (the training is deterministic).
  arrays = workdir.read_cached_npz(path, 'the digits classifier cache')
  if arrays is None:
    # Atomic: a concurrent or interrupted run never sees half a file.
    workdir.savez(path, **train_digits_classifier()._asdict())
    arrays = workdir.read_npz(path)
  for key, shape in _SHAPES.items():
    if key not in arrays or arrays[key].shape != shape:
      found = arrays[key].shape if key in arrays else 'missing'
      raise ValueError(f'digits classifier {path!r}: {key} is {found}, expected shape {shape}; '
                       'delete the file to retrain')
  return DigitsClassifier(**{k: arrays[k] for k in _SHAPES})


def digits_metrics(samples_uint8: np.ndarray, cache_dir: str) -> dict[str, float]:
  """Classifier-feature Fréchet distance and Inception Score of digit samples uint8 [N, 8, 8, 1].

  See the module docstring for the keys. `cache_dir` holds the classifier (e.g. the workdir).
  """
  _pixels(samples_uint8)  # fail on bad samples before any training
  clf = load_or_train_digits_classifier(cache_dir)
  features = classifier_features(clf, samples_uint8)
  train_images, _ = load_digits_split('train')
  test_images, _ = load_digits_split('test')
  subset = np.random.default_rng(SEED).choice(len(train_images), len(test_images), replace=False)
  test_features = classifier_features(clf, test_images)
  test_stats = fid.activation_statistics(test_features)
  floor_stats = fid.activation_statistics(classifier_features(clf, train_images[subset]))

  def score(feats: np.ndarray) -> tuple[float, float]:
    num_splits = int(np.clip(feats.shape[0] // 100, 1, 10))
    return fid.inception_score(classifier_logits(clf, feats), num_splits)

  is_mean, is_std = score(features)
  return {
      'frechet_distance': fid.frechet_distance(*fid.activation_statistics(features), *test_stats),
      'floor_frechet_distance': fid.frechet_distance(*floor_stats, *test_stats),
      'classifier_is': is_mean,
      'classifier_is_std': is_std,
      'test_classifier_is': score(test_features)[0],
      'test_accuracy': float(clf.test_accuracy),
      'num_samples': int(features.shape[0]),
  }
