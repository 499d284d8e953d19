"""The diffusion tables of a config: the only module of `diffusion` that knows the config tree.

config.py validates every field once; this module maps `config.diffusion` (and a respacing spec) to
the arguments of the pure functions, whose own argument checks stay as they are.
"""

import jax.numpy as jnp
import ml_collections

from ddpm_jax.diffusion.coefficients import DiffusionCoefficients, make_coefficients, respaced_coefficients
from ddpm_jax.diffusion.respace import space_timesteps
from ddpm_jax.diffusion.schedules import get_beta_schedule


def coefficients_from_config(diffusion_config: ml_collections.ConfigDict, *, respacing: str = '',
                             dtype=jnp.float32) -> DiffusionCoefficients:
  """DiffusionCoefficients for `config.diffusion` (DDPM §2, §4; iDDPM §3, §4 when respaced).

  Args:
    diffusion_config: the `diffusion` sub-config (num_timesteps, beta_schedule, beta_start,
      beta_end, mean_type, var_type, loss_type, hybrid_lambda).
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
    kwargs = dict(mean_type=c.mean_type, var_type=c.var_type, loss_type=c.loss_type,
                  hybrid_lambda=c.hybrid_lambda, dtype=dtype)
    if not respacing:
      return make_coefficients(betas, **kwargs)
  except ValueError as e:
    raise ValueError(f'Invalid config.diffusion: {e}') from e
  try:
    use_timesteps = space_timesteps(c.num_timesteps, respacing)
  except ValueError as e:
    raise ValueError(f'Invalid respacing={respacing!r}: {e}') from e
  return respaced_coefficients(betas, use_timesteps, **kwargs)
