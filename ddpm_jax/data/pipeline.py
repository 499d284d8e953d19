"""Training batches and evaluation images, for every source, as a pure function of (config, seed).

The iterator contract (what the training job, `jobs/train.py`, relies on):
  * `create_train_iterator(config, seed=..., start_step=s, process_index=i, process_count=n)`;
    `next(it)` is this process's float32 [training.batch_size // n, S, S, C] batch in [-1, 1] for
    training step `it.step` (then `it.step` advances). Process i gets rows [i * b, (i + 1) * b) of
    the global batch.
  * `it.save_state(directory)` writes this process's position under `directory` (one file set per
    process, so all processes may share the directory); `it.restore_state(directory)` on a fresh
    iterator built from the same config and seed continues exactly where the saved one stood.

In-memory sources (digits, cifar10, mnist, image folders, anything with data.in_memory=True) hold
the split as uint8 and compute global batch s from (seed, s) alone: the training stream is the
concatenation of epoch permutations (numpy Generator seeded by (seed, epoch)), batch s is positions
[s * B, (s + 1) * B) of it, and its flips come from a Generator seeded by (seed, s). So
`start_step` alone resumes exactly (save/restore only record and check the step), and the global
batch does not depend on the process count. Each batch costs one uint8 gather and one float
conversion (microseconds next to a train step, so no prefetch thread is needed).

Class labels (config.model.num_classes > 0 only, iDDPM's class_cond): then `next(it)` is a pair
(images, int32 labels [local_batch]), the labels of the same examples (digits' digit, a tfds set's
'label' feature, an image folder's class sub-folder); with num_classes = 0 nothing about the
iterator changes.

Streaming sources (celeb_a_hq, lsun, other tfds sets by default) go through tf.data
(`tfds_source.streaming_dataset`); the stream position lives in the tf.data iterator, saved with
tf.train.Checkpoint. Exact resumption therefore needs `restore_state`; an iterator created with
start_step > 0 and never restored starts a fresh shuffle order derived from (seed, start_step), so
it does not replay the first batches (statistically sound, but not the uninterrupted run's batches).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import ml_collections
import numpy as np
from absl import logging

from ddpm_jax.data import image_folder, preprocess, sources, tfds_source
from ddpm_jax.data.digits import load_digits_split

# Domain tags keep the permutation, flip and restart random streams apart for equal numbers.
_PERMUTATION_STREAM, _FLIP_STREAM, _RESTART_STREAM = 0, 1, 2
_STATE_FILE = 'data_process_{:05d}'


class TrainIterator(Protocol):
  """What create_train_iterator returns (see the module docstring)."""
  step: int

  def __iter__(self) -> Iterator[np.ndarray]: ...

  def __next__(self) -> np.ndarray: ...

  def save_state(self, directory: str) -> None: ...

  def restore_state(self, directory: str) -> None: ...


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Read-only int64 [num_examples]: the order of the examples in `epoch` of the training stream."""
  permutation = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch]).permutation(num_examples)
  permutation.flags.writeable = False  # shared by the cache
  return permutation


def flip_mask(seed: int, step: int, global_batch: int) -> np.ndarray:
  """bool [global_batch]: which images of global batch `step` are mirrored (probability 1/2)."""
  return np.random.default_rng([seed, _FLIP_STREAM, step]).random(global_batch) < 0.5


def example_indices(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
  """int64 example index at each position (int64 array) of the epoch-permutation stream."""
  epochs, offsets = np.divmod(positions, num_examples)
  indices = np.empty_like(positions)
  for epoch in np.unique(epochs):
    where = epochs == epoch
    indices[where] = epoch_permutation(seed, int(epoch), num_examples)[offsets[where]]
  return indices


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index: got {process_index}, expected 0 <= index < {process_count}')


def _state_prefix(directory: str, process_index: int) -> str:
  return os.path.join(directory, _STATE_FILE.format(process_index))


def _write_meta(directory: str, process_index: int, meta: dict[str, Any]) -> None:
  gfile = tfds_source.tf_cpu_only().io.gfile  # gfile also reaches gs:// checkpoint directories
  gfile.makedirs(directory)
  with gfile.GFile(_state_prefix(directory, process_index) + '.json', 'w') as f:
    json.dump(meta, f)


def _read_meta(directory: str, process_index: int, expected: dict[str, Any]) -> dict[str, Any]:
  """The saved metadata; ValueError if it was saved by an iterator with different settings."""
  gfile = tfds_source.tf_cpu_only().io.gfile
  path = _state_prefix(directory, process_index) + '.json'
  if not gfile.exists(path):
    raise FileNotFoundError(f'no data iterator state for process {process_index} at {path!r}')
  with gfile.GFile(path) as f:
    meta = json.load(f)
  for key, value in expected.items():
    if meta.get(key) != value:
      raise ValueError(f'data iterator state {path!r} was saved with {key}={meta.get(key)!r}, but '
                       f'this iterator has {key}={value!r}; resume with the same config and seed')
  return meta


class InMemoryIterator:
  """Batches of a uint8 array held in memory; batch s is a pure function of (seed, s)."""

  def __init__(self, images: np.ndarray, *, global_batch: int, seed: int, random_flip: bool,
               start_step: int = 0, process_index: int = 0, process_count: int = 1,
               labels: np.ndarray | None = None):
    """images: uint8 [N, H, W, C], N >= 1, the whole split (every process holds all of it).

    labels: optional int [N] class labels; then each batch is (images, int32 labels).
    """
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
      raise ValueError(f'images: expected a non-empty uint8 [N, H, W, C] array, got '
                       f'{images.dtype} {images.shape}')
    if labels is not None and np.shape(labels) != (len(images),):
      raise ValueError(f'labels: expected one per image, shape ({len(images)},), got '
                       f'{np.shape(labels)}')
    self._labels = None if labels is None else np.asarray(labels, np.int32)
    local_batch = sources.local_batch_size(global_batch, process_count)
    _check_process(process_index, process_count)
    self._images = images
    self._global_batch, self._seed, self._random_flip = global_batch, seed, random_flip
    self._rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    self._process_index = process_index
    self.step = start_step

  def batch_at(self, step: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """This process's float32 [local_batch, H, W, C] in [-1, 1] of global batch `step` (and its
    int32 labels [local_batch] when the iterator has labels)."""
    positions = step * self._global_batch + np.arange(self._rows.start, self._rows.stop)
    indices = example_indices(positions, len(self._images), self._seed)
    batch = self._images[indices]
    if self._random_flip:
      flips = flip_mask(self._seed, step, self._global_batch)[self._rows]
      preprocess.flip_horizontally(batch, flips)
    if self._labels is not None:
      return preprocess.to_model_range(batch), self._labels[indices]
    return preprocess.to_model_range(batch)

  def __iter__(self) -> InMemoryIterator:
    return self

  def __next__(self) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def _identity(self) -> dict[str, Any]:
    return {'kind': 'in_memory', 'seed': self._seed, 'global_batch': self._global_batch,
            'num_examples': len(self._images), 'random_flip': self._random_flip}

  def save_state(self, directory: str) -> None:
    """Records the step (and what the batches depend on, to refuse a mismatched restore)."""
    _write_meta(directory, self._process_index, {**self._identity(), 'step': self.step})

  def restore_state(self, directory: str) -> None:
    """Continues from the saved step; ValueError if it was saved with other data settings."""
    self.step = int(_read_meta(directory, self._process_index, self._identity())['step'])


class StreamingIterator:
  """Wraps a tf.data stream of uint8 batches; its position is saved with tf.train.Checkpoint.

  The tf.data iterator is built lazily, so that `restore_state` can rebuild it with the seed of the
  saved stream before anything is read.
  """

  def __init__(self, make_dataset: Callable[[int], Any], *, seed: int, start_step: int = 0,
               process_index: int = 0, settings: dict[str, Any] | None = None):
    """make_dataset(stream_seed) -> tf.data.Dataset of uint8 [local_batch, H, W, C] batches.

    settings: JSON-able values the stream depends on; a restore from a state saved with other
    values is refused.
    """
    self._make_dataset, self._seed, self._process_index = make_dataset, seed, process_index
    self._identity = {'kind': 'streaming', 'seed': seed, **(settings or {})}
    self._iterator, self._stream_seed = None, None
    self.step = start_step

  def _start(self, stream_seed: int) -> None:
    self._stream_seed = stream_seed
    self._iterator = iter(self._make_dataset(stream_seed))

  def _ensure_started(self) -> None:
    if self._iterator is not None:
      return
    if self.step == 0:
      self._start(self._seed)
      return
    logging.warning('Streaming data: start_step=%d without restore_state; the stream restarts '
                    'with a fresh shuffle order (not the batches of an uninterrupted run).',
                    self.step)
    self._start(int(np.random.SeedSequence([self._seed, _RESTART_STREAM, self.step])
                    .generate_state(1)[0]))

  def __iter__(self) -> StreamingIterator:
    return self

  def __next__(self) -> np.ndarray:
    """This process's float32 [local_batch, H, W, C] batch in [-1, 1]."""
    self._ensure_started()
    try:
      batch = next(self._iterator)
    except StopIteration:
      raise ValueError('data.train_split: this process\'s share of the split holds fewer examples '
                       'than one local batch') from None
    self.step += 1
    if isinstance(batch, tuple):  # (images, labels): class-conditional
      return preprocess.to_model_range(batch[0].numpy()), batch[1].numpy()
    return preprocess.to_model_range(batch.numpy())

  def _checkpoint(self):
    return tfds_source.tf_cpu_only().train.Checkpoint(iterator=self._iterator)

  def save_state(self, directory: str) -> None:
    """Saves the tf.data iterator (including its shuffle and prefetch buffers) and the step."""
    self._ensure_started()
    meta = {**self._identity, 'stream_seed': self._stream_seed, 'step': self.step}
    _write_meta(directory, self._process_index, meta)
    self._checkpoint().write(_state_prefix(directory, self._process_index))

  def restore_state(self, directory: str) -> None:
    """Rebuilds the saved stream and moves it to the saved position."""
    meta = _read_meta(directory, self._process_index, self._identity)
    self._start(int(meta['stream_seed']))
    self._checkpoint().read(_state_prefix(directory, self._process_index)).assert_consumed()
    self.step = int(meta['step'])


def _load_uint8(config: ml_collections.ConfigDict, source: sources.Source, split: str,
                limit: int | None) -> np.ndarray:
  data = config.data
  if source.kind == sources.DIGITS:
    return load_digits_split(split)[0][:limit].copy()  # not a view of the cached split
  if source.kind == sources.IMAGE_FOLDER:
    return image_folder.load_image_folder(data.image_folder, split, data.image_size,
                                          data.num_channels, limit)
  return tfds_source.load_split_uint8(source, data, split, limit)


def _load_labels(config: ml_collections.ConfigDict, source: sources.Source, split: str,
                 limit: int | None) -> np.ndarray:
  """int32 [N] class labels of the examples `_load_uint8` returns, checked against num_classes."""
  data = config.data
  if source.kind == sources.DIGITS:
    labels = load_digits_split(split)[1][:limit].copy()
  elif source.kind == sources.IMAGE_FOLDER:
    labels = image_folder.class_labels(data.image_folder, split, limit)
  else:
    labels = tfds_source.load_split_labels(source, data, split, limit)
  num_classes = config.model.num_classes
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'model.num_classes={num_classes} is too small: data.dataset='
                     f'{data.dataset!r} split {split!r} has labels in [{labels.min()}, '
                     f'{labels.max()}]')
  return labels


def _class_conditional(config: ml_collections.ConfigDict) -> bool:
  return config.model.get('num_classes', 0) > 0


def create_train_iterator(config: ml_collections.ConfigDict, *, seed: int, start_step: int = 0,
                          process_index: int = 0, process_count: int = 1) -> TrainIterator:
  """This process's iterator of float32 [batch_size // process_count, S, S, C] batches in [-1, 1].

  seed: non-negative int (usually config.seed); start_step: the first training step it serves.
  See the module docstring for the determinism and save/restore contract. config.data is checked
  once, by `ddpm_jax.config.validate_config` (config.seed too); numpy refuses a negative seed.
  With config.model.num_classes > 0 it yields (images, int32 labels) pairs.
  """
  with_labels = _class_conditional(config)
  source = sources.resolve_source(config)
  local_batch = sources.local_batch_size(config.training.batch_size, process_count)
  _check_process(process_index, process_count)
  if source.in_memory:
    images = _load_uint8(config, source, config.data.train_split, None)
    labels = _load_labels(config, source, config.data.train_split, None) if with_labels else None
    logging.info('Training data %r/%s: %d images %s held in memory.', config.data.dataset,
                 config.data.train_split, len(images), images.shape[1:])
    return InMemoryIterator(images, global_batch=config.training.batch_size, seed=seed,
                            random_flip=config.data.random_flip, start_step=start_step,
                            process_index=process_index, process_count=process_count,
                            labels=labels)
  # Prepared now, so that a missing dataset fails at start-up rather than at the first batch.
  builder = tfds_source.prepared_builder(source.tfds_name, config.data.data_dir)
  make_dataset = functools.partial(tfds_source.streaming_dataset, builder, source, config.data,
                                   local_batch=local_batch, process_index=process_index,
                                   process_count=process_count, with_labels=with_labels)
  data = config.data
  settings = {'dataset': data.dataset, 'split': data.train_split, 'local_batch': local_batch,
              'image_size': data.image_size, 'num_channels': data.num_channels,
              'random_flip': data.random_flip, 'process_count': process_count}
  if with_labels:  # only then: an unconditional run's saved state keeps its settings
    settings['labels'] = True
  return StreamingIterator(lambda stream_seed: make_dataset(seed=stream_seed), seed=seed,
                           start_step=start_step, process_index=process_index, settings=settings)


def load_eval_images(config: ml_collections.ConfigDict, split: str,
                     num_examples: int) -> np.ndarray:
  """The first num_examples images of `split` (fewer if it is smaller): uint8 [N, S, S, C].

  Deterministic (file / sorted order), same fitting as training, no flips: for bpd and FID
  reference statistics.
  """
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f'num_examples: got {num_examples!r}, expected a positive integer')
  return _load_uint8(config, sources.resolve_source(config), split, int(num_examples))


def load_eval_labels(config: ml_collections.ConfigDict, split: str, num_examples: int) -> np.ndarray:
  """int32 [N]: the class labels of `load_eval_images(config, split, num_examples)`, same order
  (class-conditional models, config.model.num_classes > 0)."""
  if not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
    raise ValueError(f'num_examples: got {num_examples!r}, expected a positive integer')
  return _load_labels(config, sources.resolve_source(config), split, int(num_examples))
