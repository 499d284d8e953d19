"""The forward (noising) process q and its posterior (DDPM §2, eq. 4, 6, 7).

Images are float arrays [B, H, W, C] in [-1, 1]; t is an int32 array [B] of 0-based indices
(index 0 is the paper's t = 1).
"""

import jax

from ddpm_jax.diffusion._checks import _check_same_shape
from ddpm_jax.diffusion.coefficients import DiffusionCoefficients, extract


def q_mean_variance(coefs: DiffusionCoefficients, x_start: jax.Array,
                    t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM eq. 4).

  Args:
    coefs: the diffusion tables.
    x_start: x_0, [B, H, W, C] in [-1, 1].
    t: int [B] indices.
  Returns:
    (mean [B, H, W, C], variance [B, 1, 1, 1], log_variance [B, 1, 1, 1]).
  """
  mean = extract(coefs.sqrt_alphas_cumprod, t, x_start.shape) * x_start
  # (sqrt(1 - abar))^2 keeps full relative precision in float32, unlike 1 - abar near abar = 1.
  variance = extract(coefs.sqrt_one_minus_alphas_cumprod, t, x_start.shape)**2
  log_variance = extract(coefs.log_one_minus_alphas_cumprod, t, x_start.shape)
  return mean, variance, log_variance


def q_sample(coefs: DiffusionCoefficients, x_start: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Samples x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4, Algorithm 1).

  Args:
    coefs: the diffusion tables.
    x_start: x_0, [B, H, W, C] in [-1, 1].
    t: int [B] indices.
    noise: eps ~ N(0, I), [B, H, W, C], drawn by the caller from its own key.
  Returns:
    x_t, [B, H, W, C].
  """
  _check_same_shape(x_start=x_start, noise=noise)
  return (extract(coefs.sqrt_alphas_cumprod, t, x_start.shape) * x_start
          + extract(coefs.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)


def q_posterior_mean_variance(coefs: DiffusionCoefficients, x_start: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (DDPM eq. 6-7).

  mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
          + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t.

  Args:
    coefs: the diffusion tables.
    x_start: x_0 (or a prediction of it), [B, H, W, C].
    x_t: the noisy image at t, [B, H, W, C].
    t: int [B] indices.
  Returns:
    (mean [B, H, W, C], variance beta~_t [B, 1, 1, 1], log_variance_clipped [B, 1, 1, 1]); the log
    variance at t = 1 (index 0) is log beta~_2 rather than log 0 (iDDPM §2).
  """
  _check_same_shape(x_start=x_start, x_t=x_t)
  mean = (extract(coefs.posterior_mean_coef1, t, x_t.shape) * x_start
          + extract(coefs.posterior_mean_coef2, t, x_t.shape) * x_t)
  variance = extract(coefs.posterior_variance, t, x_t.shape)
  log_variance = extract(coefs.posterior_log_variance_clipped, t, x_t.shape)
  return mean, variance, log_variance
