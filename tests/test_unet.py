"""Tests of the DDPM / iDDPM U-Net (ddpm_jax/models/unet.py, layers.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import _large256, cifar10, cifar10_iddpm, default
from ddpm_jax.config import validate_config
from ddpm_jax.models import count_params, create_model, init_params, layers, param_shapes, unet


def tiny_config(**model_fields):
  """8x8 RGB images, ch 32, levels 8x8 and 4x4, attention at 4x4: compiles in seconds on a core."""
  config = default.get_config()
  config.data.image_size = 8
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
  config.model.update(model_fields)
  return config


@pytest.fixture(scope='module')
def tiny_params():
  return init_params(create_model(tiny_config()), jax.random.key(0), 8, 3)


def randomize(params, seed, scale=0.05):
  """Adds numpy noise to every parameter, so that the zero-initialised layers contribute too."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(p + scale * rng.standard_normal(p.shape), jnp.float32), params)


def inputs(seed, batch, size, channels=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1.0, 1.0, (batch, size, size, channels)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  return x, t


def forward(model, train=False):
  return jax.jit(lambda p, x, t, key: model.apply({'params': p}, x, t, train=train,
                                                  rngs={'dropout': key}))


def learned_sigma_cifar10():
  config = cifar10.get_config()
  config.model.learn_sigma = True
  return config


@pytest.mark.parametrize('make_config, expected', [
    (cifar10.get_config, 35_746_307),
    (learned_sigma_cifar10, 35_749_766),
    (lambda: _large256.get_config('celeb_a_hq/256'), 113_673_219),
    (cifar10_iddpm.get_config, 52_546_438),
])
def test_parameter_counts_match_the_papers(make_config, expected):
  assert count_params(param_shapes(make_config())) == expected


def test_parameters_are_float32_and_named_like_the_tf_scopes():
  shapes = param_shapes(cifar10.get_config())
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype('float32')}
  assert set(shapes) == {'temb', 'conv_in', 'down_0', 'down_1', 'down_2', 'down_3', 'mid', 'up_0',
                         'up_1', 'up_2', 'up_3', 'norm_out', 'conv_out'}
  # Attention only at 16x16 (level 1), after each block; down_3 (4x4) has no downsample.
  assert set(shapes['down_1']) == {'block_0', 'attn_0', 'block_1', 'attn_1', 'downsample'}
  assert set(shapes['down_3']) == {'block_0', 'block_1'}
  assert set(shapes['up_1']) == {f'{kind}_{i}' for kind in ('block', 'attn') for i in range(3)} | {
      'upsample'}
  assert set(shapes['up_0']) == {'block_0', 'block_1', 'block_2'}
  assert set(shapes['mid']) == {'block_1', 'attn_1', 'block_2'}
  assert set(shapes['down_1']['block_0']) == {'norm1', 'conv1', 'temb_proj', 'norm2', 'conv2',
                                              'nin_shortcut'}
  assert set(shapes['mid']['attn_1']) == {'norm', 'q', 'k', 'v', 'proj_out'}
  assert shapes['down_0']['downsample']['conv']['kernel'].shape == (3, 3, 128, 128)
  # Up blocks read concat[h, skip]: 256 from up_1 + a 128 skip from down_0, then 128 + 128.
  assert shapes['up_0']['block_0']['conv1']['kernel'].shape == (3, 3, 384, 128)
  assert shapes['up_0']['block_2']['conv1']['kernel'].shape == (3, 3, 256, 128)
  assert shapes['temb']['dense0']['kernel'].shape == (128, 512)


def _shapes_of_intermediates(config, batch=2):
  model = create_model(config)
  size = config.data.image_size
  params = param_shapes(config)
  x = jax.ShapeDtypeStruct((batch, size, size, config.data.num_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  _, state = jax.eval_shape(
      lambda p, x, t: model.apply({'params': p}, x, t, train=False, capture_intermediates=True,
                                  mutable=['intermediates']), params, x, t)
  return state['intermediates']


@pytest.mark.parametrize('make_config', [cifar10.get_config,
                                         lambda: _large256.get_config('lsun/church_outdoor')])
def test_shapes_at_every_resolution(make_config):
  config = make_config()
  ch, mult, blocks = config.model.ch, config.model.ch_mult, config.model.num_res_blocks
  size, batch = config.data.image_size, 2
  inter = _shapes_of_intermediates(config, batch)
  for level, m in enumerate(mult):
    res = size // 2 ** level
    outs = inter[f'down_{level}']['__call__'][0]
    expected = [(batch, res, res, ch * m)] * blocks
    if level != len(mult) - 1:
      expected.append((batch, res // 2, res // 2, ch * m))
    assert [o.shape for o in outs] == expected, level
    up = inter[f'up_{level}']['__call__'][0]
    up_res = res * 2 if level else res
    assert up.shape == (batch, up_res, up_res, ch * m), level
  low = size // 2 ** (len(mult) - 1)
  assert inter['mid']['__call__'][0].shape == (batch, low, low, ch * mult[-1])
  assert inter['temb']['__call__'][0].shape == (batch, 4 * ch)
  out = inter['__call__'][0]
  assert out.shape == (batch, size, size, 3) and out.dtype == jnp.float32


def test_learned_sigma_doubles_the_output_channels():
  config = tiny_config(learn_sigma=True)
  config.data.num_channels = 1
  model = create_model(config)
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out = jax.eval_shape(lambda p, x, t: model.apply({'params': p}, x, t, train=False),
                       param_shapes(config), x, t)
  assert out.shape == (2, 8, 8, 2)


def test_init_is_deterministic_for_a_fixed_key(tiny_params):
  model = create_model(tiny_config())
  again = init_params(model, jax.random.key(0), 8, 3)
  other = init_params(model, jax.random.key(1), 8, 3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, tiny_params, again)
  assert not np.array_equal(tiny_params['conv_in']['kernel'], other['conv_in']['kernel'])


def test_zero_initialised_layers_are_zero_and_the_others_variance_scaled(tiny_params):
  flat = traverse_util.flatten_dict(tiny_params)
  zero = {path: value for path, value in flat.items()
          if path[-2] in ('conv2', 'proj_out', 'conv_out')}
  # conv_out, 8 residual blocks (2 down, 2 mid, 4 up), 4 attention blocks (1 down, 1 mid, 2 up).
  assert len(zero) == 2 * (1 + 8 + 4)
  for path, value in zero.items():
    assert np.all(value == 0), path
  # variance_scaling(1, fan_avg, uniform) is U(-l, l) with l = sqrt(3 / ((fan_in + fan_out) / 2)).
  kernel = np.asarray(tiny_params['down_1']['block_0']['conv1']['kernel'])  # [3, 3, 32, 64]
  limit = math.sqrt(3.0 / ((9 * 32 + 9 * 64) / 2))
  assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit
  assert abs(kernel.std() / (limit / math.sqrt(3.0)) - 1.0) < 0.05
  dense = np.asarray(tiny_params['temb']['dense1']['kernel'])  # [128, 128]
  assert abs(dense.std() / math.sqrt(1.0 / 128) - 1.0) < 0.05
  norm = tiny_params['down_0']['block_0']['norm1']
  assert np.all(norm['scale'] == 1) and np.all(norm['bias'] == 0)
  x, t = inputs(1, 2, 8)
  out = forward(create_model(tiny_config()))(tiny_params, x, t, jax.random.key(0))
  np.testing.assert_array_equal(out, 0.0)


def test_dropout_is_active_only_in_training(tiny_params):
  params = randomize(tiny_params, 1)
  model = create_model(tiny_config(dropout=0.5))
  x, t = inputs(2, 2, 8)
  evaluate, train = forward(model, train=False), forward(model, train=True)
  key0, key1 = jax.random.key(0), jax.random.key(1)
  no_dropout = forward(create_model(tiny_config(dropout=0.0)))(params, x, t, key0)
  np.testing.assert_array_equal(evaluate(params, x, t, key0), no_dropout)
  np.testing.assert_array_equal(evaluate(params, x, t, key1), no_dropout)
  np.testing.assert_array_equal(train(params, x, t, key0), train(params, x, t, key0))
  assert not np.allclose(train(params, x, t, key0), train(params, x, t, key1))
  assert not np.allclose(train(params, x, t, key0), no_dropout)
  with pytest.raises(Exception, match='dropout'):  # a training pass needs a dropout key
    jax.eval_shape(lambda p: model.apply({'params': p}, x, t, train=True), params)


def test_timestep_embedding_formula():
  emb = np.asarray(layers.timestep_embedding(jnp.array([0, 7]), 8))
  freqs = np.exp(-np.arange(4) * np.log(10000.0) / 3)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(7 * freqs), np.cos(7 * freqs)]),
                             rtol=1e-6, atol=1e-6)
  assert layers.timestep_embedding(jnp.array([1]), 9).shape == (1, 9)


def _attention_reference(x, p, num_heads):
  """Plain numpy: GroupNorm(32), q, k, v, per head softmax(q k^T / sqrt(d)) v, proj_out, + x."""
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, 32, c // 32)
  mean, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
  n = ((g - mean) / np.sqrt(var + 1e-6)).reshape(b, h * w, c)
  n = n * p['norm']['scale'] + p['norm']['bias']
  q, k, v = (n @ p[name]['kernel'] + p[name]['bias'] for name in 'qkv')
  d = c // num_heads
  outs = []
  for i in range(num_heads):
    s = np.einsum('bqc,bkc->bqk', q[..., i * d:(i + 1) * d], k[..., i * d:(i + 1) * d]) / np.sqrt(d)
    s = np.exp(s - s.max(-1, keepdims=True))
    outs.append(np.einsum('bqk,bkc->bqc', s / s.sum(-1, keepdims=True), v[..., i * d:(i + 1) * d]))
  out = np.concatenate(outs, -1) @ p['proj_out']['kernel'] + p['proj_out']['bias']
  return x + out.reshape(b, h, w, c)


@pytest.mark.parametrize('num_heads', [1, 4])
def test_attention_matches_an_einsum_reference(num_heads):
  block = layers.AttnBlock(num_heads=num_heads)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 64)), jnp.float32)
  params = randomize(block.init(jax.random.key(1), x)['params'], 2, scale=0.2)
  got = block.apply({'params': params}, x)
  want = _attention_reference(np.asarray(x, np.float64),
                              jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params),
                              num_heads)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, x, atol=1e-2)  # the attention branch really contributes


def test_bfloat16_forward_stays_close_to_float32(tiny_params):
  params = randomize(tiny_params, 1)
  x, t = inputs(2, 4, 8)
  out32 = forward(create_model(tiny_config()))(params, x, t, jax.random.key(0))
  model16 = create_model(tiny_config(dtype='bfloat16'))
  out16, state = jax.jit(lambda p: model16.apply({'params': p}, x, t, train=False,
                                                 capture_intermediates=True,
                                                 mutable=['intermediates']))(params)
  inter = state['intermediates']
  assert inter['down_0']['block_0']['conv1']['__call__'][0].dtype == jnp.bfloat16  # really bf16
  assert inter['mid']['attn_1']['__call__'][0].dtype == jnp.bfloat16
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0.0 < rel < 0.03, rel
  bf16_shapes = param_shapes(tiny_config(dtype='bfloat16'))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_shapes)} == {jnp.dtype('float32')}


def test_avg_pool_resampling_variant():
  config = tiny_config(resamp_with_conv=False)
  shapes = param_shapes(config)
  assert 'downsample' not in shapes['down_0'] and 'upsample' not in shapes['up_1']
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  pooled = layers.Downsample(with_conv=False).apply({}, x)
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
  up = layers.Upsample(with_conv=False).apply({}, pooled)
  np.testing.assert_array_equal(up[0, :, :, 0],
                                [[2.5, 2.5, 4.5, 4.5]] * 2 + [[10.5, 10.5, 12.5, 12.5]] * 2)


@pytest.mark.parametrize('section, field, value, message', [
    ('data', 'image_size', 30, 'config.data.image_size=30'),
    ('model', 'ch', 48, 'config.model.ch=48'),
    ('model', 'ch_mult', (), 'config.model.ch_mult=()'),
    ('model', 'num_res_blocks', 0, 'config.model.num_res_blocks=0'),
    ('model', 'attn_resolutions', (16, 7), 'resolution 7 never occurs'),
    ('model', 'dtype', 'float16', "config.model.dtype='float16'"),
    ('model', 'num_heads', 3, 'config.model.num_heads=3'),
    ('model', 'dropout', 1.0, 'config.model.dropout=1.0'),
    ('model', 'name', 'transformer', "config.model.name='transformer'"),
    ('data', 'num_channels', 0, 'config.data.num_channels=0'),
    ('model', 'attn_implementation', 'flash', "config.model.attn_implementation='flash'"),
])
def test_bad_configs_raise_errors_naming_the_field(section, field, value, message):
  config = cifar10.get_config()
  config[section][field] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    validate_config(config)


def _valid_tiny_config(**model_fields):
  """tiny_config with a dataset that fits its 8x8 RGB images, so that the whole tree validates."""
  config = tiny_config(**model_fields)
  config.data.dataset = 'celeb_a_hq/256'  # crop-resized to any size
  return config


def test_create_model_only_maps_fields_to_the_constructor():
  config = tiny_config(num_heads=2, scale_shift_norm=True, dtype='bfloat16', learn_sigma=True)
  model = create_model(config)
  assert isinstance(model, nn.Module)
  assert (model.ch, model.out_ch, model.ch_mult, model.num_res_blocks, model.attn_resolutions,
          model.num_heads, model.scale_shift_norm, model.dropout, model.resamp_with_conv,
          model.dtype, model.attn_implementation) == (32, 6, (1, 2), 1, (4,), 2, True, 0.0, True,
                                                      jnp.bfloat16, None)
  assert create_model(config) == unet.UNet(**{f: getattr(model, f) for f in (
      'ch', 'out_ch', 'ch_mult', 'num_res_blocks', 'attn_resolutions', 'num_heads',
      'scale_shift_norm', 'dropout', 'resamp_with_conv', 'dtype', 'attn_implementation')})


def test_attn_implementation_reaches_the_model_and_cudnn_is_checked_early():
  config = _valid_tiny_config()
  config.model.attn_implementation = 'xla'
  assert create_model(config).attn_implementation == 'xla'
  config.model.attn_implementation = 'cudnn'
  with pytest.raises(ValueError, match="attn_implementation='cudnn'.*model.dtype='bfloat16'"):
    validate_config(config)
  config.model.dtype = 'bfloat16'
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="'cudnn' needs a CUDA GPU"):
      validate_config(config)
  # cuDNN flash attention takes heads of <= 128 channels: not DDPM's CIFAR10 net (one head of 256).
  config = cifar10.get_config()
  config.model.update(dtype='bfloat16', attn_implementation='cudnn')
  with pytest.raises(ValueError, match=r"heads of at most 128 channels.*num_heads=1 the heads have \[256\]"):
    validate_config(config)
  config.model.num_heads = 2  # heads of 128: passes this check, then needs a GPU
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="'cudnn' needs a CUDA GPU"):
      validate_config(config)


def test_default_configs_are_valid():
  for config in (cifar10.get_config(), cifar10_iddpm.get_config(), _valid_tiny_config(),
                 _large256.get_config('lsun/bedroom')):
    validate_config(config)


def test_bad_inputs_raise_errors_naming_the_shapes():
  model = create_model(tiny_config())
  params = param_shapes(tiny_config())
  with pytest.raises(ValueError, match=r'divisible by 2.*\(2, 15, 15, 3\)'):
    jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((2, 15, 15, 3)),
                                         jnp.zeros((2,), jnp.int32), train=False), params)
  with pytest.raises(ValueError, match=r'shape \[B\].*\(2, 1\)'):
    jax.eval_shape(lambda p: model.apply({'params': p}, jnp.zeros((2, 8, 8, 3)),
                                         jnp.zeros((2, 1), jnp.int32), train=False), params)


def test_resolutions_helper():
  assert unet.resolutions(256, (1, 1, 2, 2, 4, 4)) == [256, 128, 64, 32, 16, 8]


@pytest.mark.slow
def test_full_cifar10_forward_runs_and_is_zero_at_init():
  config = cifar10.get_config()
  model = create_model(config)
  params = init_params(model, jax.random.key(0), 32, 3)
  x, t = inputs(1, 1, 32)
  out = forward(model)(params, x, t, jax.random.key(0))
  assert out.shape == (1, 32, 32, 3)
  np.testing.assert_array_equal(out, 0.0)
