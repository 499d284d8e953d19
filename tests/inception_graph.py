"""A runnable stand-in for TF's `classify_image_graph_def.pb` (inception-2015-12-05), for tests.

It has the published graph's node names, ops and attributes (DecodeJpeg's Cast -> ExpandDims ->
ResizeBilinear -> Sub -> Mul -> 94 `<scope>/Conv2D` + `<scope>/batchnorm`
(BatchNormWithGlobalNormalization) + `<scope>` (Relu) layers, the pools, `<block>/join` Concat
nodes, `pool_3` (8x8 AvgPool), `pool_3/_reshape` to a constant [1, 2048], `softmax/logits/MatMul`,
`softmax/logits`, `softmax`), holding whatever weights the test chooses. The block layout (which
branch feeds which concatenation, in which order) is written out here from the graph's node
listing, not taken from ddpm_jax's Flax port, so that the port can be checked against it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, types_pb2

from ddpm_jax.evaluation import inception as inc

# Layers whose stride / padding differ from the default 1 / SAME.
_STRIDED_VALID = {'conv', 'mixed_3/conv', 'mixed_3/tower/conv_2', 'mixed_8/tower/conv_1',
                  'mixed_8/tower_1/conv_3'}
_VALID = {'conv_1', 'conv_4'}


def _chain(prefix, n):
  return [f'{prefix}conv' if i == 0 else f'{prefix}conv_{i}' for i in range(n)]


def _block_branches(block):
  """The branches of a block, in concatenation order; each a list of conv scopes / ('pool', op) /
  ('split', scope) entries, relative to the block."""
  index = 0 if block == 'mixed' else int(block.split('_')[1])
  pool_tower = [('pool', 'MaxPool' if block == 'mixed_10' else 'AvgPool', 'tower_2/pool'),
                'tower_2/conv']
  if index <= 2:
    return [['conv'], _chain('tower/', 2), _chain('tower_1/', 3), pool_tower]
  if index == 3:
    return [['conv'], _chain('tower/', 3), [('pool', 'MaxPool', 'pool')]]
  if index <= 7:
    return [['conv'], _chain('tower/', 3), _chain('tower_1/', 5), pool_tower]
  if index == 8:
    return [_chain('tower/', 2), _chain('tower_1/', 4), [('pool', 'MaxPool', 'pool')]]
  return [['conv'], ['tower/conv', ('split', 'tower/mixed')],
          _chain('tower_1/', 2) + [('split', 'tower_1/mixed')], pool_tower]


BLOCKS = ['mixed'] + [f'mixed_{i}' for i in range(1, 11)]


class _Builder:
  def __init__(self, consts, scale_after_normalization):
    self.graph_def = graph_pb2.GraphDef()
    self.graph_def.versions.producer = 8  # BatchNormWithGlobalNormalization: GraphDef version < 9
    self.consts = consts
    self.scale = scale_after_normalization

  def node(self, name, op, inputs=(), **attrs):
    node = self.graph_def.node.add()
    node.name, node.op = name, op
    node.input.extend(inputs)
    for key, value in attrs.items():
      if key in ('T', 'dtype', 'Tdim', 'Tshape'):
        node.attr[key].type = value
      elif isinstance(value, bool):
        node.attr[key].b = value
      elif isinstance(value, float):
        node.attr[key].f = value
      elif isinstance(value, bytes):
        node.attr[key].s = value
      elif isinstance(value, int):
        node.attr[key].i = value
      elif isinstance(value, list):
        node.attr[key].list.i.extend(value)
      else:
        node.attr[key].tensor.CopyFrom(tf.make_tensor_proto(value))
    return name

  def const(self, name, value):
    value = np.asarray(value)
    dtype = types_pb2.DT_INT32 if value.dtype == np.int32 else types_pb2.DT_FLOAT
    return self.node(name, 'Const', dtype=dtype, value=value)

  def conv(self, scope, x):
    f = types_pb2.DT_FLOAT
    strides, padding = (2, b'VALID') if scope in _STRIDED_VALID else (
        (1, b'VALID') if scope in _VALID else (1, b'SAME'))
    kernel = self.const(f'{scope}/conv2d_params', self.consts[f'{scope}/conv2d_params'])
    conv = self.node(f'{scope}/Conv2D', 'Conv2D', [x, kernel], T=f,
                     strides=[1, strides, strides, 1], padding=padding)
    stats = [self.const(f'{scope}/batchnorm/{n}', self.consts[f'{scope}/batchnorm/{n}'])
             for n in ('moving_mean', 'moving_variance', 'beta', 'gamma')]
    bn = self.node(f'{scope}/batchnorm', 'BatchNormWithGlobalNormalization', [conv] + stats, T=f,
                   variance_epsilon=1e-3, scale_after_normalization=self.scale)
    return self.node(scope, 'Relu', [bn], T=f)

  def pool(self, name, op, x, size=3, strides=1, padding=b'SAME'):
    return self.node(name, op, [x], T=types_pb2.DT_FLOAT, ksize=[1, size, size, 1],
                     strides=[1, strides, strides, 1], padding=padding)

  def concat(self, name, inputs):
    dim = self.const(f'{name}/concat_dim', np.int32(3))
    return self.node(name, 'Concat', [dim] + inputs, T=types_pb2.DT_FLOAT, N=len(inputs))

  def block(self, block, x):
    outputs = []
    for branch in _block_branches(block):
      y = x
      for entry in branch:
        if isinstance(entry, str):
          y = self.conv(f'{block}/{entry}', y)
        elif entry[0] == 'pool':
          _, op, name = entry
          strided = name == 'pool'
          y = self.pool(f'{block}/{name}', op, y, strides=2 if strided else 1,
                        padding=b'VALID' if strided else b'SAME')
        else:  # the 1x3 / 3x1 pair of mixed_9 / mixed_10
          scope = f'{block}/{entry[1]}'
          y = self.concat(scope, [self.conv(f'{scope}/conv', y), self.conv(f'{scope}/conv_1', y)])
      outputs.append(y)
    return self.concat(f'{block}/join', outputs)


def build_graph_def(flat: dict[str, np.ndarray], scale_after_normalization: bool = False):
  """The GraphDef holding `flat` (Flax paths 'params/.../kernel' -> arrays, as from
  `inc.variable_shapes()`), stored under the graph's const names."""
  f = types_pb2.DT_FLOAT
  b = _Builder({inc.tf_const_name(p): v for p, v in flat.items()}, scale_after_normalization)
  b.node('Cast', 'Placeholder', dtype=f)  # the graph's DecodeJpeg -> Cast: one [H, W, 3] image
  b.const('ExpandDims/dim', np.int32(0))
  b.node('ExpandDims', 'ExpandDims', ['Cast', 'ExpandDims/dim'], T=f, Tdim=types_pb2.DT_INT32)
  b.const('ResizeBilinear/size', np.array([299, 299], np.int32))
  b.node('ResizeBilinear', 'ResizeBilinear', ['ExpandDims', 'ResizeBilinear/size'], T=f,
         align_corners=False)
  b.const('Sub/y', np.float32(128.0))
  b.node('Sub', 'Sub', ['ResizeBilinear', 'Sub/y'], T=f)
  b.const('Mul/y', np.float32(1 / 128))
  x = b.node('Mul', 'Mul', ['Sub', 'Mul/y'], T=f)
  x = b.conv('conv', x)
  x = b.conv('conv_1', x)
  x = b.conv('conv_2', x)
  x = b.pool('pool', 'MaxPool', x, strides=2, padding=b'VALID')
  x = b.conv('conv_3', x)
  x = b.conv('conv_4', x)
  x = b.pool('pool_1', 'MaxPool', x, strides=2, padding=b'VALID')
  for block in BLOCKS:
    x = b.block(block, x)
  x = b.pool('pool_3', 'AvgPool', x, size=8, padding=b'VALID')
  shape = b.const('pool_3/_reshape/shape', np.array([1, 2048], np.int32))  # batch 1 only, as in
  x = b.node('pool_3/_reshape', 'Reshape', [x, shape], T=f, Tshape=types_pb2.DT_INT32)  # the graph
  weights = b.const('softmax/weights', b.consts['softmax/weights'])
  biases = b.const('softmax/biases', b.consts['softmax/biases'])
  logits = b.node('softmax/logits/MatMul', 'MatMul', [x, weights], T=f)
  logits = b.node('softmax/logits', 'BiasAdd', [logits, biases], T=f)
  b.node('softmax', 'Softmax', [logits], T=f)
  return b.graph_def


def random_flat(seed: int) -> dict[str, np.ndarray]:
  """Weights that keep activations O(1) through the network: He-normal kernels, batch norm with
  random moving statistics and offsets (every leaf distinct, so a mix-up changes the outputs)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in inc.variable_shapes().items():
    if path.endswith('kernel'):
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif path.endswith('/var'):
      value = rng.uniform(0.5, 1.5, shape)
    elif path.endswith('/scale'):
      value = rng.uniform(0.8, 1.2, shape)
    else:  # mean, batch-norm offset, logit bias
      value = rng.normal(0.0, 0.1, shape)
    flat[path] = value.astype(np.float32)
  return flat


def write_graph_def(graph_def, path) -> str:
  with open(path, 'wb') as f:
    f.write(graph_def.SerializeToString())
  return str(path)
