"""TensorFlow Datasets sources: preparing a builder with useful errors, and the tf.data pipelines.

TF is only a data loader here, so it must never claim an accelerator that JAX is about to use: every
function here calls `tf_cpu_only()` (data/tf_cpu.py) before TF builds anything.

Both paths decode with the builder's own `image` feature (tfds stores PNG / JPEG bytes) and fit the
image with the same TF function, so in-memory and streamed batches of one dataset agree pixel for
pixel. Images are read as encoded bytes and decoded after the shuffle: the shuffle buffer (which
the iterator checkpoints save) then holds compressed images.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ddpm_jax.data.sources import Source
from ddpm_jax.data.tf_cpu import tf_cpu_only

if TYPE_CHECKING:
  import ml_collections
  import tensorflow as tf_types
  from tensorflow_datasets.core import DatasetBuilder

IMAGE_KEY = 'image'
LABEL_KEY = 'label'  # the class label of tfds's supervised image sets (cifar10, mnist, imagenet...)
_LOAD_BATCH = 1024
_MESSAGE_CHARS = 400


class DatasetUnavailableError(RuntimeError):
  """A tfds dataset is not prepared in data.data_dir and tfds could not prepare it."""


def _short(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + '...'


# Modules that tfds imports only while it prepares a dataset, and what to install for each. tfds
# 4.9.10 declares importlib_resources only for Python < 3.9 but imports it on every preparation
# (issue #18); tensorflow_io is what its lsun builder reads LMDB with.
_INSTALL_HINTS = {
    'importlib_resources': '`pip install "importlib_resources>=7.1.0"` (a dependency of '
                           'ddpm_jax: reinstall it with `pip install -e .`)',
    'tensorflow_io': "tfds's lsun builder reads LMDB with tensorflow-io, whose latest release "
                     '(0.37.1) is built for TensorFlow 2.17 and does not load with the TensorFlow '
                     'that ddpm_jax uses. Prepare the dataset in a separate environment with '
                     '`pip install "tensorflow-datasets[lsun]"` (it installs TensorFlow 2.17 and '
                     "tensorflow-io) and run tfds's download_and_prepare there; any tfds reads "
                     'the prepared files',
}
_MISSING_MODULE_PATTERNS = (
    re.compile(r"No module named '([\w.]+)'"),
    re.compile(r'Failed importing ([\w.]+)'),  # tfds's lazy_imports
    re.compile(r'import of ([\w.]+) halted'),
)


def missing_module(error: BaseException) -> str | None:
  """The top-level module whose import failed somewhere in error's chain (None: no ImportError).

  tfds re-raises import errors with a new message and without `.name`, hence the patterns.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, ImportError):
      if error.name:
        return error.name.split('.')[0]
      for pattern in _MISSING_MODULE_PATTERNS:
        match = pattern.search(str(error))
        if match:
          return match.group(1).split('.')[0]
    error = error.__cause__ or error.__context__
  return None


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that downloads and prepares tfds dataset `name` into data_dir.

  Not `tfds build`: tfds 4.9.10's CLI imports apache_beam, which tensorflow-datasets does not
  install, so that command fails before it starts.
  """
  return f'python -m ddpm_jax.data.prepare {name} --data_dir={data_dir}'


def _how_to_prepare(name: str, builder: DatasetBuilder, error: BaseException) -> str:
  root = str(builder.data_dir_root)
  command = prepare_command(name, root)
  lines = [
      f'tfds dataset {name!r} is not prepared in data_dir {root!r} (looked in '
      f'{builder.data_dir!r}) and tfds could not prepare it ({type(error).__name__}: '
      f'{_short(error)}).',
  ]
  module = missing_module(error)
  if module is not None:
    hint = _INSTALL_HINTS.get(module, f'`pip install {module}`')
    lines.append(f'Preparing {name!r} needs the Python module {module!r}, which is not '
                 f'installed: {hint}. Until then `{command}` fails the same way.')
  else:
    lines.append(f'Prepare it once on a machine with network access: `{command}`, then set '
                 f'--config.data.data_dir={root}.')
  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if instructions:
    manual_dir = os.path.join(root, 'downloads', 'manual')
    lines.append(f'{name!r} needs a manual download: put the files in {manual_dir} (or pass '
                 f'--manual_dir=DIR to the command above). tfds says: '
                 f'{" ".join(instructions.split())}')
  return '\n'.join(lines)


def prepared_builder(name: str, data_dir: str | None,
                     manual_dir: str | None = None) -> DatasetBuilder:
  """tfds builder of `name` in `data_dir`, downloading and preparing it when it is missing.

  manual_dir: where tfds looks for manually downloaded files (default <data_dir>/downloads/manual).

  Raises:
    ValueError: tfds cannot build a dataset of that name (names data.dataset).
    DatasetUnavailableError: it is not prepared and tfds could not prepare it (names the dataset,
      the data_dir and the command that prepares it, or the package that is missing).
  """
  tf_cpu_only()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # DatasetNotFoundError, unknown builder config or version
    raise ValueError(f'data.dataset: tfds cannot build {name!r}: {str(e).splitlines()[0]}') from e
  if IMAGE_KEY not in builder.info.features:
    raise ValueError(f'data.dataset: tfds dataset {name!r} has no {IMAGE_KEY!r} feature '
                     f'(features: {sorted(builder.info.features)})')
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    # Network, manual-download, checksum and import failures all come with different types.
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetUnavailableError(_how_to_prepare(name, builder, e)) from e
  return builder


def _check_labelled(builder: DatasetBuilder) -> None:
  if LABEL_KEY not in builder.info.features:
    raise ValueError(f'tfds dataset {builder.name!r} has no {LABEL_KEY!r} feature: a '
                     'class-conditional model (model.num_classes > 0) needs labelled data')


def _encoded_images(builder: DatasetBuilder, split: str, shuffle_seed: int | None = None,
                    with_labels: bool = False) -> tf_types.data.Dataset:
  """The split's encoded image bytes (string scalars), in file order unless shuffle_seed is set;
  (bytes, int64 label) pairs when with_labels."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # No autocache: a cached dataset would put the whole split into every iterator checkpoint.
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                            decoders={IMAGE_KEY: tfds.decode.SkipDecoding()},
                            read_config=read_config)
  except (KeyError, ValueError) as e:
    raise ValueError(f'data split {split!r} of tfds dataset {builder.name!r}: {_short(e)}') from e
  if with_labels:
    _check_labelled(builder)
    return ds.map(lambda example: (example[IMAGE_KEY], example[LABEL_KEY]))
  return ds.map(lambda example: example[IMAGE_KEY])


def _convert_channels(tf, image, num_channels: int):
  channels = image.shape[-1]
  if channels == 4:  # drop alpha
    image, channels = image[..., :3], 3
  if channels == num_channels:
    return image
  if num_channels == 1:
    return tf.image.rgb_to_grayscale(image)
  return tf.image.grayscale_to_rgb(image)


def _crop_resize(tf, image, image_size: int):
  shape = tf.shape(image)
  side = tf.minimum(shape[0], shape[1])
  image = tf.image.crop_to_bounding_box(image, (shape[0] - side) // 2, (shape[1] - side) // 2,
                                        side, side)
  if image.shape[0] == image.shape[1] == image_size:  # statically known: nothing to resize
    return image
  resized = tf.image.resize(image, [image_size, image_size], method='bicubic', antialias=True)
  # Back onto the 8-bit grid (bicubic overshoots a little at edges, hence the clip).
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _pad(tf, image, image_size: int, stored_size: int):
  before = (image_size - stored_size) // 2
  after = image_size - stored_size - before
  return tf.pad(image, [[before, after], [before, after], [0, 0]])  # 0 = background (-1)


def _fit_fn(builder: DatasetBuilder, source: Source, image_size: int,
            num_channels: int) -> Callable:
  """encoded bytes -> uint8 [image_size, image_size, num_channels], as described in sources.py."""
  tf = tf_cpu_only()
  feature = builder.info.features[IMAGE_KEY]

  def fit(encoded):
    image = _convert_channels(tf, feature.decode_example(encoded), num_channels)
    if source.fit == 'pad':
      image = _pad(tf, image, image_size, source.size)
    elif source.fit == 'crop_resize':
      image = _crop_resize(tf, image, image_size)
    return tf.ensure_shape(image, [image_size, image_size, num_channels])

  return fit


def load_split_uint8(source: Source, data: ml_collections.ConfigDict, split: str,
                     limit: int | None = None) -> np.ndarray:
  """The first `limit` (default all) examples of a split in file order, fitted, unflipped.

  Returns uint8 [N, S, S, C].
  """
  tf = tf_cpu_only()
  builder = prepared_builder(source.tfds_name, data.data_dir)
  ds = _encoded_images(builder, split)
  if limit is not None:
    ds = ds.take(limit)
  fit = _fit_fn(builder, source, data.image_size, data.num_channels)
  # Parallel map keeps the input order (tf.data is deterministic unless told otherwise).
  ds = ds.map(fit, num_parallel_calls=tf.data.AUTOTUNE).batch(_LOAD_BATCH).prefetch(1)
  batches = list(ds.as_numpy_iterator())
  if not batches:
    raise ValueError(f'data split {split!r} of tfds dataset {source.tfds_name!r} has no examples')
  return np.concatenate(batches)


def load_split_labels(source: Source, data: ml_collections.ConfigDict, split: str,
                      limit: int | None = None) -> np.ndarray:
  """int32 [N]: the class labels of the examples `load_split_uint8` returns (same order)."""
  builder = prepared_builder(source.tfds_name, data.data_dir)
  _check_labelled(builder)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=_tfds().ReadConfig(try_autocache=False),
                          decoders={IMAGE_KEY: _tfds().decode.SkipDecoding()})
  ds = ds.map(lambda example: example[LABEL_KEY])
  if limit is not None:
    ds = ds.take(limit)
  return np.fromiter(ds.as_numpy_iterator(), dtype=np.int64).astype(np.int32)


def _tfds() -> types.ModuleType:
  tf_cpu_only()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def streaming_dataset(builder: DatasetBuilder, source: Source, data: ml_collections.ConfigDict, *,
                      local_batch: int, seed: int, process_index: int,
                      process_count: int, with_labels: bool = False) -> tf_types.data.Dataset:
  """This process's endless stream of uint8 batches [local_batch, S, S, C] of data.train_split.

  builder: from prepared_builder(source.tfds_name, data.data_dir).

  Each process reads its own even share of the split (tfds.even_splits), shuffles it with `seed`
  (files and a data.shuffle_buffer buffer, reshuffled every epoch), repeats, decodes, fits, flips
  (data.random_flip; a stateless coin per stream position, so a restored iterator flips the same
  way), batches and prefetches. Everything in it can be saved by tf.train.Checkpoint.
  with_labels: batches are (images, int32 labels [local_batch]) pairs (class-conditional models).
  """
  tf = tf_cpu_only()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = tfds.even_splits(data.train_split, n=process_count)[process_index]
  fit = _fit_fn(builder, source, data.image_size, data.num_channels)

  def fit_and_flip(position, encoded):
    if with_labels:  # (bytes, label): the label passes through untouched by fitting and flips
      encoded, label = encoded
      return fit_and_flip_image(position, encoded), tf.cast(label, tf.int32)
    return fit_and_flip_image(position, encoded)

  def fit_and_flip_image(position, encoded):
    image = fit(encoded)
    if not data.random_flip:
      return image
    # The coin depends on the global stream position, not on an RNG state, so flips survive a
    # restore and differ between processes.
    key = tf.stack([tf.constant(seed, tf.int64), position * process_count + process_index])
    flip = tf.random.stateless_uniform([], seed=key) < 0.5
    return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)

  ds = _encoded_images(builder, split, shuffle_seed=seed, with_labels=with_labels)
  ds = ds.shuffle(data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate()
  ds = ds.map(fit_and_flip, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(data.prefetch) if data.prefetch else ds
