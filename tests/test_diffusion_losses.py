"""Tests of training_losses against float64 numpy (DDPM §3.4, Algorithm 1; iDDPM §3.1).

The network is replaced by a tiny linear function of (x_t, t) with four scalar parameters, so that
outputs and gradients have closed forms.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from references import (
  DDPM_BETAS,
  assert_close,
  grid_images,
  ref_extract,
  ref_tables,
  ref_vb_bits,
  small_betas,
  t_values,
)

SHAPE = (5, 4, 4, 3)
PARAMS = {'a': 0.3, 'b': -0.2, 'c': 0.5, 'd': -0.1}  # mean: a x_t + b t/T; variance: c x_t + d


def params_for(mean_type: str) -> dict[str, float]:
  """For x0 / xprev, a = 1 keeps the decoder mean near x_0 at t = 1: a decoder NLL of ~36 bits/dim
  has probabilities near the 1e-12 floor, where float32 cannot match float64."""
  return PARAMS if mean_type == 'eps' else dict(PARAMS, a=1.0)
LEARNED = ('learned', 'learned_range')


def make_model(params, learned: bool, num_timesteps: int, backend=jnp):
  """out = a x_t + b t_model / T (and, for learned variances, c x_t + d as the second half)."""
  def model_fn(x_t, t_model):
    time = backend.reshape(backend.asarray(t_model, x_t.dtype) / num_timesteps, (-1, 1, 1, 1))
    mean = params['a'] * x_t + params['b'] * time
    if not learned:
      return mean
    return backend.concatenate([mean, params['c'] * x_t + params['d'] + 0 * time], axis=-1)
  return model_fn


def ref_training_losses(betas, mean_type, var_type, loss_type, x0, t, noise, timestep_map=None,
                        hybrid_lambda=0.001, params=None) -> dict[str, np.ndarray]:
  """The objectives of DDPM eq. 14 / eq. 5 and iDDPM eq. 16, float64.

  The model sees timestep_map[t] / (largest mapped timestep + 1): t / T of the original process.
  """
  num_timesteps = len(betas)
  timestep_map = np.arange(num_timesteps) if timestep_map is None else timestep_map
  r = {k: ref_extract(v, t) for k, v in ref_tables(betas).items()}
  x_t = np.sqrt(r['abar']) * x0 + np.sqrt(r['one_minus_abar']) * noise
  learned = var_type in LEARNED
  model_fn = make_model(params or PARAMS, learned, timestep_map[-1] + 1, np)
  out = model_fn(x_t, timestep_map[t].astype(np.float64))
  if loss_type in ('kl', 'rescaled_kl'):
    vb = ref_vb_bits(betas, mean_type, var_type, out, x0, x_t, t)
    return {'vb': vb, 'loss': vb * (num_timesteps if loss_type == 'rescaled_kl' else 1)}
  target = {'eps': noise, 'x0': x0, 'xprev': r['coef1'] * x0 + r['coef2'] * x_t}[mean_type]
  mse = ((target - out[..., :3])**2).reshape(len(t), -1).mean(axis=1)
  if not learned:
    return {'mse': mse, 'loss': mse}
  vb = ref_vb_bits(betas, mean_type, var_type, out, x0, x_t, t)
  weight = num_timesteps / 1000 if loss_type == 'rescaled_mse' else hybrid_lambda * num_timesteps
  return {'mse': mse, 'vb': vb, 'loss': mse + weight * vb}


CASES = [('eps', 'fixed_large', 'mse'), ('x0', 'fixed_small', 'mse'),
         ('xprev', 'fixed_small', 'mse'), ('eps', 'learned_range', 'hybrid'),
         ('x0', 'learned', 'rescaled_mse'),
         ('eps', 'fixed_large', 'kl'), ('eps', 'learned_range', 'rescaled_kl'),
         ('xprev', 'learned_range', 'kl')]


def _data(dtype: str, num_timesteps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x0 = grid_images(rng, SHAPE).astype(dtype)
  key = jax.random.key(seed)
  # The documented noise: jax.random.normal(key, x_start.shape, x_start.dtype).
  noise = np.asarray(jax.random.normal(key, SHAPE, getattr(jnp, dtype)), np.float64)
  return x0, t_values(num_timesteps), key, noise


@pytest.mark.parametrize('mean_type,var_type,loss_type', CASES)
@pytest.mark.parametrize('betas', [DDPM_BETAS, small_betas()], ids=['T1000', 'T20'])
def test_training_losses_match_reference(mean_type, var_type, loss_type, betas, dtype):
  coefs = diffusion.make_coefficients(betas, mean_type=mean_type, var_type=var_type,
                                      loss_type=loss_type, dtype=getattr(jnp, dtype))
  x0, t, key, noise = _data(dtype, len(betas))
  params = params_for(mean_type)
  model_fn = make_model(params, var_type in LEARNED, len(betas))
  got = diffusion.training_losses(coefs, model_fn, jnp.asarray(x0), jnp.asarray(t), key)
  want = ref_training_losses(betas, mean_type, var_type, loss_type, x0.astype(np.float64), t, noise,
                             params=params)
  assert set(got) == set(want)
  for name, value in got.items():
    assert value.shape == (5,) and value.dtype == np.dtype(dtype), name
    # The decoder / KL terms are sums cancelling to small values (see the likelihood tests).
    assert_close(value, want[name], dtype, rtol=1e-4 if dtype == 'float32' else 1e-9, scale=1e-3)


def test_model_sees_the_respaced_timestep():
  betas = small_betas(100)
  kept = diffusion.space_timesteps(100, '10')
  coefs = diffusion.respaced_coefficients(betas, kept)
  seen = []
  def model_fn(x_t, t_model):
    seen.append(np.asarray(t_model))
    return make_model(PARAMS, False, 100)(x_t, t_model)
  x0, _, key, noise = _data('float32', 10)
  t = np.array([0, 3, 9, 9, 5])
  got = diffusion.training_losses(coefs, model_fn, jnp.asarray(x0), jnp.asarray(t), key)
  np.testing.assert_array_equal(seen[0], kept[t])
  assert seen[0].dtype == np.int32
  abar = ref_tables(betas)['abar'][kept]
  respaced_betas = 1 - abar / np.append(1, abar[:-1])
  want = ref_training_losses(respaced_betas, 'eps', 'fixed_large', 'mse', x0.astype(np.float64), t,
                             noise, timestep_map=kept)
  assert_close(got['loss'], want['loss'], 'float32', scale=1)


def _grads(coefs, x0, t, key, learned=True) -> dict[str, dict[str, jax.Array]]:
  """Gradients of the batch sums of 'loss', 'mse' and 'vb' w.r.t. the four model parameters."""
  def totals(params):
    model_fn = make_model(params, learned, coefs.num_timesteps)
    terms = diffusion.training_losses(coefs, model_fn, x0, t, key)
    return {k: jnp.sum(v) for k, v in terms.items()}
  return jax.jacrev(totals)({k: jnp.float32(v) for k, v in PARAMS.items()})


def test_hybrid_gradient_of_mean_is_mse_gradient_alone():
  """iDDPM §3.1: the stop-gradient makes L_vlb train only the variance."""
  betas = small_betas()
  coefs = diffusion.make_coefficients(betas, var_type='learned_range', loss_type='hybrid',
                                      hybrid_lambda=0.05)
  x0, t, key, noise = _data('float32', len(betas))
  args = (jnp.asarray(x0), jnp.asarray(t), key)
  grads = _grads(coefs, *args)
  loss_grad, mse_grad, vb_grad = grads['loss'], grads['mse'], grads['vb']
  for p in ('a', 'b'):
    np.testing.assert_allclose(loss_grad[p], mse_grad[p], rtol=1e-6)
    assert vb_grad[p] == 0.0
  for p in ('c', 'd'):
    assert mse_grad[p] == 0.0 and abs(vb_grad[p]) > 1e-3
    np.testing.assert_allclose(loss_grad[p], 0.05 * 20 * vb_grad[p], rtol=1e-5)
  # The mse gradient in closed form: d/da sum_b mean((eps - a x_t - b s)^2) = sum_b mean(-2 r x_t).
  r = ref_extract(ref_tables(betas)['abar'], t)
  x_t = np.sqrt(r) * x0 + np.sqrt(1 - r) * noise
  residual = noise - PARAMS['a'] * x_t - PARAMS['b'] * (t / 20).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(mse_grad['a'], np.sum(np.mean(-2 * residual * x_t, axis=(1, 2, 3))),
                             rtol=1e-4)
  np.testing.assert_allclose(
      mse_grad['b'],
      np.sum(np.mean(-2 * residual * (t / 20).reshape(-1, 1, 1, 1), axis=(1, 2, 3))), rtol=1e-4)


def test_pure_bound_trains_the_mean_too():
  coefs = diffusion.make_coefficients(small_betas(), var_type='learned_range', loss_type='kl')
  x0, t, key, _ = _data('float32', 20)
  grads = _grads(coefs, jnp.asarray(x0), jnp.asarray(t), key)['loss']
  assert abs(grads['a']) > 1e-3 and abs(grads['c']) > 1e-3


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(seed=st.integers(0, 1000), num_timesteps=st.sampled_from([20, 4000]))
def test_rescaled_mse_is_hybrid_with_lambda_1e3(seed, num_timesteps):
  betas = diffusion.get_beta_schedule('cosine', num_timesteps=num_timesteps)
  x0, _, key, _ = _data('float32', num_timesteps, seed)
  t = jax.random.randint(jax.random.key(seed + 1), (5,), 0, num_timesteps)
  model_fn = make_model(PARAMS, True, num_timesteps)
  results = [diffusion.training_losses(
      diffusion.make_coefficients(betas, var_type='learned', loss_type=loss_type), model_fn,
      jnp.asarray(x0), t, key) for loss_type in ('rescaled_mse', 'hybrid')]
  for name in ('loss', 'mse', 'vb'):
    np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-6)


def test_training_losses_jit():
  coefs = diffusion.make_coefficients(small_betas(), var_type='learned_range', loss_type='hybrid')
  x0, t, key, _ = _data('float32', 20)

  @jax.jit
  def losses(params, x, tt, k):
    return diffusion.training_losses(coefs, make_model(params, True, 20), x, tt, k)

  jitted = losses(PARAMS, jnp.asarray(x0), jnp.asarray(t), key)
  eager = diffusion.training_losses(coefs, make_model(PARAMS, True, 20), jnp.asarray(x0),
                                    jnp.asarray(t), key)
  for name in eager:
    np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('var_type,loss_type,match', [
    ('learned_range', 'mse', r"loss_type='mse'.*var_type='learned_range'"),
    ('learned', 'mse', r"loss_type='mse'.*var_type='learned'"),
    ('fixed_large', 'hybrid', r"loss_type='hybrid'.*var_type='fixed_large' is fixed"),
    ('fixed_small', 'rescaled_mse', r"loss_type='rescaled_mse'.*var_type='fixed_small'"),
])
def test_incompatible_loss_and_variance_raise(var_type, loss_type, match):
  coefs = diffusion.make_coefficients(small_betas(), var_type=var_type, loss_type=loss_type)
  x0, t, key, _ = _data('float32', 20)
  model_fn = make_model(PARAMS, var_type in LEARNED, 20)
  with pytest.raises(ValueError, match=match):
    diffusion.training_losses(coefs, model_fn, jnp.asarray(x0), jnp.asarray(t), key)


def test_bad_inputs_raise():
  coefs = diffusion.make_coefficients(small_betas(), var_type='learned_range', loss_type='hybrid')
  x0, t, key, _ = _data('float32', 20)
  with pytest.raises(ValueError, match=r'model_output must have shape \[5, 4, 4, 6\]'):
    diffusion.training_losses(coefs, make_model(PARAMS, False, 20), jnp.asarray(x0),
                              jnp.asarray(t), key)
  with pytest.raises(ValueError, match='x_start must be a float array'):
    diffusion.training_losses(coefs, make_model(PARAMS, True, 20), jnp.zeros(SHAPE, jnp.uint8),
                              jnp.asarray(t), key)
  with pytest.raises(ValueError, match=r't must lie in \[0, 19\]'):
    diffusion.training_losses(coefs, make_model(PARAMS, True, 20), jnp.asarray(x0),
                              np.array([0, 1, 2, 3, 25]), key)
