"""Variance schedules beta_1..beta_T of the forward process (DDPM §2, §4; iDDPM §3.2).

Every schedule is computed in float64 numpy and returned as a float64 array of shape [T]; index i
holds the paper's beta_{i+1}. Casting to the training dtype happens once, in `make_coefficients`.
`one_minus_alphas_cumprod` is the one quantity of the betas that respacing and the tables share.
"""

import math

import numpy as np

from ddpm_jax.diffusion._checks import _check_choice, _check_positive_int

BETA_SCHEDULES = ('linear', 'linear_rescaled', 'quad', 'warmup10', 'warmup50', 'const', 'jsd',
                  'cosine')

# iDDPM §3.2: the cosine schedule's offset s and the cap on beta_t that keeps the last steps finite.
COSINE_S = 0.008
COSINE_MAX_BETA = 0.999


def _check_beta_range(beta_start: float, beta_end: float, what: str = '') -> None:
  # DDPM requires 0 < beta <= 1; a decreasing range is almost certainly swapped arguments.
  if not (0.0 < beta_start <= beta_end <= 1.0):
    raise ValueError(f'{what}beta_start={beta_start!r} and beta_end={beta_end!r} must satisfy '
                     '0 < beta_start <= beta_end <= 1.')


def one_minus_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """1 - abar_t = 1 - prod_{s<=t} (1 - beta_s) for t = 1..T, float64 [T], without cancellation.

  Subtracting abar ~ 1 - 1e-5 from 1 would keep only ~11 of float64's 16 digits at the first
  steps; accumulating g <- g + beta (1 - g) instead keeps every term positive and full precision
  (DDPM eq. 4).
  """
  out = np.empty(len(betas), dtype=np.float64)
  g = 0.0
  for i, beta in enumerate(np.asarray(betas, dtype=np.float64)):
    g = g + beta * (1.0 - g)
    out[i] = g
  return out


def _warmup_betas(beta_start: float, beta_end: float, num_timesteps: int,
                  warmup_frac: float) -> np.ndarray:
  """beta_end, after a linear ramp from beta_start over the first warmup_frac of the steps."""
  betas = np.full(num_timesteps, beta_end, dtype=np.float64)
  warmup = int(num_timesteps * warmup_frac)
  betas[:warmup] = np.linspace(beta_start, beta_end, warmup, dtype=np.float64)
  return betas


def _cosine_alpha_bar(t: np.ndarray, s: float = COSINE_S) -> np.ndarray:
  """iDDPM eq. 17 without the normalisation by f(0): f(t) = cos^2(((t + s) / (1 + s)) pi / 2).

  Args:
    t: float64 array of normalised times t/T in [0, 1].
    s: the small offset that keeps beta_1 from being vanishingly small (iDDPM §3.2).
  Returns:
    float64 array like t; only ratios f(t2)/f(t1) are used, so the normalisation cancels.
  """
  return np.cos((t + s) / (1.0 + s) * math.pi / 2) ** 2


def _cosine_betas(num_timesteps: int) -> np.ndarray:
  """iDDPM §3.2: beta_t = min(1 - abar_t / abar_{t-1}, 0.999) with abar from `_cosine_alpha_bar`."""
  f = _cosine_alpha_bar(np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps)
  return np.minimum(1.0 - f[1:] / f[:-1], COSINE_MAX_BETA)


def get_beta_schedule(name: str, *, num_timesteps: int, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
  """The forward-process variances beta_1..beta_T (DDPM §2 and §4; iDDPM §3.2).

  Args:
    name: one of BETA_SCHEDULES.
      'linear': DDPM §4, np.linspace(beta_start, beta_end, T) (1e-4 .. 0.02 for T = 1000).
      'linear_rescaled': iDDPM's linear schedule for any T: both ends scaled by 1000 / T, so that
        the total noise matches DDPM's T = 1000 schedule (iDDPM §3.2).
      'quad': linspace of the square roots of beta_start..beta_end, squared (original DDPM code).
      'warmup10' / 'warmup50': beta_end everywhere, with a linear ramp from beta_start over the
        first 10% / 50% of the steps (original DDPM code).
      'const': beta_end at every step.
      'jsd': 1/T, 1/(T-1), ..., 1 (original DDPM code); its last step has beta_T = 1, so abar_T = 0.
      'cosine': iDDPM eq. 17 with s = 0.008 and beta_t capped at 0.999; ignores beta_start/beta_end.
    num_timesteps: T >= 1.
    beta_start: beta_1 for the schedules that use it, in (0, beta_end].
    beta_end: beta_T for the schedules that use it, in [beta_start, 1].
  Returns:
    float64 array [T] of betas in (0, 1].
  Raises:
    ValueError: for an unknown name, T < 1 or a beta range outside 0 < beta_start <= beta_end <= 1.
  """
  _check_choice('beta_schedule', name, BETA_SCHEDULES)
  _check_positive_int('num_timesteps', num_timesteps)
  t = int(num_timesteps)
  if name == 'cosine':
    return _cosine_betas(t)
  if name == 'jsd':
    return 1.0 / np.linspace(t, 1, t, dtype=np.float64)
  _check_beta_range(beta_start, beta_end)
  if name == 'linear':
    return np.linspace(beta_start, beta_end, t, dtype=np.float64)
  if name == 'linear_rescaled':
    scale = 1000.0 / t
    _check_beta_range(scale * beta_start, scale * beta_end,
                      f'with num_timesteps={t} the rescaled (x{scale:g}) ')
    return np.linspace(scale * beta_start, scale * beta_end, t, dtype=np.float64)
  if name == 'quad':
    return np.linspace(beta_start**0.5, beta_end**0.5, t, dtype=np.float64)**2
  if name == 'warmup10':
    return _warmup_betas(beta_start, beta_end, t, 0.1)
  if name == 'warmup50':
    return _warmup_betas(beta_start, beta_end, t, 0.5)
  return np.full(t, beta_end, dtype=np.float64)  # 'const'
