"""DDIM sampling (Song et al. 2021, eq. 12), used by iDDPM for fast sampling ('ddim50' respacing).

x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s_t^2) eps + s_t z,
s_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}).
eta = 0 is deterministic given x_T; eta = 1 has the variance of the DDPM posterior beta~_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.sampling.ancestral import nonzero_mask
from ddpm_jax.sampling.loop import StepNoise, sample_loop


def ddim_sample(coefs: diffusion.DiffusionCoefficients, model_fn: diffusion.ModelFn, x_t: jax.Array,
                t: jax.Array, noise: jax.Array, *, eta: float = 0.0,
                clip_denoised: bool = True) -> dict[str, jax.Array]:
  """One DDIM step from table index t (int32 [B]) to t - 1.

  Args:
    coefs: diffusion tables (full or respaced: abar_{t-1} is then the previous *kept* step's).
    model_fn: (x_t [B, H, W, C], timestep int32 [B]) -> output (C or 2C channels; the variance
      channels are not used by DDIM).
    x_t: [B, H, W, C].
    t: int32 [B] table indices.
    noise: z ~ N(0, I) [B, H, W, C]; only used when eta > 0 and t > 0.
    eta: 0 = deterministic DDIM, 1 = DDPM-like stochasticity.
    clip_denoised: clip x0_hat to [-1, 1].
  Returns:
    {'sample': x_{t-1} [B, H, W, C], 'pred_xstart': x0_hat [B, H, W, C]}.
  """
  out = diffusion.p_mean_variance(coefs, diffusion.model_output(coefs, model_fn, x_t, t), x_t, t,
                                  clip_denoised=clip_denoised)
  # out['eps'] is re-derived from the clipped x0_hat when clipping, keeping the update consistent.
  eps = out['eps']
  abar = diffusion.extract(coefs.alphas_cumprod, t, x_t.shape)
  abar_prev = diffusion.extract(coefs.alphas_cumprod_prev, t, x_t.shape)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
  # >= 0 in exact arithmetic; the clamp stops float32 round-off from giving sqrt(-tiny) = NaN.
  eps_scale = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))
  mean = jnp.sqrt(abar_prev) * out['pred_xstart'] + eps_scale * eps
  sample = mean + nonzero_mask(t, x_t) * sigma * noise
  return {'sample': sample.astype(x_t.dtype), 'pred_xstart': out['pred_xstart']}


def ddim_sample_loop(coefs: diffusion.DiffusionCoefficients, model_fn: diffusion.ModelFn, keys: jax.Array,
                     shape: Sequence[int], *, eta: float = 0.0, clip_denoised: bool = True,
                     noise: jax.Array | None = None,
                     step_noise: StepNoise | None = None) -> jax.Array:
  """DDIM over the K = coefs.num_timesteps steps of `coefs` (typically 'ddim50'), one compiled loop.

  Args and return as `ancestral.p_sample_loop` (x_T `noise` and per-step `step_noise` included);
  `eta` as `ddim_sample`.
  """
  def step(x, t, z):
    return ddim_sample(coefs, model_fn, x, t, z, eta=eta, clip_denoised=clip_denoised)
  return sample_loop(step, keys, shape, coefs.num_timesteps, coefs.betas.dtype, noise=noise,
                     step_noise=step_noise)[0]
