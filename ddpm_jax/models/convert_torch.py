"""improved-diffusion's PyTorch state dicts <-> Flax parameters of `ddpm_jax.models.UNet`.

improved-diffusion (Nichol & Dhariwal 2021; `improved_diffusion/unet.py`) names its UNetModel's
tensors by module position; each maps onto one Flax module of the UNet built with
`conventions='improved_diffusion'` (same parameters; see layers.CONVENTIONS for the three
numerical conventions):
  time_embed.{0,2}                   -> temb/dense{0,1}          Linear: kernel = weight.T
  label_emb.weight                   -> label_emb/embedding      (class-conditional models)
  input_blocks.0.0                   -> conv_in                  Conv2d: kernel = weight [O,I,kh,kw]
                                                                  -> [kh,kw,I,O]
  input_blocks.k.0 / .k.1            -> down_l/block_i / attn_i  k counts 1, 2, ... level by level
  input_blocks.k.0.op                -> down_l/downsample/conv   after each level but the last
  middle_block.{0,1,2}               -> mid/block_1, attn_1, block_2
  output_blocks.k.0 / .k.1           -> up_l/block_i / attn_i    levels from the lowest resolution
  output_blocks.k.{1|2}.conv         -> up_l/upsample/conv       on the last block of levels > 0
  out.{0,2}                          -> norm_out, conv_out
ResBlock: in_layers.0 -> norm1, in_layers.2 -> conv1, emb_layers.1 -> temb_proj (2 out_ch with
scale-shift norm: [scale, shift], the order th.chunk reads), out_layers.0 -> norm2, out_layers.3 ->
conv2, skip_connection (a 1x1 Conv2d) -> nin_shortcut (Dense). AttentionBlock: norm -> norm,
proj_out (1x1 Conv1d) -> proj_out, and qkv (Conv1d C -> 3C) -> q, k, v: QKVAttention reshapes
the 3C channels to [heads, 3 * C/heads] and splits each head's group into q, k, v, so output
channel h * 3d + s * d + j (d = C/heads) is channel h * d + j of q (s=0), k (s=1) or v (s=2), and
the heads stay head-major as AttnBlock reshapes them. GroupNorm weight/bias -> scale/bias.

The mapping is numpy only; `torch_zip.load_state_dict` reads the .pt files without PyTorch.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

Params = Any

# Torch module kinds: how each converts. 'qkv' maps one torch module onto three Flax modules.
_RESBLOCK = (('norm1', 'in_layers.0', 'norm'), ('conv1', 'in_layers.2', 'conv'),
             ('temb_proj', 'emb_layers.1', 'linear'), ('norm2', 'out_layers.0', 'norm'),
             ('conv2', 'out_layers.3', 'conv'), ('nin_shortcut', 'skip_connection', 'conv2d_1x1'))
_ATTN = (('norm', 'norm', 'norm'), ('proj_out', 'proj_out', 'conv1d_1x1'))
_ONE_BY_ONE = {'conv2d_1x1': 2, 'conv1d_1x1': 1}  # spatial dims of the torch weight [O, I, 1...]


def _count(tree: Mapping[str, Any], prefix: str) -> int:
  return sum(1 for k in tree if k.startswith(prefix))


def module_map(params_template: Params) -> list[tuple[tuple[str, ...], str, str]]:
  """(Flax module path, torch module name, kind) of every torch module of improved-diffusion's
  UNetModel with this parameter tree, in the torch model's own order (UNetModel.__init__)."""
  p = params_template
  num_levels = _count(p, 'down_')
  num_res_blocks = _count(p['down_0'], 'block_')
  out = [(('temb', 'dense0'), 'time_embed.0', 'linear'),
         (('temb', 'dense1'), 'time_embed.2', 'linear')]
  if 'label_emb' in p:
    out.append((('label_emb',), 'label_emb', 'embedding'))

  def resblock(path, name):
    out.extend((path + (sub,), f'{name}.{tname}', kind) for sub, tname, kind in _RESBLOCK
               if sub in _dig(p, path))

  def attn(path, name):
    out.extend((path + (sub,), f'{name}.{tname}', kind) for sub, tname, kind in _ATTN)
    out.append((path, f'{name}.qkv', 'qkv'))

  out.append((('conv_in',), 'input_blocks.0.0', 'conv'))
  k = 1
  for level in range(num_levels):
    scope = f'down_{level}'
    for i in range(num_res_blocks):
      resblock((scope, f'block_{i}'), f'input_blocks.{k}.0')
      if f'attn_{i}' in p[scope]:
        attn((scope, f'attn_{i}'), f'input_blocks.{k}.1')
      k += 1
    if 'downsample' in p[scope]:
      out.append(((scope, 'downsample', 'conv'), f'input_blocks.{k}.0.op', 'conv'))
      k += 1
  resblock(('mid', 'block_1'), 'middle_block.0')
  attn(('mid', 'attn_1'), 'middle_block.1')
  resblock(('mid', 'block_2'), 'middle_block.2')
  k = 0
  for level in reversed(range(num_levels)):
    scope = f'up_{level}'
    for i in range(num_res_blocks + 1):
      resblock((scope, f'block_{i}'), f'output_blocks.{k}.0')
      j = 1
      if f'attn_{i}' in p[scope]:
        attn((scope, f'attn_{i}'), f'output_blocks.{k}.1')
        j = 2
      if i == num_res_blocks and 'upsample' in p[scope]:
        out.append(((scope, 'upsample', 'conv'), f'output_blocks.{k}.{j}.conv', 'conv'))
      k += 1
  out += [(('norm_out',), 'out.0', 'norm'), (('conv_out',), 'out.2', 'conv')]
  return out


def _dig(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _to_flax(kind: str, w: np.ndarray, b: np.ndarray | None, num_heads: int) -> dict[tuple, Any]:
  """{Flax sub-path: array} for one torch module's weight (and bias)."""
  if kind == 'norm':
    return {('scale',): w, ('bias',): b}
  if kind == 'embedding':
    return {('embedding',): w}
  if kind == 'linear':
    return {('kernel',): w.T, ('bias',): b}
  if kind == 'conv':
    return {('kernel',): w.transpose(2, 3, 1, 0), ('bias',): b}
  if kind in _ONE_BY_ONE:  # Conv2d / Conv1d with a 1-wide kernel: [O, I, 1(, 1)] -> Dense [I, O]
    if w.shape[2:] != (1,) * _ONE_BY_ONE[kind]:
      raise ValueError(f'expected a 1x1 kernel, got weight {w.shape}')
    return {('kernel',): w.reshape(w.shape[:2]).T, ('bias',): b}
  if kind == 'qkv':
    c = w.shape[1]
    w = w.reshape(num_heads, 3, c // num_heads, c)  # [head, q/k/v, channel of the head, in]
    b = b.reshape(num_heads, 3, c // num_heads)
    return {(name, leaf): (w[:, s].reshape(c, c).T if leaf == 'kernel' else b[:, s].reshape(c))
            for s, name in enumerate('qkv') for leaf in ('kernel', 'bias')}
  raise ValueError(kind)


def _from_flax(kind: str, module: Mapping[str, Any], num_heads: int) -> dict[str, np.ndarray]:
  """The inverse of `_to_flax`: {'weight'|'bias': torch-layout array}."""
  m = {k: (v if isinstance(v, Mapping) else np.asarray(v)) for k, v in module.items()}
  if kind == 'norm':
    return {'weight': m['scale'], 'bias': m['bias']}
  if kind == 'embedding':
    return {'weight': m['embedding']}
  if kind == 'linear':
    return {'weight': m['kernel'].T, 'bias': m['bias']}
  if kind == 'conv':
    return {'weight': m['kernel'].transpose(3, 2, 0, 1), 'bias': m['bias']}
  if kind in _ONE_BY_ONE:
    kernel = m['kernel'].T
    return {'weight': kernel.reshape(kernel.shape + (1,) * _ONE_BY_ONE[kind]), 'bias': m['bias']}
  if kind == 'qkv':
    c = np.asarray(m['q']['kernel']).shape[0]
    d = c // num_heads
    w = np.stack([np.asarray(m[n]['kernel']).T.reshape(num_heads, d, c) for n in 'qkv'], axis=1)
    b = np.stack([np.asarray(m[n]['bias']).reshape(num_heads, d) for n in 'qkv'], axis=1)
    return {'weight': w.reshape(3 * c, c, 1), 'bias': b.reshape(3 * c)}
  raise ValueError(kind)


def torch_to_flax(state_dict: Mapping[str, np.ndarray], params_template: Params,
                  num_heads: int) -> Params:
  """Maps an improved-diffusion UNetModel state dict onto a UNet parameter tree.

  Args:
    state_dict: {torch name: array}, e.g. from `torch_zip.load_state_dict`.
    params_template: the UNet's parameter tree (arrays or jax.ShapeDtypeStruct leaves) for
      conventions='improved_diffusion', for the names and shapes.
    num_heads: the attention heads (config.model.num_heads), which order the qkv channels.
  Returns:
    A nested dict with the template's structure of numpy arrays in the template's dtypes.
  Raises:
    ValueError listing the torch tensors left over, the Flax parameters left unfilled and the shape
    mismatches, unless every tensor fills parameters of the same shape and every parameter is
    filled, each tensor used exactly once.
  """
  template = traverse_util.flatten_dict(params_template)
  out, used, mismatched, missing_torch = {}, set(), [], []
  for path, name, kind in module_map(params_template):
    names = {'weight': f'{name}.weight', 'bias': f'{name}.bias'}
    if kind == 'embedding':
      names.pop('bias')
    absent = [n for n in names.values() if n not in state_dict]
    if absent:
      missing_torch += absent
      continue
    used.update(names.values())
    w = np.asarray(state_dict[names['weight']])
    b = np.asarray(state_dict[names['bias']]) if 'bias' in names else None
    try:
      converted = _to_flax(kind, w, b, num_heads)
    except ValueError as e:  # a qkv whose channels do not split into the heads
      mismatched.append(f'{name} {w.shape}: {e}')
      continue
    for sub, value in converted.items():
      full = path + sub
      if full not in template:
        mismatched.append(f'{name} -> {"/".join(full)}: no such Flax parameter')
      elif value.shape != tuple(template[full].shape):
        mismatched.append(f'{name} {w.shape} -> {"/".join(full)} {tuple(template[full].shape)} '
                          f'(converted {value.shape})')
      elif full in out:
        mismatched.append(f'{"/".join(full)} filled twice')
      else:
        out[full] = value.astype(template[full].dtype)
  leftover = sorted(set(state_dict) - used)
  unfilled = sorted('/'.join(p) for p in template if p not in out)
  if leftover or unfilled or mismatched:
    raise ValueError(
        'improved-diffusion state dict does not match the model configuration:\n'
        f'  torch tensors left over ({len(leftover)}): {leftover}\n'
        f'  Flax parameters not filled ({len(unfilled)}): {unfilled}\n'
        f'  torch tensors expected but absent ({len(missing_torch)}): {missing_torch}\n'
        f'  shape mismatches ({len(mismatched)}): {mismatched}')
  return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Params, num_heads: int) -> dict[str, np.ndarray]:
  """The inverse of `torch_to_flax`: improved-diffusion's state dict of these parameters."""
  sd = {}
  for path, name, kind in module_map(params):
    for leaf, value in _from_flax(kind, _dig(params, path), num_heads).items():
      sd[f'{name}.{leaf}'] = np.asarray(value)
  return sd
