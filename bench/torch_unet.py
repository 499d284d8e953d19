"""The DDPM U-Net (Ho et al. 2020, §4, Appendix B) in PyTorch, for the peer benchmark (bench/torch_peer.py) only.

Written from the network's description (SPEC.md §5) and the layer list of `ddpm_jax.models.unet`, so that
the two frameworks time the same network: the same layers, shapes and parameter count
(`count_params(TorchUNet.from_config(c)) == ddpm_jax.models.count_params(param_shapes(c))`, checked by the
runner and by tests/test_bench.py). It is not a port for weights (no name mapping, NCHW layout) and
ddpm_jax never imports it: torch is not a dependency of the package.

Conventions are DDPM's ('diffusion_tf' in `ddpm_jax.models.layers`): GroupNorm(32 groups, eps 1e-6),
timestep embedding [sin, cos] with frequencies exp(-i ln(10000) / (half - 1)), the stride-2 downsampling
conv padded 0 pixels before and 1 after (TF 'SAME'). Weights: variance scaling (fan_avg, uniform), which is
Xavier-uniform; the layers DDPM initialises at zero (each block's conv2, attention's proj_out, conv_out)
start at zero. iDDPM's options that change the parameter count (num_heads, scale_shift_norm,
learn_sigma) are supported so that any config without class labels can be timed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NUM_GROUPS = 32   # as ddpm_jax.models.layers.NUM_GROUPS: with ch=32 each group holds one channel
NORM_EPS = 1e-6   # DDPM's (TF group_norm's) epsilon


def _init(module: nn.Module, zero: bool = False) -> nn.Module:
  """Variance scaling (fan_avg, uniform) = Xavier-uniform weights, zero biases; all zero when `zero`."""
  if zero:
    nn.init.zeros_(module.weight)
  else:
    nn.init.xavier_uniform_(module.weight)
  nn.init.zeros_(module.bias)
  return module


def conv3x3(in_ch: int, out_ch: int, zero: bool = False) -> nn.Conv2d:
  return _init(nn.Conv2d(in_ch, out_ch, 3, padding=1), zero)


def conv1x1(in_ch: int, out_ch: int, zero: bool = False) -> nn.Conv2d:
  """DDPM's `nin`: a dense layer on the channels of every pixel."""
  return _init(nn.Conv2d(in_ch, out_ch, 1), zero)


def group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(NUM_GROUPS, channels, eps=NORM_EPS)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
  """[B] timesteps -> [B, dim] float32: concat[sin(t f), cos(t f)], f_i = exp(-i ln(10000) / (half - 1))."""
  half = dim // 2
  freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device)
                    * -(math.log(10000.0) / (half - 1)))
  args = t.float()[:, None] * freqs[None, :]
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
  return F.pad(emb, (0, dim % 2))


class ResnetBlock(nn.Module):
  """GN-swish-conv3x3, + Dense(swish(temb)), GN-swish-dropout-conv3x3 (zero at init), 1x1 shortcut when the
  channel count changes. With `scale_shift_norm` (iDDPM) the embedding gives [scale, shift] for norm2."""

  def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, scale_shift_norm: bool):
    super().__init__()
    self.scale_shift_norm = scale_shift_norm
    self.norm1 = group_norm(in_ch)
    self.conv1 = conv3x3(in_ch, out_ch)
    self.temb_proj = _init(nn.Linear(temb_ch, 2 * out_ch if scale_shift_norm else out_ch))
    self.norm2 = group_norm(out_ch)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = conv3x3(out_ch, out_ch, zero=True)
    self.nin_shortcut = conv1x1(in_ch, out_ch) if in_ch != out_ch else None

  def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    emb = self.temb_proj(F.silu(temb))[:, :, None, None]
    if self.scale_shift_norm:
      scale, shift = emb.chunk(2, dim=1)
      h = self.norm2(h) * (1 + scale) + shift
    else:
      h = self.norm2(h + emb)
    h = self.conv2(self.dropout(F.silu(h)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  """Self-attention over all H*W positions: 1x1 q, k, v of norm(x), softmax(q k^T / sqrt(C / heads)) v per
  head, zero-initialised 1x1 proj_out, added to x."""

  def __init__(self, channels: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.norm = group_norm(channels)
    self.q, self.k, self.v = (conv1x1(channels, channels) for _ in range(3))
    self.proj_out = conv1x1(channels, channels, zero=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, height, width = x.shape
    h = self.norm(x)

    def heads(proj: nn.Module) -> torch.Tensor:  # [B, heads, H*W, C/heads]
      return proj(h).reshape(b, self.num_heads, c // self.num_heads, height * width).transpose(2, 3)

    # torch's fused attention: the kernel a PyTorch user gets by default (scale 1/sqrt(C/heads)).
    out = F.scaled_dot_product_attention(heads(self.q), heads(self.k), heads(self.v))
    out = out.transpose(2, 3).reshape(b, c, height, width)
    return x + self.proj_out(out)


class Downsample(nn.Module):
  """Stride-2 conv3x3 padded as TF 'SAME' (0 before, 1 after), or 2x2 average pooling."""

  def __init__(self, channels: int, with_conv: bool):
    super().__init__()
    self.conv = _init(nn.Conv2d(channels, channels, 3, stride=2)) if with_conv else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.conv is None:
      return F.avg_pool2d(x, 2)
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  """Nearest-neighbour x2, then conv3x3 (when `with_conv`)."""

  def __init__(self, channels: int, with_conv: bool):
    super().__init__()
    self.conv = conv3x3(channels, channels) if with_conv else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(x, scale_factor=2.0, mode='nearest')
    return x if self.conv is None else self.conv(x)


class TorchUNet(nn.Module):
  """eps_theta(x_t, t): x [B, C, H, W] (NCHW, torch's native layout), t int [B] -> [B, out_ch, H, W].

  The layer order of `ddpm_jax.models.unet.UNet`: conv_in; per level num_res_blocks blocks (+ attention at
  `attn_resolutions`), downsampling except at the last level; middle block, attention, block; per level in
  reverse num_res_blocks + 1 blocks on concat[h, skip] (+ attention), upsampling except at level 0;
  GroupNorm, swish, conv_out (zero at init).
  """

  def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
               attn_resolutions: tuple[int, ...], dropout: float, in_ch: int, out_ch: int, image_size: int,
               num_heads: int = 1, scale_shift_norm: bool = False, resamp_with_conv: bool = True):
    super().__init__()
    temb_ch = 4 * ch
    self.num_res_blocks = num_res_blocks
    self.temb_dense0 = _init(nn.Linear(ch, temb_ch))
    self.temb_dense1 = _init(nn.Linear(temb_ch, temb_ch))
    self.ch = ch

    def block(i: int, o: int) -> ResnetBlock:
      return ResnetBlock(i, o, temb_ch, dropout, scale_shift_norm)

    self.conv_in = conv3x3(in_ch, ch)
    # The down path; `skip_chs` follows the activations the up path will read back, in order.
    self.down = nn.ModuleList()
    skip_chs, h_ch, res = [ch], ch, image_size
    for level, mult in enumerate(ch_mult):
      blocks, attns = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks):
        blocks.append(block(h_ch, ch * mult))
        h_ch = ch * mult
        attns.append(AttnBlock(h_ch, num_heads) if res in attn_resolutions else nn.Identity())
        skip_chs.append(h_ch)
      level_mod = nn.Module()
      level_mod.blocks, level_mod.attns = blocks, attns
      level_mod.downsample = None
      if level != len(ch_mult) - 1:
        level_mod.downsample = Downsample(h_ch, resamp_with_conv)
        skip_chs.append(h_ch)
        res //= 2
      self.down.append(level_mod)

    self.mid_block_1 = block(h_ch, h_ch)
    self.mid_attn_1 = AttnBlock(h_ch, num_heads)
    self.mid_block_2 = block(h_ch, h_ch)

    # The up path, built in the order it runs (levels reversed); its modules are stored in that order.
    self.up = nn.ModuleList()
    for level in reversed(range(len(ch_mult))):
      blocks, attns = nn.ModuleList(), nn.ModuleList()
      for _ in range(num_res_blocks + 1):
        blocks.append(block(h_ch + skip_chs.pop(), ch * ch_mult[level]))
        h_ch = ch * ch_mult[level]
        attns.append(AttnBlock(h_ch, num_heads) if res in attn_resolutions else nn.Identity())
      level_mod = nn.Module()
      level_mod.blocks, level_mod.attns = blocks, attns
      level_mod.upsample = None
      if level != 0:
        level_mod.upsample = Upsample(h_ch, resamp_with_conv)
        res *= 2
      self.up.append(level_mod)
    assert not skip_chs  # every skip consumed, as in the JAX network

    self.norm_out = group_norm(h_ch)
    self.conv_out = conv3x3(h_ch, out_ch, zero=True)

  @classmethod
  def from_config(cls, config: Any) -> TorchUNet:
    """The network of `config.model` / `config.data` (an ml_collections ConfigDict of ddpm_jax)."""
    m = config.model
    if int(m.get('num_classes', 0)) > 0:
      raise NotImplementedError('the peer U-Net has no class-conditional variant (model.num_classes > 0)')
    c = config.data.num_channels
    return cls(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
               attn_resolutions=tuple(m.attn_resolutions), dropout=float(m.dropout), in_ch=c,
               out_ch=c * (2 if m.learn_sigma else 1), image_size=config.data.image_size,
               num_heads=m.num_heads, scale_shift_norm=m.scale_shift_norm,
               resamp_with_conv=m.resamp_with_conv)

  def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    temb = self.temb_dense1(F.silu(self.temb_dense0(timestep_embedding(t, self.ch))))
    hs = [self.conv_in(x)]
    for level in self.down:
      for block, attn in zip(level.blocks, level.attns):
        hs.append(attn(block(hs[-1], temb)))
      if level.downsample is not None:
        hs.append(level.downsample(hs[-1]))
    h = self.mid_block_2(self.mid_attn_1(self.mid_block_1(hs[-1], temb)), temb)
    for level in self.up:
      for block, attn in zip(level.blocks, level.attns):
        h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
      if level.upsample is not None:
        h = level.upsample(h)
    assert not hs
    return self.conv_out(F.silu(self.norm_out(h)))


def count_params(module: nn.Module) -> int:
  """Number of scalars in the module's parameters (as `ddpm_jax.models.count_params` counts the Flax tree)."""
  return sum(p.numel() for p in module.parameters())
