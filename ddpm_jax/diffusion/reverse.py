"""The reverse process p_theta(x_{t-1} | x_t) for every parameterization (DDPM §3.2, iDDPM §3.1).

The network output is turned into a Gaussian mean and variance here; the network itself is not
involved. Images are float arrays [B, H, W, C]; t is an int32 array [B] of 0-based indices.
"""

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion._checks import _check_same_shape
from ddpm_jax.diffusion.coefficients import DiffusionCoefficients, extract
from ddpm_jax.diffusion.forward import q_posterior_mean_variance

LEARNED_VAR_TYPES = ('learned', 'learned_range')


def predict_xstart_from_eps(coefs: DiffusionCoefficients, x_t: jax.Array, t: jax.Array,
                            eps: jax.Array) -> jax.Array:
  """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), DDPM eq. 4 solved for x_0 (§3.2).

  Written as sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps. All arrays [B, H, W, C]; t int [B].
  """
  _check_same_shape(x_t=x_t, eps=eps)
  return (extract(coefs.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
          - extract(coefs.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)


def predict_eps_from_xstart(coefs: DiffusionCoefficients, x_t: jax.Array, t: jax.Array,
                            pred_xstart: jax.Array) -> jax.Array:
  """eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), the inverse of `predict_xstart_from_eps`.

  DDPM eq. 4 solved for eps; used by DDIM (iDDPM §4). All arrays [B, H, W, C]; t int [B].
  """
  _check_same_shape(x_t=x_t, pred_xstart=pred_xstart)
  return ((extract(coefs.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
          / extract(coefs.sqrt_recipm1_alphas_cumprod, t, x_t.shape))


def predict_xstart_from_xprev(coefs: DiffusionCoefficients, x_t: jax.Array, t: jax.Array,
                              xprev: jax.Array) -> jax.Array:
  """x0_hat from a prediction of the posterior mean mu~_t (DDPM eq. 7 solved for x_0, §3.2).

  x0_hat = (x_prev - coef2_t x_t) / coef1_t. All arrays [B, H, W, C]; t int [B].
  """
  _check_same_shape(x_t=x_t, xprev=xprev)
  return ((xprev - extract(coefs.posterior_mean_coef2, t, x_t.shape) * x_t)
          / extract(coefs.posterior_mean_coef1, t, x_t.shape))


def split_model_output(coefs: DiffusionCoefficients, model_output: jax.Array,
                       x_t: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Splits the network output into its mean part and (for learned variances) its variance part.

  Args:
    coefs: the diffusion tables (var_type decides whether there is a variance part, iDDPM §3.1).
    model_output: [B, H, W, C], or [B, H, W, 2C] for 'learned' / 'learned_range'.
    x_t: [B, H, W, C], the network input.
  Returns:
    (mean part [B, H, W, C], variance part [B, H, W, C] or None for fixed variances).
  Raises:
    ValueError: if the shapes do not agree with x_t and var_type.
  """
  channels = x_t.shape[-1]
  learned = coefs.var_type in LEARNED_VAR_TYPES
  want = x_t.shape[:-1] + (2 * channels if learned else channels,)
  if model_output.shape != want:
    raise ValueError(f'model_output must have shape {list(want)} for x_t {list(x_t.shape)} and '
                     f'var_type={coefs.var_type!r} ({"2C" if learned else "C"} channels: learned '
                     f'variances need 2C), got {list(model_output.shape)}.')
  if not learned:
    return model_output, None
  return model_output[..., :channels], model_output[..., channels:]


def _fixed_large_variance(coefs: DiffusionCoefficients) -> jax.Array:
  """[T] table beta_t, but beta~_2 at t = 1 for a better decoder NLL (DDPM §3.2, iDDPM §2)."""
  if coefs.num_timesteps == 1:
    return coefs.betas
  return jnp.concatenate([coefs.posterior_variance[1:2], coefs.betas[1:]])


def _variance(coefs: DiffusionCoefficients, var_out: jax.Array | None, t: jax.Array,
              shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(variance, log_variance) of p_theta for coefs.var_type (DDPM §3.2, iDDPM eq. 15)."""
  if coefs.var_type == 'fixed_small':
    return (extract(coefs.posterior_variance, t, shape),
            extract(coefs.posterior_log_variance_clipped, t, shape))
  if coefs.var_type == 'fixed_large':
    table = _fixed_large_variance(coefs)
    return extract(table, t, shape), extract(jnp.log(table), t, shape)
  if coefs.var_type == 'learned':
    log_variance = var_out
  else:  # 'learned_range': interpolate log beta~_t .. log beta_t with v = (output + 1) / 2.
    min_log = extract(coefs.posterior_log_variance_clipped, t, shape)
    max_log = extract(jnp.log(coefs.betas), t, shape)
    frac = (var_out + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
  return jnp.exp(log_variance), log_variance


def _pred_xstart(coefs: DiffusionCoefficients, mean_out: jax.Array, x_t: jax.Array,
                 t: jax.Array) -> jax.Array:
  if coefs.mean_type == 'eps':
    return predict_xstart_from_eps(coefs, x_t, t, mean_out)
  if coefs.mean_type == 'x0':
    return mean_out
  return predict_xstart_from_xprev(coefs, x_t, t, mean_out)


def p_mean_variance(coefs: DiffusionCoefficients, model_output: jax.Array, x_t: jax.Array,
                    t: jax.Array, *, clip_denoised: bool = True) -> dict[str, jax.Array]:
  """Mean and variance of p_theta(x_{t-1} | x_t) from the network output (DDPM §3.2, iDDPM §3.1).

  Mean: for 'eps' and 'x0' the posterior mean mu~_t(x_t, x0_hat) (DDPM eq. 7 and 11); for 'xprev'
  the output itself. Variance: beta~_t ('fixed_small'), beta_t with beta~_2 at t = 1
  ('fixed_large'), exp(output) ('learned') or exp(v log beta_t + (1 - v) log beta~_t) with
  v = (output + 1) / 2 ('learned_range', iDDPM eq. 15).

  Args:
    coefs: the diffusion tables (mean_type, var_type).
    model_output: [B, H, W, C], or [B, H, W, 2C] for learned variances (second half = variance).
    x_t: the noisy image, [B, H, W, C].
    t: int [B] indices.
    clip_denoised: clip x0_hat to [-1, 1] before forming the mean (DDPM sampling).
  Returns:
    dict with 'mean', 'pred_xstart' (x0_hat) and 'eps' (the noise consistent with x0_hat, as DDIM
    needs; the raw output for unclipped 'eps') of shape [B, H, W, C], and 'variance', 'log_variance'
    of shape [B, 1, 1, 1] (fixed) or [B, H, W, C] (learned).
  """
  mean_out, var_out = split_model_output(coefs, model_output, x_t)
  variance, log_variance = _variance(coefs, var_out, t, x_t.shape)
  pred_xstart = _pred_xstart(coefs, mean_out, x_t, t)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1, 1)
  if coefs.mean_type == 'xprev':
    mean = mean_out
  else:
    mean, _, _ = q_posterior_mean_variance(coefs, pred_xstart, x_t, t)
  if coefs.mean_type == 'eps' and not clip_denoised:
    eps = mean_out
  else:
    eps = predict_eps_from_xstart(coefs, x_t, t, pred_xstart)
  return {'mean': mean, 'variance': variance, 'log_variance': log_variance,
          'pred_xstart': pred_xstart, 'eps': eps}
