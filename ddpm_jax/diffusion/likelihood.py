"""The variational bound in bits per dimension (DDPM §2 eq. 5, §3.3; iDDPM §2-3).

L = L_T + sum_{t>1} L_{t-1} + L_0: Gaussian KL terms, a discretized Gaussian decoder for L_0 and the
prior term L_T. Images are float arrays [B, H, W, C] in [-1, 1]; t is an int32 array [B].
"""

import math

import jax
import jax.numpy as jnp

from ddpm_jax.diffusion._checks import _check_same_shape
from ddpm_jax.diffusion.coefficients import DiffusionCoefficients
from ddpm_jax.diffusion.forward import q_mean_variance, q_posterior_mean_variance
from ddpm_jax.diffusion.reverse import p_mean_variance

# Floor on bin probabilities, as in the DDPM code (log max(p, 1e-12)): kept as a floor on the
# log-probability, so that reported bits/dim equal the originals' wherever they were exact, and
# far-off means still give a finite NLL (and a zero gradient, as the originals' clamp does).
_LOG_MIN_PROB = math.log(1e-12)
# Pixels are 256 levels spread over [-1, 1]: each bin is 2/255 wide, so its half-width is 1/255.
_HALF_BIN = 1.0 / 255.0
# x below -0.999 / above 0.999 are the lowest / highest level, whose bins extend to -inf / +inf.
_EDGE = 0.999
# The DDPM code's Phi(u) ~= 0.5 (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) = sigmoid(a(u)) with
# a(u) = _LOGIT_SCALE (u + _LOGIT_CUBIC u^3), since 0.5 (1 + tanh(z)) = sigmoid(2 z).
_LOGIT_SCALE = 2.0 * math.sqrt(2.0 / math.pi)
_LOGIT_CUBIC = 0.044715


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array,
              logvar2: jax.Array) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise (DDPM eq. 5).

  0.5 (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2)). All
  arguments broadcast against each other; the result has the broadcast shape.
  """
  # -1 + exp(d) as expm1(d), and the log variances subtracted first: for (near) equal variances,
  # as in most bound terms, the sum then cancels at the scale of d instead of 1, which in float32
  # would add ~1e-7 nats of rounding to every pixel of terms that are themselves ~1e-6.
  log_ratio = logvar2 - logvar1
  return 0.5 * (log_ratio + jnp.expm1(-log_ratio) + (mean1 - mean2)**2 * jnp.exp(-logvar2))


def _approx_cdf_logit(u: jax.Array) -> jax.Array:
  """a(u) = 2 sqrt(2/pi) (u + 0.044715 u^3), the logit of the DDPM code's approximation of Phi(u).

  Odd in u, so 1 - Phi(u) = sigmoid(-a(u)) = Phi(-u) holds exactly for the approximation too.
  """
  return _LOGIT_SCALE * (u + _LOGIT_CUBIC * u**3)


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """Phi(x) ~= 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation of the DDPM code.

  Used by the discretized decoder of DDPM §3.3 (absolute error below 2e-4 against the exact Phi).
  Evaluated as the equal sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)): 1 + tanh(.) would round every
  value below float32's ulp(1) ~ 6e-8 in the left tail to a multiple of it, or to 0.
  """
  return jax.nn.sigmoid(_approx_cdf_logit(x))


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """log p(x) of the discretized Gaussian decoder of DDPM §3.3 (eq. 13), in nats, elementwise.

  Each pixel's probability is the Gaussian mass of its bin [x - 1/255, x + 1/255], with the bins of
  the lowest and highest level extending to -inf and +inf, so the 256 levels sum to 1. Phi is the
  tanh approximation of the DDPM code and log-probabilities are floored at log(1e-12), as there:
  the definition, and so the reported bits/dim, are the originals'.

  The evaluation is not theirs (issue #14): log(Phi(u+) - Phi(u-)) as a difference of two numbers
  near 1 (upper tail) or of two values of 1 + tanh near 0 (lower tail) keeps only the digits above
  float32's ulp(1), so tail bins of mass below ~1e-7 came out as multiples of it or at the floor.
  With Phi(u) = sigmoid(a(u)) and the identity
    sigmoid(B) - sigmoid(A) = sigmoid(B) sigmoid(-A) (1 - exp(-(B - A))),
  the bin's log mass is log_sigmoid(a+) + log_sigmoid(-a-) + log(-expm1(-(a+ - a-))): in either
  tail one log_sigmoid is ~0 and the other ~ -|a|, both to full relative precision, and a+ - a-
  is expanded in closed form (below) instead of subtracted. The outer bins are log_sigmoid(a+)
  and log_sigmoid(-a-) = log(1 - Phi(u-)). The result agrees with the float64 evaluation of the
  original formula to a few float32 ulps relative, tails included (tests/test_decoder_numerics.py).

  Args:
    x: the data, [B, H, W, C], on the 256-level grid -1 + 2k/255 of [-1, 1].
    means: Gaussian means, shaped like x.
    log_scales: log standard deviations, broadcastable to x (e.g. [B, 1, 1, 1]).
  Returns:
    log-probabilities, shaped like x (in [log(1e-12), 0]).
  """
  _check_same_shape(x=x, means=means)
  try:
    log_scales = jnp.broadcast_to(log_scales, x.shape)
  except ValueError as e:
    raise ValueError(f'log_scales of shape {list(jnp.shape(log_scales))} does not broadcast to x '
                     f'{list(x.shape)}.') from e
  inv_stdv = jnp.exp(-log_scales)
  # Standardized bin centre and half-width: the bin is [u_c - u_h, u_c + u_h].
  u_c = inv_stdv * (x - means)
  u_h = inv_stdv * _HALF_BIN
  a_plus = _approx_cdf_logit(u_c + u_h)
  a_min = _approx_cdf_logit(u_c - u_h)
  # a(u_c + u_h) - a(u_c - u_h) = scale (2 u_h + cubic ((u_c + u_h)^3 - (u_c - u_h)^3))
  #                             = 2 scale u_h (1 + cubic (3 u_c^2 + u_h^2)): positive terms only,
  # so it keeps full precision where the bin is narrow against sigma and a+ ~ a-.
  a_delta = 2.0 * _LOGIT_SCALE * u_h * (1.0 + _LOGIT_CUBIC * (3.0 * u_c**2 + u_h**2))
  log_cdf_plus = jax.nn.log_sigmoid(a_plus)
  log_one_minus_cdf_min = jax.nn.log_sigmoid(-a_min)
  log_cdf_delta = log_cdf_plus + log_one_minus_cdf_min + jnp.log(-jnp.expm1(-a_delta))
  log_probs = jnp.where(x < -_EDGE, log_cdf_plus,
                        jnp.where(x > _EDGE, log_one_minus_cdf_min, log_cdf_delta))
  return jnp.maximum(log_probs, _LOG_MIN_PROB)


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all axes but the first: [B, ...] -> [B] (the per-example average of DDPM §3.3)."""
  return jnp.mean(x, axis=tuple(range(1, jnp.ndim(x))))


def vb_terms_bpd(coefs: DiffusionCoefficients, model_output: jax.Array, x_start: jax.Array,
                 x_t: jax.Array, t: jax.Array, *,
                 clip_denoised: bool = False) -> dict[str, jax.Array]:
  """One term of the variational bound, in bits per dimension (DDPM eq. 5; iDDPM eq. 4-6).

  L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t > 1 (index > 0), and the
  decoder NLL L_0 = -log p_theta(x_0 | x_1) at t = 1 (index 0). Divided by D ln 2 (mean over
  pixels).

  Args:
    coefs: the diffusion tables.
    model_output: network output at (x_t, t), [B, H, W, C] or [B, H, W, 2C] for learned variances.
    x_start: x_0, [B, H, W, C] on the 256-level grid of [-1, 1].
    x_t: the noisy image, [B, H, W, C].
    t: int [B] indices.
    clip_denoised: clip x0_hat to [-1, 1] inside p_theta.
  Returns:
    dict: 'output' [B] bits/dim, 'pred_xstart' [B, H, W, C].
  """
  true_mean, _, true_log_variance = q_posterior_mean_variance(coefs, x_start, x_t, t)
  out = p_mean_variance(coefs, model_output, x_t, t, clip_denoised=clip_denoised)
  kl = normal_kl(true_mean, true_log_variance, out['mean'], out['log_variance'])
  kl = mean_flat(kl) / math.log(2.0)
  decoder_nll = -discretized_gaussian_log_likelihood(
      x_start, means=out['mean'], log_scales=0.5 * out['log_variance'])
  decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
  return {'output': jnp.where(t == 0, decoder_nll, kl), 'pred_xstart': out['pred_xstart']}


def prior_bpd(coefs: DiffusionCoefficients, x_start: jax.Array) -> jax.Array:
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension (DDPM eq. 5; iDDPM §2).

  Args:
    coefs: the diffusion tables.
    x_start: x_0, [B, H, W, C] in [-1, 1].
  Returns:
    [B] bits/dim; independent of the network, close to 0 for a good schedule.
  """
  t = jnp.full((x_start.shape[0],), coefs.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = q_mean_variance(coefs, x_start, t)
  zero = jnp.zeros((), dtype=mean.dtype)
  return mean_flat(normal_kl(mean, log_variance, zero, zero)) / math.log(2.0)
