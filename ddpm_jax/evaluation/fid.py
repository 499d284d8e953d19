"""FID and Inception Score of generated samples (DDPM §4.1, Table 1), with the Flax FID Inception.

Comparable to the TTUR FID code (github.com/bioinf-jku/TTUR, `fid.py`: same graph, same in-graph
TF1 bilinear resize to 299, pool_3 features, float64 statistics with the unbiased covariance, same
Fréchet distance with its eps fallback) and to the improved-GAN Inception Score (softmax of
pool_3 @ softmax/weights without the bias, 10 contiguous splits, exp of the mean KL, mean and std
over splits). pytorch-fid's numbers differ slightly: it resizes with half-pixel centres.

Reference statistics are .npz files with arrays `mu` [2048] and `sigma` [2048, 2048] (float64),
the layout of TTUR's precomputed statistics, so e.g. TTUR's `fid_stats_cifar10_train.npz` can be
used directly as the reference file.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special
from absl import logging

from ddpm_jax import workdir
from ddpm_jax.evaluation import inception
from ddpm_jax.evaluation import precision_recall as pr_lib

# config.eval.inception_backend: 'tf_graph' runs TF's frozen graph on the CPU (the reference, slow);
# 'flax' runs the Flax port on the accelerator, after checking it against the graph once.
INCEPTION_BACKENDS = ('tf_graph', 'flax')

Images = np.ndarray | Iterable[np.ndarray]   # uint8 [N, H, W, C], or batches of it
Stats = tuple[np.ndarray, np.ndarray]        # (mu float64 [D], sigma float64 [D, D])


def activation_statistics(features: np.ndarray) -> Stats:
  """Mean and covariance (unbiased, rows are samples) of features [N, D], in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'features: got shape {features.shape}, expected [N, D] with N >= 2')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  # Singular products are expected (rank-deficient covariances); the caller checks the result.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) between two Gaussians, float64.

  As in TTUR: if the matrix square root is not finite (near-singular covariances, e.g. fewer samples
  than dimensions) it is retried with eps added to both diagonals; an imaginary part from rounding
  is dropped, one above 1e-3 on the diagonal raises.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  for name, value, shape in (('mu2', mu2, (dim,)), ('sigma1', sigma1, (dim, dim)),
                             ('sigma2', sigma2, (dim, dim))):
    if value.shape != shape:
      raise ValueError(f'frechet_distance: {name} has shape {value.shape}, expected {shape} '
                       f'(mu1 has {dim} dimensions)')
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(dim) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imaginary = np.max(np.abs(np.diagonal(covmean).imag))
    if imaginary > 1e-3:
      raise ValueError(f'frechet_distance: sqrtm(sigma1 sigma2) has an imaginary diagonal part of '
                       f'{imaginary:.3g} (> 1e-3); the covariances are not valid')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))) of logits [N, K] (Salimans et al. 2016).

  The N samples are cut into `num_splits` contiguous parts (sizes differ by at most one); p(y) is
  the mean prediction of each part. Returns (mean, std) of the per-part scores. Works in log space
  (float64), so confident predictions with exact zeros are fine.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f'logits: got shape {logits.shape}, expected [N, K]')
  num = logits.shape[0]
  if not 1 <= num_splits <= num:
    raise ValueError(f'num_splits: got {num_splits}, expected 1 <= num_splits <= N = {num}')
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for k in range(num_splits):
    part = log_p[k * num // num_splits:(k + 1) * num // num_splits]
    log_py = scipy.special.logsumexp(part, axis=0) - np.log(part.shape[0])
    kl = np.sum(np.exp(part) * (part - log_py), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def _check_images(images: np.ndarray, name: str = 'images') -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'{name}: got {images.dtype} {images.shape}, expected uint8 [N, H, W, C] with '
                     'C = 1 or 3 (values 0..255)')
  return images


def _fixed_size_batches(images: Images, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """Re-cuts an array or a stream of batches into [batch_size, H, W, C] batches; the last one is
  zero-padded so the network compiles once. Yields (batch, number of real images in it)."""
  chunks = [images] if isinstance(images, np.ndarray) else images
  pending = None
  for chunk in chunks:
    chunk = _check_images(chunk)
    pending = chunk if pending is None else np.concatenate([pending, chunk])
    full = pending.shape[0] // batch_size * batch_size
    for start in range(0, full, batch_size):
      yield pending[start:start + batch_size], batch_size
    pending = pending[full:]
  if pending is not None and pending.shape[0]:
    padding = np.zeros((batch_size - pending.shape[0],) + pending.shape[1:], np.uint8)
    yield np.concatenate([pending, padding]), pending.shape[0]


def compute_inception_features(apply_fn: inception.InceptionFn, images: Images,
                               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Runs the Inception on uint8 images [N, H, W, C] (or an iterable of such batches).

  Args:
    apply_fn: `inception.make_inception_fn(...)`: [B, H, W, C] -> (pool [B, 2048], logits [B, 1008])
    images: uint8 in [0, 255]; C = 1 is tiled to RGB; any H, W (resized to 299 in the network).
    batch_size: every call gets exactly this many images, so `apply_fn` compiles once.
  Returns:
    (pool_3 features float32 [N, 2048], logits float32 [N, 1008]).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size: got {batch_size}, expected >= 1')
  pools, logits = [], []

  def collect(outputs, count):
    pools.append(np.asarray(outputs[0])[:count])
    logits.append(np.asarray(outputs[1])[:count])

  previous = None
  for batch, count in _fixed_size_batches(images, batch_size):
    outputs = apply_fn(batch)  # dispatched asynchronously; fetch the previous batch meanwhile
    if previous is not None:
      collect(*previous)
    previous = (outputs, count)
  if previous is None:
    raise ValueError('images: got no images')
  collect(*previous)
  return np.concatenate(pools), np.concatenate(logits)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes (mu, sigma) as a TTUR-style .npz, atomically (a crash leaves no half-written file)."""
  workdir.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str) -> Stats:
  """Reads (mu [D], sigma [D, D]) float64 from a .npz with arrays `mu` and `sigma`."""
  data = workdir.read_npz(path, 'replace it with a complete copy (a cached one is recomputed)')
  if 'mu' not in data or 'sigma' not in data:
    raise ValueError(f'reference statistics {path!r}: has arrays {sorted(data)}, '
                     'expected mu, sigma')
  mu, sigma = data['mu'].astype(np.float64), data['sigma'].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f'reference statistics {path!r}: mu {mu.shape}, sigma {sigma.shape}; '
                     'expected [D] and [D, D]')
  return mu, sigma


def load_or_compute_reference_stats(path: str, compute_fn: Callable[[], Stats]) -> Stats:
  """Loads (mu, sigma) from `path`, or computes them once with `compute_fn()` and saves them.

  A damaged cache file is set aside (`<path>.damaged-<time>`) with a warning and recomputed.
  """
  if os.path.exists(path):
    try:
      return load_stats(path)
    except workdir.DamagedFileError as e:
      warnings.warn(f'{e}. Moved it to {workdir.set_aside(path)}; recomputing the reference statistics.',
                    stacklevel=2)
  mu, sigma = compute_fn()
  save_stats(path, mu, sigma)
  return load_stats(path)


def make_inception(backend: str = 'flax', weights_path: str | None = None,
                   cache_dir: str | None = None,
                   self_check: bool = True) -> tuple[inception.InceptionFn, dict[str, Any]]:
  """The Inception function of `backend` and its provenance.

  Args:
    backend: 'tf_graph' (the frozen graph, TensorFlow on the CPU) or 'flax' (the port, jitted; its
      variables are self-checked against the graph the first time a weights file is used, see
      `inception.load_checked_variables`).
    weights_path: config.eval.inception_weights (None: the public file, downloaded once).
    cache_dir: where weights are downloaded, converted and their self-check recorded.
    self_check: 'flax' only; False runs an unchecked port (an explicit opt-out).
  Returns:
    (images [B, H, W, C] uint8 -> (pool_3 [B, 2048], logits [B, 1008]), {'backend', 'weights_file',
    'weights_sha256', 'self_check'}).
  """
  if backend == 'flax':
    variables, provenance = inception.load_checked_variables(weights_path, cache_dir, self_check)
    return inception.make_inception_fn(variables), {'backend': backend, **provenance}
  if backend == 'tf_graph':
    from ddpm_jax.evaluation import inception_tf  # pylint: disable=g-import-not-at-top
    path = inception.resolve_weights(weights_path, cache_dir)
    if path.endswith('.npz'):
      raise ValueError(f"config.eval.inception_weights={weights_path!r}: inception_backend='tf_graph'"
                       ' runs the TF graph itself; give classify_image_graph_def.pb or the .tgz')
    logging.info('Inception backend tf_graph: running %s with TensorFlow on the CPU.', path)
    return inception_tf.make_tf_inception_fn(path), {
        'backend': backend, 'weights_file': os.path.abspath(path),
        'weights_sha256': inception.sha256_of(path), 'self_check': 'not needed (the graph itself)'}
  raise ValueError(f'backend: got {backend!r}, expected one of {INCEPTION_BACKENDS}')


@dataclasses.dataclass(frozen=True)
class Reference:
  """A reference set: its name (the split), its cached statistics file, and its images (read only
  when that file is missing or lacks the features that precision / recall need)."""
  name: str
  stats_path: str
  images_fn: Callable[[], Images]


def load_or_compute_reference(reference: Reference, inception_fn: inception.InceptionFn,
                              batch_size: int, need_features: bool) -> dict[str, Any]:
  """{'mu', 'sigma', 'features' (or None), 'num_images'} of a reference set, cached in its .npz
  (the TTUR layout plus the pool_3 `features` [N, 2048] float32 that precision / recall need)."""
  path = reference.stats_path
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as data:
      has_features = 'features' in data.files
    if has_features or not need_features:
      mu, sigma = load_stats(path)
      features = None
      if has_features:
        with np.load(path, allow_pickle=False) as data:
          features = data['features']
      return {'mu': mu, 'sigma': sigma, 'features': features,
              'num_images': None if features is None else int(features.shape[0])}
    logging.info('%s has no features (precision / recall need them): recomputing it.', path)
  features, _ = compute_inception_features(inception_fn, reference.images_fn(), batch_size)
  mu, sigma = activation_statistics(features)
  workdir.savez(path, mu=mu, sigma=sigma, features=np.asarray(features, np.float32))
  return {'mu': mu, 'sigma': sigma, 'features': np.asarray(features, np.float32),
          'num_images': int(features.shape[0])}


def fid_report(samples_uint8: Images, references: Sequence[Reference],
               inception_fn: inception.InceptionFn, provenance: dict[str, Any],
               batch_size: int = 100, num_splits: int = 10,
               k: int | None = pr_lib.DEFAULT_K) -> dict[str, Any]:
  """FID against each reference (DDPM reports the train split; the original evaluation also the
  test split), Inception Score, and improved precision / recall (k-NN, `k`; None skips them).

  Keys: 'fid', 'precision', 'recall' against references[0]; 'fid_<name>', 'precision_<name>',
  'recall_<name>' against each further reference; 'inception_score', 'inception_score_std',
  'num_samples'; and 'provenance': for every number, the backend, the weights file's sha256, the
  number of samples, the reference statistics file and its number of images.
  """
  features, logits = compute_inception_features(inception_fn, samples_uint8, batch_size)
  mu, sigma = activation_statistics(features)
  is_mean, is_std = inception_score(logits, num_splits)
  num = int(features.shape[0])
  common = {'backend': provenance['backend'], 'weights_sha256': provenance['weights_sha256'],
            'num_samples': num}
  result: dict[str, Any] = {'inception_score': is_mean, 'inception_score_std': is_std,
                            'num_samples': num}
  records = {'inception_score': dict(common, reference_stats=None),
             'inception_score_std': dict(common, reference_stats=None)}
  for i, reference in enumerate(references):
    ref = load_or_compute_reference(reference, inception_fn, batch_size, k is not None)
    suffix = '' if i == 0 else f'_{reference.name}'
    source = dict(common, reference_stats=os.path.abspath(reference.stats_path),
                  reference_split=reference.name, reference_num_images=ref['num_images'])
    result['fid' + suffix] = frechet_distance(mu, sigma, ref['mu'], ref['sigma'])
    records['fid' + suffix] = source
    if k is not None:
      for name, value in pr_lib.precision_recall(ref['features'], features, k).items():
        result[name + suffix] = value
        records[name + suffix] = dict(source, k=k)
  result['provenance'] = dict(inception=provenance, numbers=records)
  return result


def fid_and_is(samples_uint8: Images, reference_stats_path: str,
               reference_images_fn: Callable[[], Images], weights_path: str | None = None,
               cache_dir: str | None = None, batch_size: int = 100, num_splits: int = 10,
               inception_fn: inception.InceptionFn | None = None, backend: str = 'flax',
               self_check: bool = True) -> dict[str, float]:
  """FID against reference statistics and Inception Score of generated samples (DDPM §4.1).

  Args:
    samples_uint8: generated images, uint8 [N, H, W, C] (C = 1 or 3), or an iterable of batches.
    reference_stats_path: .npz of the reference (mu, sigma); computed from `reference_images_fn()`
      and cached there when missing (DDPM: the CIFAR10 training set, 50k images).
    reference_images_fn: returns the reference images (same forms as samples); only called when the
      statistics are not cached yet.
    weights_path: config.eval.inception_weights (see `inception.load_inception_variables`).
    cache_dir: where weights are downloaded/converted (default ~/.cache/ddpm_jax).
    batch_size: images per Inception call (config.eval.batch_size).
    num_splits: Inception Score splits (10 as in the paper's code).
    inception_fn: an already built `inception.make_inception_fn(...)`; overrides weights_path.
    backend, self_check: see `make_inception`.
  Returns:
    {'fid', 'inception_score', 'inception_score_std', 'num_samples'}.
  """
  if inception_fn is None:
    inception_fn, _ = make_inception(backend, weights_path, cache_dir, self_check)

  def reference_stats() -> Stats:
    features, _ = compute_inception_features(inception_fn, reference_images_fn(), batch_size)
    return activation_statistics(features)

  ref_mu, ref_sigma = load_or_compute_reference_stats(reference_stats_path, reference_stats)
  features, logits = compute_inception_features(inception_fn, samples_uint8, batch_size)
  mu, sigma = activation_statistics(features)
  is_mean, is_std = inception_score(logits, num_splits)
  return {'fid': frechet_distance(mu, sigma, ref_mu, ref_sigma), 'inception_score': is_mean,
          'inception_score_std': is_std, 'num_samples': int(features.shape[0])}
