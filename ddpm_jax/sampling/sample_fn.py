"""From a config to one compiled, sharded sampling function (DDPM Alg. 2, iDDPM §4, DDIM).

`make_sample_fn(config, model, mesh)` returns `sample_fn(params, base_key, indices)`: the images
whose global indices are `indices`, each a function of (base_key, its index) only, so the result is
the same for any batch size, device count or process count, and an interrupted run can regenerate
exactly the samples it is missing.

Class-conditional models (config.model.num_classes > 0, iDDPM's class_cond): the label reaches the
network through the model_fn closure (`make_model_fn(..., labels)`), so `diffusion` and the loops
stay label-agnostic. Unless given, the label of sample i is drawn from its own key,
randint(fold_in(keys[i], LABEL_STREAM), num_classes) (`sample_labels`), so it too depends only on
(base_key, i).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from ddpm_jax import diffusion, models, parallel
from ddpm_jax.sampling.ancestral import p_sample
from ddpm_jax.sampling.ddim import ddim_sample
from ddpm_jax.sampling.loop import StepFn, sample_loop
from ddpm_jax.streams import per_sample_keys

# The reverse steps `make_step_fn` builds (config.sampling.method).
METHODS = ('ancestral', 'ddim')
SampleFn = Callable[..., jax.Array]
# The per-sample stream of a class label: far above the step streams 0 .. K - 1 and x_T's stream K.
LABEL_STREAM = 2**31 - 1


def make_model_fn(model: Any, params: Any, labels: jax.Array | None = None) -> diffusion.ModelFn:
  """model_fn(x_t [B, H, W, C], timestep [B]) -> output, evaluation mode (no dropout).

  `labels` int [B] (class-conditional models only) are bound here, so the diffusion code keeps
  calling model_fn(x, t).
  """
  if labels is None:
    return lambda x, t: model.apply({'params': params}, x, t, train=False)
  return lambda x, t: model.apply({'params': params}, x, t, labels, train=False)


def sample_labels(keys: jax.Array, num_classes: int) -> jax.Array:
  """int32 [B]: label i = randint(fold_in(keys[i], LABEL_STREAM), [0, num_classes)), a function of
  sample i's own key (so of (base_key, i)) alone, whatever the batch."""
  draw = lambda key: jax.random.randint(jax.random.fold_in(key, LABEL_STREAM), (), 0, num_classes,
                                        jnp.int32)
  return jax.vmap(draw)(keys)


def labels_for_indices(base_key: jax.Array, indices: Any, num_classes: int) -> np.ndarray:
  """int32 [B] on the host: the labels `make_sample_fn` draws for global sample `indices` (stored
  with the samples)."""
  indices = jnp.asarray(np.asarray(indices, np.int32))
  return np.asarray(jax.device_get(sample_labels(per_sample_keys(base_key, indices), num_classes)))


def make_step_fn(coefs: diffusion.DiffusionCoefficients, model_fn: diffusion.ModelFn, *, method: str,
                 eta: float = 0.0, clip_denoised: bool = True) -> StepFn:
  """One reverse step: 'ancestral' (DDPM Alg. 2; respaced when `coefs` are) or 'ddim'."""
  if method == 'ancestral':
    return lambda x, t, z: p_sample(coefs, model_fn, x, t, z, clip_denoised=clip_denoised)
  if method == 'ddim':
    return lambda x, t, z: ddim_sample(coefs, model_fn, x, t, z, eta=eta,
                                       clip_denoised=clip_denoised)
  raise ValueError(f'config field sampling.method={method!r} is invalid: allowed: {METHODS}')


def sampling_coefficients(config: ml_collections.ConfigDict,
                          respacing: str | None = None) -> diffusion.DiffusionCoefficients:
  """float32 tables for the sampler: config.diffusion respaced by `respacing` (default
  config.sampling.timestep_respacing). The chain runs in float32 even for a bfloat16 network: 1,000
  small updates would be lost to bfloat16's 8-bit mantissa."""
  if respacing is None:
    respacing = config.sampling.timestep_respacing
  return diffusion.coefficients_from_config(config.diffusion, respacing=respacing,
                                            dtype=jnp.float32)


def step_fn_from_config(config: ml_collections.ConfigDict, coefs: diffusion.DiffusionCoefficients,
                        model_fn: diffusion.ModelFn) -> StepFn:
  s = config.sampling
  return make_step_fn(coefs, model_fn, method=s.method, eta=float(s.ddim_eta),
                      clip_denoised=bool(s.clip_denoised))


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the model's images."""
  return (config.data.image_size, config.data.image_size, config.data.num_channels)


def _check_indices(indices: Any, mesh: Mesh) -> None:
  shape, dtype = np.shape(indices), np.result_type(indices)
  num_devices = mesh.devices.size
  if len(shape) != 1 or not np.issubdtype(dtype, np.integer) or shape[0] % num_devices:
    raise ValueError(f'sample_fn indices must be an integer array [B] with B divisible by the '
                     f'{num_devices} devices of the mesh; got dtype {dtype}, shape {list(shape)}')


def _place_indices(indices: Any, mesh: Mesh) -> jax.Array:
  """Global indices [B] sharded over `data`. Numpy input must be identical on every process (each
  feeds its slice); a fully addressable jax.Array is resharded; other global arrays pass through."""
  if isinstance(indices, jax.Array):
    if indices.is_fully_addressable:
      return jax.device_put(indices.astype(jnp.int32), parallel.data_sharding(mesh))
    return indices
  indices = np.asarray(indices, np.int32)
  return parallel.shard_batch(indices[parallel.process_slice(indices.shape[0])], mesh)


def jit_sample(config: ml_collections.ConfigDict, model: Any, mesh: Mesh, *,
               with_labels: bool = False) -> Any:
  """The sampler of `make_sample_fn` jitted for `mesh`, before its argument checks: (params, base_key,
  indices[, labels]) -> samples, params and key replicated, indices (and labels) split on `data`.

  On a CPU it is compiled with `runtime.cpu_sample_reductions`' reduction kernels
  (`parallel.cpu_compiler_options`). The one place the sampler is jitted, so that tests and benchmarks
  inspect exactly what sampling runs.
  """
  coefs = sampling_coefficients(config)
  shape = image_shape(config)
  num_classes = models.num_classes(config)

  def sample(params, base_key, indices, labels=None):
    keys = per_sample_keys(base_key, indices)
    if num_classes > 0 and labels is None:
      labels = sample_labels(keys, num_classes)
    step = step_fn_from_config(config, coefs, make_model_fn(model, params, labels))
    x0, _ = sample_loop(step, keys, (keys.shape[0],) + shape, coefs.num_timesteps,
                        coefs.betas.dtype)
    # Unclipped samplers can overshoot slightly; images are [-1, 1] by contract.
    return jnp.clip(x0, -1.0, 1.0)

  replicated, sharded = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(sample, in_shardings=(replicated, replicated, sharded) + (sharded,) * with_labels,
                 out_shardings=sharded,
                 compiler_options=parallel.cpu_compiler_options(
                     mesh, reductions=config.runtime.cpu_sample_reductions))


def make_sample_fn(config: ml_collections.ConfigDict, model: Any, mesh: Mesh) -> SampleFn:
  """Builds `sample_fn(params, base_key, indices[, labels]) -> samples`, compiled once per batch
  size.

  The sampler follows config.sampling: `method` ('ancestral' | 'ddim'), `timestep_respacing`
  ('' = all T steps), `ddim_eta`, `clip_denoised`.

  Returns:
    sample_fn: params (the U-Net's, replicated on `mesh`), base_key (typed key, replicated),
      indices (int [B], B divisible by the device count; numpy, or a jax.Array) ->
      samples float32 [B, H, W, C] in [-1, 1], sharded over the mesh's `data` axis. Sample i is
      drawn with key fold_in(base_key, indices[i]). When config.model.num_classes > 0, labels
      (int [B], optional, like indices) are the classes to draw; by default sample i's label is
      `sample_labels` of its key (`labels_for_indices` gives the same labels on the host).
  """
  num_classes = models.num_classes(config)
  compiled = jit_sample(config, model, mesh)
  if num_classes > 0:
    compiled_labels = jit_sample(config, model, mesh, with_labels=True)

  def sample_fn(params: Any, base_key: jax.Array, indices: Any, labels: Any = None) -> jax.Array:
    _check_indices(indices, mesh)
    if labels is None:
      return compiled(params, base_key, _place_indices(indices, mesh))
    if num_classes == 0:
      raise ValueError('labels were given, but config.model.num_classes=0 (unconditional model)')
    if np.shape(labels) != np.shape(indices):
      raise ValueError(f'labels must match indices, shape {list(np.shape(indices))}; got '
                       f'{list(np.shape(labels))}')
    return compiled_labels(params, base_key, _place_indices(indices, mesh),
                           _place_indices(labels, mesh))

  return sample_fn
