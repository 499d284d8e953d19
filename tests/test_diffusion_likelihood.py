"""Tests of the bound terms against float64 numpy (DDPM eq. 5, §3.3 eq. 13; iDDPM §2-3)."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ddpm_jax import diffusion
from references import (
  DDPM_BETAS,
  LN2,
  assert_close,
  grid_images,
  ref_cdf,
  ref_discretized_log_likelihood,
  ref_extract,
  ref_normal_kl,
  ref_tables,
  ref_vb_bits,
  small_betas,
  t_values,
)

SHAPE = (5, 4, 4, 3)


def test_normal_kl_matches_reference(dtype):
  rng = np.random.default_rng(0)
  m1, m2, lv1, lv2 = (np.asarray(rng.normal(size=(7, 3)).astype(dtype), np.float64)
                      for _ in range(4))
  got = diffusion.normal_kl(*(jnp.asarray(a, dtype) for a in (m1, lv1, m2, lv2)))
  assert got.dtype == np.dtype(dtype)
  assert_close(got, ref_normal_kl(m1, lv1, m2, lv2), dtype, scale=5)
  # Broadcasting a [B, 1] log variance against [B, C] means (fixed variances).
  got = diffusion.normal_kl(jnp.asarray(m1, dtype), jnp.asarray(lv1[:, :1], dtype),
                            jnp.asarray(m2, dtype), jnp.asarray(lv2[:, :1], dtype))
  assert_close(got, ref_normal_kl(m1, lv1[:, :1], m2, lv2[:, :1]), dtype, scale=5)


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(mean=st.floats(-10, 10), logvar=st.floats(-15, 5), dm=st.floats(-3, 3),
                  dlv=st.floats(-3, 3))
def test_normal_kl_zero_for_identical_and_positive_otherwise(mean, logvar, dm, dlv):
  same = diffusion.normal_kl(jnp.float32(mean), jnp.float32(logvar), jnp.float32(mean),
                             jnp.float32(logvar))
  assert abs(float(same)) <= 1e-6
  other = float(diffusion.normal_kl(mean, logvar, mean + dm, logvar + dlv))
  assert other >= -1e-6
  np.testing.assert_allclose(other, ref_normal_kl(mean, logvar, mean + dm, logvar + dlv),
                             rtol=1e-4, atol=1e-5)


def test_approx_cdf_matches_reference_and_phi(dtype):
  x = np.linspace(-8, 8, 1601)
  got = diffusion.approx_standard_normal_cdf(jnp.asarray(x, dtype))
  # 1 + tanh(.) loses everything below ulp(1) in the far left tail: absolute precision there.
  assert_close(got, ref_cdf(x), dtype, rtol=1e-6 if dtype == 'float32' else 1e-12, scale=1)
  np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - special.ndtr(x)), 2e-4)


def test_discretized_likelihood_matches_reference(dtype):
  rng = np.random.default_rng(1)
  x = grid_images(rng, SHAPE)  # includes both edge levels with high probability
  x[0, 0, 0] = [-1.0, 1.0, 1 / 255]
  means = np.asarray(rng.uniform(-1.2, 1.2, SHAPE).astype(dtype), np.float64)
  log_scales = np.asarray(rng.uniform(-6, 0, (5, 1, 1, 1)).astype(dtype), np.float64)
  x = np.asarray(x.astype(dtype), np.float64)
  got = diffusion.discretized_gaussian_log_likelihood(
      jnp.asarray(x, dtype), means=jnp.asarray(means, dtype),
      log_scales=jnp.asarray(log_scales, dtype))
  assert got.shape == SHAPE and got.dtype == np.dtype(dtype)
  assert np.all(np.asarray(got) <= 0)
  # Probabilities are differences of cdfs ~ 1 for bins of mass ~ 1/255: relative rounding ~ 255 ulp.
  assert_close(np.exp(got), np.exp(ref_discretized_log_likelihood(x, means, log_scales)), dtype,
               rtol=2e-4 if dtype == 'float32' else 1e-10, scale=1e-3)


@pytest.mark.parametrize('mean,log_scale', [(0.0, -3.0), (0.37, -6.0), (-0.9, 0.0), (1.5, -2.0),
                                            (-3.0, 1.0), (0.2, -9.0)])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale, dtype):
  levels = -1.0 + 2.0 * np.arange(256) / 255
  got = diffusion.discretized_gaussian_log_likelihood(
      jnp.asarray(levels, dtype)[None], means=jnp.full((1, 256), mean, dtype),
      log_scales=jnp.asarray(log_scale, dtype))
  total = np.exp(np.asarray(got, np.float64)).sum()
  # Each level's mass is at least the 1e-12 floor, so the sum may exceed 1 by 256e-12.
  np.testing.assert_allclose(total, 1.0, atol=1e-4 if dtype == 'float32' else 1e-9)


def test_mean_flat(dtype):
  x = np.random.default_rng(2).normal(size=SHAPE)
  got = diffusion.mean_flat(jnp.asarray(x, dtype))
  assert got.shape == (5,)
  assert_close(got, x.astype(dtype).astype(np.float64).reshape(5, -1).mean(axis=1), dtype, scale=1)


VB_CASES = [('eps', 'fixed_large'), ('eps', 'fixed_small'), ('x0', 'learned_range'),
            ('xprev', 'fixed_small'), ('eps', 'learned')]


@pytest.mark.parametrize('mean_type,var_type', VB_CASES)
@pytest.mark.parametrize('betas', [DDPM_BETAS, small_betas()], ids=['T1000', 'T20'])
def test_vb_terms_bpd_matches_reference(mean_type, var_type, betas, dtype):
  rng = np.random.default_rng(3)
  coefs = diffusion.make_coefficients(betas, mean_type=mean_type, var_type=var_type,
                                      dtype=getattr(jnp, dtype))
  channels = 6 if var_type.startswith('learned') else 3
  x0 = np.asarray(grid_images(rng, SHAPE).astype(dtype), np.float64)
  t = t_values(len(betas))
  abar = ref_extract(ref_tables(betas)['abar'], t)
  noise = rng.normal(size=SHAPE)
  x_t = np.asarray((np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(dtype), np.float64)
  # A plausible network output, near the truth, so that the decoder probabilities are not at the
  # 1e-12 floor (where float32 and float64 legitimately disagree).
  r = {k: ref_extract(v, t) for k, v in ref_tables(betas).items()}
  truth = {'eps': noise, 'x0': x0, 'xprev': r['coef1'] * x0 + r['coef2'] * x_t}[mean_type]
  out = np.concatenate([truth + 0.01 * rng.normal(size=SHAPE),
                        0.3 * rng.normal(size=SHAPE)], axis=-1)[..., :channels]
  out = np.asarray(out.astype(dtype), np.float64)
  got = diffusion.vb_terms_bpd(coefs, jnp.asarray(out, dtype), jnp.asarray(x0, dtype),
                               jnp.asarray(x_t, dtype), jnp.asarray(t))
  assert got['output'].shape == (5,) and got['output'].dtype == np.dtype(dtype)
  assert got['pred_xstart'].shape == SHAPE
  want = ref_vb_bits(betas, mean_type, var_type, out, x0, x_t, t)
  # The KL of near-equal variances is a sum of O(1) terms cancelling to ~1e-6: absolute floor 1e-7.
  assert_close(got['output'], want, dtype, rtol=1e-4 if dtype == 'float32' else 1e-9, scale=1e-3)


def test_vb_term_vanishes_for_the_true_posterior():
  """A network that outputs x_0 exactly (x0 parameterization, fixed_small) matches q: KL = 0."""
  betas = small_betas()
  coefs = diffusion.make_coefficients(betas, mean_type='x0', var_type='fixed_small')
  x0 = jnp.asarray(grid_images(np.random.default_rng(4), SHAPE), jnp.float32)
  x_t = jax.random.normal(jax.random.key(0), SHAPE)
  t = jnp.array([1, 2, 10, 19, 19])
  got = diffusion.vb_terms_bpd(coefs, x0, x0, x_t, t)['output']
  np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_decoder_nll_of_a_sharp_centred_decoder_is_near_zero():
  coefs = diffusion.make_coefficients(small_betas(), mean_type='xprev', var_type='learned')
  x0 = jnp.asarray(grid_images(np.random.default_rng(5), SHAPE), jnp.float32)
  out = jnp.concatenate([x0, jnp.full(SHAPE, 2 * math.log(1 / 2550))], axis=-1)  # sigma = bin / 10
  got = diffusion.vb_terms_bpd(coefs, out, x0, x0, jnp.zeros(5, jnp.int32))['output']
  np.testing.assert_allclose(got, 0.0, atol=1e-5)


def test_prior_bpd(dtype):
  rng = np.random.default_rng(6)
  x0 = np.asarray(grid_images(rng, SHAPE).astype(dtype), np.float64)
  results = []
  for betas in (DDPM_BETAS, small_betas()):
    coefs = diffusion.make_coefficients(betas, dtype=getattr(jnp, dtype))
    abar_t = ref_tables(betas)['abar'][-1]
    kl = ref_normal_kl(np.sqrt(abar_t) * x0, np.log(1 - abar_t), 0.0, 0.0)
    want = kl.reshape(5, -1).mean(axis=1) / LN2
    got = diffusion.prior_bpd(coefs, jnp.asarray(x0, dtype))
    assert got.shape == (5,) and got.dtype == np.dtype(dtype)
    # The KL is a difference of O(abar_T) terms: absolute rounding ~ ulp.
    assert_close(got, want, dtype, rtol=1e-3 if dtype == 'float32' else 1e-9, scale=1e-5)
    results.append(np.asarray(got))
  # DDPM's T = 1000 schedule destroys almost all signal: L_T is ~1e-5 bits/dim.
  assert np.all(results[0] < 1e-4) and np.all(results[0] > 0)


def test_likelihood_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='x and means must have the same shape'):
    diffusion.discretized_gaussian_log_likelihood(jnp.zeros(SHAPE), means=jnp.zeros((5, 4, 4, 1)),
                                                  log_scales=jnp.zeros(()))
  with pytest.raises(ValueError, match='log_scales of shape'):
    diffusion.discretized_gaussian_log_likelihood(jnp.zeros(SHAPE), means=jnp.zeros(SHAPE),
                                                  log_scales=jnp.zeros((5, 2)))
  coefs = diffusion.make_coefficients(small_betas(), var_type='learned_range')
  with pytest.raises(ValueError, match='2C'):
    diffusion.vb_terms_bpd(coefs, jnp.zeros(SHAPE), jnp.zeros(SHAPE), jnp.zeros(SHAPE),
                           jnp.zeros(5, jnp.int32))
