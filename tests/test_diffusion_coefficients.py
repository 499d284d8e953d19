"""Tests of ddpm_jax.diffusion.coefficients against float64 numpy written from DDPM eq. 4-7.

This module also holds the shared helpers of the diffusion tests (the reference tables and the
dtype fixture); the other test_diffusion_* modules import them from here. float64 cases run only in
the JAX_ENABLE_X64=1 subprocess of test_diffusion_x64.py.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_iddpm, default
from ddpm_jax import diffusion

# ----------------------------------------------------------------------------------------------
# Shared helpers (imported by the other diffusion test modules).


@pytest.fixture(params=['float32', 'float64'])
def dtype(request) -> str:
  """Runs a test for float32 here and for float64 in the x64 subprocess (test_diffusion_x64.py)."""
  if request.param == 'float64' and not jax.config.jax_enable_x64:
    pytest.skip('float64 cases run in test_diffusion_x64.py (JAX_ENABLE_X64=1 subprocess)')
  return request.param


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


# ----------------------------------------------------------------------------------------------
# Tests.

FIELD_TO_REF = {
    'betas': lambda r: r['betas'],
    'alphas_cumprod': lambda r: r['abar'],
    'alphas_cumprod_prev': lambda r: r['abar_prev'],
    'alphas_cumprod_next': lambda r: r['abar_next'],
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
  assert len(leaves) == 14
  rebuilt = jax.tree_util.tree_unflatten(treedef, [leaf * 1 for leaf in leaves])
  assert (rebuilt.num_timesteps, rebuilt.mean_type, rebuilt.var_type, rebuilt.loss_type,
          rebuilt.hybrid_lambda) == (SMALL_T, 'x0', 'learned_range', 'hybrid', 0.5)
  # Static fields are part of the tree structure, so jit specialises on them.
  traced = jax.jit(lambda c: (c.betas.sum(), c.num_timesteps + 0))(coefs)
  assert traced[1] == SMALL_T
  with pytest.raises(Exception):  # frozen: no hidden mutation
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
