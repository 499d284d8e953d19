"""improved-diffusion's conventions as config options (issue #14 item 1).

rescale_timesteps: the network sees the float t * 1000 / T, and when respaced timestep_map[t] * 1000
/ T_original (improved-diffusion's `_scale_timesteps` and respace.py's `_WrappedModel`), in
training, sampling and the bound alike, since all of them call `diffusion.model_output`.
rescale_learned_sigmas: improved-diffusion's RESCALED_MSE, L_simple + (T / 1000) L_{t-1}.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import diffusion, models
from ddpm_jax.config import validate_config
from ddpm_jax.sampling import p_sample
from references import grid_images, t_values
from test_diffusion_losses import make_model, ref_training_losses

SHAPE = (4, 4, 4, 3)


def _diffusion_config(**overrides) -> ml_collections.ConfigDict:
  from configs import default  # pylint: disable=import-outside-toplevel
  c = default.get_config().diffusion
  c.num_timesteps = 10
  c.update(overrides)
  return c


class Recorder:
  """A model_fn (run eagerly) that keeps every timestep input it was given."""

  def __init__(self, out_channels: int = 3):
    self.seen = []
    self.out_channels = out_channels

  def __call__(self, x, t):
    self.seen.append(np.asarray(t))
    return jnp.zeros(x.shape[:-1] + (self.out_channels,), x.dtype) + 0.1 * x[..., :1]


def _expected(timestep_map, t, original_t):
  """improved-diffusion: map_tensor[ts].float() * (1000.0 / original_num_steps), in float32."""
  return np.asarray(timestep_map)[t].astype(np.float32) * np.float32(1000.0 / original_t)


def test_defaults_are_off():
  c = _diffusion_config()
  assert c.rescale_timesteps is False and c.rescale_learned_sigmas is False
  coefs = diffusion.coefficients_from_config(c)
  assert coefs.timestep_scale is None and coefs.loss_type == 'mse'
  recorder = Recorder()
  t = jnp.array([0, 3, 5, 9])
  diffusion.model_output(coefs, recorder, jnp.zeros(SHAPE), t)
  assert recorder.seen[0].dtype == np.int32
  np.testing.assert_array_equal(recorder.seen[0], [0, 3, 5, 9])


@pytest.mark.parametrize('respacing', ['', '5', '2,3'])
def test_model_sees_rescaled_timesteps_in_training_sampling(respacing):
  c = _diffusion_config(rescale_timesteps=True)
  coefs = diffusion.coefficients_from_config(c, respacing=respacing)
  k = coefs.num_timesteps
  assert coefs.timestep_scale == 1000.0 / 10  # the ORIGINAL T, even when respaced
  t = jnp.asarray(np.arange(k)[::-1][:4] % k, jnp.int32)
  want = _expected(coefs.timestep_map, np.asarray(t), 10)
  x = jnp.asarray(grid_images(np.random.default_rng(0), SHAPE), jnp.float32)

  for call in (
      lambda m: diffusion.model_output(coefs, m, x, t),
      lambda m: diffusion.training_losses(coefs, m, x, t, jax.random.key(0)),
      lambda m: p_sample(coefs, m, x, t, jnp.zeros_like(x)),
  ):
    recorder = Recorder()
    call(recorder)
    assert len(recorder.seen) == 1
    assert recorder.seen[0].dtype == np.float32
    np.testing.assert_array_equal(recorder.seen[0], want)
  if respacing:  # e.g. '5' of T = 10 keeps 0, 2, 4, 7, 9: the network sees 900, 700, ... not k-based
    assert set(np.asarray(coefs.timestep_map)) != set(range(k))


def test_bound_sees_rescaled_timesteps():
  c = _diffusion_config(rescale_timesteps=True, var_type='learned_range', loss_type='hybrid')
  coefs = diffusion.coefficients_from_config(c)
  recorder = Recorder(out_channels=6)
  x = jnp.asarray(grid_images(np.random.default_rng(1), SHAPE), jnp.float32)
  t = jnp.array([0, 1, 4, 9])
  diffusion.training_losses(coefs, recorder, x, t, jax.random.key(1))
  np.testing.assert_array_equal(recorder.seen[0], _expected(np.arange(10), [0, 1, 4, 9], 10))


def test_unet_accepts_float_timesteps():
  """The sinusoidal embedding takes real t: a float t equal to an int t gives the same output."""
  model = models.UNet(ch=32, out_ch=3, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
  params = models.init_params(model, jax.random.key(0), 8, 3)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)
  out_int = model.apply({'params': params}, x, jnp.array([3, 700]), train=False)
  out_float = model.apply({'params': params}, x, jnp.array([3.0, 700.0]), train=False)
  np.testing.assert_array_equal(out_int, out_float)
  out_frac = model.apply({'params': params}, x, jnp.array([3.5, 700.25]), train=False)
  assert np.all(np.isfinite(out_frac))


@pytest.mark.parametrize('mean_type,var_type', [('eps', 'learned_range'), ('x0', 'learned')])
def test_rescale_learned_sigmas_weights_the_bound_by_t_over_1000(mean_type, var_type):
  """improved-diffusion's RESCALED_MSE: loss = mse + (T / 1000) vb, against the float64 reference."""
  num_timesteps = 20
  c = _diffusion_config(num_timesteps=num_timesteps, beta_schedule='cosine', mean_type=mean_type,
                        var_type=var_type, loss_type='mse', rescale_learned_sigmas=True)
  betas = diffusion.get_beta_schedule(c.beta_schedule, num_timesteps=num_timesteps,
                                      beta_start=c.beta_start, beta_end=c.beta_end)
  coefs = diffusion.coefficients_from_config(c)
  assert coefs.loss_type == 'rescaled_mse'
  rng = np.random.default_rng(2)
  x0 = grid_images(rng, SHAPE).astype(np.float32)
  t = t_values(num_timesteps)[:SHAPE[0]]
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  params = {'a': 0.3 if mean_type == 'eps' else 1.0, 'b': -0.2, 'c': 0.5, 'd': -0.1}
  got = diffusion.training_losses(coefs, make_model(params, True, num_timesteps), jnp.asarray(x0),
                                  jnp.asarray(t), None, noise=jnp.asarray(noise))
  want = ref_training_losses(betas, mean_type, var_type, 'rescaled_mse', x0.astype(np.float64), t,
                             noise.astype(np.float64), params=params)
  for name in ('mse', 'vb', 'loss'):
    np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-5)
  # The weight itself, in numpy: loss - mse = (T / 1000) vb.
  np.testing.assert_allclose(np.asarray(got['loss'] - got['mse']),
                             num_timesteps / 1000.0 * np.asarray(got['vb']), rtol=1e-5, atol=1e-7)


def test_rescale_learned_sigmas_keeps_a_fixed_variance_plain_mse():
  """With a fixed variance improved-diffusion's RESCALED_MSE adds no bound term: plain 'mse'."""
  coefs = diffusion.coefficients_from_config(_diffusion_config(rescale_learned_sigmas=True))
  assert coefs.loss_type == 'mse'


def _config(**diffusion_overrides):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.diffusion.update(diffusion_overrides)
  return config


def test_config_accepts_improved_diffusion_flags():
  validate_config(_config(rescale_timesteps=True))
  config = _config(var_type='learned_range', loss_type='mse', rescale_learned_sigmas=True)
  config.model.learn_sigma = True
  validate_config(config)


@pytest.mark.parametrize('loss_type', ['kl', 'rescaled_kl', 'hybrid'])
def test_config_rejects_rescale_learned_sigmas_with_another_loss(loss_type):
  """The flag chooses between improved-diffusion's MSE and RESCALED_MSE only."""
  with pytest.raises(ValueError, match='config.diffusion.rescale_learned_sigmas=True is invalid'):
    validate_config(_config(rescale_learned_sigmas=True, loss_type=loss_type))


def test_config_rejects_non_bool_flag():
  config = _config()
  del config.diffusion['rescale_timesteps']  # ConfigDict itself refuses a retyped field
  config.diffusion.rescale_timesteps = 1
  with pytest.raises(ValueError, match='config.diffusion.rescale_timesteps=1 is invalid'):
    validate_config(config)


def test_learned_mse_without_rescale_is_still_refused():
  config = _config(var_type='learned_range', loss_type='mse')
  config.model.learn_sigma = True
  with pytest.raises(ValueError, match='config.diffusion.loss_type='):
    validate_config(config)
