"""Official DDPM TensorFlow checkpoints <-> Flax parameters of `ddpm_jax.models.UNet`.

The released checkpoints of Ho et al. (diffusion_tf) keep every network variable under `model/`:
`<scope>/W` and `<scope>/b` for conv2d (W [kh, kw, in, out]), nin and dense (W [in, out]);
`<scope>/gamma` and `<scope>/beta` for GroupNorm; EMA copies as `<name>/ExponentialMovingAverage`.
The UNet's module tree mirrors those scopes, so a TF name and a Flax path differ only in the leaf:
  model/down_0/block_0/conv1/W    <-> params['down_0']['block_0']['conv1']['kernel']  (same layout)
  model/mid/attn_1/q/b            <-> params['mid']['attn_1']['q']['bias']
  model/up_1/block_2/norm1/gamma  <-> params['up_1']['block_2']['norm1']['scale']
nin / dense layers are `nn.Dense`, whose kernel [in, out] is the TF W unchanged.

Only `load_tf_checkpoint` / `save_tf_checkpoint` need TensorFlow (imported lazily, with no GPU
visible); the mapping itself is numpy.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ddpm_jax.data.tf_cpu import tf_cpu_only

TF_PREFIX = 'model/'
EMA_SUFFIX = '/ExponentialMovingAverage'
_TF_LEAVES = ('W', 'b', 'gamma', 'beta')
_CONV_LEAVES = {'kernel': 'W', 'bias': 'b'}    # conv2d, nin, dense
_NORM_LEAVES = {'scale': 'gamma', 'bias': 'beta'}  # group_norm

Params = Any


def load_tf_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Reads the network variables (names under `model/`, raw and EMA) of a TF checkpoint.

  Args:
    path: a checkpoint prefix (e.g. .../model.ckpt-790000) or a directory with a `checkpoint`
      file.
  Returns:
    {TF variable name: array}. Optimizer slots (e.g. `.../W/Adam`) and non-network variables are
    skipped.
  """
  tf = tf_cpu_only()
  reader = tf.train.load_checkpoint(path)
  names = [n for n in reader.get_variable_to_shape_map() if n.startswith(TF_PREFIX)
           and (n.endswith(EMA_SUFFIX) or n.rsplit('/', 1)[-1] in _TF_LEAVES)]
  if not names:
    raise ValueError(f'TF checkpoint {path!r} has no variables under {TF_PREFIX!r}; is it a DDPM '
                     'diffusion_tf checkpoint?')
  return {n: np.asarray(reader.get_tensor(n)) for n in names}


def save_tf_checkpoint(prefix: str, tf_vars: Mapping[str, np.ndarray]) -> str:
  """Writes `tf_vars` as a TF checkpoint under exactly these names (for tests and round trips).

  Returns the prefix, which `load_tf_checkpoint` / tf.train.load_checkpoint accept.
  """
  tf = tf_cpu_only()
  names = sorted(tf_vars)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names),
                    tensors=[tf.constant(np.asarray(tf_vars[n])) for n in names])
  return prefix


def _tf_names(params: Params) -> dict[tuple[str, ...], str]:
  """Flax parameter path -> TF name without `model/` (a module with a `scale` is a GroupNorm)."""
  flat = traverse_util.flatten_dict(params)
  names = {}
  for path in flat:
    module, leaf = path[:-1], path[-1]
    leaf_map = _NORM_LEAVES if module + ('scale',) in flat else _CONV_LEAVES
    if leaf not in leaf_map:
      raise ValueError(f'Flax parameter {"/".join(path)} has no TF counterpart (leaf {leaf!r}; '
                       f'expected one of {sorted(leaf_map)})')
    names[path] = '/'.join(module + (leaf_map[leaf],))
  return names


def has_ema(tf_vars: Mapping[str, Any]) -> bool:
  """Whether the checkpoint holds ExponentialMovingAverage copies of the network variables."""
  return any(n.startswith(TF_PREFIX) and n.endswith(EMA_SUFFIX) for n in tf_vars)


def _select(tf_vars: Mapping[str, np.ndarray],
            use_ema: bool) -> tuple[dict[str, np.ndarray], list[str]]:
  """The raw or EMA network variables by scope name (no `model/`, no suffix), and unknown names."""
  raw, ema, other = {}, {}, []
  for name, value in tf_vars.items():
    if not name.startswith(TF_PREFIX):
      continue  # global_step and the like
    rest = name[len(TF_PREFIX):]
    if rest.endswith(EMA_SUFFIX):
      ema[rest[:-len(EMA_SUFFIX)]] = value
    elif rest.rsplit('/', 1)[-1] in _TF_LEAVES:
      raw[rest] = value
    else:
      other.append(name)
  # Optimizer slots hang below a weight (`<weight>/Adam`); anything else under model/ is unknown.
  unknown = [n for n in other if n[len(TF_PREFIX):].rsplit('/', 1)[0] not in raw]
  return (ema if use_ema else raw), unknown


def tf_to_flax(tf_vars: Mapping[str, np.ndarray], params_template: Params, use_ema: bool) -> Params:
  """Maps the TF network variables onto a UNet parameter tree.

  Args:
    tf_vars: {TF name: array}, e.g. from `load_tf_checkpoint`.
    params_template: the UNet's parameter tree (arrays or jax.ShapeDtypeStruct leaves), for the
      names and shapes.
    use_ema: take the `<name>/ExponentialMovingAverage` copies instead of the raw weights.
  Returns:
    A nested dict with the template's structure of numpy arrays in the template's dtypes.
  Raises:
    ValueError listing the TF names left unused, the Flax parameters left unfilled and the shape
    mismatches, unless every selected variable fills exactly one parameter of the same shape.
  """
  selected, unknown = _select(tf_vars, use_ema)
  template = traverse_util.flatten_dict(params_template)
  names = _tf_names(params_template)
  out, missing, mismatched = {}, [], []
  for path, tf_name in names.items():
    want = template[path]
    if tf_name not in selected:
      missing.append(f'{"/".join(path)} (TF {TF_PREFIX}{tf_name})')
      continue
    value = np.asarray(selected[tf_name])
    if value.shape != tuple(want.shape):
      mismatched.append(
          f'{TF_PREFIX}{tf_name} {value.shape} -> {"/".join(path)} {tuple(want.shape)}')
      continue
    out[path] = value.astype(want.dtype)
  used = set(names.values())
  leftover = sorted(TF_PREFIX + n for n in selected if n not in used) + sorted(unknown)
  if missing or mismatched or leftover:
    kind = 'EMA' if use_ema else 'raw'
    raise ValueError(
        f'TF checkpoint ({kind} weights) does not match the model configuration:\n'
        f'  TF variables left over ({len(leftover)}): {leftover}\n'
        f'  Flax parameters not filled ({len(missing)}): {missing}\n'
        f'  shape mismatches ({len(mismatched)}): {mismatched}')
  return traverse_util.unflatten_dict(out)


def flax_to_tf(params: Params, use_ema: bool = False) -> dict[str, np.ndarray]:
  """The inverse of `tf_to_flax`: {`model/...` TF name (+ EMA suffix if `use_ema`): numpy array}."""
  flat = traverse_util.flatten_dict(params)
  suffix = EMA_SUFFIX if use_ema else ''
  return {TF_PREFIX + name + suffix: np.asarray(flat[path])
          for path, name in _tf_names(params).items()}


def tf_variable_shapes(params_template: Params) -> dict[str, tuple[int, ...]]:
  """{TF variable name: shape} a checkpoint of this network holds (raw weights, no EMA suffix)."""
  flat = traverse_util.flatten_dict(params_template)
  return {TF_PREFIX + name: tuple(flat[path].shape)
          for path, name in _tf_names(params_template).items()}


def convert_tf_vars(tf_vars: Mapping[str, np.ndarray],
                    params_template: Params) -> tuple[Params, Params]:
  """(params, ema_params) of a checkpoint; without EMA copies both are the raw weights."""
  params = tf_to_flax(tf_vars, params_template, use_ema=False)
  ema_params = tf_to_flax(tf_vars, params_template, use_ema=True) if has_ema(tf_vars) else params
  return params, ema_params
