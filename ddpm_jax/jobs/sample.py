"""--mode=sample: config.sampling.num_samples samples as uint8 .npz shards and a PNG grid.

Shard k holds the global sample indices [k S, (k + 1) S) (S = config.sampling.samples_per_shard), written
atomically; a rerun skips the shards on disk and, since sample i depends only on (seed, i), produces
exactly what an uninterrupted run would have. Every process computes; only process 0 writes.
A class-conditional model (config.model.num_classes > 0) also stores each sample's class label in
its shard (`labels`, int32), drawn from the sample's own key. A shard's arrays come from
`sampling.generate.generate_shard`, as those --mode=eval fills in, so they do not depend on the job.
"""

from __future__ import annotations

import os

import ml_collections
from absl import logging
from jax.sharding import Mesh

from ddpm_jax import checkpoints, images, models, parallel, sampling
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.sampling.generate import generate_shard
from ddpm_jax.streams import SAMPLE_STREAM, stream_key

GRID_SIZE = 64


def sample(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> str:
  """Samples with the latest checkpoint of `workdir` (EMA weights when config.sampling.use_ema) and
  the sampler of config.sampling (method, timestep_respacing, ddim_eta, clip_denoised), into
  config.eval.sample_dir or <workdir>/samples; returns that directory."""
  params, step = checkpoints.restore_sampling_params(workdir, config, mesh)
  directory = workdir_lib.sample_dir(workdir, config.eval.sample_dir)
  s = config.sampling
  sample_fn = sampling.make_sample_fn(config, models.create_model(config), mesh)
  key = stream_key(config, SAMPLE_STREAM)
  num_classes = models.num_classes(config)
  workdir_lib.fill_sample_shards(
      directory, workdir_lib.sample_meta(config, step), s.num_samples,
      lambda start, stop: generate_shard(sample_fn, params, key, start, stop, s.batch_size, num_classes),
      is_writer=parallel.is_writer(), broadcast=parallel.broadcast_from_writer, log=logging.info)
  if parallel.is_writer():
    grid = workdir_lib.load_samples(directory, min(GRID_SIZE, s.num_samples))
    images.save_image_grid(grid, os.path.join(directory, workdir_lib.SAMPLES_GRID_FILE))
  return directory
