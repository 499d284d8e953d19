"""Tests of the beta schedules against element-wise float64 formulas (DDPM §4; iDDPM §3.2)."""

import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from ddpm_jax import diffusion


def _ramp(start: float, end: float, n: int) -> list[float]:
  """start + (end - start) i / (n - 1), i = 0..n-1 (a single step is just `start`)."""
  return [start + (end - start) * i / max(n - 1, 1) for i in range(n)]


def _warmup(start: float, end: float, n: int, frac: float) -> list[float]:
  warm = int(n * frac)
  return _ramp(start, end, warm) + [end] * (n - warm)


def _cosine(n: int, s: float = 0.008) -> list[float]:
  """iDDPM eq. 17: abar_t = f(t) / f(0), beta_t = min(1 - abar_t / abar_{t-1}, 0.999)."""
  f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2)**2
  abar = [f(t) / f(0) for t in range(n + 1)]
  return [min(1 - abar[t] / abar[t - 1], 0.999) for t in range(1, n + 1)]


def reference_betas(name: str, n: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
  ref = {
      'linear': lambda: _ramp(start, end, n),
      'linear_rescaled': lambda: _ramp(start * 1000 / n, end * 1000 / n, n),
      'quad': lambda: [r * r for r in _ramp(math.sqrt(start), math.sqrt(end), n)],
      'warmup10': lambda: _warmup(start, end, n, 0.1),
      'warmup50': lambda: _warmup(start, end, n, 0.5),
      'const': lambda: [end] * n,
      'jsd': lambda: [1 / (n - i) for i in range(n)],
      'cosine': lambda: _cosine(n),
  }[name]
  return np.array(ref(), dtype=np.float64)


@pytest.mark.parametrize('name', diffusion.BETA_SCHEDULES)
@pytest.mark.parametrize('num_timesteps', [1, 2, 7, 100, 1000, 4000])
def test_schedule_matches_reference(name, num_timesteps):
  if name == 'linear_rescaled' and num_timesteps < 20:
    pytest.skip('rescaled betas exceed 1 for T < 20 (tested as an error below)')
  betas = diffusion.get_beta_schedule(name, num_timesteps=num_timesteps)
  assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
  np.testing.assert_allclose(betas, reference_betas(name, num_timesteps), rtol=1e-12, atol=1e-15)


def test_paper_values():
  linear = diffusion.get_beta_schedule('linear', num_timesteps=1000)
  assert linear[0] == 1e-4 and linear[-1] == 0.02  # DDPM §4
  np.testing.assert_array_equal(
      diffusion.get_beta_schedule('linear_rescaled', num_timesteps=1000), linear)
  rescaled = diffusion.get_beta_schedule('linear_rescaled', num_timesteps=4000)
  np.testing.assert_allclose([rescaled[0], rescaled[-1]], [2.5e-5, 0.005], rtol=1e-12)
  cosine = diffusion.get_beta_schedule('cosine', num_timesteps=4000, beta_start=0.5, beta_end=0.9)
  assert cosine[-1] == 0.999  # f(T) = 0, clipped (iDDPM §3.2)
  np.testing.assert_array_equal(cosine, diffusion.get_beta_schedule('cosine', num_timesteps=4000))
  # iDDPM eq. 17: abar follows the cosine except where beta is capped.
  abar = np.cumprod(1 - cosine)
  t = np.arange(1, 4001) / 4000
  expected = np.cos((t + 0.008) / 1.008 * np.pi / 2)**2 / np.cos(0.008 / 1.008 * np.pi / 2)**2
  np.testing.assert_allclose(abar[:3990], expected[:3990], rtol=1e-9)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(name=st.sampled_from(diffusion.BETA_SCHEDULES),
                  num_timesteps=st.integers(min_value=1, max_value=3000),
                  start=st.floats(1e-6, 0.05), width=st.floats(0.0, 0.1))
# Found by hypothesis in CI: T = 50 rescales beta = 0.05 to exactly 1 (abar = 0 from t = 1 on).
@hypothesis.example(name='linear_rescaled', num_timesteps=1, start=0.05, width=0.0)
def test_abar_strictly_decreasing_in_unit_interval(name, num_timesteps, start, width):
  # (Ranges keep abar_T above float64's underflow: sum of betas < 700.)
  if name == 'linear_rescaled':  # the rescaled beta_end (x 1000 / T) must stay below 1, so abar > 0
    num_timesteps = max(num_timesteps, math.floor(1000 * (start + width)) + 1)
  betas = diffusion.get_beta_schedule(name, num_timesteps=num_timesteps, beta_start=start,
                                      beta_end=start + width)
  assert np.all(betas > 0) and np.all(betas <= 1)
  abar = np.cumprod(1 - betas)
  if name == 'jsd':  # beta_T = 1: x_T carries no signal at all.
    assert abar[-1] == 0
    abar = abar[:-1]
  assert np.all(abar > 0) and np.all(abar < 1)
  assert np.all(np.diff(abar) < 0)


def test_unknown_schedule_names_value_and_allowed():
  with pytest.raises(ValueError,
                     match=r"beta_schedule='cosin' is not one of \('linear'.*'cosine'\)"):
    diffusion.get_beta_schedule('cosin', num_timesteps=10)


@pytest.mark.parametrize('num_timesteps', [0, -3, 2.5, True, '10'])
def test_bad_num_timesteps(num_timesteps):
  with pytest.raises(ValueError, match='num_timesteps'):
    diffusion.get_beta_schedule('linear', num_timesteps=num_timesteps)


@pytest.mark.parametrize('start,end', [(0.0, 0.02), (-1e-4, 0.02), (0.02, 1e-4), (1e-4, 1.5)])
def test_bad_beta_range(start, end):
  with pytest.raises(ValueError, match=rf'beta_start={start!r} and beta_end={end!r}'):
    diffusion.get_beta_schedule('linear', num_timesteps=10, beta_start=start, beta_end=end)


def test_rescaled_linear_needs_enough_steps():
  with pytest.raises(ValueError, match=r'num_timesteps=10 the rescaled \(x100\)'):
    diffusion.get_beta_schedule('linear_rescaled', num_timesteps=10)
