"""What a `config.data.dataset` name means, how it is fitted to the model's shape, and its checks.

A source is read as uint8 images, fitted to (data.image_size, data.image_size, data.num_channels):
  * 'exact': stored at that shape already (digits 8x8x1, cifar10 32x32x3); another size is an error.
  * 'pad': MNIST's 28x28 is padded with background (0, i.e. -1 in model range) to image_size.
  * 'crop_resize': centre square crop, then an antialiased bicubic resize (CelebA-HQ, LSUN, image
    folders, any other tfds image dataset); channels are converted to num_channels.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NoReturn

import ml_collections

DIGITS = 'digits'
IMAGE_FOLDER = 'image_folder'
FITS = ('exact', 'pad', 'crop_resize')


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved `config.data.dataset`.

  kind: 'digits' | 'image_folder' | 'tfds'. tfds_name: the full tfds name ('lsun/church_outdoor'),
  None for the other kinds. channels / size: what is stored (None: varies or converted).
  fit: one of FITS. in_memory: the whole split is held in host memory as uint8 (else streamed by
  tf.data).
  """
  kind: str
  tfds_name: str | None
  channels: int | None
  size: int | None
  fit: str
  in_memory: bool


# Defaults per tfds base name. CIFAR10 and MNIST fit easily in host memory, which gives the exact,
# process-count-independent batches of the in-memory path; the 256x256 sets are streamed.
_TFDS_SOURCES = {
    'cifar10': dict(channels=3, size=32, fit='exact', in_memory=True),
    'mnist': dict(channels=1, size=28, fit='pad', in_memory=True),
    'celeb_a_hq': dict(channels=3, size=None, fit='crop_resize', in_memory=False),
    'lsun': dict(channels=3, size=None, fit='crop_resize', in_memory=False),
}
_OTHER_TFDS = dict(channels=None, size=None, fit='crop_resize', in_memory=False)


def _fail(field: str, value: Any, allowed: str) -> NoReturn:
  raise ValueError(f'{field}: got {value!r}, {allowed}')


def _tfds_base_name(name: str) -> str:
  return name.split('/')[0].split(':')[0]


def _check_registered_tfds_name(name: str) -> None:
  """Fails for names that tfds does not know (only for names outside the table: imports tfds)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tfds.builder_cls(_tfds_base_name(name))
  except tfds.core.DatasetNotFoundError:
    _fail('data.dataset', name, f"expected '{DIGITS}', '{IMAGE_FOLDER}' or a tfds image dataset "
          f"name (e.g. {', '.join(sorted(_TFDS_SOURCES))}, 'celeb_a_hq/256', "
          "'lsun/church_outdoor')")


def _check_shape_fields(data: ml_collections.ConfigDict) -> None:
  for field in ('image_size', 'num_channels', 'shuffle_buffer', 'prefetch'):
    value = data.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
      _fail(f'data.{field}', value, 'expected an integer')
  if data.image_size < 1:
    _fail('data.image_size', data.image_size, 'expected a positive integer')
  if data.num_channels not in (1, 3):
    _fail('data.num_channels', data.num_channels, 'expected 1 (grey) or 3 (RGB)')
  if data.shuffle_buffer < 1:
    _fail('data.shuffle_buffer', data.shuffle_buffer, 'expected a positive integer')
  if data.prefetch < 0:
    _fail('data.prefetch', data.prefetch, 'expected an integer >= 0')
  if not isinstance(data.random_flip, bool):
    _fail('data.random_flip', data.random_flip, 'expected True or False')
  in_memory = data.get('in_memory', None)
  if in_memory is not None and not isinstance(in_memory, bool):
    _fail('data.in_memory', in_memory, 'expected None (the source default), True or False')


def _check_fit(source: Source, data: ml_collections.ConfigDict) -> None:
  """The requested (image_size, num_channels) must be reachable from what the source stores."""
  name = data.dataset
  if source.channels is not None and data.num_channels != source.channels:
    _fail('data.num_channels', data.num_channels,
          f'dataset {name!r} has {source.channels} channel(s); '
          f'set data.num_channels={source.channels}')
  if source.fit == 'exact' and data.image_size != source.size:
    _fail('data.image_size', data.image_size,
          f'dataset {name!r} is stored at {source.size}x{source.size}; '
          f'set data.image_size={source.size}')
  if source.fit == 'pad' and data.image_size < source.size:
    _fail('data.image_size', data.image_size,
          f'dataset {name!r} ({source.size}x{source.size}) is padded, not shrunk: '
          f'expected >= {source.size}')


def _base_source(data: ml_collections.ConfigDict) -> Source:
  name = data.dataset
  if not isinstance(name, str) or not name:
    _fail('data.dataset', name, f"expected '{DIGITS}', '{IMAGE_FOLDER}' or a tfds dataset name")
  if name == DIGITS:
    return Source(DIGITS, None, channels=1, size=8, fit='exact', in_memory=True)
  if name == IMAGE_FOLDER:
    folder = data.get('image_folder')
    if not folder or not os.path.isdir(folder):
      _fail('data.image_folder', folder,
            "expected an existing directory (for data.dataset='image_folder')")
    return Source(IMAGE_FOLDER, None, channels=None, size=None, fit='crop_resize', in_memory=True)
  defaults = _TFDS_SOURCES.get(_tfds_base_name(name))
  if defaults is None:
    _check_registered_tfds_name(name)
    defaults = _OTHER_TFDS
  return Source('tfds', name, **defaults)


def resolve_source(config: ml_collections.ConfigDict) -> Source:
  """Validates config.data and returns its Source (with data.in_memory applied).

  Raises:
    ValueError: naming the data.* field, its value and what is allowed.
  """
  data = config.data
  _check_shape_fields(data)
  source = _base_source(data)
  _check_fit(source, data)
  in_memory = data.get('in_memory', None)
  if in_memory is None:
    return source
  if not in_memory and source.kind != 'tfds':
    _fail('data.in_memory', in_memory,
          f'{data.dataset!r} is always held in memory; use None or True')
  return dataclasses.replace(source, in_memory=in_memory)


def validate_data_config(config: ml_collections.ConfigDict) -> None:
  """Checks config.data (names, shapes, types) before anything compiles.

  Raises:
    ValueError: naming the data.* field, its value and what is allowed.
  """
  resolve_source(config)


def local_batch_size(global_batch: int, process_count: int) -> int:
  """training.batch_size split over processes; ValueError unless it divides evenly."""
  if not isinstance(global_batch, int) or global_batch < 1:
    _fail('training.batch_size', global_batch, 'expected a positive integer')
  if process_count < 1 or global_batch % process_count:
    _fail('training.batch_size', global_batch,
          f'expected a multiple of the process count ({process_count})')
  return global_batch // process_count
