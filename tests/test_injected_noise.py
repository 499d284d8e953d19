"""Injected noise (issue #14 item 4): given eps in training_losses, given x_T and per-step z in the
sampling loops, so another codebase's trajectory can be replayed step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling
from references import grid_images, ref_extract, ref_p_mean_variance, ref_tables, small_betas

SHAPE = (3, 4, 4, 2)
T = 6


def linear_model(backend=jnp):
  """eps_theta(x_t, t) = 0.3 x_t - 0.2 t / T: simple enough for a float64 re-implementation."""
  def model_fn(x, t):
    time = backend.reshape(backend.asarray(t, x.dtype) / T, (-1, 1, 1, 1))
    return 0.3 * x - 0.2 * time
  return model_fn


def _draws(seed: int = 0):
  rng = np.random.default_rng(seed)
  x_T = rng.standard_normal(SHAPE).astype(np.float32)
  z = rng.standard_normal((T,) + SHAPE).astype(np.float32)
  return x_T, z


def ref_ancestral(betas, x_T, z, var_type: str, clip: bool) -> np.ndarray:
  """DDPM Algorithm 2 in float64 numpy: x_{t-1} = mu + sigma z_t (no noise at t = 0)."""
  x = x_T.astype(np.float64)
  model_fn = linear_model(np)
  for t in reversed(range(len(betas))):
    tt = np.full((x.shape[0],), t)
    out = ref_p_mean_variance(betas, 'eps', var_type, model_fn(x, tt), x, tt, clip=clip)
    x = out['mean'] + (t > 0) * np.exp(0.5 * out['log_variance']) * z[t]
  return x


@pytest.mark.parametrize('var_type', ['fixed_large', 'fixed_small'])
@pytest.mark.parametrize('clip', [True, False])
def test_given_noise_reproduces_numpy_ancestral_steps(var_type, clip):
  betas = small_betas(T)
  coefs = diffusion.make_coefficients(betas, var_type=var_type)
  x_T, z = _draws()
  got = sampling.p_sample_loop(coefs, linear_model(), None, SHAPE, clip_denoised=clip,
                               noise=jnp.asarray(x_T), step_noise=jnp.asarray(z))
  want = ref_ancestral(betas, x_T, z, var_type, clip)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


def test_step_noise_array_function_and_keys_agree():
  """The default streams as a function of t give the identical chain; as an array, the same chain
  up to XLA's fusion of the loop body (float32 round-off)."""
  coefs = diffusion.make_coefficients(small_betas(T))
  keys = sampling.per_sample_keys(jax.random.key(3), jnp.arange(SHAPE[0]))
  x_T = sampling.prior_noise(keys, T, SHAPE[1:])
  z = jnp.stack([sampling.per_sample_normal(keys, t, SHAPE[1:]) for t in range(T)])
  by_keys = sampling.p_sample_loop(coefs, linear_model(), keys, SHAPE)
  by_array = sampling.p_sample_loop(coefs, linear_model(), None, SHAPE, noise=x_T, step_noise=z)
  by_fn = sampling.p_sample_loop(coefs, linear_model(), keys, SHAPE,
                                 step_noise=lambda t: sampling.per_sample_normal(keys, t, SHAPE[1:]))
  np.testing.assert_array_equal(by_keys, by_fn)
  np.testing.assert_allclose(by_keys, by_array, rtol=1e-5, atol=1e-6)


def test_ddim_takes_step_noise():
  coefs = diffusion.make_coefficients(small_betas(T))
  x_T, z = _draws(1)
  a = sampling.ddim_sample_loop(coefs, linear_model(), None, SHAPE, eta=1.0,
                                noise=jnp.asarray(x_T), step_noise=jnp.asarray(z))
  b = sampling.ddim_sample_loop(coefs, linear_model(), None, SHAPE, eta=1.0,
                                noise=jnp.asarray(x_T), step_noise=jnp.asarray(2 * z))
  assert not np.allclose(a, b)  # the injected noise is used
  # eta = 0 ignores it: deterministic given x_T.
  c = sampling.ddim_sample_loop(coefs, linear_model(), None, SHAPE, noise=jnp.asarray(x_T),
                                step_noise=jnp.asarray(z))
  d = sampling.ddim_sample_loop(coefs, linear_model(), None, SHAPE, noise=jnp.asarray(x_T),
                                step_noise=jnp.asarray(2 * z))
  np.testing.assert_array_equal(c, d)


def test_reverse_loop_records_with_step_noise():
  coefs = diffusion.make_coefficients(small_betas(T))
  x_T, z = _draws(2)

  def step(x, t, noise):
    return sampling.p_sample(coefs, linear_model(), x, t, noise)

  x0, records = sampling.sample_loop(step, None, SHAPE, T, jnp.float32, noise=jnp.asarray(x_T),
                                     step_noise=jnp.asarray(z), record_every=2)
  np.testing.assert_allclose(x0, ref_ancestral(small_betas(T), x_T, z, 'fixed_large', True),
                             rtol=2e-5, atol=2e-5)
  assert records.shape == (4,) + SHAPE  # steps 5, 3, 1 and 0


def test_bad_step_noise_and_missing_keys_are_refused():
  coefs = diffusion.make_coefficients(small_betas(T))
  x_T, z = _draws()
  with pytest.raises(ValueError, match='step_noise must be'):
    sampling.p_sample_loop(coefs, linear_model(), None, SHAPE, noise=jnp.asarray(x_T),
                           step_noise=jnp.asarray(z[:-1]))
  with pytest.raises(ValueError, match='needs keys'):
    sampling.p_sample_loop(coefs, linear_model(), None, SHAPE, step_noise=jnp.asarray(z))
  with pytest.raises(ValueError, match='keys must be'):
    sampling.p_sample_loop(coefs, linear_model(), None, SHAPE, noise=jnp.asarray(x_T))


@pytest.mark.parametrize('mean_type', ['eps', 'x0'])
def test_training_losses_with_given_noise_match_hand_computation(mean_type):
  betas = small_betas(T)
  coefs = diffusion.make_coefficients(betas, mean_type=mean_type)
  rng = np.random.default_rng(4)
  x0 = grid_images(rng, SHAPE).astype(np.float32)
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  t = np.array([0, 2, 5])
  got = diffusion.training_losses(coefs, linear_model(), jnp.asarray(x0), jnp.asarray(t), None,
                                  noise=jnp.asarray(noise))
  r = {k: ref_extract(v, t) for k, v in ref_tables(betas).items()}
  x_t = np.sqrt(r['abar']) * x0 + np.sqrt(r['one_minus_abar']) * noise  # DDPM eq. 4
  target = noise if mean_type == 'eps' else x0
  mse = ((target - linear_model(np)(x_t, t))**2).reshape(len(t), -1).mean(axis=1)  # eq. 14
  np.testing.assert_allclose(got['mse'], mse, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got['loss'], got['mse'])


def test_training_losses_given_noise_equals_keyed_draw():
  """noise=normal(key) reproduces the default path bit for bit."""
  coefs = diffusion.make_coefficients(small_betas(T))
  x0 = jnp.asarray(grid_images(np.random.default_rng(5), SHAPE), jnp.float32)
  t, key = jnp.array([1, 3, 4]), jax.random.key(7)
  keyed = diffusion.training_losses(coefs, linear_model(), x0, t, key)
  given = diffusion.training_losses(coefs, linear_model(), x0, t, None,
                                    noise=jax.random.normal(key, SHAPE, jnp.float32))
  np.testing.assert_array_equal(keyed['loss'], given['loss'])
  with pytest.raises(ValueError, match='shape of x_start'):
    diffusion.training_losses(coefs, linear_model(), x0, t, None, noise=jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match='needs a key'):
    diffusion.training_losses(coefs, linear_model(), x0, t, None)
