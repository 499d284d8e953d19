"""What a `config.data.dataset` name means and how it is fitted to the model's shape.

A source is read as uint8 images, fitted to (data.image_size, data.image_size, data.num_channels):
  * 'exact': stored at that shape already (digits 8x8x1, cifar10 32x32x3); another size is an error.
  * 'pad': MNIST's 28x28 is padded with background (0, i.e. -1 in model range) to image_size.
  * 'crop_resize': centre square crop, then an antialiased bicubic resize (CelebA-HQ, LSUN, image
    folders, any other tfds image dataset); channels are converted to num_channels.

The helpers here only resolve and describe; `ddpm_jax.config.validate_config` turns what they
report into the error naming the config field.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ddpm_jax.data.tf_cpu import tf_cpu_only

DIGITS = 'digits'
IMAGE_FOLDER = 'image_folder'
TFDS = 'tfds'


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved `config.data.dataset`.

  kind: 'digits' | 'image_folder' | 'tfds'. tfds_name: the full tfds name ('lsun/church_outdoor'),
  None for the other kinds. channels / size: what is stored (None: varies or converted).
  fit: 'exact' | 'pad' | 'crop_resize' (see the module docstring). in_memory: the whole split is
  held in host memory as uint8 (else streamed by tf.data).
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


def tfds_base_name(name: str) -> str:
  """'lsun/church_outdoor:3.0.0' -> 'lsun'."""
  return name.split('/')[0].split(':')[0]


def known_tfds_names() -> tuple[str, ...]:
  """The tfds base names with their own entry in the source table (the others are crop-resized)."""
  return tuple(sorted(_TFDS_SOURCES))


def is_registered_tfds_name(name: str) -> bool:
  """Whether tfds knows `name`; only a name outside the table imports tensorflow_datasets."""
  if tfds_base_name(name) in _TFDS_SOURCES:
    return True
  tf_cpu_only()  # tfds imports TF: keep it off the accelerators
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tfds.builder_cls(tfds_base_name(name))
  except tfds.core.DatasetNotFoundError:
    return False
  return True


def fit_problem(source: Source, image_size: int, num_channels: int) -> tuple[str, str] | None:
  """Why (image_size, num_channels) cannot be reached from what `source` stores, or None.

  Returns (the data.* field at fault, what the dataset allows), the latter to follow its name.
  """
  if source.channels is not None and num_channels != source.channels:
    return 'num_channels', f'has {source.channels} channel(s): expected {source.channels}'
  if source.fit == 'exact' and image_size != source.size:
    return 'image_size', f'is stored at {source.size}x{source.size}: expected {source.size}'
  if source.fit == 'pad' and image_size < source.size:
    return 'image_size', (f'({source.size}x{source.size}) is padded, not shrunk: '
                          f'expected >= {source.size}')
  return None


def _base_source(name: str) -> Source:
  if name == DIGITS:
    return Source(DIGITS, None, channels=1, size=8, fit='exact', in_memory=True)
  if name == IMAGE_FOLDER:
    return Source(IMAGE_FOLDER, None, channels=None, size=None, fit='crop_resize', in_memory=True)
  return Source(TFDS, name, **_TFDS_SOURCES.get(tfds_base_name(name), _OTHER_TFDS))


def resolve_source(config: ml_collections.ConfigDict) -> Source:
  """The Source of config.data.dataset, with data.in_memory (None: the source's default) applied.

  Checks nothing: `ddpm_jax.config.validate_config` has checked config.data once, at start-up.
  """
  source = _base_source(config.data.dataset)
  in_memory = config.data.get('in_memory', None)
  return source if in_memory is None else dataclasses.replace(source, in_memory=in_memory)


def local_batch_size(global_batch: int, process_count: int) -> int:
  """training.batch_size split over processes; ValueError unless it divides evenly.

  An argument check: process_count is this run's, which validate_config may not have been given.
  """
  if process_count < 1 or global_batch < 1 or global_batch % process_count:
    raise ValueError(f'training.batch_size={global_batch!r} does not split over {process_count} '
                     'process(es): expected a positive multiple of the process count')
  return global_batch // process_count
