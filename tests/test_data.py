"""Tests of ddpm_jax.data: determinism and exact resume, process slices, flips, every source kind.

Nothing here touches the network: tfds datasets are mocked (tfds.testing.mock_data with known
images) or generated into a tmp dir by a tiny local builder; image folders are written to tmp dirs.
"""

import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import celeba_hq, cifar10, cifar10_iddpm, default, digits, lsun_bedroom, lsun_church, mnist
from ddpm_jax import data
from ddpm_jax.config import validate_config

tfds.disable_progress_bar()


# --------------------------------------------------------------------------- helpers

def _config(module=default, batch_size=8, **data_fields):
  config = module.get_config()
  config.training.batch_size = batch_size
  for name, value in data_fields.items():
    config.data[name] = value
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(expected, got):
  assert len(expected) == len(got)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)


def _random_images(n, shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _mock_tfds(images):
  """tfds.testing.mock_data serving exactly `images` (uint8 [N, H, W, C]) as PNGs, for every split.

  from_tensor_slices (unlike the default mock's from_generator) can be checkpointed.
  """
  encoded = [tf.io.encode_png(image).numpy() for image in images]

  def as_dataset_fn(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    del self, split, decoders, read_config, shuffle_files, kwargs
    return tf.data.Dataset.from_tensor_slices(
        {'image': encoded, 'label': np.zeros(len(images), np.int64)})

  return tfds.testing.mock_data(as_dataset_fn=as_dataset_fn)


def _keys(images):
  return sorted(image.tobytes() for image in images)


# --------------------------------------------------------------------------- pixel conversions

def test_model_range_round_trip_and_rounding():
  grid = np.arange(256, dtype=np.uint8)
  x = data.to_model_range(grid)
  assert x.dtype == np.float32
  assert (x[0], x[-1]) == (-1.0, 1.0)
  assert np.all(np.diff(x) > 0)
  np.testing.assert_array_equal(data.to_uint8(x), grid)
  np.testing.assert_array_equal(data.to_uint8(x + 0.4 / 127.5), grid)  # rounds to nearest
  np.testing.assert_array_equal(data.to_uint8(np.array([-3.0, 2.0, np.float32(0.3 / 127.5 - 1)])),
                                [0, 255, 0])


# --------------------------------------------------------------------------- in-memory determinism

def test_digits_batches_are_float32_on_the_8bit_grid():
  config = _config(digits, batch_size=64)
  batch = next(data.create_train_iterator(config, seed=0))
  assert batch.shape == (64, 8, 8, 1) and batch.dtype == np.float32
  assert batch.min() == -1.0 and batch.max() == 1.0
  levels = (batch + 1) * 127.5
  np.testing.assert_allclose(levels, np.rint(levels), atol=1e-4)


def test_resume_at_start_step_and_from_saved_state_is_exact(tmp_path):
  # 128 does not divide 1437, so batches 11 and 22 straddle epoch boundaries.
  config = _config(digits, batch_size=128, random_flip=True)
  uninterrupted = _take(data.create_train_iterator(config, seed=7), 25)
  resumed = data.create_train_iterator(config, seed=7, start_step=13)
  _assert_batches_equal(uninterrupted[13:], _take(resumed, 12))

  first = data.create_train_iterator(config, seed=7)
  _take(first, 13)
  first.save_state(str(tmp_path))
  restored = data.create_train_iterator(config, seed=7)
  restored.restore_state(str(tmp_path))
  assert restored.step == 13
  _assert_batches_equal(uninterrupted[13:16], _take(restored, 3))

  other_seed = next(data.create_train_iterator(config, seed=8))
  assert not np.array_equal(other_seed, uninterrupted[0])


def test_restore_refuses_state_saved_with_another_seed(tmp_path):
  config = _config(digits, batch_size=16)
  data.create_train_iterator(config, seed=1).save_state(str(tmp_path))
  with pytest.raises(ValueError, match='seed=1'):
    data.create_train_iterator(config, seed=2).restore_state(str(tmp_path))


def test_each_epoch_is_a_permutation_and_epochs_differ():
  ids = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1)
  iterator = data.InMemoryIterator(ids, global_batch=8, seed=3, random_flip=False)
  stream = data.to_uint8(np.concatenate(_take(iterator, 13))).ravel()  # 104 positions
  np.testing.assert_array_equal(np.sort(stream[:50]), np.arange(50))
  np.testing.assert_array_equal(np.sort(stream[50:100]), np.arange(50))
  assert not np.array_equal(stream[:50], stream[50:100])


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_concatenate_to_the_single_process_batch(process_count):
  config = _config(digits, batch_size=64, random_flip=True)
  single = data.create_train_iterator(config, seed=5, start_step=20)
  slices = [data.create_train_iterator(config, seed=5, start_step=20, process_index=i,
                                       process_count=process_count) for i in range(process_count)]
  for _ in range(4):  # steps 20..23 cross the epoch boundary at position 1437
    parts = [next(s) for s in slices]
    assert parts[0].shape == (64 // process_count, 8, 8, 1)
    np.testing.assert_array_equal(np.concatenate(parts), next(single))


def test_batch_size_must_divide_over_processes():
  config = _config(digits, batch_size=64)
  with pytest.raises(ValueError, match='training.batch_size'):
    data.create_train_iterator(config, seed=0, process_count=3)
  with pytest.raises(ValueError, match='process_index'):
    data.create_train_iterator(config, seed=0, process_index=2, process_count=2)


def test_flips_are_horizontal_and_only_when_configured():
  images = _random_images(40, (6, 6, 3))
  kwargs = dict(global_batch=16, seed=11)
  plain = _take(data.InMemoryIterator(images, random_flip=False, **kwargs), 10)
  flipped = _take(data.InMemoryIterator(images, random_flip=True, **kwargs), 10)
  originals = set(_keys(images))
  assert all(image.tobytes() in originals for image in data.to_uint8(np.concatenate(plain)))
  num_flipped = 0
  for a, b in zip(np.concatenate(plain), np.concatenate(flipped)):
    mirrored = a[:, ::-1]  # the W axis of an HWC image
    assert np.array_equal(b, a) or np.array_equal(b, mirrored)
    num_flipped += int(np.array_equal(b, mirrored))
  assert 40 <= num_flipped <= 120  # of 160, each with probability 1/2


# --------------------------------------------------------------------------- tfds (mocked)

def test_cifar10_in_memory_epoch_and_eval_images():
  images = _random_images(20, (32, 32, 3))
  config = _config(cifar10, batch_size=5, random_flip=False)
  with _mock_tfds(images):
    epoch = np.concatenate(_take(data.create_train_iterator(config, seed=0), 4))
    assert epoch.dtype == np.float32 and epoch.shape == (20, 32, 32, 3)
    assert _keys(data.to_uint8(epoch)) == _keys(images)
    first = data.load_eval_images(config, 'test', 8)
    everything = data.load_eval_images(config, 'test', 100)
  assert first.dtype == np.uint8
  np.testing.assert_array_equal(first, images[:8])
  assert everything.shape == (20, 32, 32, 3)


def test_cifar10_streaming_flips_and_exact_resume(tmp_path):
  images = _random_images(20, (32, 32, 3), seed=1)
  config = _config(cifar10, batch_size=4, random_flip=True, shuffle_buffer=8, in_memory=False)
  with _mock_tfds(images):
    iterator = data.create_train_iterator(config, seed=0)
    assert isinstance(iterator, data.StreamingIterator)
    head = _take(iterator, 3)
    iterator.save_state(str(tmp_path))
    tail = _take(iterator, 7)
    restored = data.create_train_iterator(config, seed=0, start_step=3)
    restored.restore_state(str(tmp_path))
    _assert_batches_equal(tail, _take(restored, 7))
    _assert_batches_equal(head, _take(data.create_train_iterator(config, seed=0), 3))
    config.training.batch_size = 2
    with pytest.raises(ValueError, match='local_batch=4'):
      data.create_train_iterator(config, seed=0).restore_state(str(tmp_path))
    other_seed = _take(data.create_train_iterator(config, seed=1), 3)
  assert restored.step == 10
  assert not all(np.array_equal(a, b) for a, b in zip(head, other_seed))
  stream = data.to_uint8(np.concatenate(head + tail))
  assert stream.shape == (40, 32, 32, 3) and head[0].dtype == np.float32
  originals = set(_keys(images))
  mirrored = set(_keys(images[:, :, ::-1]))
  num_plain = sum(image.tobytes() in originals for image in stream)
  num_mirrored = sum(image.tobytes() in mirrored for image in stream)
  assert num_plain + num_mirrored == 40 and num_plain > 0 and num_mirrored > 0


def test_mnist_is_padded_with_background():
  images = np.random.default_rng(2).integers(1, 256, (6, 28, 28, 1), dtype=np.uint8)
  config = _config(mnist, batch_size=6)
  with _mock_tfds(images):
    padded = data.load_eval_images(config, 'test', 6)
    batch = next(data.create_train_iterator(config, seed=0))
  assert padded.shape == (6, 32, 32, 1)
  np.testing.assert_array_equal(padded[:, 2:30, 2:30], images)
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(padded[:, border] == 0)
  assert np.all(batch[:, border] == -1.0) and np.all(batch[:, 2:30, 2:30] > -1.0)


def test_missing_tfds_dataset_says_how_to_prepare(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise ConnectionError('no network in tests')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_network)
  config = _config(cifar10, data_dir=str(tmp_path))
  expected = re.escape(f'python -m ddpm_jax.data.prepare cifar10 --data_dir={tmp_path}')
  with pytest.raises(data.DatasetUnavailableError, match=expected):
    data.load_eval_images(config, 'test', 4)
  config = _config(celeba_hq, data_dir=str(tmp_path))
  with pytest.raises(data.DatasetUnavailableError, match='manual download'):
    data.create_train_iterator(config, seed=0)  # fails at creation, not at the first batch


# --------------------------------------------------------------------------- tfds (real files)

class DdpmJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Non-square RGB images whose centre square is one colour and whose margins are another."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'image': tfds.features.Image(shape=(None, None, 3))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(30, 0), 'test': self._generate_examples(6, 1)}

  def _generate_examples(self, num_examples, seed):
    rng = np.random.default_rng(seed)
    for i in range(num_examples):
      height, width = rng.integers(9, 20, 2)
      colour = rng.integers(0, 128, 3, dtype=np.uint8)
      image = np.broadcast_to(255 - colour, (height, width, 3)).copy()
      side = min(height, width)
      top, left = (height - side) // 2, (width - side) // 2
      image[top:top + side, left:left + side] = colour
      yield i, {'image': image}


@pytest.fixture(scope='module')
def tiny_tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  DdpmJaxTinyImages(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_prepared_tfds_crop_resize_shards_and_resume(tiny_tfds_dir, tmp_path):
  config = _config(batch_size=4, dataset='ddpm_jax_tiny_images', data_dir=tiny_tfds_dir,
                   image_size=8, random_flip=False, shuffle_buffer=8)
  config.model.attn_resolutions = (8,)  # the whole tree is validated: 16 never occurs at 8x8
  validate_config(config)
  train = data.load_eval_images(config, 'train', 100)
  assert train.shape == (30, 8, 8, 3)
  # Centre crop then resize: every image is its constant centre colour (margins are 255 - it).
  assert np.all(train == train[:, :1, :1]) and np.all(train < 128)

  shards = [data.create_train_iterator(config, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  seen = [_keys(data.to_uint8(np.concatenate(_take(s, 7)))) for s in shards]  # 14 of 15 each
  assert set(seen[0]).isdisjoint(seen[1])
  assert set(seen[0] + seen[1]) <= set(_keys(train))

  iterator = data.create_train_iterator(config, seed=0)
  _take(iterator, 5)  # into the second epoch
  iterator.save_state(str(tmp_path))
  expected = _take(iterator, 6)
  restored = data.create_train_iterator(config, seed=0, start_step=5)
  restored.restore_state(str(tmp_path))
  _assert_batches_equal(expected, _take(restored, 6))

  config.data.in_memory = True  # a streaming-by-default source held in memory instead
  in_memory = data.create_train_iterator(config, seed=0)
  assert isinstance(in_memory, data.InMemoryIterator)
  epoch = data.to_uint8(np.concatenate(_take(in_memory, 7)))  # 28 of the 30
  assert len(set(_keys(epoch))) == 28 and set(_keys(epoch)) <= set(_keys(train))


# --------------------------------------------------------------------------- image folders

def _write(path, array, **save_kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **save_kwargs)


def _framed(height, width, centre, margin):
  """RGB uint8 [height, width, 3]: the centred square is `centre`, the rest `margin`."""
  image = np.broadcast_to(np.array(margin, np.uint8), (height, width, 3)).copy()
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image[top:top + side, left:left + side] = centre
  return image


def test_image_folder_png_and_jpeg_are_cropped_resized_and_converted(tmp_path):
  _write(str(tmp_path / 'a' / 'red.png'), _framed(20, 31, (255, 0, 0), (0, 0, 255)))
  _write(str(tmp_path / 'b' / 'grey.JPG'), np.full((24, 16), 128, np.uint8), quality=95)
  (tmp_path / 'notes.txt').write_text('not an image, ignored')
  config = _config(batch_size=2, dataset='image_folder', image_folder=str(tmp_path), image_size=8)
  images = data.load_eval_images(config, 'test', 10)
  assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
  assert np.all(images[0] == (255, 0, 0))  # sorted order; no blue margin left after the crop
  assert np.all(np.abs(images[1].astype(int) - 128) <= 3)  # grey JPEG -> 3 equal channels
  assert np.all(images[1] == images[1][..., :1])
  grey = data.load_eval_images(_config(batch_size=2, dataset='image_folder',
                                       image_folder=str(tmp_path), image_size=8, num_channels=1),
                               'test', 1)
  assert grey.shape == (1, 8, 8, 1)
  assert abs(int(grey[0, 0, 0, 0]) - 76) <= 1  # ITU-R 601 luma of pure red
  batch = next(data.create_train_iterator(config, seed=0))
  assert batch.shape == (2, 8, 8, 3) and batch.min() >= -1.0 and batch.max() <= 1.0


def test_image_folder_split_subfolders(tmp_path):
  _write(str(tmp_path / 'train' / 'x.png'), _framed(8, 8, (10, 10, 10), (10, 10, 10)))
  _write(str(tmp_path / 'test' / 'y.png'), _framed(8, 8, (200, 200, 200), (200, 200, 200)))
  config = _config(dataset='image_folder', image_folder=str(tmp_path), image_size=8)
  assert data.load_eval_images(config, 'test', 5)[0, 0, 0, 0] == 200
  assert data.load_eval_images(config, 'train', 5)[0, 0, 0, 0] == 10
  assert len(data.load_eval_images(config, 'validation', 5)) == 2  # no such subfolder: everything


def test_image_folder_corrupt_file_is_named(tmp_path):
  _write(str(tmp_path / 'good.png'), _framed(8, 8, (1, 2, 3), (1, 2, 3)))
  bad = tmp_path / 'bad.jpg'
  bad.write_bytes(b'\xff\xd8 this is not a JPEG')
  config = _config(dataset='image_folder', image_folder=str(tmp_path), image_size=8)
  with pytest.raises(ValueError, match=re.escape(str(bad))):
    data.load_eval_images(config, 'train', 5)


def test_image_folder_without_images_names_the_folder(tmp_path):
  config = _config(dataset='image_folder', image_folder=str(tmp_path), image_size=8)
  with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
    data.create_train_iterator(config, seed=0)
  (tmp_path / 'readme.txt').write_text('no images here')
  with pytest.raises(ValueError, match='no image files'):
    data.load_eval_images(config, 'train', 5)


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize('module, fields, field', [
    (digits, dict(image_size=32), 'data.image_size'),
    (digits, dict(num_channels=3), 'data.num_channels'),
    (digits, dict(in_memory=False), 'data.in_memory'),
    (cifar10, dict(num_channels=1), 'data.num_channels'),
    (cifar10, dict(image_size=64), 'data.image_size'),
    (mnist, dict(image_size=16), 'data.image_size'),
    (default, dict(num_channels=2), 'data.num_channels'),
    (default, dict(image_size=0), 'data.image_size'),
    (default, dict(dataset='image_folder'), 'data.image_folder'),
    (default, dict(dataset='image_folder', image_folder='/no/such/dir'), 'data.image_folder'),
    (default, dict(dataset='no_such_dataset_xyz'), 'data.dataset'),
])
def test_validation_names_the_field(module, fields, field):
  config = _config(module, **fields)
  with pytest.raises(ValueError, match=re.escape(f'config.{field}=')):
    validate_config(config)


@pytest.mark.parametrize('module', [default, cifar10, cifar10_iddpm, mnist, digits, celeba_hq,
                                    lsun_church, lsun_bedroom])
def test_shipped_configs_are_valid(module):
  validate_config(module.get_config())
  streamed = module in (celeba_hq, lsun_church, lsun_bedroom)
  assert data.resolve_source(module.get_config()).in_memory == (not streamed)


def test_tensorflows_native_start_up_lines_are_captured_and_shown_only_on_failure(capfd):
  """data/tf_cpu.py's capture of file descriptor 2 (where TF's C++ start-up lines go, past sys.stderr)."""
  from ddpm_jax.data.tf_cpu import captured_native_stderr  # pylint: disable=g-import-not-at-top
  with captured_native_stderr() as text:
    os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on.\n')
  assert text == ['I0000 port.cc:153] oneDNN custom operations are on.\n']
  assert 'oneDNN' not in capfd.readouterr().err
  with pytest.raises(ImportError, match='no such library'):
    with captured_native_stderr():
      os.write(2, b'E0000 could not load libfoo.so\n')
      raise ImportError('no such library')
  assert 'could not load libfoo.so' in capfd.readouterr().err  # above the traceback it explains
  os.write(2, b'after\n')
  assert capfd.readouterr().err == 'after\n'  # the descriptor is back where it was
