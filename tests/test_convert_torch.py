"""Tests of the improved-diffusion checkpoint converter (models/torch_zip.py, models/convert_torch.py,
convert_torch_checkpoint.py) and of the configs of its released models (configs/iddpm_*.py).

The references are written here from improved-diffusion's own definitions (improved_diffusion/unet.py,
nn.py, script_util.py and its README), independently of the Flax code and of configs/_iddpm.py: the
tensor names and shapes its UNetModel creates, their count as arithmetic over its layers, and a numpy
forward pass (NCHW, torch weight layouts) driven by the state dict's names. Checkpoints are written
in torch's zip format by tests/torch_zip_writer.py (no PyTorch anywhere).
"""

import collections
import importlib
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from ddpm_jax.models import convert_torch, layers, torch_zip, unet
from torch_zip_writer import GlobalCall, Parameter, View, write_torch_zip

# --------------------------------------------------------------- improved-diffusion's UNetModel, restated


def channel_mult(image_size):  # script_util.create_model
  return {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}[image_size]


def iddpm_shapes(*, image_size, ch, ch_mult, num_res_blocks, attention_resolutions, in_ch=3,
                 out_ch=6, num_classes=0, scale_shift=True):
  """{name: shape} of UNetModel(...).state_dict(), following UNetModel.__init__ line by line."""
  shapes, emb = {}, 4 * ch
  attention_ds = {image_size // r for r in attention_resolutions}

  def conv(name, cin, cout, k=3, dims=2):
    shapes[f'{name}.weight'], shapes[f'{name}.bias'] = (cout, cin) + (k,) * dims, (cout,)

  def linear(name, cin, cout):
    shapes[f'{name}.weight'], shapes[f'{name}.bias'] = (cout, cin), (cout,)

  def norm(name, c):
    shapes[f'{name}.weight'] = shapes[f'{name}.bias'] = (c,)

  def resblock(name, cin, cout):
    norm(f'{name}.in_layers.0', cin)
    conv(f'{name}.in_layers.2', cin, cout)
    linear(f'{name}.emb_layers.1', emb, 2 * cout if scale_shift else cout)
    norm(f'{name}.out_layers.0', cout)
    conv(f'{name}.out_layers.3', cout, cout)
    if cin != cout:
      conv(f'{name}.skip_connection', cin, cout, k=1)

  def attention(name, c):
    norm(f'{name}.norm', c)
    conv(f'{name}.qkv', c, 3 * c, k=1, dims=1)
    conv(f'{name}.proj_out', c, c, k=1, dims=1)

  linear('time_embed.0', ch, emb)
  linear('time_embed.2', emb, emb)
  if num_classes:
    shapes['label_emb.weight'] = (num_classes, emb)
  conv('input_blocks.0.0', in_ch, ch)
  chans, c, ds, k = [ch], ch, 1, 1
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      resblock(f'input_blocks.{k}.0', c, mult * ch)
      c = mult * ch
      if ds in attention_ds:
        attention(f'input_blocks.{k}.1', c)
      chans.append(c)
      k += 1
    if level != len(ch_mult) - 1:
      conv(f'input_blocks.{k}.0.op', c, c)
      chans.append(c)
      ds, k = ds * 2, k + 1
  resblock('middle_block.0', c, c)
  attention('middle_block.1', c)
  resblock('middle_block.2', c, c)
  k = 0
  for level, mult in list(enumerate(ch_mult))[::-1]:
    for i in range(num_res_blocks + 1):
      resblock(f'output_blocks.{k}.0', c + chans.pop(), ch * mult)
      c, j = ch * mult, 1
      if ds in attention_ds:
        attention(f'output_blocks.{k}.1', c)
        j = 2
      if level and i == num_res_blocks:
        conv(f'output_blocks.{k}.{j}.conv', c, c)
        ds //= 2
      k += 1
  norm('out.0', c)
  conv('out.2', ch, out_ch)
  return shapes


def iddpm_param_count(*, image_size, ch, ch_mult, num_res_blocks, attention_resolutions, in_ch=3,
                      out_ch=6, num_classes=0, scale_shift=True):
  """The number of parameters of UNetModel, as arithmetic over its layers (weights + biases)."""
  emb = 4 * ch
  conv3 = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731  (3x3 Conv2d)
  norm = lambda c: 2 * c  # noqa: E731  (GroupNorm weight + bias)

  def resblock(cin, cout):
    emb_out = 2 * cout if scale_shift else cout
    skip = cin * cout + cout if cin != cout else 0
    return norm(cin) + conv3(cin, cout) + emb * emb_out + emb_out + norm(cout) + conv3(cout, cout) + skip

  def attention(c):
    return norm(c) + (3 * c * c + 3 * c) + (c * c + c)

  n = (ch * emb + emb) + (emb * emb + emb) + num_classes * emb + conv3(in_ch, ch)
  res = [image_size // 2 ** level for level in range(len(ch_mult))]
  attn = [r in attention_resolutions for r in res]
  skips, c = [ch], ch
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      n += resblock(c, mult * ch) + attn[level] * attention(mult * ch)
      c = mult * ch
      skips.append(c)
    if level < len(ch_mult) - 1:
      n += conv3(c, c)  # Downsample
      skips.append(c)
  n += 2 * resblock(c, c) + attention(c)
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      n += resblock(c + skips.pop(), ch * ch_mult[level]) + attn[level] * attention(ch * ch_mult[level])
      c = ch * ch_mult[level]
    n += conv3(c, c) if level else 0  # Upsample
  return n + norm(c) + conv3(ch, out_ch)


# The README's models: config, file, flags (as MODEL_FLAGS / DIFFUSION_FLAGS say, defaults of
# model_and_diffusion_defaults otherwise), and the size its name or text gives.
_CIFAR = dict(image_size=32, ch=128, num_res_blocks=3, attention_resolutions=(16, 8), heads=4,
              scale_shift=True, num_classes=0, T=4000, schedule='cosine', rescale_timesteps=True)
_IN64 = dict(_CIFAR, image_size=64)
_LSUN = dict(image_size=256, ch=128, num_res_blocks=2, attention_resolutions=(16,), heads=1,
             scale_shift=False, num_classes=0, T=1000, schedule='linear', rescale_timesteps=False)
RELEASED = {
    'iddpm_cifar10_hybrid': ('cifar10_uncond_50M_500K.pt', dict(_CIFAR, dropout=0.3), 50e6),
    'iddpm_cifar10_vlb': ('cifar10_uncond_vlb_50M_500K.pt', dict(_CIFAR, dropout=0.3), 50e6),
    'iddpm_imagenet64_hybrid': ('imagenet64_uncond_100M_1500K.pt', dict(_IN64, dropout=0.0), 100e6),
    'iddpm_imagenet64_vlb': ('imagenet64_uncond_vlb_100M_1500K.pt', dict(_IN64, dropout=0.0), 100e6),
    'iddpm_imagenet64_cond': ('imagenet64_cond_270M_250K.pt',
                              dict(_IN64, ch=192, num_classes=1000, rescale_timesteps=False,
                                   dropout=0.0), 270e6),
    'iddpm_lsun_bedroom_lr1e4': ('lsun_uncond_100M_1200K_bs128.pt', dict(_LSUN, dropout=0.0), 100e6),
    'iddpm_lsun_bedroom_lr2e5': ('lsun_uncond_100M_2400K_bs64.pt', dict(_LSUN, dropout=0.0), 100e6),
}


def _arch(flags):
  return dict(image_size=flags['image_size'], ch=flags['ch'], ch_mult=channel_mult(flags['image_size']),
              num_res_blocks=flags['num_res_blocks'],
              attention_resolutions=flags['attention_resolutions'], num_classes=flags['num_classes'],
              scale_shift=flags['scale_shift'])


# ------------------------------------------------------------- improved-diffusion's forward, in numpy


def _conv(x, w, b, stride=1, pad=1):
  """torch Conv2d (NCHW, weight [O, I, kh, kw], symmetric zero padding) in float64."""
  kh, kw = w.shape[2:]
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho, wo = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum('nchw,oc->nohw', patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def _norm(x, w, b, eps=1e-5):  # GroupNorm32: 32 groups, torch's eps
  n, c = x.shape[:2]
  g = x.reshape(n, 32, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  return g.reshape(x.shape) * w.reshape(1, c, *[1] * (x.ndim - 2)) + b.reshape(1, c, *[1] * (x.ndim - 2))


def _silu(x):
  return x / (1 + np.exp(-x))


def _emb(t, dim):  # nn.timestep_embedding
  half = dim // 2
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def np_resblock(sd, p, x, emb, scale_shift):
  """ResBlock._forward."""
  h = _conv(_silu(_norm(x, sd[f'{p}.in_layers.0.weight'], sd[f'{p}.in_layers.0.bias'])),
            sd[f'{p}.in_layers.2.weight'], sd[f'{p}.in_layers.2.bias'])
  e = (_silu(emb) @ sd[f'{p}.emb_layers.1.weight'].T + sd[f'{p}.emb_layers.1.bias'])[:, :, None, None]
  if scale_shift:
    scale, shift = np.split(e, 2, axis=1)
    h = _norm(h, sd[f'{p}.out_layers.0.weight'], sd[f'{p}.out_layers.0.bias']) * (1 + scale) + shift
  else:
    h = _norm(h + e, sd[f'{p}.out_layers.0.weight'], sd[f'{p}.out_layers.0.bias'])
  h = _conv(_silu(h), sd[f'{p}.out_layers.3.weight'], sd[f'{p}.out_layers.3.bias'])
  if f'{p}.skip_connection.weight' in sd:
    x = _conv(x, sd[f'{p}.skip_connection.weight'], sd[f'{p}.skip_connection.bias'], pad=0)
  return x + h


def np_attention(sd, p, x, heads):
  """AttentionBlock._forward with QKVAttention: qkv reshaped to [B * heads, 3 * C/heads, T]."""
  b, c = x.shape[:2]
  xf = x.reshape(b, c, -1)
  h = _norm(xf, sd[f'{p}.norm.weight'], sd[f'{p}.norm.bias'])
  qkv = np.einsum('oc,bct->bot', sd[f'{p}.qkv.weight'][:, :, 0], h) + sd[f'{p}.qkv.bias'][:, None]
  qkv = qkv.reshape(b * heads, -1, qkv.shape[2])
  d = qkv.shape[1] // 3
  q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
  scale = 1 / math.sqrt(math.sqrt(d))
  w = np.einsum('bct,bcs->bts', q * scale, k * scale)
  w = np.exp(w - w.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum('bts,bcs->bct', w, v).reshape(b, -1, xf.shape[-1])
  a = np.einsum('oc,bct->bot', sd[f'{p}.proj_out.weight'][:, :, 0], a) + sd[f'{p}.proj_out.bias'][:, None]
  return (xf + a).reshape(x.shape)


def np_forward(sd, x, t, y, heads, scale_shift):
  """UNetModel.forward over the state dict's modules, found by name (TimestepEmbedSequential)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  ch = sd['time_embed.0.weight'].shape[1]
  emb = _emb(t, ch) @ sd['time_embed.0.weight'].T + sd['time_embed.0.bias']
  emb = _silu(emb) @ sd['time_embed.2.weight'].T + sd['time_embed.2.bias']
  if y is not None:
    emb = emb + sd['label_emb.weight'][y]

  def layer(p, h):
    if f'{p}.in_layers.0.weight' in sd:
      return np_resblock(sd, p, h, emb, scale_shift)
    if f'{p}.qkv.weight' in sd:
      return np_attention(sd, p, h, heads)
    if f'{p}.op.weight' in sd:  # Downsample: stride-2 conv, padding 1
      return _conv(h, sd[f'{p}.op.weight'], sd[f'{p}.op.bias'], stride=2)
    if f'{p}.conv.weight' in sd:  # Upsample: nearest x2, conv
      return _conv(h.repeat(2, 2).repeat(2, 3), sd[f'{p}.conv.weight'], sd[f'{p}.conv.bias'])
    return _conv(h, sd[f'{p}.weight'], sd[f'{p}.bias'])  # input_blocks.0.0

  def sequential(prefix, h):
    j = 0
    while any(k.startswith(f'{prefix}.{j}.') for k in sd):
      h, j = layer(f'{prefix}.{j}', h), j + 1
    return h

  h, hs, k = np.asarray(x, np.float64), [], 0
  while f'input_blocks.{k}.0.weight' in sd or any(s.startswith(f'input_blocks.{k}.') for s in sd):
    h = sequential(f'input_blocks.{k}', h)
    hs.append(h)
    k += 1
  h = sequential('middle_block', h)
  k = 0
  while any(s.startswith(f'output_blocks.{k}.') for s in sd):
    h = sequential(f'output_blocks.{k}', np.concatenate([h, hs.pop()], axis=1))
    k += 1
  assert not hs
  h = _silu(_norm(h, sd['out.0.weight'], sd['out.0.bias']))
  return _conv(h, sd['out.2.weight'], sd['out.2.bias'])


# ------------------------------------------------------------------------------------------ helpers


def random_state_dict(shapes, seed=0):
  """Random values of these shapes that keep activations O(1): weights N(0, 1/fan_in), GroupNorm
  scales 1 + N(0, 0.1^2), biases N(0, 0.1^2) (no zero-initialised layer hides a mapping error)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in shapes.items():
    z = rng.standard_normal(shape)
    if len(shape) > 1:
      sd[name] = z / math.sqrt(int(np.prod(shape[1:])))
    else:
      sd[name] = 1 + 0.1 * z if name.endswith('.weight') else 0.1 * z
    sd[name] = sd[name].astype(np.float32)
  return sd


def tiny_unet(**kw):
  fields = dict(ch=32, out_ch=6, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8, 4),
                num_heads=2, scale_shift_norm=True, dropout=0.0, conventions='improved_diffusion')
  fields.update(kw)
  return unet.UNet(**fields)


def template(model, image_size=8, in_ch=3):
  x = jnp.zeros((1, image_size, image_size, in_ch))
  t = jnp.zeros((1,), jnp.int32)
  args = (x, t) + ((jnp.zeros((1,), jnp.int32),) if model.num_classes else ())
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, train=False))['params']


def torch_shapes(params_template, num_heads):
  """{torch name: shape} the converter expects, with no allocation (zero-stride stand-ins)."""
  stand_ins = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape),
                                     params_template)
  return {k: v.shape for k, v in convert_torch.flax_to_torch(stand_ins, num_heads).items()}


TINY = [
    pytest.param(dict(attn_resolutions=(8, 4), num_heads=2, scale_shift_norm=True, num_classes=3),
                 id='scale_shift-2heads-labels'),
    pytest.param(dict(attn_resolutions=(8, 4), num_heads=2, scale_shift_norm=True),
                 id='scale_shift-2heads'),
    pytest.param(dict(attn_resolutions=(4,), num_heads=1, scale_shift_norm=False, ch_mult=(1, 2, 2)),
                 id='plain-1head'),
]


def _tiny_shapes(kw):
  return iddpm_shapes(image_size=8, ch=32, ch_mult=kw.get('ch_mult', (1, 2)), num_res_blocks=2,
                      attention_resolutions=kw['attn_resolutions'], num_classes=kw.get('num_classes', 0),
                      scale_shift=kw['scale_shift_norm'])


# -------------------------------------------------------------------------------------- the reader


def test_reader_follows_offsets_strides_shared_storages_and_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  storage = rng.standard_normal(40).astype(np.float32)
  sd = {
      'plain': rng.standard_normal((3, 4, 2)).astype(np.float32),
      'transposed': View(storage, 3, (4, 5), (1, 6), 'shared'),  # a .T view with an offset
      'sliced': View(storage, 10, (3,), (7,), 'shared'),          # same storage, other view
      'half': rng.standard_normal((5,)).astype(np.float16),
      'bf16': rng.standard_normal((2, 3)).astype(jnp.bfloat16),
      'long': np.arange(-3, 4, dtype=np.int64),
      'param': Parameter(rng.standard_normal((2, 2)).astype(np.float32)),
      'scalar': np.float32(2.5).reshape(()),
  }
  path = str(tmp_path / 'x.pt')
  write_torch_zip(path, sd, folder='x')  # PyTorch < 2 names the folder after the file
  out = torch_zip.load_state_dict(path)
  assert list(out) == list(sd)
  np.testing.assert_array_equal(out['plain'], sd['plain'])
  np.testing.assert_array_equal(out['transposed'],
                                np.stack([storage[3 + i:3 + i + 30:6] for i in range(4)]))
  np.testing.assert_array_equal(out['sliced'], storage[10:31:7])
  for name in ('half', 'bf16', 'long'):
    assert out[name].dtype == sd[name].dtype
    np.testing.assert_array_equal(out[name], sd[name])
  np.testing.assert_array_equal(out['param'], sd['param'].data)
  assert out['scalar'].shape == () and out['scalar'] == 2.5


def test_reader_reads_big_endian_records(tmp_path):
  sd = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  write_torch_zip(str(tmp_path / 'b.pt'), sd, byteorder='big')
  np.testing.assert_array_equal(torch_zip.load_state_dict(str(tmp_path / 'b.pt'))['w'], sd['w'])


@pytest.mark.parametrize('module,name', [('os', 'system'), ('builtins', 'eval'),
                                         ('torch', 'Tensor'), ('numpy.core.multiarray', '_reconstruct'),
                                         ('torch._utils', '_rebuild_qtensor')])
def test_any_other_pickled_global_is_refused_by_name(tmp_path, module, name):
  path = str(tmp_path / 'evil.pt')
  write_torch_zip(path, {'w': np.zeros(2, np.float32), 'x': GlobalCall(module, name, ('touch pwned',))})
  with pytest.raises(torch_zip.RefusedGlobalError, match=f'refusing the pickled global {module}.{name}:'):
    torch_zip.load_state_dict(path)
  assert not os.path.exists('pwned')


def test_reader_refuses_views_outside_their_storage_and_non_zip_files(tmp_path):
  path = str(tmp_path / 'oob.pt')
  write_torch_zip(path, {'w': View(np.zeros(6, np.float32), 2, (2, 3), (3, 1))})
  with pytest.raises(Exception, match='reaches element 7 of a storage of 6'):
    torch_zip.load_state_dict(path)
  legacy = tmp_path / 'legacy.pt'
  legacy.write_bytes(b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.')  # the legacy format's magic number
  with pytest.raises(ValueError, match='not a zip file'):
    torch_zip.load_state_dict(str(legacy))


# ------------------------------------------------------------------------ the released models' configs


@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_config_has_improved_diffusions_names_shapes_and_parameter_count(name):
  file, flags, named = RELEASED[name]
  config = importlib.import_module(f'configs.{name}').get_config()
  params = unet.param_shapes(config)
  expected = iddpm_param_count(**_arch(flags))
  assert unet.count_params(params) == expected
  shapes = iddpm_shapes(**_arch(flags))
  assert sum(int(np.prod(s)) for s in shapes.values()) == expected
  assert torch_shapes(params, config.model.num_heads) == shapes
  # The size in the README (file name or text): the counts round to it within 25% (ImageNet-64's
  # "100M" model has 121M parameters, LSUN's 114M, CIFAR-10's 52.5M, the conditional one 273M).
  assert 0.95 * named <= expected <= 1.25 * named, (file, expected)
  m, d = config.model, config.diffusion
  assert (m.conventions, m.num_heads, m.dropout, m.learn_sigma, d.num_timesteps, d.beta_schedule,
          d.var_type, d.rescale_timesteps) == (
              'improved_diffusion', flags['heads'], flags['dropout'], True, flags['T'],
              flags['schedule'], 'learned_range', flags['rescale_timesteps'])


def test_cifar10_count_is_improved_diffusions_52_546_438():
  # The number improved-diffusion's CIFAR-10 model reports (the UNet's docstring), by the formula.
  assert iddpm_param_count(**_arch(RELEASED['iddpm_cifar10_hybrid'][1])) == 52_546_438


def test_released_configs_validate():
  from ddpm_jax.config import validate_config  # pylint: disable=import-outside-toplevel
  for name in RELEASED:
    validate_config(importlib.import_module(f'configs.{name}').get_config())


# ----------------------------------------------------------------------------- conversion, tiny nets


@pytest.mark.parametrize('kw', TINY)
def test_round_trip_uses_every_tensor_once_and_fills_every_parameter(tmp_path, kw):
  model = tiny_unet(**kw)
  shapes = _tiny_shapes(kw)
  sd = random_state_dict(shapes)
  path = str(tmp_path / 'm.pt')
  write_torch_zip(path, sd)
  loaded = torch_zip.load_state_dict(path)
  params = convert_torch.torch_to_flax(loaded, template(model), model.num_heads)
  assert unet.count_params(params) == sum(v.size for v in sd.values())
  back = convert_torch.flax_to_torch(params, model.num_heads)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_reader_reads_what_torch_save_writes(tmp_path):
  """A file written by PyTorch itself (not by tests/torch_zip_writer.py): a state dict as
  improved-diffusion saves it (`th.save(model.state_dict(), path)`: an OrderedDict of tensors, some of
  them views sharing a storage), read by the reader and converted. Skipped where torch is absent (CI);
  ddpm_jax never imports torch."""
  torch = pytest.importorskip('torch')
  kw = TINY[0].values[0]
  model = tiny_unet(**kw)
  sd = random_state_dict(_tiny_shapes(kw), seed=3)
  state = collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in sd.items())
  shared = torch.arange(12, dtype=torch.float32)
  state['extra.view'] = shared[2:].view(2, 5).t()  # a strided view with an offset into a shared storage
  state['extra.base'] = shared
  state['extra.half'] = torch.ones(3, dtype=torch.float16)
  path = str(tmp_path / 'model.pt')
  torch.save(state, path)
  loaded = torch_zip.load_state_dict(path)
  np.testing.assert_array_equal(loaded['extra.view'], np.arange(2, 12, dtype=np.float32).reshape(2, 5).T)
  np.testing.assert_array_equal(loaded['extra.base'], np.arange(12, dtype=np.float32))
  assert loaded['extra.half'].dtype == np.float16
  for k in ('extra.view', 'extra.base', 'extra.half'):
    del loaded[k]
  params = convert_torch.torch_to_flax(loaded, template(model), model.num_heads)
  back = convert_torch.flax_to_torch(params, model.num_heads)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize('kw', TINY)
def test_converted_network_computes_improved_diffusions_forward_pass(kw):
  model = tiny_unet(**kw)
  sd = random_state_dict(_tiny_shapes(kw), seed=1)
  params = convert_torch.torch_to_flax(sd, template(model), model.num_heads)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)  # NCHW, as torch
  t = np.array([3.25, 997.0], np.float32)  # rescaled timesteps t * 1000 / T are real numbers
  y = np.array([0, 2]) if kw.get('num_classes') else None
  args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t)) + ((jnp.asarray(y),) if y is not None else ())
  # One compiled program: op-by-op dispatch of the whole net takes twice as long on a CPU.
  out = np.asarray(jax.jit(lambda p, *a: model.apply({'params': p}, *a, train=False))(params, *args))
  ref = np_forward(sd, x, t, y, model.num_heads, model.scale_shift_norm).transpose(0, 2, 3, 1)
  np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-4)
  assert np.abs(ref).mean() > 0.1  # a non-trivial output


def test_scale_shift_resblock_and_multihead_attention_match_numpy():
  """The two blocks on their own, with the converted parameters of a whole net: the first ResBlock of
  level 1 (scale-shift norm, 32 -> 64 channels with the 1x1 skip) and the middle 4-head attention."""
  model = tiny_unet(num_heads=4)
  sd = random_state_dict(_tiny_shapes(dict(attn_resolutions=(8, 4), scale_shift_norm=True)), seed=4)
  params = convert_torch.torch_to_flax(sd, template(model), model.num_heads)
  sd64 = {k: v.astype(np.float64) for k, v in sd.items()}
  rng = np.random.default_rng(3)

  # input_blocks: 0 the input conv, 1-2 level 0's blocks, 3 its Downsample, 4 level 1's first block.
  x = rng.standard_normal((2, 32, 4, 4)).astype(np.float32)
  emb = rng.standard_normal((2, 128)).astype(np.float32)
  block = layers.ResnetBlock(64, scale_shift_norm=True, conventions='improved_diffusion')
  out = jax.jit(lambda p, x, e: block.apply({'params': p}, x, e, train=False))(
      params['down_1']['block_0'], jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(emb))
  ref = np_resblock(sd64, 'input_blocks.4.0', x, emb, scale_shift=True)
  np.testing.assert_allclose(np.asarray(out), ref.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)

  x = rng.standard_normal((2, 64, 4, 4)).astype(np.float32)
  attn = layers.AttnBlock(num_heads=4, conventions='improved_diffusion')
  out = jax.jit(lambda p, x: attn.apply({'params': p}, x))(params['mid']['attn_1'],
                                                          jnp.asarray(x.transpose(0, 2, 3, 1)))
  ref = np_attention(sd64, 'middle_block.1', x, heads=4)
  np.testing.assert_allclose(np.asarray(out), ref.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  # The heads matter: read as 1 or 2 heads, the same weights give other functions.
  for heads in (1, 2):
    assert not np.allclose(np_attention(sd64, 'middle_block.1', x, heads), ref, atol=1e-3)


def test_leftover_missing_and_misshapen_tensors_are_listed_on_both_sides():
  kw = dict(attn_resolutions=(8, 4), num_heads=2, scale_shift_norm=True)
  model = tiny_unet(**kw)
  sd = random_state_dict(_tiny_shapes(kw))
  del sd['input_blocks.1.0.in_layers.2.bias']
  sd['input_blocks.9.0.op.weight'] = np.zeros((1,), np.float32)
  sd['middle_block.1.qkv.weight'] = np.zeros((3 * 64, 32, 1), np.float32)
  with pytest.raises(ValueError) as e:
    convert_torch.torch_to_flax(sd, template(model), model.num_heads)
  msg = str(e.value)
  assert "torch tensors left over (2): ['input_blocks.1.0.in_layers.2.weight', 'input_blocks.9.0.op.weight']" in msg
  assert 'Flax parameters not filled (8)' in msg and 'down_0/block_0/conv1/kernel' in msg
  assert "torch tensors expected but absent (1): ['input_blocks.1.0.in_layers.2.bias']" in msg
  assert 'middle_block.1.qkv (192, 32, 1)' in msg


# ---------------------------------------------------------------- command line -> sample and eval


_TINY_CONFIG = '''
from configs import _iddpm


def get_config():
  config = _iddpm.from_flags(dataset='digits', num_train_steps=10, image_size=32, num_channels=32,
                             num_res_blocks=1, learn_sigma=True, diffusion_steps=10,
                             noise_schedule='cosine', attention_resolutions='4')
  config.data.image_size, config.data.num_channels = 8, 1
  config.model.ch_mult, config.model.num_heads = (1, 2), 2
  config.sampling.update(num_samples=4, batch_size=4, samples_per_shard=4, interpolation_t=5,
                         progressive_every=3)
  config.eval.update(batch_size=4, num_examples=8, num_train_examples=0, metrics=('bpd',))
  return config
'''


@pytest.mark.slow
def test_command_line_writes_a_workdir_that_sample_and_eval_load(tmp_path):
  config_path = tmp_path / 'tiny_iddpm.py'
  config_path.write_text(textwrap.dedent(_TINY_CONFIG))
  shapes = iddpm_shapes(image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), in_ch=1, out_ch=2)
  checkpoint = str(tmp_path / 'tiny.pt')
  write_torch_zip(checkpoint, random_state_dict(shapes, seed=6))
  workdir = str(tmp_path / 'work')
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  code = textwrap.dedent(f'''
      import sys
      sys.argv = ['convert', '--checkpoint={checkpoint}', '--config={config_path}', '--workdir={workdir}']
      from absl import app
      from ddpm_jax import convert_torch_checkpoint
      try:
        app.run(convert_torch_checkpoint.main)
      except SystemExit as e:
        assert not e.code, e.code
      import importlib.util
      from ddpm_jax import jobs
      spec = importlib.util.spec_from_file_location('c', {str(config_path)!r})
      mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
      config = mod.get_config()
      jobs.run('sample', config, {workdir!r})
      print('EVAL', jobs.run('eval', config, {workdir!r}))
      ''')
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'EVAL' in result.stdout
  from ddpm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  assert os.path.isdir(workdir_lib.checkpoint_dir(workdir))


def test_conventions_field_is_validated_and_defaults_to_ddpm():
  from configs import default  # pylint: disable=import-outside-toplevel
  from ddpm_jax.config import validate_config  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  assert config.model.conventions == 'diffusion_tf' and unet.create_model(config).conventions == 'diffusion_tf'
  config.model.conventions = 'pytorch'
  with pytest.raises(ValueError, match=r"config.model.conventions='pytorch' is invalid: allowed: "
                                       r"\('diffusion_tf', 'improved_diffusion'\)"):
    validate_config(config)
