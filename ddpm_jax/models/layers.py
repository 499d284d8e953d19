"""The building blocks of the DDPM U-Net (Ho et al. 2020, §4 and Appendix B), with iDDPM options.

Every layer mirrors a scope of the original TensorFlow code so that official checkpoints map one
to one (see `convert_tf.py`): a `conv2d` is an `nn.Conv` (kernel [kh, kw, in, out]), a `nin`
(1x1 conv) and a `dense` are an `nn.Dense` (kernel [in, out], applied to the last axis of NHWC),
a group norm is an `nn.GroupNorm` (gamma/beta -> scale/bias).

Mixed precision: `dtype` is the computation dtype. Parameters are always float32; GroupNorm
statistics and the attention softmax are computed in float32 whatever `dtype` is.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

NUM_GROUPS = 32     # GroupNorm groups (DDPM Appendix B: "group normalization")
NORM_EPS = 1e-6     # tf.contrib.layers.group_norm's default epsilon, used by the original code

# Conventions of the code a checkpoint comes from. They change no parameter, only the function the
# parameters compute, so a converted checkpoint needs its own (`config.model.conventions`):
#   'diffusion_tf' (DDPM's TF code, the default): GroupNorm eps 1e-6; timestep embedding
#     [sin, cos] with frequencies exp(-i ln(10000) / (half - 1)); the stride-2 downsampling conv
#     pads TF-'SAME' style, 0 pixels before and 1 after.
#   'improved_diffusion' (iDDPM's PyTorch code, its released .pt models): torch.nn.GroupNorm's eps
#     1e-5; embedding [cos, sin] with frequencies exp(-i ln(10000) / half) (its nn.timestep_embedding);
#     the downsampling conv pads 1 pixel on both sides (Conv2d(padding=1)).
CONVENTIONS = ('diffusion_tf', 'improved_diffusion')
_NORM_EPS = {'diffusion_tf': NORM_EPS, 'improved_diffusion': 1e-5}
_DOWNSAMPLE_PADDING = {'diffusion_tf': ((0, 1), (0, 1)), 'improved_diffusion': ((1, 1), (1, 1))}


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
  """Variance scaling (fan_avg, uniform), the initializer of every weight in the original code.

  The original passes scale 1e-10 where it means zero (TF rejects scale 0); those layers are made
  exactly zero here, so that each residual branch and the output start as identity / zero.
  """
  if scale == 0.0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, 'fan_avg', 'uniform')


def conv3x3(features: int, name: str, dtype: Dtype, init_scale: float = 1.0) -> nn.Conv:
  """TF `conv2d` with a 3x3 filter, stride 1, 'SAME' padding (one pixel each side)."""
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=default_init(init_scale),
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def dense(features: int, name: str, dtype: Dtype, init_scale: float = 1.0) -> nn.Dense:
  """TF `dense` / `nin`: a matrix on the last axis, so on NHWC input it is a 1x1 convolution."""
  return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def group_norm(name: str, dtype: Dtype, conventions: str = 'diffusion_tf') -> nn.GroupNorm:
  """GroupNorm(32 groups, eps 1e-6) with the two-pass (biased) variance of tf.nn.moments.

  With conventions='improved_diffusion', eps 1e-5 (torch.nn.GroupNorm's default).
  """
  return nn.GroupNorm(num_groups=NUM_GROUPS, epsilon=_NORM_EPS[conventions], use_fast_variance=False,
                      dtype=dtype, param_dtype=jnp.float32, name=name)


def timestep_embedding(t: Array, dim: int, conventions: str = 'diffusion_tf') -> Array:
  """Sinusoidal embedding of the timesteps (DDPM §4 / Appendix B, after Vaswani et al. 2017).

  Args:
    t: [B] timestep indices (integer, or real for rescaled timesteps).
    dim: embedding size; the original code uses `ch`.
    conventions: 'improved_diffusion' gives concat[cos(t * f), sin(t * f)] with
      f_i = exp(-i ln(10000) / half), improved-diffusion's embedding.
  Returns:
    [B, dim] float32: concat[sin(t * f), cos(t * f)] with f_i = exp(-i ln(10000) / (half - 1)),
    zero-padded by one column when `dim` is odd. Always float32: t * f reaches 1e3 and more.
  """
  half = dim // 2
  if conventions == 'improved_diffusion':
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.pad(jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=1), ((0, 0), (0, dim % 2)))
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbed(nn.Module):
  """Scope `temb`: sinusoid(t) -> dense0 (4ch) -> swish -> dense1 (4ch).

  Returns [B, 4ch] float32 whatever the network's dtype (improved-diffusion's fp16 mode also keeps
  its time embedding in float32): it is tiny, and the fine differences between nearby t would not
  survive bfloat16's 8-bit mantissa. Each residual block applies its own swish to it.
  """
  ch: int
  conventions: str = 'diffusion_tf'

  @nn.compact
  def __call__(self, t: Array) -> Array:
    temb = timestep_embedding(t, self.ch, self.conventions)
    temb = dense(4 * self.ch, 'dense0', jnp.float32)(temb)
    return dense(4 * self.ch, 'dense1', jnp.float32)(nn.swish(temb))


class ResnetBlock(nn.Module):
  """Residual block (DDPM Appendix B; PixelCNN++ / Wide ResNet style), scope `block_{i}`.

  h = conv1(swish(norm1(x))) + temb_proj(swish(temb)); h = conv2(dropout(swish(norm2(h)))), conv2
  zero at init; output nin_shortcut(x) + h (the 1x1 shortcut only when the channel count changes).
  With `scale_shift_norm` (iDDPM's adaptive GroupNorm) temb_proj gives 2*out_ch values
  [scale, shift] and the second half reads swish(norm2(h) * (1 + scale) + shift) instead of adding
  the embedding.

  Call: x [B, H, W, C_in], temb [B, 4ch] -> [B, H, W, out_ch], in `dtype`.
  """
  out_ch: int
  dropout: float = 0.0
  scale_shift_norm: bool = False
  dtype: Dtype = jnp.float32
  conventions: str = 'diffusion_tf'  # the GroupNorm eps (CONVENTIONS)

  @nn.compact
  def __call__(self, x: Array, temb: Array, *, train: bool) -> Array:
    norm = functools.partial(group_norm, dtype=self.dtype, conventions=self.conventions)
    h = conv3x3(self.out_ch, 'conv1', self.dtype)(nn.swish(norm('norm1')(x)))
    emb_ch = 2 * self.out_ch if self.scale_shift_norm else self.out_ch
    emb = dense(emb_ch, 'temb_proj', self.dtype)(nn.swish(temb))[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = norm('norm2')(h) * (1 + scale) + shift
    else:
      h = norm('norm2')(h + emb)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = conv3x3(self.out_ch, 'conv2', self.dtype, init_scale=0.0)(h)
    if x.shape[-1] != self.out_ch:
      x = dense(self.out_ch, 'nin_shortcut', self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Self-attention over all H*W positions (DDPM Appendix B), scope `attn_{i}`; iDDPM: `num_heads`.

  q, k, v are 1x1 projections of norm(x); per head softmax(q k^T / sqrt(C / heads)) v, the heads
  concatenated (head-major channels), through the zero-initialised 1x1 `proj_out`, added to x. With
  one head this is exactly the original's einsum attention. `jax.nn.dot_product_attention` computes
  the logits and the softmax in float32 and lets XLA pick a fused kernel.

  Call: x [B, H, W, C] -> [B, H, W, C], in `dtype`.
  """
  num_heads: int = 1
  dtype: Dtype = jnp.float32
  implementation: str | None = None  # of jax.nn.dot_product_attention: 'xla', 'cudnn' or None
  conventions: str = 'diffusion_tf'  # the GroupNorm eps (CONVENTIONS)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, height, width, c = x.shape
    h = group_norm('norm', self.dtype, self.conventions)(x)

    def heads(name: str) -> Array:  # [B, H*W, heads, C/heads]
      return dense(c, name, self.dtype)(h).reshape(b, height * width, self.num_heads, -1)

    out = jax.nn.dot_product_attention(heads('q'), heads('k'), heads('v'),
                                       implementation=self.implementation)
    out = out.reshape(b, height, width, c)
    return x + dense(c, 'proj_out', self.dtype, init_scale=0.0)(out)


class Downsample(nn.Module):
  """Halves H and W (scope `downsample`): stride-2 conv3x3 (`with_conv`) or 2x2 average pooling.

  The conv reproduces TF 'SAME' padding for stride 2 on an even size: no padding before and one
  pixel after (PyTorch ports pad one on both sides, which shifts the sampling grid and would break
  converted checkpoints); conventions='improved_diffusion' pads one on both sides, as its
  Conv2d(padding=1) does, for its checkpoints.
  Call: x [B, H, W, C] (H, W even) -> [B, H/2, W/2, C].
  """
  with_conv: bool = True
  dtype: Dtype = jnp.float32
  conventions: str = 'diffusion_tf'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.with_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=_DOWNSAMPLE_PADDING[self.conventions],
                   kernel_init=default_init(), dtype=self.dtype, param_dtype=jnp.float32,
                   name='conv')(x)


class Upsample(nn.Module):
  """Doubles H and W (scope `upsample`): nearest neighbour (each pixel repeated 2x2), then conv3x3.

  The original's tf.image.resize(nearest, align_corners=True) from n to 2n picks exactly these
  pixels.
  Call: x [B, H, W, C] -> [B, 2H, 2W, C].
  """
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = conv3x3(x.shape[-1], 'conv', self.dtype)(x)
    return x


BlockFactory = Callable[..., ResnetBlock]
AttnFactory = Callable[..., AttnBlock]


def block_factories(dropout: float, scale_shift_norm: bool, num_heads: int, dtype: Dtype,
                    attn_implementation: str | None = None,
                    conventions: str = 'diffusion_tf') -> tuple[BlockFactory, AttnFactory]:
  """The residual- and attention-block constructors with the network-wide options bound."""
  block = functools.partial(ResnetBlock, dropout=dropout, scale_shift_norm=scale_shift_norm,
                            dtype=dtype, conventions=conventions)
  attn = functools.partial(AttnBlock, num_heads=num_heads, dtype=dtype,
                           implementation=attn_implementation, conventions=conventions)
  return block, attn
