"""Tests of the forward process q and its posterior against float64 numpy (DDPM eq. 4, 6, 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from references import DDPM_BETAS, assert_close, ref_extract, ref_tables, small_betas, t_values

SHAPE = (5, 4, 4, 3)


def _inputs(dtype: str, seed: int = 0):
  """x0 in [-1, 1], x_t-like and noise arrays, rounded to `dtype` and returned as float64 numpy."""
  rng = np.random.default_rng(seed)
  arrays = (rng.uniform(-1, 1, SHAPE), rng.normal(size=SHAPE), rng.normal(size=SHAPE))
  return [np.asarray(a.astype(dtype), np.float64) for a in arrays]


def _coefs(betas, dtype: str):
  return diffusion.make_coefficients(betas, dtype=getattr(jnp, dtype))


@pytest.mark.parametrize('betas', [DDPM_BETAS, small_betas()], ids=['T1000', 'T20'])
def test_q_mean_variance(betas, dtype):
  coefs, ref = _coefs(betas, dtype), ref_tables(betas)
  x0, _, _ = _inputs(dtype)
  t = t_values(len(betas))
  mean, var, log_var = diffusion.q_mean_variance(coefs, jnp.asarray(x0, dtype), jnp.asarray(t))
  abar, one_minus_abar = ref_extract(ref['abar'], t), ref_extract(ref['one_minus_abar'], t)
  assert mean.shape == SHAPE and var.shape == log_var.shape == (5, 1, 1, 1)
  assert mean.dtype == var.dtype == np.dtype(dtype)
  assert_close(mean, np.sqrt(abar) * x0, dtype)
  assert_close(var, one_minus_abar, dtype)
  assert_close(log_var, np.log(one_minus_abar), dtype)


@pytest.mark.parametrize('betas', [DDPM_BETAS, small_betas()], ids=['T1000', 'T20'])
def test_q_sample(betas, dtype):
  coefs, ref = _coefs(betas, dtype), ref_tables(betas)
  x0, _, noise = _inputs(dtype)
  t = t_values(len(betas))
  out = diffusion.q_sample(coefs, jnp.asarray(x0, dtype), jnp.asarray(t), jnp.asarray(noise, dtype))
  abar, one_minus_abar = ref_extract(ref['abar'], t), ref_extract(ref['one_minus_abar'], t)
  assert out.shape == SHAPE and out.dtype == np.dtype(dtype)
  assert_close(out, np.sqrt(abar) * x0 + np.sqrt(one_minus_abar) * noise, dtype, scale=1)
  jitted = jax.jit(diffusion.q_sample)(coefs, jnp.asarray(x0, dtype), jnp.asarray(t),
                                       jnp.asarray(noise, dtype))
  assert_close(jitted, out, dtype, scale=1)


@pytest.mark.parametrize('betas', [DDPM_BETAS, small_betas()], ids=['T1000', 'T20'])
def test_q_posterior_mean_variance(betas, dtype):
  coefs, ref = _coefs(betas, dtype), ref_tables(betas)
  x0, x_t, _ = _inputs(dtype)
  t = t_values(len(betas))
  mean, var, log_var = diffusion.q_posterior_mean_variance(
      coefs, jnp.asarray(x0, dtype), jnp.asarray(x_t, dtype), jnp.asarray(t))
  r = {k: ref_extract(v, t) for k, v in ref.items()}
  # DDPM eq. 7, written out.
  expected_mean = (np.sqrt(r['abar_prev']) * r['betas'] / r['one_minus_abar'] * x0
                   + np.sqrt(r['alphas']) * r['one_minus_abar_prev'] / r['one_minus_abar'] * x_t)
  expected_var = r['one_minus_abar_prev'] / r['one_minus_abar'] * r['betas']
  assert mean.shape == SHAPE and var.shape == log_var.shape == (5, 1, 1, 1)
  assert_close(mean, expected_mean, dtype, scale=1)
  assert_close(var, expected_var, dtype)
  # At t = 1 (index 0) beta~ = 0; the log is clipped to log beta~_2.
  expected_log_var = np.where(t[:, None, None, None] == 0, np.log(ref['beta_tilde'][1]),
                              np.log(np.maximum(expected_var, 1e-300)))
  assert_close(log_var, expected_log_var, dtype)
  np.testing.assert_array_equal(np.asarray(mean)[t == 0], np.asarray(x0.astype(dtype))[t == 0])


def test_q_sample_large_batch_has_closed_form_moments():
  """x_t | x_0 ~ N(sqrt(abar_t) x_0, 1 - abar_t) (DDPM eq. 4), checked by sampling."""
  coefs = diffusion.make_coefficients(DDPM_BETAS)
  abar = ref_tables(DDPM_BETAS)['abar']
  n, x0_values = 50_000, np.array([-1.0, -0.3, 0.5, 1.0])
  t = np.array([0, 99, 499, 999])
  x0 = jnp.full((len(t) * n, 1, 1, 4), x0_values, jnp.float32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  x_t = diffusion.q_sample(coefs, x0, jnp.repeat(jnp.asarray(t), n), noise)
  x_t = np.asarray(x_t, np.float64).reshape(len(t), n, 4)
  for i, ti in enumerate(t):
    std = np.sqrt(1 - abar[ti])
    # Sample mean within 5 standard errors, sample std within 2% (both ~5 sigma at n = 50k).
    np.testing.assert_allclose(x_t[i].mean(axis=0), np.sqrt(abar[ti]) * x0_values,
                               atol=5 * std / np.sqrt(n))
    np.testing.assert_allclose(x_t[i].std(axis=0), std, rtol=0.02)


def test_forward_rejects_mismatched_shapes():
  coefs = diffusion.make_coefficients(small_betas())
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match=r'x_start and noise must have the same shape'):
    diffusion.q_sample(coefs, x, jnp.zeros(5, jnp.int32), jnp.zeros((5, 4, 4, 1)))
  with pytest.raises(ValueError, match=r'x_start and x_t must have the same shape'):
    diffusion.q_posterior_mean_variance(coefs, x, x[:2], jnp.zeros(5, jnp.int32))
  with pytest.raises(ValueError, match=r't must be an int array of shape \[5\]'):
    diffusion.q_mean_variance(coefs, x, jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r't must lie in \[0, 19\]'):
    diffusion.q_sample(coefs, x, np.array([0, 1, 2, 3, 20]), x)
