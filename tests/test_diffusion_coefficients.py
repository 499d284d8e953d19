"""Tests of ddpm_jax.diffusion.coefficients against float64 numpy written from DDPM eq. 4-7.

The references are in tests/references.py and the `dtype` fixture in tests/conftest.py; float64 cases
run only in the JAX_ENABLE_X64=1 subprocess of test_diffusion_x64.py.
"""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_iddpm, default
from ddpm_jax import diffusion
from references import DDPM_BETAS, FIELD_TO_REF, SMALL_T, assert_close, ref_extract, ref_tables, small_betas, t_values


@pytest.mark.parametrize('schedule,num_timesteps', [('linear', 1000), ('cosine', 4000),
                                                    ('quad', 10), ('warmup10', 100)])
def test_tables_match_reference(schedule, num_timesteps, dtype):
  betas = diffusion.get_beta_schedule(schedule, num_timesteps=num_timesteps)
  coefs = diffusion.make_coefficients(betas, dtype=getattr(jnp, dtype))
  ref = ref_tables(betas)
  assert coefs.num_timesteps == num_timesteps
  for field, expected in FIELD_TO_REF.items():
    value = getattr(coefs, field)
    assert value.dtype == np.dtype(dtype) and value.shape == (num_timesteps,), field
    # The tables are computed in float64 and cast once: one rounding, whatever the dtype.
    assert_close(value, expected(ref), dtype, rtol=1e-6 if dtype == 'float32' else 1e-12)
  np.testing.assert_array_equal(coefs.timestep_map, np.arange(num_timesteps))
  assert coefs.timestep_map.dtype == jnp.int32


def test_ddpm_linear_known_values():
  coefs = diffusion.make_coefficients(DDPM_BETAS)
  np.testing.assert_allclose(coefs.alphas_cumprod[-1], 4.0358e-5, rtol=1e-4)
  # beta~_1 = 0 exactly (abar_0 = 1), and its clipped log is log beta~_2.
  assert coefs.posterior_variance[0] == 0.0
  assert coefs.posterior_log_variance_clipped[0] == coefs.posterior_log_variance_clipped[1]


def test_posterior_is_bayes_rule_of_forward_process():
  """beta~ and mu~ from conjugate Gaussians: q(x_{t-1}|x_0) q(x_t|x_{t-1}), an independent route."""
  betas = small_betas()
  coefs = diffusion.make_coefficients(betas, dtype=jnp.float32)
  ref = ref_tables(betas)
  prior_var = ref['one_minus_abar_prev'][1:]     # q(x_{t-1} | x_0) variance, t >= 2
  precision = 1.0 / prior_var + ref['alphas'][1:] / betas[1:]
  np.testing.assert_allclose(coefs.posterior_variance[1:], 1 / precision, rtol=1e-6)
  np.testing.assert_allclose(coefs.posterior_mean_coef1[1:],
                             np.sqrt(ref['abar_prev'][1:]) / prior_var / precision, rtol=1e-6)
  np.testing.assert_allclose(coefs.posterior_mean_coef2[1:],
                             np.sqrt(ref['alphas'][1:]) / betas[1:] / precision, rtol=1e-6)
  # At t = 1 the posterior is a point mass on x_0.
  assert (coefs.posterior_mean_coef1[0], coefs.posterior_mean_coef2[0]) == (1.0, 0.0)
  # beta~_t <= beta_t: the two fixed variances of DDPM §3.2 bracket the true one.
  assert np.all(np.asarray(coefs.posterior_variance) <= np.asarray(coefs.betas))


def test_single_step_process_is_finite():
  coefs = diffusion.make_coefficients(np.array([0.3]))
  for field in FIELD_TO_REF:
    assert np.all(np.isfinite(getattr(coefs, field))), field
  np.testing.assert_allclose(coefs.posterior_log_variance_clipped, np.log([0.3]), rtol=1e-6)


def test_jsd_schedule_ends_in_pure_noise_without_warnings():
  betas = diffusion.get_beta_schedule('jsd', num_timesteps=10)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    coefs = diffusion.make_coefficients(betas)
  assert coefs.alphas_cumprod[-1] == 0.0 and np.isinf(coefs.sqrt_recip_alphas_cumprod[-1])
  assert np.all(np.isfinite(coefs.posterior_variance))


def test_coefficients_are_a_pytree_with_static_choices():
  coefs = diffusion.make_coefficients(small_betas(), mean_type='x0', var_type='learned_range',
                                      loss_type='hybrid', hybrid_lambda=0.5)
  leaves, treedef = jax.tree_util.tree_flatten(coefs)
  assert len(leaves) == 13  # the 12 float tables and timestep_map
  rebuilt = jax.tree_util.tree_unflatten(treedef, [leaf * 1 for leaf in leaves])
  assert (rebuilt.num_timesteps, rebuilt.mean_type, rebuilt.var_type, rebuilt.loss_type,
          rebuilt.hybrid_lambda) == (SMALL_T, 'x0', 'learned_range', 'hybrid', 0.5)
  # Static fields are part of the tree structure, so jit specialises on them.
  traced = jax.jit(lambda c: (c.betas.sum(), c.num_timesteps + 0))(coefs)
  assert traced[1] == SMALL_T
  with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: no hidden mutation
    coefs.betas = None


def test_extract_values_and_shape(dtype):
  table = jnp.asarray(np.linspace(0.1, 2.0, SMALL_T), dtype=getattr(jnp, dtype))
  t = t_values(SMALL_T)
  out = diffusion.extract(table, jnp.asarray(t), (5, 4, 4, 3))
  assert out.shape == (5, 1, 1, 1) and out.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(out, ref_extract(np.asarray(table), t))
  assert diffusion.extract(table, t, (5, 7)).shape == (5, 1)
  jitted = jax.jit(diffusion.extract, static_argnums=2)(table, jnp.asarray(t), (5, 4, 4, 3))
  np.testing.assert_array_equal(jitted, out)


@pytest.mark.parametrize('t,shape,match', [
    (np.array([0.0, 1.0]), (2, 3), 'integer'),
    (np.array([[0, 1]]), (1, 3), r'shape \[1\]'),
    (np.array([0, 1, 2]), (2, 3), r'shape \[2\]'),
    (np.array([0, SMALL_T]), (2, 3), r'\[0, 19\]'),
    (np.array([-1, 0]), (2, 3), r'\[0, 19\]'),
    (jnp.array([0, SMALL_T + 5]), (2, 3), r'\[0, 19\]'),
])
def test_extract_rejects_bad_t(t, shape, match):
  with pytest.raises(ValueError, match=match):
    diffusion.extract(jnp.ones(SMALL_T), t, shape)


@pytest.mark.parametrize('kwargs,match', [
    (dict(mean_type='v'), r"mean_type='v' is not one of \('eps', 'x0', 'xprev'\)"),
    (dict(var_type='fixed'), r"var_type='fixed' is not one of \('fixed_small'"),
    (dict(loss_type='l1'), r"loss_type='l1' is not one of \('mse', 'rescaled_mse'"),
    (dict(hybrid_lambda=-1.0), 'hybrid_lambda'),
    (dict(hybrid_lambda=float('nan')), 'hybrid_lambda'),
    (dict(dtype=jnp.int32), 'floating'),
    (dict(timestep_map=np.arange(SMALL_T - 1)), 'timestep_map'),
    (dict(timestep_map=np.arange(SMALL_T) * 1.0), 'timestep_map'),
    (dict(timestep_map=-np.arange(SMALL_T)), 'timestep_map'),
])
def test_make_coefficients_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    diffusion.make_coefficients(small_betas(), **kwargs)


@pytest.mark.parametrize('betas', [np.array([]), np.zeros((2, 3)) + 0.1, np.array([0.1, 0.0]),
                                   np.array([0.1, 1.5]), np.array([0.1, np.nan])])
def test_make_coefficients_rejects_bad_betas(betas):
  with pytest.raises(ValueError, match='betas'):
    diffusion.make_coefficients(betas)


def test_float64_needs_x64():
  if jax.config.jax_enable_x64:
    assert diffusion.make_coefficients(small_betas(), dtype=jnp.float64).betas.dtype == jnp.float64
  else:
    with pytest.raises(ValueError, match='jax_enable_x64'):
      diffusion.make_coefficients(small_betas(), dtype=jnp.float64)


def test_coefficients_from_config_default_and_iddpm():
  coefs = diffusion.coefficients_from_config(default.get_config().diffusion)
  assert (coefs.num_timesteps, coefs.mean_type, coefs.var_type, coefs.loss_type) == (
      1000, 'eps', 'fixed_large', 'mse')
  np.testing.assert_allclose(coefs.betas, DDPM_BETAS, rtol=1e-7)

  config = cifar10_iddpm.get_config().diffusion
  coefs = diffusion.coefficients_from_config(config, respacing='100')
  assert (coefs.num_timesteps, coefs.var_type, coefs.loss_type) == (100, 'learned_range', 'hybrid')
  full = ref_tables(diffusion.get_beta_schedule('cosine', num_timesteps=4000))
  kept = np.asarray(coefs.timestep_map)
  assert kept[0] == 0 and kept[-1] == 3999 and len(kept) == 100
  np.testing.assert_allclose(coefs.alphas_cumprod, full['abar'][kept], rtol=1e-6)


@pytest.mark.parametrize('field,value,match', [
    ('beta_schedule', 'cosin', r"config.diffusion.*beta_schedule='cosin'.*'cosine'"),
    ('num_timesteps', 0, r'config.diffusion.*num_timesteps'),
    ('var_type', 'learned_rng', r"config.diffusion.*var_type='learned_rng'"),
    ('beta_end', 2.0, r'config.diffusion.*beta_end=2.0'),
])
def test_coefficients_from_config_names_the_bad_field(field, value, match):
  config = default.get_config().diffusion
  config[field] = value
  with pytest.raises(ValueError, match=match):
    diffusion.coefficients_from_config(config)


def test_coefficients_from_config_names_bad_respacing():
  with pytest.raises(ValueError, match=r"respacing='ddim7x'"):
    diffusion.coefficients_from_config(default.get_config().diffusion, respacing='ddim7x')


def test_ref_tables_self_check():
  """The reference itself: abar is the running product and beta~_1 = 0 (guards the helpers)."""
  ref = ref_tables([0.5, 0.5])
  assert ref['abar'].tolist() == [0.5, 0.25] and ref['beta_tilde'][0] == 0.0
  assert math.isclose(ref['beta_tilde'][1], 0.5 * 0.5 / 0.75)
