"""Tests of the reverse-process parameterizations against float64 numpy (DDPM §3.2, iDDPM §3.1)."""

import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from references import DDPM_BETAS, assert_close, ref_extract, ref_p_mean_variance, ref_tables, small_betas, t_values

SHAPE = (5, 4, 4, 3)
LEARNED = ('learned', 'learned_range')


def _inputs(dtype: str, channels_out: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x_t = rng.normal(size=SHAPE)
  out = rng.normal(size=SHAPE[:-1] + (channels_out,)) * 0.7
  return [np.asarray(a.astype(dtype), np.float64) for a in (x_t, out)]


def _scales(betas, t) -> tuple[np.ndarray, np.ndarray]:
  """Per-example sizes of the terms that cancel: sqrt(1/abar_t) in x0 from x_t, plus
  1/sqrt(1 - abar_t) in eps from x0 (rounding is amplified by these factors)."""
  abar = ref_extract(ref_tables(betas)['abar'], t)
  return np.sqrt(1 / abar), np.sqrt(1 / abar) + 1 / np.sqrt(1 - abar)


@pytest.mark.parametrize('mean_type,var_type', list(itertools.product(
    diffusion.MEAN_TYPES, diffusion.VAR_TYPES)))
@pytest.mark.parametrize('clip', [False, True])
def test_p_mean_variance_matches_reference(mean_type, var_type, clip, dtype):
  betas = DDPM_BETAS
  coefs = diffusion.make_coefficients(betas, mean_type=mean_type, var_type=var_type,
                                      dtype=getattr(jnp, dtype))
  x_t, out = _inputs(dtype, 6 if var_type in LEARNED else 3)
  t = t_values(len(betas))
  got = diffusion.p_mean_variance(coefs, jnp.asarray(out, dtype), jnp.asarray(x_t, dtype),
                                  jnp.asarray(t), clip_denoised=clip)
  want = ref_p_mean_variance(betas, mean_type, var_type, out, x_t, t, clip)
  var_shape = SHAPE if var_type in LEARNED else (5, 1, 1, 1)
  for key in ('mean', 'pred_xstart', 'eps'):
    assert got[key].shape == SHAPE and got[key].dtype == np.dtype(dtype), key
  assert got['variance'].shape == got['log_variance'].shape == var_shape
  x0_scale, eps_scale = _scales(betas, t)
  for key in ('mean', 'pred_xstart'):
    assert_close(got[key], want[key], dtype, scale=x0_scale)
  assert_close(got['variance'], want['variance'], dtype)
  # learned_range mixes two logs of size ~10 with weights outside [0, 1]: they may cancel.
  assert_close(got['log_variance'], want['log_variance'], dtype, scale=20)
  assert_close(got['eps'], want['eps'], dtype, scale=eps_scale)
  if clip:
    assert np.all(np.abs(np.asarray(got['pred_xstart'])) <= 1)


def test_predict_functions_match_reference(dtype):
  betas = small_betas()
  coefs = diffusion.make_coefficients(betas, dtype=getattr(jnp, dtype))
  r = {k: ref_extract(v, t_values(len(betas))) for k, v in ref_tables(betas).items()}
  x_t, x0 = _inputs(dtype, 3)
  _, eps = _inputs(dtype, 3, seed=1)
  t = jnp.asarray(t_values(len(betas)))
  args = lambda a: (coefs, jnp.asarray(x_t, dtype), t, jnp.asarray(a, dtype))
  x0_scale, eps_scale = _scales(betas, t_values(len(betas)))
  assert_close(diffusion.predict_xstart_from_eps(*args(eps)),
               (x_t - np.sqrt(r['one_minus_abar']) * eps) / np.sqrt(r['abar']), dtype,
               scale=x0_scale)
  assert_close(diffusion.predict_eps_from_xstart(*args(x0)),
               (x_t - np.sqrt(r['abar']) * x0) / np.sqrt(r['one_minus_abar']), dtype,
               scale=eps_scale)
  xprev = r['coef1'] * x0 + r['coef2'] * x_t
  assert_close(diffusion.predict_xstart_from_xprev(*args(xprev)), x0, dtype, scale=x0_scale)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(t=st.integers(0, 19), seed=st.integers(0, 2**16))
def test_eps_and_xstart_predictions_invert_each_other(t, seed):
  coefs = diffusion.make_coefficients(small_betas())
  x_t, eps = (jnp.asarray(a, jnp.float32) for a in _inputs('float32', 3, seed))
  tt = jnp.full((SHAPE[0],), t, jnp.int32)
  x0 = diffusion.predict_xstart_from_eps(coefs, x_t, tt, eps)
  round_trip = diffusion.predict_eps_from_xstart(coefs, x_t, tt, x0)
  np.testing.assert_allclose(round_trip, eps, atol=2e-3, rtol=1e-3)
  # The mean of the eps parameterization is the posterior mean at x0_hat (DDPM eq. 11).
  out = diffusion.p_mean_variance(coefs, eps, x_t, tt, clip_denoised=False)
  mean, _, _ = diffusion.q_posterior_mean_variance(coefs, x0, x_t, tt)
  np.testing.assert_allclose(out['mean'], mean, atol=1e-5, rtol=1e-5)


def test_fixed_variances_for_single_step_process():
  coefs = diffusion.make_coefficients(np.array([0.2]), var_type='fixed_large')
  out = diffusion.p_mean_variance(coefs, jnp.zeros((1, 2, 2, 1)), jnp.ones((1, 2, 2, 1)),
                                  jnp.zeros(1, jnp.int32))
  np.testing.assert_allclose(out['variance'], 0.2, rtol=1e-6)
  np.testing.assert_allclose(out['log_variance'], np.log(0.2), rtol=1e-6)


def test_p_mean_variance_jits_and_respects_timestep_order():
  coefs = diffusion.make_coefficients(small_betas(), var_type='learned_range')
  x_t, out = (jnp.asarray(a, jnp.float32) for a in _inputs('float32', 6))
  t = jnp.asarray(t_values(20))
  eager = diffusion.p_mean_variance(coefs, out, x_t, t)
  jitted = jax.jit(diffusion.p_mean_variance, static_argnames='clip_denoised')(coefs, out, x_t, t)
  for key in eager:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('var_type,channels,match', [
    ('learned_range', 3, r"shape \[5, 4, 4, 6\].*var_type='learned_range'.*2C"),
    ('learned', 4, r"shape \[5, 4, 4, 6\].*var_type='learned'"),
    ('fixed_large', 6, r"shape \[5, 4, 4, 3\].*var_type='fixed_large'"),
])
def test_p_mean_variance_rejects_wrong_channels(var_type, channels, match):
  coefs = diffusion.make_coefficients(small_betas(), var_type=var_type)
  with pytest.raises(ValueError, match=match):
    diffusion.p_mean_variance(coefs, jnp.zeros(SHAPE[:-1] + (channels,)), jnp.zeros(SHAPE),
                              jnp.zeros(5, jnp.int32))


def test_predict_rejects_mismatched_shapes():
  coefs = diffusion.make_coefficients(small_betas())
  with pytest.raises(ValueError, match='x_t and eps must have the same shape'):
    diffusion.predict_xstart_from_eps(coefs, jnp.zeros(SHAPE), jnp.zeros(5, jnp.int32),
                                      jnp.zeros((5, 4, 4, 1)))
