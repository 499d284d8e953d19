"""Shared by the sampling and evaluation tests: a tiny config, a U-Net with non-trivial weights."""

import functools

import jax
import jax.numpy as jnp
from jax import flatten_util

from configs import tiny
from ddpm_jax import checkpoints, models


def tiny_config(num_timesteps: int = 10):
  """configs/tiny.py shrunk further: one level of 32 channels, no attention, 8x8x1 digits, T=10."""
  config = tiny.get_config()
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = num_timesteps
  config.sampling.num_samples = 12
  config.sampling.batch_size = 4
  config.sampling.samples_per_shard = 4
  config.sampling.progressive_every = 3
  config.sampling.interpolation_t = 5
  config.sampling.interpolation_num_lambdas = 3
  config.eval.batch_size = 4
  config.eval.num_examples = 10
  config.eval.num_train_examples = 6
  config.eval.metrics = ('bpd', 'rate_distortion')
  return config


@functools.lru_cache(maxsize=None)
def _param_maker(model, image_shape):
  """One jitted init-and-perturb per (model, image shape), shared by every seed."""
  x = jnp.zeros((1,) + image_shape)

  @jax.jit
  def make(key):
    init_key, noise_key = jax.random.split(key)
    params = model.init({'params': init_key}, x, jnp.zeros((1,), jnp.int32), train=False)['params']
    flat, unravel = flatten_util.ravel_pytree(params)  # one normal draw, not one per leaf
    return unravel(flat + 0.05 * jax.random.normal(noise_key, flat.shape, flat.dtype))
  return make


def random_params(config, seed: int = 0):
  """Initial weights plus N(0, 0.05^2) noise: the zero-initialised output conv of a fresh U-Net
  would otherwise make eps_theta = 0 and hide most of the sampler."""
  d = config.data
  make = _param_maker(models.create_model(config), (d.image_size, d.image_size, d.num_channels))
  return make(jax.random.key(seed))


def write_checkpoint(workdir: str, config, seed: int = 0) -> None:
  """A step-0 checkpoint whose EMA weights differ from the raw weights."""
  checkpoints.save_converted(workdir, config, random_params(config, seed),
                             random_params(config, seed + 1))

