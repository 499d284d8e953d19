"""The DDPM U-Net (Ho et al. 2020, §4, Appendix B) with Improved DDPM's options (Nichol & Dhariwal).

Module and parameter names mirror the scopes of the original TensorFlow model
(`diffusion_tf/models/unet.py`), so the parameter tree reads like the checkpoint:
params['down_0']['block_0']['conv1']['kernel'] is `model/down_0/block_0/conv1/W` (convert_tf.py).

Data flow (NHWC): x [B, H, W, C] in [-1, 1], t [B] -> conv_in -> down levels (num_res_blocks
residual blocks, attention where the resolution is in attn_resolutions, downsample except at the
last level) -> mid (block, attention, block) -> up levels (num_res_blocks + 1 blocks over [h, skip]
concatenations, upsample except at level 0) -> GroupNorm, swish, conv_out (zero at init)
-> [B, H, W, out_ch] float32.

iDDPM options (§3.1, Appendix A): `num_heads` > 1 and attention also at 8x8, adaptive "scale-shift"
GroupNorm, more residual blocks, 2C outputs when the variance is learned. With their CIFAR10
settings the parameter count equals improved-diffusion's (52,546,438). Three details of
improved-diffusion change no parameter, only the computed function: its embedding is [cos, sin]
with frequencies exp(-i ln(10000) / half), its GroupNorm eps is 1e-5 and its downsampling conv pads
both sides; `conventions='improved_diffusion'` applies them, for its released checkpoints
(convert_torch.py); the default 'diffusion_tf' keeps DDPM's (layers.CONVENTIONS).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax.models import layers

Array = jax.Array

MODEL_NAMES = ('unet',)  # the config.model.name values create_model builds
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ATTN_IMPLEMENTATIONS = (None, 'xla', 'cudnn')
# cuDNN's fused attention (jax.nn.dot_product_attention, implementation='cudnn') exists only on CUDA
# GPUs, for 16-bit inputs and heads of at most 128 channels, a multiple of 8.
CUDNN_DTYPES = ('bfloat16',)
CUDNN_MAX_HEAD_DIM = 128
CUDNN_HEAD_DIM_MULTIPLE = 8


class DownLevel(nn.Module):
  """Scope `down_{level}`: residual blocks (+ attention), then `downsample` unless last.

  Returns the activations the up path reads as skips (after each block, and the downsampled one
  when `downsample`), each [B, H', W', out_ch].
  """
  out_ch: int
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  downsample: bool
  resamp_with_conv: bool
  block: layers.BlockFactory
  attn: layers.AttnFactory
  dtype: Any = jnp.float32
  conventions: str = 'diffusion_tf'  # the downsampling conv's padding (layers.CONVENTIONS)

  @nn.compact
  def __call__(self, h: Array, temb: Array, *, train: bool) -> list[Array]:
    hs = []
    for i in range(self.num_res_blocks):
      h = self.block(self.out_ch, name=f'block_{i}')(h, temb, train=train)
      if h.shape[1] in self.attn_resolutions:
        h = self.attn(name=f'attn_{i}')(h)
      hs.append(h)
    if self.downsample:
      hs.append(layers.Downsample(self.resamp_with_conv, self.dtype, self.conventions,
                                  name='downsample')(h))
    return hs


class Middle(nn.Module):
  """Scope `mid`: block_1, attn_1, block_2 at the lowest resolution; [B, h, w, C] -> same shape."""
  block: layers.BlockFactory
  attn: layers.AttnFactory

  @nn.compact
  def __call__(self, h: Array, temb: Array, *, train: bool) -> Array:
    ch = h.shape[-1]
    h = self.block(ch, name='block_1')(h, temb, train=train)
    h = self.attn(name='attn_1')(h)
    return self.block(ch, name='block_2')(h, temb, train=train)


class UpLevel(nn.Module):
  """Scope `up_{level}`: num_res_blocks + 1 blocks (+ attention), then `upsample` unless level 0.

  Each block reads concat[h, skip] (h first, as the original); `skips` come in the order they are
  consumed. Returns [B, H', W', out_ch] (H' doubled when upsampling).
  """
  out_ch: int
  attn_resolutions: tuple[int, ...]
  upsample: bool
  resamp_with_conv: bool
  block: layers.BlockFactory
  attn: layers.AttnFactory
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: Array, skips: Sequence[Array], temb: Array, *, train: bool) -> Array:
    for i, skip in enumerate(skips):
      h = self.block(self.out_ch, name=f'block_{i}')(jnp.concatenate([h, skip], axis=-1), temb,
                                                     train=train)
      if h.shape[1] in self.attn_resolutions:
        h = self.attn(name=f'attn_{i}')(h)
    if self.upsample:
      h = layers.Upsample(self.resamp_with_conv, self.dtype, name='upsample')(h)
    return h


class UNet(nn.Module):
  """The noise-prediction network eps_theta(x_t, t) of DDPM (and iDDPM, with the options).

  Attributes mirror `config.model` (see `create_model`); `out_ch` is C, or 2C for learned variance.
  `attn_implementation` is passed to jax.nn.dot_product_attention (None lets JAX choose).
  `num_classes` > 0 makes it class-conditional (iDDPM's class_cond, ImageNet-64): an embedding
  `label_emb` [num_classes, 4 ch] of the label y is added to the timestep embedding, as
  improved-diffusion does; 0 (the default) builds exactly the unconditional network.
  """
  ch: int = 128
  out_ch: int = 3
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  num_heads: int = 1
  scale_shift_norm: bool = False
  dropout: float = 0.0
  resamp_with_conv: bool = True
  dtype: Any = jnp.float32
  conventions: str = 'diffusion_tf'  # or 'improved_diffusion' (layers.CONVENTIONS)
  attn_implementation: str | None = None
  num_classes: int = 0

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *, train: bool) -> Array:
    """eps_theta(x_t, t) (DDPM §3.2, eq. 11), or eps_theta(x_t, t, y) when class-conditional.

    Args:
      x: [B, H, W, C] noisy images x_t in [-1, 1] (H, W divisible by 2**(len(ch_mult) - 1)).
      t: [B] timesteps: int indices (0-based, as in the original code) or real values (improved-
        diffusion's rescaled t * 1000 / T); the sinusoidal embedding takes either.
      y: int [B] class labels in [0, num_classes), required iff num_classes > 0.
      train: enables dropout (then needs rngs={'dropout': key}).
    Returns:
      [B, H, W, out_ch] float32: the eps prediction (and the variance channels when out_ch = 2C).
    """
    self._check_inputs(x, t, y)
    block, attn = layers.block_factories(self.dropout, self.scale_shift_norm, self.num_heads,
                                         self.dtype, self.attn_implementation, self.conventions)
    attn_res = tuple(self.attn_resolutions)
    num_levels = len(self.ch_mult)
    temb = layers.TimestepEmbed(self.ch, self.conventions, name='temb')(t)
    if self.num_classes > 0:
      # improved-diffusion: emb = time_embed(t) + label_emb(y), before any residual block.
      temb = temb + nn.Embed(self.num_classes, temb.shape[-1], param_dtype=jnp.float32,
                             name='label_emb')(y)

    hs = [layers.conv3x3(self.ch, 'conv_in', self.dtype)(x)]
    for level, mult in enumerate(self.ch_mult):
      hs += DownLevel(self.ch * mult, self.num_res_blocks, attn_res, level != num_levels - 1,
                      self.resamp_with_conv, block, attn, self.dtype, self.conventions,
                      name=f'down_{level}')(hs[-1], temb, train=train)

    h = Middle(block, attn, name='mid')(hs[-1], temb, train=train)

    for level in reversed(range(num_levels)):
      skips = [hs.pop() for _ in range(self.num_res_blocks + 1)]
      h = UpLevel(self.ch * self.ch_mult[level], attn_res, level != 0, self.resamp_with_conv, block,
                  attn, self.dtype, name=f'up_{level}')(h, skips, temb, train=train)
    assert not hs  # every skip consumed, as in the original

    # The output head runs in float32: it produces the eps (and variance) values the losses consume.
    h = nn.swish(layers.group_norm('norm_out', jnp.float32, self.conventions)(h))
    return layers.conv3x3(self.out_ch, 'conv_out', jnp.float32, init_scale=0.0)(h)

  def _check_inputs(self, x: Array, t: Array, y: Array | None) -> None:
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'UNet input x must be [B, H, W, C] with H and W divisible by {factor} '
                       f'(2**(len(ch_mult) - 1)); got shape {x.shape}')
    if t.shape != (x.shape[0],):
      raise ValueError(f'UNet input t must have shape [B] = ({x.shape[0]},); got {t.shape}')
    if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
      raise ValueError(f'UNet input t must be int or float timesteps; got dtype {t.dtype}')
    if self.num_classes > 0:
      if y is None:
        raise ValueError(f'this UNet is class-conditional (num_classes={self.num_classes}): pass '
                         'the labels y [B]')
      if y.shape != (x.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f'UNet labels y must be int with shape [B] = ({x.shape[0]},); got '
                         f'{y.dtype} {y.shape}')
    elif y is not None:
      raise ValueError('labels y were given to an unconditional UNet (num_classes=0)')


def resolutions(image_size: int, ch_mult: Sequence[int]) -> list[int]:
  """The spatial size at each level: image_size, image_size / 2, ... (one per entry of ch_mult)."""
  return [image_size // 2 ** level for level in range(len(ch_mult))]


def attention_channels(ch: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int],
                       image_size: int) -> set[int]:
  """Channel counts of the attention layers: at the attn_resolutions, and always in the middle block."""
  res = resolutions(image_size, ch_mult)
  return {ch * c for c, r in zip(ch_mult, res) if r in attn_resolutions} | {ch * ch_mult[-1]}


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The classes of a class-conditional model (iDDPM's class_cond), 0 for an unconditional one; configs
  written before `model.num_classes` existed are unconditional."""
  return int(config.model.get('num_classes', 0))


def create_model(config: ml_collections.ConfigDict) -> UNet:
  """Builds the UNet from config.model; its output has C (or 2C when learn_sigma) channels.

  Use: `model.apply({'params': params}, x, t, train=True, rngs={'dropout': key})` (x, t, y when
  model.num_classes > 0). Only maps
  fields to the constructor's arguments: `ddpm_jax.config.validate_config` checked them at start-up.
  """
  m = config.model
  out_ch = config.data.num_channels * (2 if m.learn_sigma else 1)
  return UNet(ch=m.ch, out_ch=out_ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              conventions=m.get('conventions', 'diffusion_tf'),
              attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads,
              scale_shift_norm=m.scale_shift_norm, dropout=float(m.dropout),
              resamp_with_conv=m.resamp_with_conv, dtype=DTYPES[m.dtype],
              attn_implementation=m.get('attn_implementation'),
              num_classes=num_classes(config))


@functools.lru_cache(maxsize=16)
def _compiled_init(model: UNet, image_size: int, num_channels: int) -> Callable[[jax.Array], dict]:
  """One compiled init per (model, image shape): compiling init costs far more than running it."""

  def init(key: jax.Array) -> dict:
    x = jnp.zeros((1, image_size, image_size, num_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    if model.num_classes > 0:
      return model.init({'params': key}, x, t, jnp.zeros((1,), jnp.int32), train=False)['params']
    return model.init({'params': key}, x, t, train=False)['params']

  return jax.jit(init)


def init_params(model: UNet, key: jax.Array, image_size: int, num_channels: int) -> dict:
  """Initial float32 parameters for images [*, image_size, image_size, num_channels] from `key`."""
  return _compiled_init(model, image_size, num_channels)(key)


def param_shapes(config: ml_collections.ConfigDict) -> dict:
  """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating or computing anything."""
  model = create_model(config)
  return jax.eval_shape(lambda k: init_params(model, k, config.data.image_size,
                                              config.data.num_channels), jax.random.key(0))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))
