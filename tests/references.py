"""Independent float64 numpy references of the diffusion maths, shared by the tests/test_diffusion_* modules.

Each is written out from the papers' definitions (DDPM §2-3, eq. 4-13; iDDPM §2-3, eq. 15), not from
ddpm_jax, so that a test compares two routes to the same number. `assert_close` holds the tolerance rule.
"""

import math

import numpy as np

LN2 = math.log(2.0)


def assert_close(actual, expected, dtype: str, *, rtol: float | None = None, scale=0.0):
  """|actual - expected| <= rtol (|expected| + scale), rtol fitting `dtype`.

  `scale` (a number or an array broadcasting against `expected`) is the size of the terms that
  cancel in the computation, e.g. sqrt(1/abar_t) when recovering x0 from x_t: rounding grows with
  it.
  """
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  if rtol is None:
    rtol = 2e-5 if dtype == 'float32' else 1e-11
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  bound = rtol * (np.abs(expected) + scale)
  bad = ~(np.abs(actual - expected) <= bound)  # also catches nan
  assert not np.any(bad), (f'{bad.sum()} of {bad.size} differ beyond rtol={rtol}; worst: actual '
                           f'{actual[bad][:5]}, expected {expected[bad][:5]}')


def ref_tables(betas) -> dict[str, np.ndarray]:
  """DDPM §2 quantities, float64, written out step by step from the definitions.

  Index i is the paper's t = i + 1; '_prev' uses abar_0 = 1. 1 - abar_t is summed as
  sum_{k<=t} beta_k abar_{k-1} (the first step at which noise "arrives"): positive terms only, so
  it keeps full relative precision where 1 - abar_t ~ 1e-5 (1.0 - abar would keep 11 digits).
  """
  betas = np.asarray(betas, dtype=np.float64)
  abar, running = [], 1.0
  for beta in betas:
    running *= 1.0 - beta
    abar.append(running)
  abar = np.array(abar)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  one_minus = np.cumsum(betas * abar_prev)
  one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
  alphas = 1.0 - betas
  beta_tilde = one_minus_prev / one_minus * betas  # DDPM eq. 7
  return {
      'betas': betas, 'alphas': alphas, 'abar': abar, 'abar_prev': abar_prev,
      'abar_next': np.concatenate([abar[1:], [0.0]]),
      'one_minus_abar': one_minus, 'one_minus_abar_prev': one_minus_prev,
      'beta_tilde': beta_tilde,
      # DDPM eq. 7: mu~ = coef1 x0 + coef2 x_t.
      'coef1': np.sqrt(abar_prev) * betas / one_minus,
      'coef2': np.sqrt(alphas) * one_minus_prev / one_minus,
      # beta~_1 = 0: iDDPM clips its log to log beta~_2 (log beta_1 when T = 1).
      'log_beta_tilde_clipped': np.log(np.concatenate(
          [[beta_tilde[1] if len(betas) > 1 else betas[0]], beta_tilde[1:]])),
  }


def ref_extract(table: np.ndarray, t: np.ndarray, ndim: int = 4) -> np.ndarray:
  """table[t], shaped [B, 1, 1, 1] to broadcast against a batch of images (the extract of DDPM's code)."""
  return np.asarray(table)[np.asarray(t)].reshape((-1,) + (1,) * (ndim - 1))


def grid_images(rng: np.random.Generator, shape) -> np.ndarray:
  """Images on the 256-level grid -1 + 2k/255 of [-1, 1] (what the data pipeline produces)."""
  return -1.0 + 2.0 * rng.integers(0, 256, size=shape) / 255.0


def t_values(num_timesteps: int) -> np.ndarray:
  """Several t, including the first (paper's t = 1) and last index, and a duplicate."""
  return np.array([0, 1, num_timesteps // 2, num_timesteps - 1, 0], dtype=np.int32)


SMALL_T = 20
DDPM_BETAS = np.linspace(1e-4, 0.02, 1000)


def small_betas(num_timesteps: int = SMALL_T) -> np.ndarray:
  """A short schedule that still ends close to pure noise (abar_T ~ 1e-4 for T = 20)."""
  return np.linspace(1e-3, 0.6, num_timesteps)


# Each field of diffusion.Coefficients, in terms of ref_tables (DDPM §2, eq. 4-7).
FIELD_TO_REF = {
    'betas': lambda r: r['betas'],
    'alphas_cumprod': lambda r: r['abar'],
    'alphas_cumprod_prev': lambda r: r['abar_prev'],
    'sqrt_alphas_cumprod': lambda r: np.sqrt(r['abar']),
    'sqrt_one_minus_alphas_cumprod': lambda r: np.sqrt(r['one_minus_abar']),
    # (log1p(-abar) where abar is tiny and log(1 - abar) ~ -abar must keep its relative precision.)
    'log_one_minus_alphas_cumprod': lambda r: np.where(r['abar'] < 0.5, np.log1p(-r['abar']),
                                                       np.log(r['one_minus_abar'])),
    'sqrt_recip_alphas_cumprod': lambda r: 1 / np.sqrt(r['abar']),
    'sqrt_recipm1_alphas_cumprod': lambda r: np.sqrt(r['one_minus_abar'] / r['abar']),
    'posterior_variance': lambda r: r['beta_tilde'],
    'posterior_log_variance_clipped': lambda r: r['log_beta_tilde_clipped'],
    'posterior_mean_coef1': lambda r: r['coef1'],
    'posterior_mean_coef2': lambda r: r['coef2'],
}


def ref_p_mean_variance(betas, mean_type: str, var_type: str, model_output, x_t, t,
                        clip: bool) -> dict[str, np.ndarray]:
  """p_theta(x_{t-1} | x_t) in float64, from the formulas of DDPM §3.2 and iDDPM eq. 15."""
  r = {k: ref_extract(v, t) for k, v in ref_tables(betas).items()}
  channels = x_t.shape[-1]
  out, v = model_output[..., :channels], model_output[..., channels:]

  def posterior_mean(x0):  # DDPM eq. 7
    return r['coef1'] * x0 + r['coef2'] * x_t

  if mean_type == 'eps':
    x0 = (x_t - np.sqrt(r['one_minus_abar']) * out) / np.sqrt(r['abar'])
    # DDPM eq. 11, equal to the posterior mean of the unclipped x0.
    mean = (x_t - r['betas'] / np.sqrt(r['one_minus_abar']) * out) / np.sqrt(r['alphas'])
  elif mean_type == 'x0':
    x0 = out
    mean = posterior_mean(out)
  else:  # xprev: the network predicts mu~ itself.
    x0 = (out - r['coef2'] * x_t) / r['coef1']
    mean = out
  if clip:
    x0 = np.clip(x0, -1, 1)
    if mean_type != 'xprev':
      mean = posterior_mean(x0)
  eps = out if mean_type == 'eps' and not clip else (
      (x_t - np.sqrt(r['abar']) * x0) / np.sqrt(r['one_minus_abar']))

  first = np.asarray(t).reshape(r['betas'].shape) == 0
  beta_tilde_2 = ref_tables(betas)['beta_tilde'][1] if len(betas) > 1 else betas[0]
  if var_type == 'fixed_small':
    var = r['beta_tilde']
    log_var = r['log_beta_tilde_clipped']
  elif var_type == 'fixed_large':  # beta_t, with beta~_2 at t = 1 (DDPM §3.2 / iDDPM code).
    var = np.where(first, beta_tilde_2, r['betas'])
    log_var = np.log(var)
  elif var_type == 'learned':
    log_var = v
    var = np.exp(v)
  else:  # iDDPM eq. 15
    frac = (v + 1) / 2
    log_var = frac * np.log(r['betas']) + (1 - frac) * r['log_beta_tilde_clipped']
    var = np.exp(log_var)
  return {'mean': mean, 'variance': var, 'log_variance': log_var, 'pred_xstart': x0, 'eps': eps}


def ref_normal_kl(mean1, logvar1, mean2, logvar2):
  """KL of 1-D Gaussians, std-dev form: log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
  s1, s2 = np.exp(0.5 * np.asarray(logvar1)), np.exp(0.5 * np.asarray(logvar2))
  return np.log(s2 / s1) + (s1**2 + (mean1 - mean2)**2) / (2 * s2**2) - 0.5


def ref_cdf(x):
  """The tanh approximation of Phi used by the DDPM decoder."""
  return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def ref_discretized_log_likelihood(x, means, log_scales):
  """log Gaussian mass of x's bin of width 2/255; the outer bins reach -inf / +inf (DDPM eq. 13)."""
  x, means = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(means, np.float64))
  sigma = np.exp(np.broadcast_to(log_scales, x.shape))
  upper = np.where(x > 0.999, 1.0, ref_cdf((x + 1 / 255 - means) / sigma))
  lower = np.where(x < -0.999, 0.0, ref_cdf((x - 1 / 255 - means) / sigma))
  return np.log(np.maximum(upper - lower, 1e-12))


def ref_vb_bits(betas, mean_type, var_type, model_output, x0, x_t, t, clip=False) -> np.ndarray:
  """L_{t-1} (KL of posterior and p_theta) or, at t = 1, the decoder NLL L_0; bits/dim, [B]."""
  r = {k: ref_extract(v, t) for k, v in ref_tables(betas).items()}
  true_mean = r['coef1'] * x0 + r['coef2'] * x_t
  p = ref_p_mean_variance(betas, mean_type, var_type, model_output, x_t, t, clip)
  kl = ref_normal_kl(true_mean, r['log_beta_tilde_clipped'], p['mean'], p['log_variance'])
  nll = -ref_discretized_log_likelihood(x0, p['mean'], 0.5 * p['log_variance'])
  per_pixel = np.where(np.reshape(t, (-1, 1, 1, 1)) == 0, nll, kl)
  return per_pixel.reshape(len(t), -1).mean(axis=1) / LN2


def ref_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance of two Gaussians (TTUR, Heusel et al. 2017) without a non-symmetric sqrtm:
  Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), the eigenvalues of a symmetric PSD matrix (clipped at 0,
  so a singular covariance of few samples is fine); two `eigh` instead of a Schur decomposition."""
  mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0.0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
