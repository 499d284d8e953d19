"""The FID Inception as the reference computes it: TF's frozen `classify_image_graph_def.pb`, run by
TensorFlow on the CPU (config.eval.inception_backend = 'tf_graph').

This is the ground truth the Flax port (`inception.py`) is checked against. It reads the graph's
tensors where TTUR's `fid.py` and the improved-GAN Inception Score code read them:
- input: float32 RGB images [N, H, W, 3] with values in [0, 255], fed in place of `ExpandDims:0`
  (the graph's own DecodeJpeg -> Cast -> ExpandDims prefix takes one JPEG; TTUR feeds this tensor);
  the graph resizes to 299 itself (`ResizeBilinear`, TF1 legacy mode), then `Sub` 128, `Mul` 1/128.
- pool_3 features: `pool_3:0` [N, 1, 1, 2048] reshaped to [N, 2048] (TTUR's `pool_3`).
- logits: `pool_3` squeezed @ the second input of `softmax/logits/MatMul` (the `softmax/weights`
  constant), without the bias, as improved-GAN's `inception_score.py` rebuilds them.
The graph's own `pool_3/_reshape` has a constant shape [1, 2048], which is why TTUR patches every
op's static batch dimension; here `ExpandDims:0` is replaced through `input_map` by a placeholder
of shape [None, None, None, 3] and nothing after pool_3 in the graph is run, so any batch size works
without touching TF internals.

TensorFlow never sees an accelerator (`tf_cpu_only` runs first): JAX keeps the GPU/TPU memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from absl import logging

INPUT_TENSOR = 'ExpandDims:0'
POOL_TENSOR = 'pool_3:0'
LOGITS_MATMUL = 'softmax/logits/MatMul'

Outputs = tuple[np.ndarray, np.ndarray]  # (pool_3 float32 [N, 2048], logits float32 [N, 1008])


class TFGraphInception:
  """A TF session over the imported graph: images uint8/float [B, H, W, 1 or 3] -> (pool_3, logits).

  Call it like the jitted Flax function (`fid.compute_inception_features` batches for it). Grey
  images are tiled to RGB (TTUR converts them with grayscale_to_rgb, the same thing).
  """

  def __init__(self, graph_def_path: str):
    from ddpm_jax.data.tf_cpu import tf_cpu_only  # pylint: disable=g-import-not-at-top
    tf = tf_cpu_only()
    graph_def = tf.compat.v1.GraphDef()
    with open(graph_def_path, 'rb') as f:
      try:
        graph_def.ParseFromString(f.read())
      except Exception as e:  # protobuf raises its own DecodeError
        raise ValueError(f'Inception weights file {graph_def_path!r}: not a TF GraphDef ({e}); '
                         'expected classify_image_graph_def.pb') from e
    self.graph_def_path = graph_def_path
    self._graph = tf.Graph()
    with self._graph.as_default():
      self._images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name='images')
      pool, matmul = tf.compat.v1.import_graph_def(
          graph_def, input_map={INPUT_TENSOR: self._images},
          return_elements=[POOL_TENSOR, LOGITS_MATMUL], name='')
      self._pool = tf.reshape(pool, [-1, pool.shape[-1]])
      self._logits = tf.matmul(self._pool, matmul.inputs[1])
    self._session = tf.compat.v1.Session(graph=self._graph, config=tf.compat.v1.ConfigProto(
        device_count={'GPU': 0}))

  def __call__(self, images) -> Outputs:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f'Inception input: got shape {images.shape}, expected [N, H, W, C] with '
                       'C = 1 (tiled to RGB) or 3, values in [0, 255]')
    images = images.astype(np.float32)
    if images.shape[-1] == 1:
      images = np.tile(images, (1, 1, 1, 3))
    pool, logits = self._session.run([self._pool, self._logits], {self._images: images})
    return pool.astype(np.float32), logits.astype(np.float32)

  def close(self) -> None:
    self._session.close()


def make_tf_inception_fn(graph_def_path: str, log_every: int = 10) -> Callable[..., Outputs]:
  """A TFGraphInception that logs its progress every `log_every` batches (it is the slow path)."""
  model = TFGraphInception(graph_def_path)
  state = {'batches': 0, 'images': 0, 'start': time.perf_counter()}

  def apply(images) -> Outputs:
    outputs = model(images)
    state['batches'] += 1
    state['images'] += len(images)
    if state['batches'] % log_every == 0:
      elapsed = time.perf_counter() - state['start']
      logging.info('Inception (tf_graph, CPU): %d images in %.0f s (%.2f images/s).',
                   state['images'], elapsed, state['images'] / max(elapsed, 1e-9))
    return outputs
  return apply
