"""The sampling jobs behind main.py: --mode=sample, --mode=progressive and --mode=interpolate.

`sample` writes config.sampling.num_samples images as uint8 .npz shards; shard k holds the global
sample indices [k S, (k + 1) S) (S = config.sampling.samples_per_shard). Each shard is written to a
temporary file and renamed, so a shard on disk is always complete; a rerun skips the shards that
exist and, since sample i depends only on (seed, i), produces exactly what an uninterrupted run
would have. Every process computes; only process 0 writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ddpm_jax import checkpoints, data, images, models, parallel
from ddpm_jax.config import validate_config
from ddpm_jax.sampling import interpolation, progressive as progressive_lib
from ddpm_jax.sampling.loop import per_sample_keys
from ddpm_jax.sampling.sample_fn import (image_shape, make_model_fn, make_sample_fn,
                                         sampling_coefficients, step_fn_from_config)
from ddpm_jax.streams import INTERPOLATION_STREAM, PROGRESSIVE_STREAM, SAMPLE_STREAM, stream_key

NUM_PROGRESSIVE_ROWS = 8
NUM_INTERPOLATION_PAIRS = 4
GRID_SIZE = 64
META_FILE = 'samples_meta.json'
# Fields that make two sample sets different; num_samples is not one (a rerun may ask for more).
_META_FIELDS = ('seed', 'method', 'timestep_respacing', 'ddim_eta', 'clip_denoised', 'use_ema',
                'samples_per_shard', 'image_shape', 'checkpoint_step')


def sample_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.eval.sample_dir, or <workdir>/samples."""
  return config.eval.sample_dir or os.path.join(workdir, 'samples')


def shard_path(directory: str, shard: int) -> str:
  return os.path.join(directory, f'samples_{shard:05d}.npz')


def shard_ranges(num_samples: int, per_shard: int) -> list[tuple[int, int]]:
  """[start, stop) of the global sample indices of each shard."""
  return [(s, min(s + per_shard, num_samples)) for s in range(0, num_samples, per_shard)]


def load_inference_params(config: ml_collections.ConfigDict, workdir: str,
                          mesh: jax.sharding.Mesh) -> tuple[Any, int]:
  """(params replicated on `mesh`, checkpoint step); the EMA weights if config.sampling.use_ema."""
  state = checkpoints.load_for_inference(workdir, config, mesh)
  params = state.ema_params if config.sampling.use_ema else state.params
  return params, int(jax.device_get(state.step))


def _setup(config: ml_collections.ConfigDict, workdir: str):
  """(mesh, params, checkpoint step) after joining the other hosts, if any, and validating."""
  parallel.maybe_initialize_distributed(config.training.distributed)
  mesh = parallel.create_mesh()
  validate_config(config, num_devices=mesh.devices.size, num_processes=jax.process_count())
  params, step = load_inference_params(config, workdir, mesh)
  return mesh, params, step


def _atomic_write(path: str, write) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  write(tmp)
  os.replace(tmp, path)


def _savez(path: str, **arrays: np.ndarray) -> None:
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
  _atomic_write(path, write)


def _write_json(path: str, obj: Any) -> None:
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(obj, f, indent=2, sort_keys=True)
  _atomic_write(path, write)


def _sampling_meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
  s = config.sampling
  return {'seed': config.seed, 'method': s.method, 'timestep_respacing': s.timestep_respacing,
          'ddim_eta': float(s.ddim_eta), 'clip_denoised': bool(s.clip_denoised),
          'use_ema': bool(s.use_ema), 'samples_per_shard': s.samples_per_shard,
          'image_shape': list(image_shape(config)), 'checkpoint_step': step}


def _check_meta(directory: str, meta: dict[str, Any]) -> None:
  """Refuses to mix samples of different settings or checkpoints in one directory."""
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = [f'{k}: directory has {saved.get(k)!r}, now {meta[k]!r}' for k in _META_FIELDS
           if saved.get(k) != meta[k]]
  if diffs:
    raise ValueError(f'{directory} holds samples made with other settings; delete it or set '
                     'config.eval.sample_dir to another directory. Differences:\n  '
                     + '\n  '.join(diffs))


def _missing_shards(directory: str, ranges: list[tuple[int, int]]) -> list[int]:
  """Shards not on disk, as process 0 sees them (broadcast: every process computes the same)."""
  missing = np.array([not os.path.exists(shard_path(directory, k)) for k in range(len(ranges))])
  if jax.process_count() > 1:
    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  return [k for k in range(len(ranges)) if missing[k]]


def _generate(sample_fn, params, key: jax.Array, start: int, stop: int,
              batch_size: int) -> np.ndarray:
  """uint8 samples of global indices [start, stop) in batches of `batch_size` (last one padded)."""
  out = []
  for first in range(start, stop, batch_size):
    indices = np.arange(first, first + batch_size, dtype=np.int32)
    samples = parallel.to_host(sample_fn(params, key, indices))
    out.append(data.to_uint8(np.asarray(samples))[:stop - first])
  return np.concatenate(out)


def load_samples(directory: str, num_samples: int) -> np.ndarray:
  """The first `num_samples` samples of a sample directory, uint8 [N, H, W, C], in index order."""
  out, have, shard = [], 0, 0
  while have < num_samples and os.path.exists(shard_path(directory, shard)):
    with np.load(shard_path(directory, shard)) as f:
      if int(f['indices'][0]) != have:
        raise ValueError(f'{shard_path(directory, shard)} starts at sample {int(f["indices"][0])}, '
                         f'expected {have}: the directory is not one consistent sample set')
      out.append(f['images'])
    have += len(out[-1])
    shard += 1
  if have < num_samples:
    raise ValueError(f'{directory} holds {have} consecutive samples from index 0, {num_samples} '
                     'are needed: run --mode=sample with config.sampling.num_samples large enough')
  return np.concatenate(out)[:num_samples]


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--mode=sample: config.sampling.num_samples samples (resumable) and a PNG grid; returns the dir.

  Uses the latest checkpoint of `workdir` (EMA weights when config.sampling.use_ema) and the sampler
  of config.sampling (method, timestep_respacing, ddim_eta, clip_denoised). Writes into
  config.eval.sample_dir, or <workdir>/samples.
  """
  mesh, params, step = _setup(config, workdir)
  directory = sample_dir(config, workdir)
  meta = _sampling_meta(config, step)
  _check_meta(directory, meta)
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, META_FILE), meta)
  s = config.sampling
  ranges = shard_ranges(s.num_samples, s.samples_per_shard)
  sample_fn = make_sample_fn(config, models.create_model(config), mesh)
  key = stream_key(config, SAMPLE_STREAM)
  for k in _missing_shards(directory, ranges):
    start, stop = ranges[k]
    shard_images = _generate(sample_fn, params, key, start, stop, s.batch_size)
    if jax.process_index() == 0:
      _savez(shard_path(directory, k), images=shard_images, indices=np.arange(start, stop))
    logging.info('Wrote sample shard %d/%d (samples %d-%d).', k + 1, len(ranges), start, stop - 1)
  if jax.process_index() == 0:
    grid = load_samples(directory, min(GRID_SIZE, s.num_samples))
    images.save_image_grid(grid, os.path.join(directory, 'samples_grid.png'))
  return directory


def _replicated_call(fn, mesh: jax.sharding.Mesh, *args) -> Any:
  """Runs a small job replicated on every device of `mesh`; numpy result, same on every process."""
  out = jax.jit(fn, out_shardings=parallel.replicated_sharding(mesh))(*args)
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), out)


def progressive(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """--mode=progressive (DDPM §4.3, Fig. 6): x0_hat every config.sampling.progressive_every steps.

  Writes <workdir>/progressive/progressive.png (rows = samples, columns = steps from x_T to x_0)
  and progressive.npz (pred_xstart uint8 [rows, columns, H, W, C]; timesteps: the paper's t of
  each column). Returns both paths.
  """
  mesh, params, _ = _setup(config, workdir)
  coefs = sampling_coefficients(config)
  model = models.create_model(config)
  every = config.sampling.progressive_every
  shape = (NUM_PROGRESSIVE_ROWS,) + image_shape(config)

  def run(params, indices):
    keys = per_sample_keys(stream_key(config, PROGRESSIVE_STREAM), indices)
    step_fn = step_fn_from_config(config, coefs, make_model_fn(model, params))
    return progressive_lib.progressive_sample_loop(coefs, step_fn, keys, shape, every=every)[1]

  records = _replicated_call(run, mesh, params, np.arange(NUM_PROGRESSIVE_ROWS, dtype=np.int32))
  steps = progressive_lib.recorded_steps(coefs.num_timesteps, every)
  timesteps = np.asarray(coefs.timestep_map)[steps] + 1
  strip = data.to_uint8(records)
  return _write_strip(os.path.join(workdir, 'progressive'), 'progressive', strip,
                      pred_xstart=strip, timesteps=timesteps)


def _write_strip(directory: str, name: str, strip: np.ndarray, **arrays: np.ndarray) -> list[str]:
  """Saves uint8 strip [rows, cols, H, W, C] as <name>.png, `arrays` as <name>.npz (process 0)."""
  png, npz = os.path.join(directory, f'{name}.png'), os.path.join(directory, f'{name}.npz')
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    rows, cols = strip.shape[:2]
    images.save_image_grid(strip.reshape((rows * cols,) + strip.shape[2:]), png, ncol=cols)
    _savez(npz, **arrays)
  return [png, npz]


def _interpolation_pairs(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive test images as pairs: (x_a, x_b), each uint8 [P, H, W, C]."""
  split = config.data.eval_split
  pool = data.load_eval_images(config, split, 2 * NUM_INTERPOLATION_PAIRS)
  if len(pool) < 2:
    raise ValueError(f'interpolation needs two images of data.eval_split={split!r}, '
                     f'found {len(pool)}')
  num_pairs = len(pool) // 2
  return pool[0:2 * num_pairs:2], pool[1:2 * num_pairs:2]


def interpolate(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """--mode=interpolate (DDPM §4.4, Fig. 8): latent interpolation between pairs of test images.

  The images are encoded to table index t = config.sampling.interpolation_t of the full T-step
  process (not respaced) with the same noise, mixed for config.sampling.interpolation_num_lambdas
  values of lambda in [0, 1] and decoded with config.sampling.method. Writes
  <workdir>/interpolation/interpolation.png (rows = pairs; columns = x0, lambda = 0 .. 1, x0') and
  interpolation.npz (decoded uint8 [P, L, H, W, C], sources uint8 [P, 2, H, W, C], lambdas [L],
  t). Returns both paths.
  """
  mesh, params, _ = _setup(config, workdir)
  coefs = sampling_coefficients(config, respacing='')
  model = models.create_model(config)
  s = config.sampling
  if s.interpolation_num_lambdas < 2:
    raise ValueError('config field sampling.interpolation_num_lambdas='
                     f'{s.interpolation_num_lambdas} is invalid: expected >= 2 (lambda = 0 and 1)')
  lambdas = np.linspace(0.0, 1.0, s.interpolation_num_lambdas, dtype=np.float32)
  x_a, x_b = _interpolation_pairs(config)

  def run(params, x_a, x_b, lambdas, indices):
    keys = per_sample_keys(stream_key(config, INTERPOLATION_STREAM), indices)
    step_fn = step_fn_from_config(config, coefs, make_model_fn(model, params))
    return interpolation.interpolate(coefs, step_fn, x_a, x_b, lambdas, s.interpolation_t, keys)

  decoded = _replicated_call(run, mesh, params, data.to_model_range(x_a), data.to_model_range(x_b),
                             lambdas, np.arange(len(x_a), dtype=np.int32))
  decoded = data.to_uint8(decoded)
  strip = np.concatenate([x_a[:, None], decoded, x_b[:, None]], axis=1)
  return _write_strip(os.path.join(workdir, 'interpolation'), 'interpolation', strip,
                      decoded=decoded, sources=np.stack([x_a, x_b], axis=1), lambdas=lambdas,
                      t=np.asarray(s.interpolation_t))
