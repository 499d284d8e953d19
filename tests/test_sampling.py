"""Samplers vs float64 numpy steps; reproducibility, respacing, DDIM, progressive, interpolation."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, TEST_XLA_FLAGS, cpu_mesh, ops_by_library, random_params, run_with_devices, tiny_config
from ddpm_jax import diffusion, models, parallel, sampling
from ddpm_jax.sampling import loop

T = 10
BETAS = np.linspace(1e-3, 0.2, T)
SHAPE = (4, 8, 8, 1)


def toy_model_fn(x, t):
  """A fixed linear 'network', so every reference can be written by hand: eps = 0.3 x + 0.05 t."""
  return 0.3 * x + 0.05 * t[:, None, None, None].astype(x.dtype)


def coefs_for(var_type='fixed_large', **kw):
  return diffusion.make_coefficients(BETAS, var_type=var_type, **kw)


def keys_for(indices, seed=0):
  return sampling.per_sample_keys(jax.random.key(seed), jnp.asarray(indices, jnp.int32))


# --- float64 numpy reference of DDPM eq. 4-7, Alg. 2 and DDIM eq. 12 ------------------------------

def ref_tables():
  alphas = 1.0 - BETAS
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = BETAS * (1.0 - abar_prev) / (1.0 - abar)
  return alphas, abar, abar_prev, post_var


def ref_x0_and_eps(x, t, clip):
  _, abar, _, _ = ref_tables()
  a = abar[t][:, None, None, None]
  eps = 0.3 * x + 0.05 * t[:, None, None, None]
  x0 = (x - np.sqrt(1.0 - a) * eps) / np.sqrt(a)
  if clip:
    x0 = np.clip(x0, -1.0, 1.0)
    eps = (x - np.sqrt(a) * x0) / np.sqrt(1.0 - a)
  return x0, eps


def ref_ancestral_step(x, t, z, var_type, clip):
  alphas, abar, abar_prev, post_var = ref_tables()
  x0, _ = ref_x0_and_eps(x, t, clip)
  col = lambda v: v[t][:, None, None, None]
  mean = (col(np.sqrt(abar_prev) * BETAS / (1.0 - abar)) * x0
          + col(np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar)) * x)
  if var_type == 'fixed_large':
    var = np.append(post_var[1], BETAS[1:])  # beta_t, with beta~_2 at t = 1
  else:
    var = np.append(post_var[1], post_var[1:])  # beta~_t, its log clipped at t = 1
  nonzero = (t > 0)[:, None, None, None]
  return mean + nonzero * np.sqrt(col(var)) * z


def ref_ddim_step(x, t, z, eta, clip):
  _, abar, abar_prev, _ = ref_tables()
  x0, eps = ref_x0_and_eps(x, t, clip)
  a, ap = abar[t][:, None, None, None], abar_prev[t][:, None, None, None]
  sigma = eta * np.sqrt((1.0 - ap) / (1.0 - a)) * np.sqrt(1.0 - a / ap)
  nonzero = (t > 0)[:, None, None, None]
  return np.sqrt(ap) * x0 + np.sqrt(1.0 - ap - sigma**2) * eps + nonzero * sigma * z


def _step_inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=SHAPE) * 1.5
  z = rng.normal(size=SHAPE)
  t = np.array([0, 1, 5, T - 1])
  return x, t, z


@pytest.mark.parametrize('var_type', ['fixed_large', 'fixed_small'])
@pytest.mark.parametrize('clip', [True, False])
def test_one_ancestral_step_matches_float64_reference(var_type, clip):
  x, t, z = _step_inputs()
  got = sampling.p_sample(coefs_for(var_type), toy_model_fn, jnp.float32(x),
                          jnp.asarray(t, jnp.int32), jnp.float32(z), clip_denoised=clip)
  want = ref_ancestral_step(x, t, z, var_type, clip)
  np.testing.assert_allclose(got['sample'], want, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(got['pred_xstart'], ref_x0_and_eps(x, t, clip)[0], rtol=1e-5,
                             atol=2e-5)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('clip', [True, False])
def test_one_ddim_step_matches_float64_reference(eta, clip):
  x, t, z = _step_inputs(1)
  got = sampling.ddim_sample(coefs_for(), toy_model_fn, jnp.float32(x), jnp.asarray(t, jnp.int32),
                             jnp.float32(z), eta=eta, clip_denoised=clip)
  np.testing.assert_allclose(got['sample'], ref_ddim_step(x, t, z, eta, clip), rtol=1e-5, atol=2e-5)


def test_ddim_with_eta_one_has_the_ddpm_posterior_variance():
  # DDIM eq. 16: eta = 1 gives sigma_t^2 = beta~_t, the fixed_small variance of DDPM.
  x, t, _ = _step_inputs(2)
  t = np.array([1, 3, 5, 9])
  x, t_j = jnp.float32(x), jnp.asarray(t, jnp.int32)
  zeros, ones = jnp.zeros(SHAPE), jnp.ones(SHAPE)
  coefs = coefs_for('fixed_small')
  step = lambda z: sampling.ddim_sample(coefs, toy_model_fn, x, t_j, z, eta=1.0)['sample']
  sigma = np.asarray(step(ones) - step(zeros))[:, 0, 0, 0]
  np.testing.assert_allclose(sigma**2, ref_tables()[3][t], rtol=1e-4)


def test_ddim_eta_zero_is_deterministic_given_x_T():
  coefs = coefs_for()
  x_T = jax.random.normal(jax.random.key(7), SHAPE)
  run = jax.jit(lambda keys: sampling.ddim_sample_loop(coefs, toy_model_fn, keys, SHAPE, eta=0.0,
                                                       noise=x_T))
  a, b = run(keys_for(range(4), seed=0)), run(keys_for(range(4), seed=123))
  np.testing.assert_array_equal(a, b)
  with_noise = sampling.ddim_sample_loop(coefs, toy_model_fn, keys_for(range(4), 123), SHAPE,
                                         eta=1.0, noise=x_T)
  assert not np.allclose(a, with_noise)  # the keys do matter once eta > 0


def test_respacing_with_all_steps_equals_full_ancestral_sampling():
  full = coefs_for()
  respaced = diffusion.respaced_coefficients(BETAS, diffusion.space_timesteps(T, str(T)),
                                             var_type='fixed_large')
  keys = keys_for(range(4))
  a = sampling.p_sample_loop(full, toy_model_fn, keys, SHAPE)
  b = sampling.p_sample_loop(respaced, toy_model_fn, keys, SHAPE)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_respaced_sampler_shows_the_network_the_original_timesteps():
  respaced = diffusion.respaced_coefficients(BETAS, [0, 4, 9], var_type='fixed_large')
  seen = []

  def spy(x, t):
    jax.debug.callback(lambda v: seen.append(int(v[0])), t)
    return toy_model_fn(x, t)
  jax.block_until_ready(sampling.p_sample_loop(respaced, spy, keys_for(range(4)), SHAPE))
  assert seen == [9, 4, 0]


def test_ancestral_samples_are_finite_and_clipped_into_range():
  x0 = sampling.p_sample_loop(coefs_for(), toy_model_fn, keys_for(range(4)), SHAPE)
  assert np.all(np.isfinite(x0)) and float(jnp.min(x0)) >= -1.0 and float(jnp.max(x0)) <= 1.0
  # Without clipping the toy model's x0_hat leaves [-1, 1]: the test above is not vacuous.
  raw = sampling.p_sample_loop(coefs_for(), toy_model_fn, keys_for(range(4)), SHAPE,
                               clip_denoised=False)
  assert np.all(np.isfinite(raw)) and float(jnp.max(jnp.abs(raw))) > 1.0


def test_sample_depends_only_on_its_key_not_on_the_batch():
  coefs = coefs_for()
  big = sampling.p_sample_loop(coefs, toy_model_fn, keys_for(range(8)), (8,) + SHAPE[1:])
  small = sampling.p_sample_loop(coefs, toy_model_fn, keys_for([4, 5, 6, 7]), SHAPE)
  np.testing.assert_array_equal(big[4:], small)


def test_reverse_loop_rejects_bad_keys():
  with pytest.raises(ValueError, match='keys must be a typed key array of shape'):
    raw_keys = jax.random.split(jax.random.PRNGKey(0), 3)
    sampling.p_sample_loop(coefs_for(), toy_model_fn, raw_keys, SHAPE)


_AT_O0 = bool(TEST_XLA_FLAGS) and TEST_XLA_FLAGS in os.environ.get('XLA_FLAGS', '')


@pytest.mark.skipif(_AT_O0, reason='compares two compiled loops bit for bit, which holds at XLA\'s '
                    'default optimization: run by test_progressive_at_default_xla_optimization')
def test_progressive_records_x0_predictions_and_ends_with_the_sample():
  coefs = coefs_for()
  step = sampling.make_step_fn(coefs, toy_model_fn, method='ancestral')
  keys = keys_for(range(4))
  x0, records = sampling.progressive_sample_loop(coefs, step, keys, SHAPE, every=4)
  np.testing.assert_array_equal(sampling.recorded_steps(T, 4), [9, 5, 1, 0])
  assert records.shape == (4, 4) + SHAPE[1:]
  np.testing.assert_array_equal(x0, sampling.p_sample_loop(coefs, toy_model_fn, keys, SHAPE))
  np.testing.assert_array_equal(records[:, -1], x0)  # x0_hat at t=1 is the (clipped) sample itself
  # Column 0 is x0_hat from x_T: the reference formula applied to the very first state.
  x_T = np.asarray(loop.prior_noise(keys, T, SHAPE[1:]), np.float64)
  np.testing.assert_allclose(records[:, 0], ref_x0_and_eps(x_T, np.full(4, T - 1), True)[0],
                             rtol=1e-5, atol=1e-5)


def test_interpolation_ends_decode_each_image_noised_with_the_same_noise():
  coefs = coefs_for()
  step = sampling.make_step_fn(coefs, toy_model_fn, method='ancestral')
  rng = np.random.default_rng(3)
  x_a, x_b = (jnp.float32(rng.uniform(-1, 1, size=(2, 8, 8, 1))) for _ in range(2))
  keys, t = keys_for([0, 1]), 5
  out = sampling.interpolate(coefs, step, x_a, x_b, jnp.linspace(0.0, 1.0, 5), t, keys)
  assert out.shape == (2, 5, 8, 8, 1)
  for x, column in ((x_a, 0), (x_b, -1)):
    want = sampling.decode(step, sampling.encode(coefs, x, t, keys), t, keys)
    np.testing.assert_allclose(out[:, column], want, atol=1e-6)
  # Both ends were noised with the same eps: x_t(b) - x_t(a) = sqrt(abar_t) (x_b - x_a).
  diff = sampling.encode(coefs, x_b, t, keys) - sampling.encode(coefs, x_a, t, keys)
  np.testing.assert_allclose(diff, np.sqrt(ref_tables()[1][t]) * (x_b - x_a), atol=1e-5)
  with pytest.raises(ValueError, match='interpolation step t=10'):
    sampling.encode(coefs, x_a, T, keys)


def _unet_sample_fn(config, mesh):
  model = models.create_model(config)
  return sampling.make_sample_fn(config, model, mesh)


@pytest.fixture(scope='module')
def unet_params():
  return random_params(tiny_config())


def test_make_sample_fn_is_independent_of_batch_size_and_in_range(unet_params):
  config, params = tiny_config(), unet_params
  sample_fn = _unet_sample_fn(config, parallel.create_mesh())
  key = jax.random.key(42)
  eight = np.asarray(sample_fn(params, key, np.arange(8)))
  four = np.asarray(sample_fn(params, key, np.arange(4, 8)))
  np.testing.assert_allclose(eight[4:], four, atol=1e-6)
  assert eight.shape == (8, 8, 8, 1) and np.all(np.isfinite(eight))
  assert eight.min() >= -1.0 and eight.max() <= 1.0 and eight.std() > 0.05
  assert not np.allclose(eight[0], eight[1])


@pytest.mark.parametrize('method, respacing', [('ddim', 'ddim5'), ('ancestral', '5')])
def test_make_sample_fn_follows_config_sampling(method, respacing, unet_params):
  config, params = tiny_config(), unet_params
  config.sampling.method, config.sampling.timestep_respacing = method, respacing
  got = _unet_sample_fn(config, parallel.create_mesh())(params, jax.random.key(0), np.arange(4))
  coefs = diffusion.coefficients_from_config(config.diffusion, respacing=respacing)
  model_fn = sampling.make_model_fn(models.create_model(config), params)
  keys = keys_for(range(4))
  loop_fn = sampling.ddim_sample_loop if method == 'ddim' else sampling.p_sample_loop
  np.testing.assert_allclose(got, jnp.clip(loop_fn(coefs, model_fn, keys, (4, 8, 8, 1)), -1, 1),
                             atol=1e-6)


def test_cpu_sample_reductions_pick_the_kernels_and_agree(unet_params):
  """runtime.cpu_sample_reductions (issue #16): 'xla' compiles the sampler with XLA's own reductions (the
  CPU default, YNNPACK's, made GroupNorm's moments a third of the digits sampler's time on an Intel Xeon)
  and keeps YNNPACK's convolutions; 'ynnpack' is XLA:CPU's default; the samples agree to float32
  rounding; a bad value is a config error."""
  config, params = tiny_config(), unet_params
  assert config.runtime.cpu_sample_reductions == 'xla'
  mesh, model = cpu_mesh(), models.create_model(config)
  args = (parallel.replicate(params, mesh), jax.random.key(3), jnp.arange(4))
  out = {}
  for kernels in ('ynnpack', 'xla'):
    config.runtime.cpu_sample_reductions = kernels
    compiled = sampling.jit_sample(config, model, mesh).lower(*args).compile()  # make_sample_fn's program
    hlo = compiled.as_text()
    out[kernels] = (ops_by_library(hlo, 'reduce'), ops_by_library(hlo, 'convolution'),
                    np.asarray(compiled(*args)))
  (ynn_reduce, ynn_conv, ynn_samples), (xla_reduce, xla_conv, xla_samples) = out['ynnpack'], out['xla']
  assert ynn_reduce[0] > 0 and xla_reduce[0] == 0 and xla_reduce[1] > 0, (ynn_reduce, xla_reduce)
  assert ynn_conv == xla_conv and xla_conv[0] > 0, (ynn_conv, xla_conv)  # YNNPACK's convolutions stay
  np.testing.assert_allclose(xla_samples, ynn_samples, atol=1e-5)
  config.runtime.cpu_sample_reductions = 'eigen'
  from ddpm_jax.config import validate_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"config\.runtime\.cpu_sample_reductions='eigen' is invalid: allowed"):
    validate_config(config)


def test_sample_fn_rejects_indices_not_divisible_by_devices():
  config = tiny_config()
  sample_fn = _unet_sample_fn(config, parallel.create_mesh())
  with pytest.raises(ValueError, match='indices must be an integer array'):
    sample_fn(None, jax.random.key(0), np.zeros((2, 2), np.int32))


@pytest.mark.slow
@pytest.mark.multidevice
def test_samples_are_identical_on_1_and_8_devices(tmp_path, unet_params):
  config, params = tiny_config(), unet_params
  one = np.asarray(_unet_sample_fn(config, parallel.create_mesh())(params, jax.random.key(5),
                                                                     np.arange(8)))
  out = os.path.join(tmp_path, 'eight.npy')
  run_with_devices(f"""
      import sys; sys.path.insert(0, 'tests')
      import jax, numpy as np
      from conftest import random_params, tiny_config
      from ddpm_jax import models, parallel, sampling
      assert jax.device_count() == 8
      config = tiny_config()
      mesh = parallel.create_mesh()
      params = parallel.replicate(random_params(config), mesh)
      fn = sampling.make_sample_fn(config, models.create_model(config), mesh)
      samples = fn(params, jax.random.key(5), np.arange(8))
      assert len(samples.sharding.device_set) == 8
      np.save({out!r}, np.asarray(samples))
  """, 8)
  np.testing.assert_allclose(np.load(out), one, atol=1e-5)


@pytest.mark.skipif(not _AT_O0, reason='this process compiles at the default: the test above ran here')
def test_progressive_at_default_xla_optimization():
  """The test above in a fresh pytest at XLA's default optimization (the suite compiles at -O0, where
  the two loops may differ in the last bit; see conftest.TEST_XLA_FLAGS)."""
  env = dict(os.environ, DDPM_JAX_TEST_XLA_FLAGS='',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '').replace(TEST_XLA_FLAGS, '').strip())
  name = 'test_progressive_records_x0_predictions_and_ends_with_the_sample'
  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist',
                         f'{os.path.abspath(__file__)}::{name}'], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0 and '1 passed' in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.multidevice
def test_the_cpu_sampler_is_deterministic_on_one_device_per_core():
  """The CPU layout of issue #16 (one single-threaded device per core) with the sampler as ddpm_jax compiles
  it (`jit_sample`: YNNPACK's convolutions): the same call gives the same samples every time. XLA:CPU's own
  convolutions fail this in jaxlib 0.10.2 (the first rows of each device's shard change from call to call,
  by up to 0.5 here: a race inside the sampling loop; BENCHMARKS.md "Back on Zen 3"), which is why the
  sampler never gets them. Needs the digits network at 125 samples a device, 20 steps, weights that are
  not a fresh initialisation (whose zero output layer makes every sample independent of the network)."""
  run_with_devices("""
      import sys; sys.path.insert(0, 'tests')
      import jax, numpy as np
      from conftest import random_params
      from configs import digits
      from ddpm_jax import models, parallel, sampling
      assert jax.device_count() == 2
      config = digits.get_config()
      config.sampling.timestep_respacing = 'ddim20'
      mesh = parallel.create_mesh()
      params = parallel.replicate(random_params(config, 3), mesh)
      fn = sampling.make_sample_fn(config, models.create_model(config), mesh)
      first = np.asarray(fn(params, jax.random.key(0), np.arange(250)))
      assert np.isfinite(first).all()
      for call in range(1, 6):
        again = np.asarray(fn(params, jax.random.key(0), np.arange(250)))
        rows = np.nonzero(np.abs(again - first).max(axis=(1, 2, 3)))[0]
        assert rows.size == 0, f'call {call} changed rows {rows.tolist()} by up to {np.abs(again - first).max()}'
  """, 2, env={'XLA_FLAGS': f'--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false '
                            f'{TEST_XLA_FLAGS}'.strip()})
