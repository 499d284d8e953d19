"""Training objectives: L_simple, the variational bound and L_hybrid (DDPM §3.4; iDDPM §3.1).

`model_fn(x_t, t_model) -> model_output` is any pure function (the network applied to fixed params);
this module never sees the network itself.
"""

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion.coefficients import DiffusionCoefficients, ModelFn, model_output
from ddpm_jax.diffusion.forward import q_posterior_mean_variance, q_sample
from ddpm_jax.diffusion.likelihood import mean_flat, vb_terms_bpd
from ddpm_jax.diffusion.reverse import LEARNED_VAR_TYPES, split_model_output


def _check_loss_compatible(coefs: DiffusionCoefficients) -> None:
  learned = coefs.var_type in LEARNED_VAR_TYPES
  if coefs.loss_type == 'mse' and learned:
    raise ValueError(f"loss_type='mse' (L_simple) cannot train var_type={coefs.var_type!r}: the "
                     "variance gets no gradient (DDPM Table 2). Use loss_type 'hybrid' or "
                     "'rescaled_mse' (iDDPM §3.1), or a fixed var_type ('fixed_small', "
                     "'fixed_large').")
  if coefs.loss_type in ('hybrid', 'rescaled_mse') and not learned:
    raise ValueError(f'loss_type={coefs.loss_type!r} adds a bound term that trains only the '
                     f'variance, but var_type={coefs.var_type!r} is fixed. Use var_type in '
                     f"{LEARNED_VAR_TYPES}, or loss_type 'mse'.")


def _mse_target(coefs: DiffusionCoefficients, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
                noise: jax.Array) -> jax.Array:
  """What the mean part of the network regresses onto (DDPM §3.2 eq. 8 / 12)."""
  if coefs.mean_type == 'eps':
    return noise
  if coefs.mean_type == 'x0':
    return x_start
  return q_posterior_mean_variance(coefs, x_start, x_t, t)[0]


def _vb_scale(coefs: DiffusionCoefficients) -> float:
  """Weight of the one-timestep bound term in the loss (iDDPM §3.1)."""
  t = coefs.num_timesteps
  return {'rescaled_mse': t / 1000.0, 'hybrid': coefs.hybrid_lambda * t, 'kl': 1.0,
          'rescaled_kl': float(t)}[coefs.loss_type]


def draw_noise(coefs: DiffusionCoefficients, key: jax.Array, x_start: jax.Array) -> jax.Array:
  """The eps of `training_losses` (DDPM Algorithm 1, line 4): N(0, I) of x_start's shape, drawn from
  `key` in the loss dtype (x_start's promoted with the coefficients'), exactly as it draws it itself."""
  return jax.random.normal(key, x_start.shape, jnp.promote_types(x_start.dtype, coefs.betas.dtype))


def training_losses(coefs: DiffusionCoefficients, model_fn: ModelFn, x_start: jax.Array,
                    t: jax.Array, key: jax.Array | None,
                    noise: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-example training loss at timesteps t (DDPM Algorithm 1, §3.4; iDDPM §3.1).

  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps drawn from `key`; then by coefs.loss_type:
    'mse': L_simple, mean over pixels of (target - output)^2 (DDPM eq. 14), with target eps, x_0 or
      mu~_t by mean_type; fixed variances only.
    'kl' / 'rescaled_kl': the bound term L_{t-1} in bits/dim (DDPM eq. 5), times T when rescaled.
    'hybrid': mse + lambda T L_{t-1} (iDDPM eq. 16; T L_{t-1} estimates L_vlb), learned variances.
    'rescaled_mse': mse + (T / 1000) L_{t-1} (iDDPM's code; equals 'hybrid' at lambda = 0.001).
  In 'hybrid' / 'rescaled_mse' the bound sees the mean output through a stop-gradient, so it trains
  only the variance (iDDPM §3.1).

  Args:
    coefs: the diffusion tables (mean_type, var_type, loss_type, hybrid_lambda).
    model_fn: (x_t [B, H, W, C], t_model [B]) -> output [B, H, W, C] or [B, H, W, 2C] for
      learned variances; t_model = coefs.timestep_map[t], the original timestep when respaced,
      int32, or float32 times coefs.timestep_scale (see `model_output`, which also casts the output
      to x_t's dtype).
    x_start: x_0, [B, H, W, C] in [-1, 1] (the 256-level grid, for the decoder term at t = 0).
    t: int [B] indices, from `sample_uniform` or the importance sampler.
    key: PRNG key for the noise: eps = jax.random.normal(key, x_start.shape, dtype), with dtype that
      of the coefficients (so a caller can reproduce the exact eps of a step). Unused (may be None)
      when `noise` is given.
    noise: optional eps [B, H, W, C] to use instead of drawing it (improved-diffusion's
      training_losses(..., noise=...)): reproduces another codebase's loss for the same draw. Cast to
      the loss dtype.
  Returns:
    dict of [B] arrays in the coefficients' dtype: 'loss' always; 'mse' for the mse-type losses;
    'vb' (the unweighted bound term L_{t-1} in bits/dim) whenever the bound enters the loss.
  Raises:
    ValueError: for a loss_type / var_type pair that cannot train (e.g. 'mse' with a learned
      variance), or noise of another shape than x_start.
  """
  _check_loss_compatible(coefs)
  if not jnp.issubdtype(x_start.dtype, jnp.floating):
    raise ValueError(f'x_start must be a float array in [-1, 1], got dtype {x_start.dtype}.')
  x_start = x_start.astype(jnp.promote_types(x_start.dtype, coefs.betas.dtype))
  if noise is None:
    if key is None:
      raise ValueError('training_losses needs a key to draw the noise, or the noise itself.')
    noise = draw_noise(coefs, key, x_start)
  elif tuple(noise.shape) != tuple(x_start.shape):
    raise ValueError(f'noise must have the shape of x_start {tuple(x_start.shape)}, got '
                     f'{tuple(noise.shape)}')
  else:
    noise = jnp.asarray(noise).astype(x_start.dtype)
  x_t = q_sample(coefs, x_start, t, noise)
  output = model_output(coefs, model_fn, x_t, t)

  terms = {}
  if coefs.loss_type in ('kl', 'rescaled_kl'):
    terms['vb'] = vb_terms_bpd(coefs, output, x_start, x_t, t, clip_denoised=False)['output']
    terms['loss'] = _vb_scale(coefs) * terms['vb']
    return terms

  mean_out, var_out = split_model_output(coefs, output, x_t)
  terms['mse'] = mean_flat((_mse_target(coefs, x_start, x_t, t, noise) - mean_out)**2)
  terms['loss'] = terms['mse']
  if var_out is not None:
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
    terms['vb'] = vb_terms_bpd(coefs, frozen, x_start, x_t, t, clip_denoised=False)['output']
    terms['loss'] = terms['mse'] + _vb_scale(coefs) * terms['vb']
  return terms
