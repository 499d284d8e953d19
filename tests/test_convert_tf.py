"""Tests of the official-TF-checkpoint converter (ddpm_jax/models/convert_tf.py).

The reference here is written from the original diffusion_tf model's structure, independently of
the Flax code: the variable names and shapes it creates, and a forward pass over those TF-named
variables with the original's own TF ops for conv2d ('SAME' padding, stride 2 for downsampling) and
nearest resize (align_corners=True), numpy for the rest.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import _large256, cifar10, default
from conftest import randomize
from ddpm_jax.data import tf_cpu_only
from ddpm_jax.models import convert_tf, create_model, init_params, param_shapes

tf = tf_cpu_only()  # the converter's own way into TF


def tiny_config():
  config = default.get_config()
  config.data.image_size = 8
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.0)
  return config


def original_variable_shapes(ch, ch_mult, num_res_blocks, attn_resolutions, image_size, in_ch,
                             out_ch):
  """The `model/...` variables diffusion_tf's unet creates, with their shapes."""
  shapes = {}

  def layer(scope, w_shape):
    shapes[f'model/{scope}/W'], shapes[f'model/{scope}/b'] = tuple(w_shape), (w_shape[-1],)

  def norm(scope, c):
    shapes[f'model/{scope}/gamma'] = shapes[f'model/{scope}/beta'] = (c,)

  def block(scope, cin, cout):
    norm(f'{scope}/norm1', cin)
    layer(f'{scope}/conv1', (3, 3, cin, cout))
    layer(f'{scope}/temb_proj', (4 * ch, cout))
    norm(f'{scope}/norm2', cout)
    layer(f'{scope}/conv2', (3, 3, cout, cout))
    if cin != cout:
      layer(f'{scope}/nin_shortcut', (cin, cout))

  def attn(scope, c):
    norm(f'{scope}/norm', c)
    for name in ('q', 'k', 'v', 'proj_out'):
      layer(f'{scope}/{name}', (c, c))

  layer('temb/dense0', (ch, 4 * ch))
  layer('temb/dense1', (4 * ch, 4 * ch))
  layer('conv_in', (3, 3, in_ch, ch))
  skips, c, res = [ch], ch, image_size
  for level, mult in enumerate(ch_mult):
    for i in range(num_res_blocks):
      block(f'down_{level}/block_{i}', c, ch * mult)
      c = ch * mult
      if res in attn_resolutions:
        attn(f'down_{level}/attn_{i}', c)
      skips.append(c)
    if level != len(ch_mult) - 1:
      layer(f'down_{level}/downsample/conv', (3, 3, c, c))
      skips.append(c)
      res //= 2
  block('mid/block_1', c, c)
  attn('mid/attn_1', c)
  block('mid/block_2', c, c)
  for level in reversed(range(len(ch_mult))):
    for i in range(num_res_blocks + 1):
      block(f'up_{level}/block_{i}', c + skips.pop(), ch * ch_mult[level])
      c = ch * ch_mult[level]
      if res in attn_resolutions:
        attn(f'up_{level}/attn_{i}', c)
    if level != 0:
      layer(f'up_{level}/upsample/conv', (3, 3, c, c))
      res *= 2
  norm('norm_out', c)
  layer('conv_out', (3, 3, c, out_ch))
  return shapes


@pytest.mark.parametrize('config', [cifar10.get_config(),
                                    _large256.get_config('lsun/church_outdoor'), tiny_config()],
                         ids=['cifar10', 'lsun256', 'tiny'])
def test_flax_parameters_have_the_original_names_and_shapes(config):
  m = config.model
  expected = original_variable_shapes(m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions,
                                      config.data.image_size, 3, 3)
  assert convert_tf.tf_variable_shapes(param_shapes(config)) == expected


# --- the original forward pass, over TF-named variables ---

def _conv(v, scope, x, stride=1):
  y = tf.nn.conv2d(x.astype(np.float32), v[f'model/{scope}/W'], strides=stride, padding='SAME')
  return y.numpy() + v[f'model/{scope}/b']


def _dense(v, scope, x):
  return x @ v[f'model/{scope}/W'] + v[f'model/{scope}/b']


def _norm(v, scope, x, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
  g = (g - mean) / np.sqrt(var + eps)
  return g.reshape(x.shape) * v[f'model/{scope}/gamma'] + v[f'model/{scope}/beta']


def _swish(x):
  return x / (1.0 + np.exp(-x))


def _block(v, scope, x, temb, out_ch):
  h = _conv(v, f'{scope}/conv1', _swish(_norm(v, f'{scope}/norm1', x)))
  h = h + _dense(v, f'{scope}/temb_proj', _swish(temb))[:, None, None, :]
  h = _conv(v, f'{scope}/conv2', _swish(_norm(v, f'{scope}/norm2', h)))
  if x.shape[-1] != out_ch:
    x = _dense(v, f'{scope}/nin_shortcut', x)
  return x + h


def _attn(v, scope, x):
  b, height, width, c = x.shape
  h = _norm(v, f'{scope}/norm', x)
  q, k, val = (_dense(v, f'{scope}/{n}', h) for n in 'qkv')
  w = np.einsum('bhwc,bHWc->bhwHW', q, k).reshape(b, height, width, -1) * c ** -0.5
  w = np.exp(w - w.max(-1, keepdims=True))
  w = (w / w.sum(-1, keepdims=True)).reshape(b, height, width, height, width)
  return x + _dense(v, f'{scope}/proj_out', np.einsum('bhwHW,bHWc->bhwc', w, val))


def original_forward(v, x, t, ch, ch_mult, num_res_blocks, attn_resolutions):
  """DDPM's network over the TF variables `v`; returns the output and {scope: activation}."""
  acts = {}
  half = ch // 2
  freqs = np.exp(np.arange(half) * -np.log(10000.0) / (half - 1))
  temb = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  temb = _dense(v, 'temb/dense1', _swish(_dense(v, 'temb/dense0', temb)))
  acts['temb'] = temb
  hs = [_conv(v, 'conv_in', x)]
  for level, mult in enumerate(ch_mult):
    for i in range(num_res_blocks):
      scope = f'down_{level}/block_{i}'
      h = acts[scope] = _block(v, scope, hs[-1], temb, ch * mult)
      if h.shape[1] in attn_resolutions:
        scope = f'down_{level}/attn_{i}'
        h = acts[scope] = _attn(v, scope, h)
      hs.append(h)
    if level != len(ch_mult) - 1:
      hs.append(_conv(v, f'down_{level}/downsample/conv', hs[-1], stride=2))
      acts[f'down_{level}/downsample'] = hs[-1]
  h = _block(v, 'mid/block_1', hs[-1], temb, hs[-1].shape[-1])
  h = _block(v, 'mid/block_2', _attn(v, 'mid/attn_1', h), temb, h.shape[-1])
  for level in reversed(range(len(ch_mult))):
    for i in range(num_res_blocks + 1):
      h = _block(v, f'up_{level}/block_{i}', np.concatenate([h, hs.pop()], -1), temb,
                 ch * ch_mult[level])
      if h.shape[1] in attn_resolutions:
        h = _attn(v, f'up_{level}/attn_{i}', h)
    if level != 0:
      b, height, width, c = h.shape
      h = tf.compat.v1.image.resize(h.astype(np.float32), [2 * height, 2 * width],
                                    align_corners=True,
                                    method=tf.image.ResizeMethod.NEAREST_NEIGHBOR).numpy()
      h = acts[f'up_{level}/upsample'] = _conv(v, f'up_{level}/upsample/conv', h)
  return _conv(v, 'conv_out', _swish(_norm(v, 'norm_out', h))), acts


@pytest.fixture(scope='module')
def tiny():
  """(config, raw params, EMA params): all layers random, the zero-initialised ones included."""
  config = tiny_config()
  params = init_params(create_model(config), jax.random.key(0), 8, 3)
  return config, randomize(params, 1), randomize(params, 2)


@pytest.fixture(scope='module')
def tf_checkpoint(tiny, tmp_path_factory):
  """A checkpoint as diffusion_tf writes it: raw + EMA weights, an Adam slot, global_step."""
  _, raw, ema = tiny
  tf_vars = {**convert_tf.flax_to_tf(raw), **convert_tf.flax_to_tf(ema, use_ema=True),
             'model/conv_in/W/Adam': np.zeros((3, 3, 3, 32), np.float32),
             'global_step': np.array(790000, np.int64)}
  prefix = str(tmp_path_factory.mktemp('tf') / 'model.ckpt-790000')
  return convert_tf.save_tf_checkpoint(prefix, tf_vars), tf_vars


def test_checkpoint_holds_the_original_names(tf_checkpoint):
  prefix, written = tf_checkpoint
  names = set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
  assert names == set(written)
  for name in ('model/temb/dense0/W', 'model/down_1/block_0/nin_shortcut/W', 'model/mid/attn_1/q/b',
               'model/down_0/downsample/conv/W', 'model/up_1/attn_2/proj_out/W',
               'model/up_1/upsample/conv/b', 'model/norm_out/gamma',
               'model/conv_out/W/ExponentialMovingAverage'):
    assert name in names, name


def test_round_trip_puts_every_value_where_it_belongs(tiny, tf_checkpoint):
  config, raw, ema = tiny
  loaded = convert_tf.load_tf_checkpoint(tf_checkpoint[0])
  assert 'global_step' not in loaded and 'model/conv_in/W/Adam' not in loaded
  assert convert_tf.has_ema(loaded)
  params, ema_params = convert_tf.convert_tf_vars(loaded, param_shapes(config))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, raw)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ema_params, ema)
  np.testing.assert_array_equal(params['mid']['attn_1']['q']['kernel'],
                                loaded['model/mid/attn_1/q/W'])
  np.testing.assert_array_equal(params['up_0']['block_1']['norm2']['bias'],
                                loaded['model/up_0/block_1/norm2/beta'])
  np.testing.assert_array_equal(ema_params['up_0']['block_1']['norm2']['scale'],
                                loaded['model/up_0/block_1/norm2/gamma/ExponentialMovingAverage'])


def test_converted_network_computes_the_original_forward_pass(tiny, tf_checkpoint):
  config, _, _ = tiny
  loaded = convert_tf.load_tf_checkpoint(tf_checkpoint[0])
  params = convert_tf.tf_to_flax(loaded, param_shapes(config), use_ema=False)
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  t = np.array([3, 917])
  model = create_model(config)
  out, state = jax.jit(lambda p: model.apply({'params': p}, jnp.asarray(x), jnp.asarray(t),
                                             train=False, capture_intermediates=True,
                                             mutable=['intermediates']))(params)
  inter = state['intermediates']
  m = config.model
  want, acts = original_forward(loaded, x.astype(np.float64), t.astype(np.float64), m.ch, m.ch_mult,
                                m.num_res_blocks, m.attn_resolutions)

  def got(scope):
    node = inter
    for part in scope.split('/'):
      node = node[part]
    return node['__call__'][0]

  tol = dict(rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(got('temb'), acts['temb'], **tol)
  # down_1/block_0 goes from 32 to 64 channels, so it has the nin_shortcut.
  np.testing.assert_allclose(got('down_1/block_0'), acts['down_1/block_0'], **tol)
  np.testing.assert_allclose(got('down_1/attn_1'), acts['down_1/attn_1'], **tol)
  np.testing.assert_allclose(got('down_0/downsample'), acts['down_0/downsample'], **tol)
  np.testing.assert_allclose(got('up_1/upsample'), acts['up_1/upsample'], **tol)
  np.testing.assert_allclose(out, want, **tol)
  assert np.abs(want).mean() > 0.1  # a real signal, not zeros


def test_missing_extra_and_misshapen_variables_are_listed(tiny):
  config, raw, _ = tiny
  template = param_shapes(config)
  tf_vars = convert_tf.flax_to_tf(raw)
  missing = {k: v for k, v in tf_vars.items() if k != 'model/mid/attn_1/q/W'}
  with pytest.raises(ValueError, match=r'not filled \(1\).*mid/attn_1/q/kernel'):
    convert_tf.tf_to_flax(missing, template, use_ema=False)
  extra = {**tf_vars, 'model/down_7/block_0/conv1/W': np.zeros((3, 3, 1, 1), np.float32),
           'model/mystery/thing': np.zeros((2,), np.float32)}
  with pytest.raises(ValueError,
                     match=r'left over \(2\).*down_7/block_0/conv1/W.*model/mystery/thing'):
    convert_tf.tf_to_flax(extra, template, use_ema=False)
  bad = dict(tf_vars)
  bad['model/temb/dense0/W'] = np.zeros((128, 32), np.float32)
  with pytest.raises(ValueError, match=r'mismatches \(1\).*temb/dense0/W \(128, 32\).*\(32, 128\)'):
    convert_tf.tf_to_flax(bad, template, use_ema=False)
  # An optimizer slot of a known weight is not a network variable, so it is skipped, not left over.
  with_slot = {**tf_vars, 'model/conv_in/W/Adam_1': np.zeros((3, 3, 3, 32), np.float32)}
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         convert_tf.tf_to_flax(with_slot, template, use_ema=False), raw)


def test_checkpoint_without_ema_gives_raw_weights_twice(tiny):
  config, raw, _ = tiny
  template = param_shapes(config)
  tf_vars = convert_tf.flax_to_tf(raw)
  assert not convert_tf.has_ema(tf_vars)
  params, ema_params = convert_tf.convert_tf_vars(tf_vars, template)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, raw)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ema_params, raw)
  with pytest.raises(ValueError, match='EMA weights'):
    convert_tf.tf_to_flax(tf_vars, template, use_ema=True)


def test_config_of_another_network_is_rejected(tiny):
  _, raw, _ = tiny
  other = tiny_config()
  other.model.num_res_blocks = 1
  with pytest.raises(ValueError, match='left over'):
    convert_tf.tf_to_flax(convert_tf.flax_to_tf(raw), param_shapes(other), use_ema=False)


def test_load_rejects_a_checkpoint_without_model_variables(tmp_path):
  prefix = convert_tf.save_tf_checkpoint(str(tmp_path / 'ckpt'), {'global_step': np.array(1)})
  with pytest.raises(ValueError, match="no variables under 'model/'"):
    convert_tf.load_tf_checkpoint(prefix)
