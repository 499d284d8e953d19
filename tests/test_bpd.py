"""The bound in bits/dim vs a float64 numpy reference; data-set batching; rate-distortion."""

import csv
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, run_with_devices, tiny_config
from ddpm_jax import diffusion, models, parallel, streams
from ddpm_jax.evaluation import bpd, rate_distortion

T = 10
BETAS = np.linspace(1e-3, 0.2, T)
SHAPE = (3, 4, 4, 1)


def toy_model_fn(x, t):
  return 0.3 * x + 0.05 * t[:, None, None, None].astype(x.dtype)


def grid_images(seed=0, shape=SHAPE):
  """x_0 on the 256-level grid, with both extreme levels present (the decoder's open-ended bins)."""
  u = np.random.default_rng(seed).integers(0, 256, size=shape)
  u.flat[0], u.flat[1] = 0, 255
  return u / 127.5 - 1.0


# --- float64 reference, written from DDPM eq. 4-7, 13 and the bound (eq. 5) -----------------------

def _phi(z):
  # The DDPM code's tanh approximation of the standard normal CDF, which defines its decoder.
  return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def _kl(m1, lv1, m2, lv2):
  return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2)**2 * np.exp(-lv2))


def _decoder_nll(x0, mean, log_var):
  inv_std = np.exp(-0.5 * log_var)
  plus, minus = _phi(inv_std * (x0 - mean + 1 / 255)), _phi(inv_std * (x0 - mean - 1 / 255))
  prob = np.where(x0 < -0.999, plus, np.where(x0 > 0.999, 1.0 - minus, plus - minus))
  return -np.log(np.maximum(prob, 1e-12))


def reference_bpd(x0, noises, var_type, clip):
  alphas = 1.0 - BETAS
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = BETAS * (1.0 - abar_prev) / (1.0 - abar)
  post_logvar = np.log(np.append(post_var[1], post_var[1:]))
  model_var = np.append(post_var[1], BETAS[1:]) if var_type == 'fixed_large' else post_var
  model_logvar = np.log(model_var) if var_type == 'fixed_large' else post_logvar
  coef1 = np.sqrt(abar_prev) * BETAS / (1.0 - abar)
  coef2 = np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar)
  per_example = lambda v: v.reshape(v.shape[0], -1).mean(axis=1)
  vb, xstart_mse, mse = [], [], []
  for t in range(T):
    x_t = np.sqrt(abar[t]) * x0 + np.sqrt(1.0 - abar[t]) * noises[t]
    eps = 0.3 * x_t + 0.05 * t
    x0_hat = (x_t - np.sqrt(1.0 - abar[t]) * eps) / np.sqrt(abar[t])
    if clip:
      x0_hat = np.clip(x0_hat, -1.0, 1.0)
    model_mean = coef1[t] * x0_hat + coef2[t] * x_t
    if t == 0:
      term = _decoder_nll(x0, model_mean, model_logvar[0])
    else:
      term = _kl(coef1[t] * x0 + coef2[t] * x_t, post_logvar[t], model_mean, model_logvar[t])
    vb.append(per_example(term) / math.log(2.0))
    xstart_mse.append(per_example((x0_hat - x0)**2))
    eps_implied = (x_t - np.sqrt(abar[t]) * x0_hat) / np.sqrt(1.0 - abar[t])
    mse.append(per_example((eps_implied - noises[t])**2))
  prior = per_example(_kl(np.sqrt(abar[-1]) * x0, np.log(1.0 - abar[-1]), 0.0, 0.0)) / math.log(2.0)
  vb = np.stack(vb, axis=1)
  return {'total_bpd': vb.sum(axis=1) + prior, 'prior_bpd': prior, 'vb': vb,
          'xstart_mse': np.stack(xstart_mse, axis=1), 'mse': np.stack(mse, axis=1)}


@pytest.mark.parametrize('var_type', ['fixed_large', 'fixed_small'])
@pytest.mark.parametrize('clip', [False, True])
def test_calc_bpd_loop_matches_float64_reference(var_type, clip):
  coefs = diffusion.make_coefficients(BETAS, var_type=var_type)
  x0 = grid_images()
  key = jax.random.key(3)
  got = jax.jit(lambda x: bpd.calc_bpd_loop(coefs, toy_model_fn, x, key, clip_denoised=clip))(
      jnp.float32(x0))
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, t), SHAPE), np.float64)
            for t in range(T)]
  want = reference_bpd(x0, noises, var_type, clip)
  assert got['vb'].shape == (3, T) and got['total_bpd'].shape == (3,)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=2e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(got['total_bpd'], got['prior_bpd'] + got['vb'].sum(axis=1), rtol=1e-6)


def test_per_example_keys_make_each_row_independent_of_its_batch():
  coefs = diffusion.make_coefficients(BETAS)
  x0 = jnp.float32(grid_images(1))
  keys = streams.per_sample_keys(jax.random.key(0), jnp.arange(3))
  full = bpd.calc_bpd_loop(coefs, toy_model_fn, x0, keys)
  single = bpd.calc_bpd_loop(coefs, toy_model_fn, x0[2:], keys[2:])
  for name in ('total_bpd', 'vb', 'mse'):
    np.testing.assert_allclose(full[name][2:], single[name], rtol=1e-6, err_msg=name)
  with pytest.raises(ValueError, match='key must be a typed key'):
    bpd.calc_bpd_loop(coefs, toy_model_fn, x0, keys[:2])


def _dataset(num=10):
  return np.random.default_rng(5).integers(0, 256, size=(num, 8, 8, 1), dtype=np.uint8)


def _dataset_means(batch_size, params, config):
  mesh = parallel.create_mesh()
  coefs = diffusion.coefficients_from_config(config.diffusion)
  fn = bpd.make_bpd_fn(coefs, models.create_model(config), mesh, clip_denoised=True)
  return bpd.dataset_bpd(fn, params, jax.random.key(9), _dataset(), batch_size, mesh)


@pytest.fixture(scope='module')
def unet():
  config = tiny_config()
  return config, random_params(config)


def test_dataset_bpd_counts_every_example_once_despite_padding(unet):
  config, params = unet
  padded = _dataset_means(4, params, config)  # 10 examples: batches of 4, 4, 2 + 2 padding
  assert padded['num_examples'] == 10
  # The padded, batched means are the plain means of the per-example bound over the 10 examples.
  model_fn = lambda x, t: models.create_model(config).apply({'params': params}, x, t, train=False)
  coefs = diffusion.coefficients_from_config(config.diffusion)
  direct = bpd.calc_bpd_loop(coefs, model_fn, jnp.asarray(_dataset() / 127.5 - 1.0, jnp.float32),
                             streams.per_sample_keys(jax.random.key(9), jnp.arange(10)),
                             clip_denoised=True)
  np.testing.assert_allclose(padded['total_bpd'], np.mean(direct['total_bpd']), rtol=1e-5)
  for name in ('prior_bpd', 'vb', 'xstart_mse', 'mse'):
    np.testing.assert_allclose(padded[name], np.mean(direct[name], axis=0), rtol=1e-5, err_msg=name)
  assert padded['vb'].shape == (T,) and 0 < padded['total_bpd'] < 100


@pytest.mark.slow
@pytest.mark.multidevice
def test_dataset_bpd_is_the_same_on_8_devices(tmp_path, unet):
  config, params = unet
  one = _dataset_means(8, params, config)
  out = os.path.join(tmp_path, 'eight.npz')
  run_with_devices(f"""
      import sys; sys.path.insert(0, 'tests')
      import jax, numpy as np
      import test_bpd
      from conftest import random_params, tiny_config
      from ddpm_jax import parallel
      assert jax.device_count() == 8
      config = tiny_config()
      params = parallel.replicate(random_params(config), parallel.create_mesh())
      means = test_bpd._dataset_means(8, params, config)
      np.savez({out!r}, total=means['total_bpd'], vb=means['vb'])
  """, 8)
  with np.load(out) as eight:
    np.testing.assert_allclose(eight['total'], one['total_bpd'], rtol=1e-5)
    np.testing.assert_allclose(eight['vb'], one['vb'], rtol=1e-5)


def test_rate_distortion_curve_from_bound_terms(tmp_path):
  vb = np.array([2.0, 0.5, 0.25, 0.125])  # L_0 .. L_3 (T = 4)
  xstart_mse = np.array([1e-4, 4e-4, 1e-2, 0.25])
  curve = rate_distortion.rate_distortion_curve(0.01, vb, xstart_mse)
  np.testing.assert_array_equal(curve['t'], [4, 3, 2, 1, 0])
  np.testing.assert_array_equal(curve['reverse_steps'], [0, 1, 2, 3, 4])
  # rate(t) = L_T + L_{T-1} + ... + L_t; t = 0 adds the decoder: the lossless total.
  np.testing.assert_allclose(curve['rate_bpd'], [0.01, 0.135, 0.385, 0.885, 2.885])
  # distortion(t) = RMSE of x0_hat(x_t) in [0, 255] units, from table index t - 1.
  np.testing.assert_allclose(curve['distortion_rmse'],
                             [127.5 * 0.5, 127.5 * 0.1, 127.5 * 0.02, 127.5 * 0.01, 0.0])
  summary = rate_distortion.summary(curve, vb)
  assert summary == pytest.approx({'rate_bpd': 0.885, 'distortion_bpd': 2.0, 'rmse': 1.275})
  csv_path = rate_distortion.write_csv(curve, os.path.join(tmp_path, 'rd.csv'))
  with open(csv_path) as f:
    rows = list(csv.reader(f))
  assert rows[0] == list(rate_distortion.CSV_COLUMNS) and len(rows) == 6
  assert rows[4][:2] == ['1', '3'] and float(rows[4][2]) == pytest.approx(0.885)
  png = rate_distortion.plot(curve, os.path.join(tmp_path, 'rd.png'))
  assert os.path.getsize(png) > 1000
  with pytest.raises(ValueError, match='must be \\[T\\] arrays of one length'):
    rate_distortion.rate_distortion_curve(0.0, vb, xstart_mse[:2])
