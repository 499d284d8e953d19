"""--mode=progressive (DDPM §4.3, Fig. 6): x0_hat every config.sampling.progressive_every steps."""

from __future__ import annotations

import ml_collections
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import checkpoints, data, images, models, parallel, sampling
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.streams import PROGRESSIVE_STREAM, stream_key

NUM_ROWS = 8


def progressive(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> list[str]:
  """Writes <workdir>/progressive/progressive.png (rows = samples, columns = steps from x_T to x_0)
  and progressive.npz (pred_xstart uint8 [rows, columns, H, W, C]; timesteps: the paper's t of each
  column). Returns both paths."""
  params, _ = checkpoints.restore_sampling_params(workdir, config, mesh)
  coefs = sampling.sampling_coefficients(config)
  model = models.create_model(config)
  every = config.sampling.progressive_every
  shape = (NUM_ROWS,) + sampling.image_shape(config)

  def run(params, indices):
    keys = sampling.per_sample_keys(stream_key(config, PROGRESSIVE_STREAM), indices)
    step_fn = sampling.step_fn_from_config(config, coefs, sampling.make_model_fn(model, params))
    return sampling.progressive_sample_loop(coefs, step_fn, keys, shape, every=every)[1]

  records = parallel.run_replicated(run, mesh, params, np.arange(NUM_ROWS, dtype=np.int32))
  steps = sampling.recorded_steps(coefs.num_timesteps, every)
  timesteps = np.asarray(coefs.timestep_map)[steps] + 1
  strip = data.to_uint8(records)
  png, npz = workdir_lib.strip_paths(workdir, workdir_lib.PROGRESSIVE)
  if parallel.is_writer():
    images.save_strip(strip, png)
    workdir_lib.savez(npz, pred_xstart=strip, timesteps=timesteps)
  return [png, npz]
