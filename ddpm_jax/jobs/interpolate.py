"""--mode=interpolate (DDPM §4.4, Fig. 8): latent interpolation between pairs of test images.

A class-conditional model (config.model.num_classes > 0) decodes with the test images' own labels
(`data.load_eval_labels`): each mixed latent with the label of the end that weighs more in
it (`interpolation.interpolation_labels`), so both ends are reconstructions under their true class.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import checkpoints, data, images, models, parallel, sampling
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.sampling import interpolation
from ddpm_jax.streams import INTERPOLATION_STREAM, stream_key

NUM_PAIRS = 4


def _pairs(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive test images as pairs: (x_a, x_b), each uint8 [P, H, W, C]."""
  split = config.data.eval_split
  pool = data.load_eval_images(config, split, 2 * NUM_PAIRS)
  if len(pool) < 2:
    raise ValueError(f'interpolation needs two images of data.eval_split={split!r}, '
                     f'found {len(pool)}')
  num_pairs = len(pool) // 2
  return pool[0:2 * num_pairs:2], pool[1:2 * num_pairs:2]


def _pair_labels(config: ml_collections.ConfigDict, num_pairs: int) -> np.ndarray:
  """int32 [P, 2]: the labels of `_pairs`' images (class-conditional models)."""
  labels = data.load_eval_labels(config, config.data.eval_split, 2 * num_pairs)
  return labels[:2 * num_pairs].reshape(num_pairs, 2)


def interpolate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> list[str]:
  """Encodes pairs of test images to table index t = config.sampling.interpolation_t of the full
  T-step process (not respaced) with the same noise, mixes them for
  config.sampling.interpolation_num_lambdas values of lambda in [0, 1] and decodes with
  config.sampling.method.

  Writes <workdir>/interpolation/interpolation.png (rows = pairs; columns = x0, lambda = 0 .. 1, x0')
  and interpolation.npz (decoded uint8 [P, L, H, W, C], sources uint8 [P, 2, H, W, C], lambdas [L],
  t; class-conditional models also labels int32 [P, 2], the sources' labels, and decoded_labels
  int32 [P, L], the label each decoded image was denoised with). Returns both paths.
  """
  params, _ = checkpoints.restore_sampling_params(workdir, config, mesh)
  coefs = sampling.sampling_coefficients(config, respacing='')
  model = models.create_model(config)
  s = config.sampling
  lambdas = np.linspace(0.0, 1.0, s.interpolation_num_lambdas, dtype=np.float32)
  x_a, x_b = _pairs(config)
  labels = _pair_labels(config, len(x_a)) if models.num_classes(config) else None

  def run(params, x_a, x_b, lambdas, indices, labels):
    keys = sampling.per_sample_keys(stream_key(config, INTERPOLATION_STREAM), indices)
    if labels is not None:
      labels = interpolation.interpolation_labels(labels[:, 0], labels[:, 1], lambdas)
    step_fn = sampling.step_fn_from_config(config, coefs,
                                           sampling.make_model_fn(model, params, labels))
    return (interpolation.interpolate(coefs, step_fn, x_a, x_b, lambdas, s.interpolation_t, keys),
            labels)

  decoded, decoded_labels = parallel.run_replicated(
      run, mesh, params, data.to_model_range(x_a), data.to_model_range(x_b), lambdas,
      np.arange(len(x_a), dtype=np.int32), labels)
  decoded = data.to_uint8(decoded)
  strip = np.concatenate([x_a[:, None], decoded, x_b[:, None]], axis=1)
  png, npz = workdir_lib.strip_paths(workdir, workdir_lib.INTERPOLATION)
  if parallel.is_writer():
    images.save_strip(strip, png)
    conditional = {} if labels is None else {
        'labels': labels, 'decoded_labels': decoded_labels.reshape(decoded.shape[:2])}
    workdir_lib.savez(npz, decoded=decoded, sources=np.stack([x_a, x_b], axis=1), lambdas=lambdas,
                      t=np.asarray(s.interpolation_t), **conditional)
  return [png, npz]
