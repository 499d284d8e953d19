"""The diffusion tables of a config: the only module of `diffusion` that knows the config tree.

config.py validates every field once; this module maps `config.diffusion` (and a respacing spec) to
the arguments of the pure functions, whose own argument checks stay as they are.
"""

import jax.numpy as jnp
import ml_collections

from ddpm_jax.diffusion.coefficients import DiffusionCoefficients, make_coefficients, respaced_coefficients
from ddpm_jax.diffusion.respace import space_timesteps
from ddpm_jax.diffusion.reverse import LEARNED_VAR_TYPES
from ddpm_jax.diffusion.schedules import get_beta_schedule


def loss_type_from_config(diffusion_config: ml_collections.ConfigDict) -> str:
  """config.diffusion.loss_type, with improved-diffusion's `rescale_learned_sigmas` applied.

  improved-diffusion trains a learned variance with L_simple + w L_{t-1}: its RESCALED_MSE
  (rescale_learned_sigmas=True) has w = T / 1000, which is loss_type 'rescaled_mse' here (iDDPM
  §3.1: lambda T with lambda = 0.001). So with the flag, 'mse' and a learned variance become
  'rescaled_mse'; a fixed variance has no bound term to weight, and stays 'mse', as there.
  """
  loss_type = diffusion_config.loss_type
  if (diffusion_config.get('rescale_learned_sigmas', False) and loss_type == 'mse'
      and diffusion_config.var_type in LEARNED_VAR_TYPES):
    return 'rescaled_mse'
  return loss_type


def timestep_scale_from_config(diffusion_config: ml_collections.ConfigDict) -> float | None:
  """improved-diffusion's rescale_timesteps: the network sees t * 1000 / T (T of the original
  schedule, even when respaced), else None (the int timestep, DDPM)."""
  if diffusion_config.get('rescale_timesteps', False):
    return 1000.0 / diffusion_config.num_timesteps
  return None


def coefficients_from_config(diffusion_config: ml_collections.ConfigDict, *, respacing: str = '',
                             dtype=jnp.float32) -> DiffusionCoefficients:
  """DiffusionCoefficients for `config.diffusion` (DDPM §2, §4; iDDPM §3, §4 when respaced).

  Args:
    diffusion_config: the `diffusion` sub-config (num_timesteps, beta_schedule, beta_start,
      beta_end, mean_type, var_type, loss_type, hybrid_lambda; rescale_learned_sigmas and
      rescale_timesteps, improved-diffusion's flags, False when absent).
    respacing: '' for all T steps, else a `space_timesteps` spec ('250', '10,10,10', 'ddim50'), e.g.
      `config.sampling.timestep_respacing`.
    dtype: floating dtype of the tables.
  Raises:
    ValueError: from the pure functions, prefixed with `config.diffusion` (or `respacing`) so the
      message says where the bad value came from.
  """
  c = diffusion_config
  try:
    betas = get_beta_schedule(c.beta_schedule, num_timesteps=c.num_timesteps,
                              beta_start=c.beta_start, beta_end=c.beta_end)
    kwargs = dict(mean_type=c.mean_type, var_type=c.var_type, loss_type=loss_type_from_config(c),
                  hybrid_lambda=c.hybrid_lambda, dtype=dtype,
                  timestep_scale=timestep_scale_from_config(c))
    if not respacing:
      return make_coefficients(betas, **kwargs)
  except ValueError as e:
    raise ValueError(f'Invalid config.diffusion: {e}') from e
  try:
    use_timesteps = space_timesteps(c.num_timesteps, respacing)
  except ValueError as e:
    raise ValueError(f'Invalid respacing={respacing!r}: {e}') from e
  return respaced_coefficients(betas, use_timesteps, **kwargs)
