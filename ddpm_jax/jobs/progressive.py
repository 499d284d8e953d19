"""--mode=progressive (DDPM §4.3, Fig. 6): x0_hat every config.sampling.progressive_every steps.

A class-conditional model (config.model.num_classes > 0) draws row i's label by the sample job's
rule, from row i's own key (`sampling.sample_labels`), so row i is exactly what `make_sample_fn`
gives for sample i of the progressive stream; the labels are stored in progressive.npz.
"""

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
  column; labels int32 [rows], class-conditional models only). Returns both paths."""
  params, _ = checkpoints.restore_sampling_params(workdir, config, mesh)
  coefs = sampling.sampling_coefficients(config)
  model = models.create_model(config)
  every = config.sampling.progressive_every
  shape = (NUM_ROWS,) + sampling.image_shape(config)
  num_classes = models.num_classes(config)

  def run(params, indices):
    keys = sampling.per_sample_keys(stream_key(config, PROGRESSIVE_STREAM), indices)
    labels = sampling.sample_labels(keys, num_classes) if num_classes else None
    step_fn = sampling.step_fn_from_config(config, coefs,
                                           sampling.make_model_fn(model, params, labels))
    return sampling.progressive_sample_loop(coefs, step_fn, keys, shape, every=every)[1], labels

  records, labels = parallel.run_replicated(run, mesh, params, np.arange(NUM_ROWS, dtype=np.int32))
  steps = sampling.recorded_steps(coefs.num_timesteps, every)
  timesteps = np.asarray(coefs.timestep_map)[steps] + 1
  strip = data.to_uint8(records)
  png, npz = workdir_lib.strip_paths(workdir, workdir_lib.PROGRESSIVE)
  if parallel.is_writer():
    images.save_strip(strip, png)
    workdir_lib.savez(npz, pred_xstart=strip, timesteps=timesteps,
                      **({} if labels is None else {'labels': labels}))
  return [png, npz]
