"""The FID Inception network: InceptionV3 of TF's "inception-2015-12-05" graph in Flax linen (NHWC).

DDPM §4.1 reports FID and Inception Score computed with this network, the one used by the TTUR FID
code (github.com/bioinf-jku/TTUR, `fid.py`) and the improved-GAN Inception Score code. It is not
Keras' or torchvision's ImageNet InceptionV3: it has 1008 output classes and its last block
(`mixed_10`) pools with a max pool where the others average, and its average pools do not count the
padding (TF `AvgPool` with SAME padding).

Input pipeline (`InceptionV3.__call__`), mirroring the graph from its `ExpandDims` node on, which is
where TTUR feeds its batches: images [N, H, W, C] with values in [0, 255] (C = 1 is tiled to 3) ->
`ResizeBilinear` to 299x299 with TF1 legacy semantics (align_corners=False, no half-pixel centres:
source pixel = destination pixel * in_size / out_size) -> `Sub` 128 -> `Mul` 1/128 -> network.
Outputs: `pool_3` features [N, 2048] (FID) and logits [N, 1008] = pool_3 @ `softmax/weights`; like
the improved-GAN / TTUR Inception Score code, the logits leave out `softmax/biases` unless
`logits_include_bias=True`.

Weights files accepted by `load_inception_variables` (never downloaded unless none is given):
- `classify_image_graph_def.pb`, the frozen GraphDef inside
  http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz (that .tgz is
  accepted too). The converter reads the Const tensors by node name: `<scope>/conv2d_params`
  [kh, kw, in, out] and `<scope>/batchnorm/{beta, gamma, moving_mean, moving_variance}` for each of
  the 94 conv layers, `softmax/weights` [2048, 1008] and `softmax/biases` [1008]. It also checks the
  graph's ops against this module: Conv2D strides/padding, pool op/size/strides/padding, the
  batch-norm epsilon (and uses gamma only when the op has `scale_after_normalization`), and the
  preprocessing (`ResizeBilinear` size and mode, `Sub/y` = 128, `Mul/y` = 1/128).
- a .npz of the converted Flax variables written by `save_inception_variables` (keys like
  `params/mixed_9/tower/mixed/conv/conv2d/kernel`).
The converted tree is cached as `inception_fid_<sha256 of the .pb>[:16].npz` in the cache directory
(default ~/.cache/ddpm_jax), the self-check's record beside it as `inception_fid_<...>.selfcheck.json`.

Not accepted: pytorch-fid's `pt_inception-2015-12-05-*.pth` (PyTorch is not a dependency).

NOT VERIFIED HERE (no network, so the real file was never opened): that the published graph uses
exactly these node names, shapes and attributes (the converter raises, naming the node, if a node is
missing or a kernel's shape differs, which also catches 1x7 vs 7x1 mix-ups). What no shape check can
see (the channel order of the branch concatenations, a pool's kind, whether an average pool counts
the padding, the resize's pixel centres) is what the self-check is for: `load_checked_variables`
runs this port and the graph itself (`inception_tf.py`, TensorFlow on the CPU) on fixed images the
first time a weights file is used, and refuses the port if they differ by more than
SELF_CHECK_TOLERANCE. The tests run it on a runnable synthetic graph with the published node names
and ops (tests/inception_graph.py), where the port matches the graph to ~1e-6 relative, and inject
each of those faults (the module switches TF1_LEGACY_RESIZE, AVG_POOL_COUNTS_PADDING, E_BLOCK_POOLS,
`join`) to show the check refuses them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tarfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from ddpm_jax import workdir
from ddpm_jax.data.tf_cpu import tf_cpu_only

INCEPTION_URL = 'http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz'
GRAPH_DEF_NAME = 'classify_image_graph_def.pb'
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'ddpm_jax')
INPUT_SIZE = 299
NUM_FEATURES = 2048   # pool_3
NUM_LOGITS = 1008     # softmax/weights columns (1000 ImageNet classes + 8 unused)
BN_EPSILON = 1e-3     # `variance_epsilon` of the graph's BatchNormWithGlobalNormalization ops
ACCEPTED_WEIGHTS = (f'{GRAPH_DEF_NAME} (or any .pb GraphDef of the same graph), '
                    'inception-2015-12-05.tgz, or a .npz written by save_inception_variables')

Variables = dict[str, Any]   # {'params': ..., 'batch_stats': ...}
InceptionFn = Callable[[Any], tuple[jax.Array, jax.Array]]


# ----------------------------------------------------------------------------- preprocessing

# Switches of the port that are facts about the TF graph. They are module constants so that the
# self-check's tests can flip one (monkeypatch) and show that the comparison with the graph catches
# what no shape check can: these are the port's likeliest silent errors.
TF1_LEGACY_RESIZE = True          # ResizeBilinear(half_pixel_centers=False), not TF2's half-pixel
AVG_POOL_COUNTS_PADDING = False   # TF's AvgPool(SAME) divides by the in-image pixels only
E_BLOCK_POOLS = ('avg', 'max')    # mixed_9 average-pools, mixed_10 max-pools (the FID graph's quirk)


def join(branches: Sequence[jax.Array]) -> jax.Array:
  """A block's `join` node: the graph concatenates its branches in scope order (conv, tower,
  tower_1, tower_2 / pool) along channels."""
  return jnp.concatenate(list(branches), axis=-1)


def _tf1_bilinear_matrix(in_size: int, out_size: int, legacy: bool = True) -> np.ndarray:
  """[out_size, in_size] float32 weights of TF's `ResizeBilinear(align_corners=False)` on one axis.

  TF1 (legacy, `half_pixel_centers=False`) maps destination pixel i to source coordinate
  i * (in / out); TF2's half-pixel mode maps it to (i + 0.5) * (in / out) - 0.5, clamped at 0. Both
  are computed in float32 and interpolate between floor and ceil (clamped to the last pixel).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  if not legacy:
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
                     - np.float32(0.5), np.float32(0))
  lower = np.floor(src).astype(np.int64)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  frac = (src - lower.astype(np.float32)).astype(np.float64)
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), lower), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), upper), frac)
  return weights.astype(np.float32)


def resize_bilinear_tf1(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Resizes float images [N, H, W, C] to [N, size, size, C] like TF1's legacy ResizeBilinear.

  This is the resize inside the FID graph (and so inside TTUR's FID); it differs from
  `jax.image.resize` and PyTorch's `interpolate`, which use half-pixel centres.
  """
  _, height, width, _ = images.shape
  if (height, width) == (size, size):
    return images
  rows = jnp.asarray(_tf1_bilinear_matrix(height, size, TF1_LEGACY_RESIZE))
  cols = jnp.asarray(_tf1_bilinear_matrix(width, size, TF1_LEGACY_RESIZE))
  hi = jax.lax.Precision.HIGHEST  # exact float32 weights: no bf16/tf32 passes on accelerators
  images = jnp.einsum('oh,nhwc->nowc', rows, images, precision=hi)
  return jnp.einsum('pw,nowc->nopc', cols, images, precision=hi)


def preprocess(images: jax.Array) -> jax.Array:
  """Images [N, H, W, 1 or 3] in [0, 255] (any numeric dtype) -> float32 [N, 299, 299, 3], [-1, 1].

  Follows the graph: Cast -> ResizeBilinear -> Sub 128 -> Mul 1/128. Grey images are tiled to RGB.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Inception input: got shape {tuple(images.shape)}, expected [N, H, W, C] '
                     'with C = 1 (tiled to RGB) or 3, values in [0, 255]')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  x = resize_bilinear_tf1(x)
  return (x - 128.0) * (1.0 / 128.0)


# ----------------------------------------------------------------------------- network

class ConvSpec(NamedTuple):
  """One conv layer of a tower: output channels, kernel (kh, kw), stride, TF padding."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: str = 'SAME'


def _scope_name(base: str, index: int) -> str:
  """TF's name uniquification inside a scope: conv, conv_1, conv_2, ..."""
  return base if index == 0 else f'{base}_{index}'


class ConvBN(nn.Module):
  """Conv (no bias) -> batch norm (stored moving statistics) -> ReLU: one `<scope>` of the graph.

  The Flax path `<scope>/conv2d/kernel` holds `<scope>/conv2d_params`, `<scope>/batchnorm/*` the
  batch-norm constants. He-normal init keeps activations O(1) through the random-weight network.
  """
  spec: ConvSpec
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.spec
    x = nn.Conv(s.features, s.kernel, (s.strides, s.strides), s.padding, use_bias=False,
                kernel_init=nn.initializers.he_normal(), precision=self.precision,
                name='conv2d')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name='batchnorm')(x)
    return nn.relu(x)


class Pool(nn.Module):
  """A parameter-free pooling node of the graph ('max' or 'avg'), kept as a module so that the
  converter can check it against the graph's node of the same name."""
  kind: str
  window: int = 3
  strides: int = 1
  padding: str = 'SAME'

  def __call__(self, x: jax.Array) -> jax.Array:
    window, strides = (self.window, self.window), (self.strides, self.strides)
    if self.kind == 'max':
      return nn.max_pool(x, window, strides, self.padding)
    # TF's AvgPool divides by the number of in-image pixels under the window, not by 9.
    return nn.avg_pool(x, window, strides, self.padding,
                       count_include_pad=AVG_POOL_COUNTS_PADDING)


class SplitConv(nn.Module):
  """The `mixed` sub-scope of the mixed_9/mixed_10 towers: 1x3 (`conv`) and 3x1 (`conv_1`) convs
  applied in parallel, concatenated."""
  features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return join([
        ConvBN(ConvSpec(self.features, (1, 3)), self.precision, name='conv')(x),
        ConvBN(ConvSpec(self.features, (3, 1)), self.precision, name='conv_1')(x)])


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ...; with `split` > 0 it ends in a SplitConv
  named `mixed` (the towers of mixed_9 and mixed_10)."""
  layers: Sequence[ConvSpec]
  split: int = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, spec in enumerate(self.layers):
      x = ConvBN(spec, self.precision, name=_scope_name('conv', i))(x)
    if self.split:
      x = SplitConv(self.split, self.precision, name='mixed')(x)
    return x


class PoolTower(nn.Module):
  """`tower_2` of the inception blocks: 3x3 stride-1 SAME pool (`pool`), 1x1 ConvBN (`conv`)."""
  kind: str
  features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Pool(self.kind, name='pool')(x)
    return ConvBN(ConvSpec(self.features), self.precision, name='conv')(x)


class InceptionA(nn.Module):
  """`mixed`, `mixed_1`, `mixed_2` (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    return join([
        ConvBN(ConvSpec(64), p, name='conv')(x),
        Tower((ConvSpec(48), ConvSpec(64, (5, 5))), precision=p, name='tower')(x),
        Tower((ConvSpec(64), ConvSpec(96, (3, 3)), ConvSpec(96, (3, 3))), precision=p,
              name='tower_1')(x),
        PoolTower('avg', self.pool_features, p, name='tower_2')(x)])


class InceptionB(nn.Module):
  """`mixed_3` (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    return join([
        ConvBN(ConvSpec(384, (3, 3), 2, 'VALID'), p, name='conv')(x),
        Tower((ConvSpec(64), ConvSpec(96, (3, 3)), ConvSpec(96, (3, 3), 2, 'VALID')), precision=p,
              name='tower')(x),
        Pool('max', 3, 2, 'VALID', name='pool')(x)])


class InceptionC(nn.Module):
  """`mixed_4` .. `mixed_7` (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p, c = self.precision, self.channels_7x7
    return join([
        ConvBN(ConvSpec(192), p, name='conv')(x),
        Tower((ConvSpec(c), ConvSpec(c, (1, 7)), ConvSpec(192, (7, 1))), precision=p,
              name='tower')(x),
        Tower((ConvSpec(c), ConvSpec(c, (7, 1)), ConvSpec(c, (1, 7)), ConvSpec(c, (7, 1)),
               ConvSpec(192, (1, 7))), precision=p, name='tower_1')(x),
        PoolTower('avg', 192, p, name='tower_2')(x)])


class InceptionD(nn.Module):
  """`mixed_8` (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    return join([
        Tower((ConvSpec(192), ConvSpec(320, (3, 3), 2, 'VALID')), precision=p, name='tower')(x),
        Tower((ConvSpec(192), ConvSpec(192, (1, 7)), ConvSpec(192, (7, 1)),
               ConvSpec(192, (3, 3), 2, 'VALID')), precision=p, name='tower_1')(x),
        Pool('max', 3, 2, 'VALID', name='pool')(x)])


class InceptionE(nn.Module):
  """`mixed_9`, `mixed_10` (8x8): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  The FID graph's quirk: mixed_9 average-pools, mixed_10 max-pools (`pool_kind`).
  """
  pool_kind: str
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.precision
    return join([
        ConvBN(ConvSpec(320), p, name='conv')(x),
        Tower((ConvSpec(384),), split=384, precision=p, name='tower')(x),
        Tower((ConvSpec(448), ConvSpec(384, (3, 3))), split=384, precision=p, name='tower_1')(x),
        PoolTower(self.pool_kind, 192, p, name='tower_2')(x)])


class Logits(nn.Module):
  """`softmax/weights` [2048, 1008] and `softmax/biases` [1008]: pool_3 features -> logits."""
  include_bias: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (NUM_FEATURES, NUM_LOGITS))
    bias = self.param('bias', nn.initializers.zeros, (NUM_LOGITS,))
    logits = jnp.dot(features, kernel, precision=self.precision)
    return logits + bias if self.include_bias else logits


class InceptionV3(nn.Module):
  """The FID InceptionV3 (TF graph inception-2015-12-05); module names are the graph's scopes.

  Call: images [N, H, W, 1 or 3] with values in [0, 255] (uint8 or float; any H, W: resized to 299)
  -> (pool_3 features float32 [N, 2048], logits float32 [N, 1008]). Inference only (no dropout,
  batch norm uses the stored statistics).

  Attributes:
    logits_include_bias: add `softmax/biases` to the logits. False matches the improved-GAN and TTUR
      Inception Score code, which multiplies pool_3 by `softmax/logits/MatMul`'s weights only.
    precision: matmul/conv precision; HIGHEST keeps float32 on GPUs/TPUs (no TF32/bf16 passes).
  """
  logits_include_bias: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.network(preprocess(images))

  @nn.compact
  def network(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From the graph's `Mul` node on: preprocessed float32 [N, 299, 299, 3] in [-1, 1] -> (pool_3,
    logits). Separate from `__call__` so that inputs of several sizes, resized first, share one
    compilation of the network (the self-check)."""
    p = self.precision
    x = ConvBN(ConvSpec(32, (3, 3), 2, 'VALID'), p, name='conv')(x)      # 149x149
    x = ConvBN(ConvSpec(32, (3, 3), 1, 'VALID'), p, name='conv_1')(x)    # 147x147
    x = ConvBN(ConvSpec(64, (3, 3)), p, name='conv_2')(x)
    x = Pool('max', 3, 2, 'VALID', name='pool')(x)                       # 73x73
    x = ConvBN(ConvSpec(80), p, name='conv_3')(x)
    x = ConvBN(ConvSpec(192, (3, 3), 1, 'VALID'), p, name='conv_4')(x)   # 71x71
    x = Pool('max', 3, 2, 'VALID', name='pool_1')(x)                     # 35x35
    for i, pool_features in enumerate((32, 64, 64)):
      x = InceptionA(pool_features, p, name=_scope_name('mixed', i))(x)
    x = InceptionB(p, name='mixed_3')(x)                                 # 17x17
    for i, channels_7x7 in enumerate((128, 160, 160, 192)):
      x = InceptionC(channels_7x7, p, name=f'mixed_{4 + i}')(x)
    x = InceptionD(p, name='mixed_8')(x)                                 # 8x8
    x = InceptionE(E_BLOCK_POOLS[0], p, name='mixed_9')(x)
    x = InceptionE(E_BLOCK_POOLS[1], p, name='mixed_10')(x)
    features = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 average pool over the whole map
    return features, Logits(self.logits_include_bias, p, name='softmax')(features)


# ----------------------------------------------------------------------------- variables

class LayerInfo(NamedTuple):
  """A conv (ConvBN) or pool node of the graph as InceptionV3 builds it."""
  kind: str              # 'conv' | 'pool'
  kernel: tuple[int, int]
  strides: int
  padding: str
  pool_kind: str = ''


@functools.lru_cache(maxsize=1)
def _structure() -> tuple[dict[str, tuple[int, ...]], dict[str, LayerInfo]]:
  """(flattened variable path -> shape, graph scope -> layer config) of InceptionV3, by tracing it.

  Tracing (no compute) makes the module the single source of the architecture for the converter.
  """
  layers: dict[str, LayerInfo] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (ConvBN, Pool)):
      scope = '/'.join(module.path)
      if isinstance(module, ConvBN):
        s = module.spec
        layers[scope] = LayerInfo('conv', s.kernel, s.strides, s.padding)
      else:
        layers[scope] = LayerInfo('pool', (module.window,) * 2, module.strides, module.padding,
                                   module.kind)
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
  with nn.intercept_methods(record):
    shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0), images)
  flat = traverse_util.flatten_dict(shapes, sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}, layers


def variable_shapes() -> dict[str, tuple[int, ...]]:
  """Flattened variable path ('params/conv/conv2d/kernel', ...) -> shape, for InceptionV3."""
  return dict(_structure()[0])


def graph_layers() -> dict[str, LayerInfo]:
  """Graph scope ('mixed_10/tower_2/pool', 'conv_4', ...) -> what InceptionV3 does there."""
  return dict(_structure()[1])


def init_inception_variables(seed: int) -> Variables:
  """Random InceptionV3 variables from numpy's generator `seed` (tests and smoke runs only).

  Kernels are He-normal (std sqrt(2 / fan_in), so activations stay O(1) through the ReLU stack),
  batch norm is the identity (scale 1, bias 0, mean 0, variance 1). Built from the traced shapes
  with numpy because `InceptionV3().init` compiles for over half a minute on a CPU.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in variable_shapes().items():
    if path.endswith('kernel'):
      fan_in = int(np.prod(shape[:-1]))
      flat[path] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    else:  # batch-norm statistics and affine parameters, logit bias
      flat[path] = np.full(shape, 1.0 if path.endswith(('scale', 'var')) else 0.0, np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


def _check_variables(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises ValueError naming `source` unless `flat` has exactly InceptionV3's paths and shapes."""
  expected = variable_shapes()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise ValueError(f'{source}: not an InceptionV3 FID variable tree; missing {missing[:5]} '
                     f'({len(missing)} in all), unexpected {extra[:5]} ({len(extra)} in all)')
  for path, shape in expected.items():
    if tuple(flat[path].shape) != shape:
      raise ValueError(f'{source}: {path} has shape {tuple(flat[path].shape)}, expected {shape}')


def save_inception_variables(variables: Variables, path: str) -> None:
  """Writes the variable tree as a flat .npz (keys 'params/.../kernel'), atomically."""
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(variables, sep='/').items()}
  _check_variables(flat, 'save_inception_variables')
  workdir.savez(path, **flat)


def load_inception_variables_npz(path: str) -> Variables:
  """Reads a .npz written by `save_inception_variables`, checking every path and shape.

  Raises:
    workdir.DamagedFileError: the file is truncated or otherwise unreadable (names it).
  """
  flat = workdir.read_npz(path, 'convert the Inception weights again (save_inception_variables), or '
                          'point config.eval.inception_weights at the .pb / .tgz')
  _check_variables(flat, f'Inception weights file {path!r}')
  return traverse_util.unflatten_dict(flat, sep='/')


# ----------------------------------------------------------------------------- TF graph converter

# Flax leaf (module name, variable name) -> const node name suffix inside the same scope.
_TF_CONST_SUFFIX = {
    ('conv2d', 'kernel'): 'conv2d_params',
    ('batchnorm', 'scale'): 'batchnorm/gamma',
    ('batchnorm', 'bias'): 'batchnorm/beta',
    ('batchnorm', 'mean'): 'batchnorm/moving_mean',
    ('batchnorm', 'var'): 'batchnorm/moving_variance',
    ('softmax', 'kernel'): 'softmax/weights',
    ('softmax', 'bias'): 'softmax/biases',
}


def tf_const_name(path: str) -> str:
  """'params/mixed/tower/conv/conv2d/kernel' -> 'mixed/tower/conv/conv2d_params' (the node name)."""
  parts = path.split('/')
  scope, leaf = parts[1:-2], tuple(parts[-2:])
  return '/'.join(scope + [_TF_CONST_SUFFIX[leaf]])


def read_graph_def(path: str):
  """The parsed GraphDef protobuf of a .pb file (ValueError naming the file if it is not one)."""
  graph_def = tf_cpu_only().compat.v1.GraphDef()
  with open(path, 'rb') as f:
    try:
      graph_def.ParseFromString(f.read())
    except Exception as e:  # protobuf raises its own DecodeError
      raise ValueError(f'Inception weights file {path!r}: not a TF GraphDef ({e}); '
                       f'accepted: {ACCEPTED_WEIGHTS}') from e
  return graph_def


def _attr_ints(node, key: str) -> list[int]:
  return list(node.attr[key].list.i)


def _check(condition: bool, source: str, message: str) -> None:
  if not condition:
    raise ValueError(f'{source}: {message}; this is not the FID InceptionV3 graph '
                     f'(accepted: {ACCEPTED_WEIGHTS})')


def _check_layer(node, info: LayerInfo, scope: str, source: str) -> None:
  """The graph op using a conv kernel / named like a pool must do what this module does."""
  padding = node.attr['padding'].s.decode()
  if info.kind == 'conv':
    _check(node.op == 'Conv2D', source, f'{scope}/conv2d_params feeds a {node.op}, not a Conv2D')
  else:
    op = {'max': 'MaxPool', 'avg': 'AvgPool'}[info.pool_kind]
    _check(node.op == op, source, f'{scope} is a {node.op}, expected {op}')
    _check(_attr_ints(node, 'ksize') == [1, *info.kernel, 1], source,
           f'{scope} ksize {_attr_ints(node, "ksize")}, expected [1, {info.kernel[0]}, '
           f'{info.kernel[1]}, 1]')
  _check(_attr_ints(node, 'strides') == [1, info.strides, info.strides, 1], source,
         f'{scope} strides {_attr_ints(node, "strides")}, expected [1, {info.strides}, '
         f'{info.strides}, 1]')
  if info.kernel != (1, 1):  # SAME and VALID coincide for 1x1 windows
    _check(padding == info.padding, source, f'{scope} padding {padding}, expected {info.padding}')


def _check_preprocessing(nodes: dict, consts: Callable[[str], np.ndarray], source: str) -> None:
  """ResizeBilinear to 299 in TF1 legacy mode, then (x - 128) / 128, as `preprocess` does."""
  for name in ('ResizeBilinear', 'ResizeBilinear/size', 'Sub/y', 'Mul/y'):
    _check(name in nodes, source, f'no {name!r} node')
  resize = nodes['ResizeBilinear']
  _check(not resize.attr['align_corners'].b and not resize.attr['half_pixel_centers'].b, source,
         'ResizeBilinear uses align_corners or half_pixel_centers')
  _check(list(consts('ResizeBilinear/size')) == [INPUT_SIZE, INPUT_SIZE], source,
         f'ResizeBilinear/size is {consts("ResizeBilinear/size")}, expected [299, 299]')
  _check(np.allclose(consts('Sub/y'), 128.0), source, f'Sub/y is {consts("Sub/y")}, expected 128')
  _check(np.allclose(consts('Mul/y'), 1 / 128), source,
         f'Mul/y is {consts("Mul/y")}, expected 1/128')


def convert_graph_def(path: str) -> Variables:
  """Converts the frozen TF graph `classify_image_graph_def.pb` to InceptionV3 variables.

  Reads the Const node of every variable (see `tf_const_name`), checks its shape, the ops using it
  (conv strides/padding, pools, batch-norm epsilon) and the preprocessing nodes, and raises a
  ValueError naming the file and node on any mismatch. Gamma is replaced by ones where the graph's
  BatchNormWithGlobalNormalization has scale_after_normalization=False (the op then ignores it).
  Returns {'params': ..., 'batch_stats': ...} of float32 numpy arrays.
  """
  tf = tf_cpu_only()
  source = f'Inception weights file {path!r}'
  graph_def = read_graph_def(path)
  nodes = {n.name: n for n in graph_def.node}
  consumers = {inp.split(':')[0].lstrip('^'): n for n in graph_def.node for inp in n.input}

  def user(name: str):
    """The op consuming node `name`, looking through Identity (`.../read`) nodes."""
    node = consumers.get(name)
    while node is not None and node.op == 'Identity':
      node = consumers.get(node.name)
    return node

  def const(name: str) -> np.ndarray:
    _check(name in nodes and nodes[name].op == 'Const', source, f'no Const node {name!r}')
    return tf.make_ndarray(nodes[name].attr['value'].tensor)

  _check_preprocessing(nodes, const, source)
  shapes, layers = _structure()
  for scope, info in layers.items():
    key = f'{scope}/conv2d_params' if info.kind == 'conv' else scope
    node = user(key) if info.kind == 'conv' else nodes.get(key)
    _check(node is not None, source, f'no op for {key!r}')
    _check_layer(node, info, scope, source)
  flat = {}
  for path, shape in shapes.items():
    name = tf_const_name(path)
    value = const(name).astype(np.float32)
    _check(value.shape == shape, source, f'{name} has shape {value.shape}, expected {shape}')
    if name.endswith('batchnorm/gamma'):
      value = _effective_gamma(user(name.replace('gamma', 'moving_mean')), value, name, source)
    flat[path] = value
  return traverse_util.unflatten_dict(flat, sep='/')


def _effective_gamma(bn_node, gamma: np.ndarray, name: str, source: str) -> np.ndarray:
  """The scale the batch-norm op really applies, after checking its epsilon."""
  _check(bn_node is not None, source, f'no batch-norm op uses {name}')
  eps = bn_node.attr['variance_epsilon'].f or bn_node.attr['epsilon'].f
  _check(np.isclose(eps, BN_EPSILON), source,
         f'{bn_node.name} epsilon {eps}, expected {BN_EPSILON}')
  if bn_node.op == 'BatchNormWithGlobalNormalization':
    if not bn_node.attr['scale_after_normalization'].b:
      return np.ones_like(gamma)
  return gamma


# ----------------------------------------------------------------------------- weights files

def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _extract_graph_def(archive: str, cache_dir: str) -> str:
  """Extracts classify_image_graph_def.pb from inception-2015-12-05.tgz into cache_dir."""
  out = os.path.join(cache_dir, GRAPH_DEF_NAME)
  with tarfile.open(archive, 'r:*') as tar:
    members = [m for m in tar.getmembers() if os.path.basename(m.name) == GRAPH_DEF_NAME]
    if not members:
      raise ValueError(f'Inception weights archive {archive!r} has no {GRAPH_DEF_NAME}; '
                       f'accepted: {ACCEPTED_WEIGHTS}')
    with tar.extractfile(members[0]) as src, workdir.atomic_write(out) as dst:
      shutil.copyfileobj(src, dst)
  return out


def _download(url: str, cache_dir: str) -> str:
  """Fetches the public .tgz into cache_dir (once); raises with what to do instead on failure."""
  target = os.path.join(cache_dir, os.path.basename(url))
  if os.path.exists(target):
    return target
  try:
    # Only a complete download gets the final name.
    with workdir.atomic_write(target) as f, urllib.request.urlopen(url, timeout=60) as response:
      shutil.copyfileobj(response, f)
  except OSError as e:
    raise RuntimeError(
        f'could not download the Inception weights from {url} ({e}); download it elsewhere and '
        f'set config.eval.inception_weights to the file ({ACCEPTED_WEIGHTS})') from e
  return target


def sha256_of(path: str) -> str:
  """The hex sha256 of a file's bytes: the key of its converted weights and self-check record."""
  return _sha256(path)


def _cache_base(graph_def_path: str, cache_dir: str, digest: str | None = None) -> str:
  return os.path.join(cache_dir, f'inception_fid_{(digest or _sha256(graph_def_path))[:16]}')


def _converted(graph_def_path: str, cache_dir: str, digest: str | None = None) -> Variables:
  """Converts a .pb once; the Flax tree is cached under the .pb's content hash."""
  cached = _cache_base(graph_def_path, cache_dir, digest) + '.npz'
  # A damaged cache (an interrupted copy, a full disk) is set aside with a warning and converted again.
  if workdir.read_cached_npz(cached, 'converted Inception weights cache') is None:
    save_inception_variables(convert_graph_def(graph_def_path), cached)
  return load_inception_variables_npz(cached)


def resolve_weights(weights_path: str | None = None, cache_dir: str | None = None,
                    url: str = INCEPTION_URL) -> str:
  """The weights file to use: a GraphDef .pb (a .tgz is extracted into cache_dir; None means
  `<cache_dir>/classify_image_graph_def.pb`, downloaded from `url` if missing) or a .npz."""
  cache_dir = cache_dir or DEFAULT_CACHE_DIR
  os.makedirs(cache_dir, exist_ok=True)
  if weights_path is None:
    graph_def = os.path.join(cache_dir, GRAPH_DEF_NAME)
    if not os.path.exists(graph_def):
      graph_def = _extract_graph_def(_download(url, cache_dir), cache_dir)
    return graph_def
  if not os.path.isfile(weights_path):
    raise FileNotFoundError(f'config.eval.inception_weights: {weights_path!r} does not exist; '
                            f'accepted: {ACCEPTED_WEIGHTS}')
  if weights_path.endswith(('.npz', '.pb')):
    return weights_path
  if weights_path.endswith(('.tgz', '.tar.gz')):
    return _extract_graph_def(weights_path, cache_dir)
  raise ValueError(f'config.eval.inception_weights: {weights_path!r} has an unknown extension; '
                   f'accepted: {ACCEPTED_WEIGHTS}')


def load_inception_variables(weights_path: str | None = None, cache_dir: str | None = None,
                             url: str = INCEPTION_URL) -> Variables:
  """InceptionV3 variables from `weights_path` (config.eval.inception_weights) or the public file.

  Not self-checked: `load_checked_variables` is what the FID pipeline uses.

  Args:
    weights_path: a .npz (from `save_inception_variables`), a GraphDef .pb or the
      inception-2015-12-05 .tgz / .tar.gz. None: use `<cache_dir>/classify_image_graph_def.pb`,
      downloading and extracting `url` first if it is not there.
    cache_dir: where downloads and converted trees are kept (default ~/.cache/ddpm_jax).
    url: the public archive (inception-2015-12-05.tgz).
  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays for `InceptionV3().apply`.
  """
  cache_dir = cache_dir or DEFAULT_CACHE_DIR
  path = resolve_weights(weights_path, cache_dir, url)
  if path.endswith('.npz'):
    return load_inception_variables_npz(path)
  return _converted(path, cache_dir)


# ----------------------------------------------------------------------------- self-check

# Agreement criterion of the self-check: for pool_3 and for the logits, the largest absolute
# difference between the port and the graph, divided by the largest absolute value the graph
# outputs, must stay below this. Both backends compute in float32 but sum in different orders
# (TF's oneDNN/Eigen convolutions vs XLA's) through ~50 layers, which leaves relative differences of
# order 1e-6 (under 1e-6 on the tests' synthetic graph); the port errors the tests inject (a swapped
# concatenation, a wrong pool, the half-pixel resize) all exceed 1e-3. It leaves a factor of 1000
# for other float32 implementations (oneDNN, cuDNN).
SELF_CHECK_TOLERANCE = 1e-3


class PortMismatchError(RuntimeError):
  """The Flax port disagrees with the TF graph on the self-check images."""


def self_check_images() -> list[np.ndarray]:
  """The self-check's fixed inputs: two uint8 batches [8, 32, 32, 3] and [8, 256, 256, 3].

  Each holds horizontal and diagonal gradients, a 1-pixel and a coarse checkerboard, uniform noise
  (numpy seed 0), two flat colours and a bright square on black: inputs on which a wrong resize, a
  pool counting padding or swapped channels show up at the borders and in the mean.
  """
  rng = np.random.default_rng(0)
  batches = []
  for size in (32, 256):
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    ramp = j / (size - 1)
    diagonal = (i + j) / (2 * size - 2)
    fine = ((i + j) % 2).astype(np.float64)
    coarse = ((i // max(size // 8, 1) + j // max(size // 8, 1)) % 2).astype(np.float64)
    square = ((i > size // 4) & (i < size // 2) & (j > size // 3) & (j < 3 * size // 4)) * 1.0
    images = [np.stack([ramp, 1 - ramp, diagonal], -1), np.stack([diagonal, ramp, fine], -1),
              np.stack([fine] * 3, -1), np.stack([coarse, 1 - coarse, coarse * 0.5], -1),
              rng.uniform(size=(size, size, 3)),
              np.broadcast_to([0.9, 0.2, 0.1], (size, size, 3)),
              np.broadcast_to([0.1, 0.5, 0.8], (size, size, 3)), np.stack([square] * 3, -1)]
    batches.append(np.round(np.stack(images) * 255).astype(np.uint8))
  return batches


def port_outputs(variables: Variables, batches: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
  """The Flax port's (pool_3, logits) on `batches` (uint8 [B, H, W, C] of any sizes).

  Each batch is preprocessed (resized) on its own, then one compilation of the network runs them
  all, so checking inputs of several sizes costs one compile of the big graph.
  """
  model = InceptionV3()
  # Fresh jitted functions: JAX caches traces by function, and a check must trace the port as it
  # is now (the module switches are read at trace time).
  resize = jax.jit(lambda images: preprocess(images))  # noqa: PLW0108
  x = jnp.concatenate([resize(b) for b in batches])
  pool, logits = jax.jit(functools.partial(model.apply, method=InceptionV3.network))(variables, x)
  return np.asarray(pool), np.asarray(logits)


def compare_with_graph(variables: Variables, graph_def_path: str,
                       batches: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
  """Runs the port and the TF graph on `batches` (default: `self_check_images()`) and returns the
  largest absolute and relative differences of pool_3 and of the logits."""
  from ddpm_jax.evaluation import inception_tf  # pylint: disable=g-import-not-at-top
  batches = list(self_check_images() if batches is None else batches)
  graph = inception_tf.TFGraphInception(graph_def_path)
  try:
    expected = [np.concatenate(o) for o in zip(*(graph(b) for b in batches))]
  finally:
    graph.close()
  got = port_outputs(variables, batches)
  report: dict[str, Any] = {'num_images': int(sum(len(b) for b in batches)),
                            'image_sizes': [list(s) for s in sorted({tuple(b.shape[1:3])
                                                                     for b in batches})],
                            'tolerance': SELF_CHECK_TOLERANCE}
  for name, want, have in zip(('pool_3', 'logits'), expected, got):
    diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    report[name] = {'max_abs_diff': float(diff.max()),
                    'max_rel_diff': float(diff.max() / max(np.abs(want).max(), 1e-30)),
                    'worst_index': [int(k) for k in worst]}
  report['passed'] = all(report[n]['max_rel_diff'] <= SELF_CHECK_TOLERANCE
                         for n in ('pool_3', 'logits'))
  return report


def check_port(variables: Variables, graph_def_path: str, record_path: str,
               batches: Sequence[np.ndarray] | None = None) -> dict[str, Any]:
  """The self-check: compares the port with the graph once and records the agreement.

  Returns the record (also written as JSON to `record_path`, beside the cached converted weights);
  raises PortMismatchError naming the largest difference when they disagree.
  """
  report = compare_with_graph(variables, graph_def_path, batches)
  report.update(weights_file=os.path.abspath(graph_def_path), weights_sha256=_sha256(graph_def_path),
                jax_backend=jax.default_backend(), checked_at=time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                                                            time.gmtime()))
  if not report['passed']:
    name = max(('pool_3', 'logits'), key=lambda n: report[n]['max_rel_diff'])
    worst = report[name]
    raise PortMismatchError(
        f'the Flax Inception port disagrees with the TF graph {graph_def_path!r}: largest '
        f'difference in {name} at {worst["worst_index"]}: {worst["max_abs_diff"]:.3g} absolute, '
        f'{worst["max_rel_diff"]:.3g} relative to the largest value (tolerance '
        f'{SELF_CHECK_TOLERANCE:g}). Its numbers cannot be trusted: set '
        "config.eval.inception_backend='tf_graph' (the graph itself, on the CPU)")
  workdir.write_json(record_path, report)
  logging.info('Inception self-check passed: the Flax port matches %s on %d images (pool_3 max '
               'relative difference %.2g, logits %.2g, tolerance %g); recorded in %s.',
               graph_def_path, report['num_images'], report['pool_3']['max_rel_diff'],
               report['logits']['max_rel_diff'], SELF_CHECK_TOLERANCE, record_path)
  return report


def load_checked_variables(weights_path: str | None = None, cache_dir: str | None = None,
                           self_check: bool = True,
                           url: str = INCEPTION_URL) -> tuple[Variables, dict[str, Any]]:
  """The Flax port's variables, self-checked against the graph the first time a file is used.

  Returns (variables, provenance): provenance holds 'weights_file', 'weights_sha256' and
  'self_check' (the record of the check: run now or earlier for the same sha256, or 'skipped').
  A .npz carries no graph to check against: it needs self_check=False (an explicit opt-out).
  """
  cache_dir = cache_dir or DEFAULT_CACHE_DIR
  path = resolve_weights(weights_path, cache_dir, url)
  digest = _sha256(path)
  provenance: dict[str, Any] = {'weights_file': os.path.abspath(path), 'weights_sha256': digest}
  if path.endswith('.npz'):
    if self_check:
      raise ValueError(
          f'config.eval.inception_weights={weights_path!r}: a .npz of converted weights cannot be '
          'self-checked (it holds no TF graph); give the classify_image_graph_def.pb or the .tgz, '
          'or opt out with config.eval.inception_self_check=False')
    provenance['self_check'] = 'skipped'
    return load_inception_variables_npz(path), provenance
  variables = _converted(path, cache_dir, digest)
  if not self_check:
    logging.warning('Inception self-check skipped (config.eval.inception_self_check=False): the '
                    'Flax port has not been compared with %s.', path)
    provenance['self_check'] = 'skipped'
    return variables, provenance
  record_path = _cache_base(path, cache_dir, digest) + '.selfcheck.json'
  if os.path.exists(record_path):
    record = workdir.read_json(record_path)
    if record.get('weights_sha256') == digest and record.get('passed'):
      logging.info('Inception self-check: the Flax port matched this graph on %s (%s).',
                   record.get('checked_at'), record_path)
      provenance['self_check'] = record
      return variables, provenance
  logging.info('Inception self-check: comparing the Flax port with the TF graph %s (once per '
               'weights file)...', path)
  provenance['self_check'] = check_port(variables, path, record_path)
  return variables, provenance


def make_inception_fn(variables: Variables, logits_include_bias: bool = False) -> InceptionFn:
  """A jitted images [B, H, W, C] in [0, 255] -> (pool_3 [B, 2048], logits [B, 1008]) function.

  The variables are put on the device once and passed as an argument (not baked in as constants).
  It compiles once per input shape: feed it fixed-size batches.
  """
  return functools.partial(_jitted_apply(logits_include_bias), jax.device_put(variables))


@functools.cache
def _jitted_apply(logits_include_bias: bool) -> Callable[..., tuple[jax.Array, jax.Array]]:
  # One jitted function per configuration, so every weights tree reuses its compilations.
  return jax.jit(InceptionV3(logits_include_bias=logits_include_bias).apply)
