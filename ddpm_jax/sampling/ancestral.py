"""Ancestral sampling (DDPM Algorithm 2), over all T steps or a respaced subset of them (iDDPM §4).

Respacing needs no code of its own: `respaced_coefficients` (or `coefficients_from_config(...,
respacing='250')`) builds tables for the K kept steps, with betas recomputed from the kept abar,
and a `timestep_map` that tells which original timestep the network must see at each index.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.sampling.loop import StepNoise, sample_loop


def nonzero_mask(t: jax.Array, x: jax.Array) -> jax.Array:
  """[B, 1, 1, 1]: 0 where t = 0 (the paper's t = 1, which adds no noise, Alg. 2 line 3), else 1."""
  return (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def p_sample(coefs: diffusion.DiffusionCoefficients, model_fn: diffusion.ModelFn, x_t: jax.Array,
             t: jax.Array, noise: jax.Array, *, clip_denoised: bool = True) -> dict[str, jax.Array]:
  """One step x_{t-1} = mu_theta(x_t, t) + sigma_t z (DDPM Alg. 2, line 4).

  Args:
    coefs: diffusion tables (full or respaced).
    model_fn: (x_t [B, H, W, C], timestep int32 [B]) -> output [B, H, W, C] (2C for learned
      variances).
    x_t: [B, H, W, C] current state.
    t: int32 [B] table indices (0 is the paper's t = 1).
    noise: z ~ N(0, I), [B, H, W, C]; ignored where t = 0.
    clip_denoised: clip x0_hat to [-1, 1] before forming the mean (DDPM's sampler does).
  Returns:
    {'sample': x_{t-1} [B, H, W, C], 'pred_xstart': x0_hat [B, H, W, C]}.
  """
  out = diffusion.p_mean_variance(coefs, diffusion.model_output(coefs, model_fn, x_t, t), x_t, t,
                                  clip_denoised=clip_denoised)
  sigma = jnp.exp(0.5 * out['log_variance']).astype(x_t.dtype)
  sample = out['mean'] + nonzero_mask(t, x_t) * sigma * noise
  return {'sample': sample.astype(x_t.dtype), 'pred_xstart': out['pred_xstart']}


def p_sample_loop(coefs: diffusion.DiffusionCoefficients, model_fn: diffusion.ModelFn, keys: jax.Array,
                  shape: Sequence[int], *, clip_denoised: bool = True,
                  noise: jax.Array | None = None,
                  step_noise: StepNoise | None = None) -> jax.Array:
  """DDPM Algorithm 2 over the K = coefs.num_timesteps steps of `coefs`, as one compiled loop.

  Args:
    coefs: diffusion tables (all T steps, or K respaced ones); their dtype is the chain's dtype.
    model_fn: (x_t, timestep int32 [B]) -> model output.
    keys: typed keys [B], one per sample (see `sampling.loop`); None with noise and step_noise.
    shape: [B, H, W, C] of the samples.
    clip_denoised: clip x0_hat to [-1, 1] at every step.
    noise: optional x_T [B, H, W, C]; by default drawn from the keys.
    step_noise: optional z of every step, [K, B, H, W, C] (row t: table index t) or a function
      t -> [B, H, W, C], instead of the keys' streams (`sampling.loop`); with `noise` too, keys
      may be None and the trajectory is exactly that of another implementation fed the same draws.
  Returns:
    x_0, [B, H, W, C]; in [-1, 1] when clip_denoised (the last step returns the clipped x0_hat).
  """
  def step(x, t, z):
    return p_sample(coefs, model_fn, x, t, z, clip_denoised=clip_denoised)
  return sample_loop(step, keys, shape, coefs.num_timesteps, coefs.betas.dtype, noise=noise,
                     step_noise=step_noise)[0]
