"""Issue #18: tfds's real preparation path (download, extract, generate, write, read), offline.

tests/test_data.py mocks tfds (tfds.testing.mock_data), which bypasses the builders, so it could not
notice that preparing CIFAR10 failed at once on a fresh install (importlib_resources missing). Here
the real tfds builders run: their download is served by a local HTTP server on 127.0.0.1 from small
archives the tests write in the real formats; only the builder's URL constant is pointed at that
server (with the archive's checksum registered for the new URL, so tfds still verifies it), and
MNIST's hard-coded example counts are shrunk. Everything else is tfds's and ddpm_jax's own code:
the download manager, the extraction of .tar.gz / .gz / .zip / .tar, _split_generators,
_generate_examples, the writer, as_dataset, and ddpm_jax's input pipeline.
"""

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.image import lsun as tfds_lsun
from tensorflow_datasets.image_classification import cifar as tfds_cifar
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from configs import celeba_hq, cifar10, lsun_church, mnist
from ddpm_jax import data
from ddpm_jax.data import prepare as prepare_cli
from ddpm_jax.data import tfds_source

tfds.disable_progress_bar()

_CIFAR_LABELS = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                 'truck']


# --------------------------------------------------------------------------- serving offline

class _Handler(http.server.SimpleHTTPRequestHandler):
  requested: list  # set per server

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args  # keep the test output quiet

  def do_GET(self):
    self.requested.append(self.path)
    super().do_GET()


@contextlib.contextmanager
def _serve(directory):
  """Serves `directory` on 127.0.0.1 (free port) in a thread; yields (base_url, requested paths)."""
  requested = []
  handler = type('Handler', (_Handler,), {'requested': requested})
  server = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(handler, directory=str(directory)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}', requested
  finally:
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(name='offline')
def _offline(monkeypatch):
  """Any request that is not for 127.0.0.1 fails at once (the tests never use the network)."""
  monkeypatch.setenv('NO_PROXY', '127.0.0.1')
  send = requests.adapters.HTTPAdapter.send

  def local_only(self, request, **kwargs):
    if not request.url.startswith('http://127.0.0.1:'):
      raise requests.ConnectionError(f'offline test: refused {request.url}')
    return send(self, request, **kwargs)

  monkeypatch.setattr(requests.adapters.HTTPAdapter, 'send', local_only)


def _register(monkeypatch, builder_cls, files):
  """Registers size and sha256 of each {url: path} as builder_cls's checksums (tfds checks them)."""
  infos = {}
  for url, path in files.items():
    content = path.read_bytes()
    infos[url] = tfds_checksums.UrlInfo(
        size=len(content), checksum=hashlib.sha256(content).hexdigest(), filename=path.name)
  monkeypatch.setattr(builder_cls, 'url_infos', infos)


# --------------------------------------------------------------------------- the real formats

def _cifar10_archive(directory, train_per_batch=3, num_test=5):
  """cifar-10-binary.tar.gz as published; returns it and {id: (image, label)}."""
  rng = np.random.default_rng(18)
  examples, members = {}, {}
  files = [(f'data_batch_{i}.bin', 'train_', train_per_batch) for i in range(1, 6)]
  files.append(('test_batch.bin', 'test_', num_test))
  counters = {'train_': 0, 'test_': 0}
  for filename, prefix, count in files:
    records = []
    for _ in range(count):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      label = int(rng.integers(0, 10))
      # One label byte, then the R, G and B planes of 32x32 row-major.
      records.append(bytes([label]) + image.transpose(2, 0, 1).tobytes())
      examples[f'{prefix}{counters[prefix]:05d}'] = (image, label)
      counters[prefix] += 1
    members[filename] = b''.join(records)
  members['batches.meta.txt'] = ('\n'.join(_CIFAR_LABELS) + '\n\n').encode()
  path = directory / 'cifar-10-binary.tar.gz'
  with tarfile.open(path, 'w:gz') as archive:
    for filename, content in members.items():
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{filename}')
      info.size = len(content)
      archive.addfile(info, io.BytesIO(content))
  return path, examples


def _mnist_files(directory, num_train=12, num_test=6):
  """The four idx gzip files as published; returns {filename: path}, {split: (images, labels)}."""
  rng = np.random.default_rng(18)
  paths, splits = {}, {}
  for split, prefix, count in (('train', 'train', num_train), ('test', 't10k', num_test)):
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.uint8)
    splits[split] = (images, labels)
    for filename, content in (
        (f'{prefix}-images-idx3-ubyte.gz',
         struct.pack('>IIII', 2051, count, 28, 28) + images.tobytes()),  # idx3: magic 2051
        (f'{prefix}-labels-idx1-ubyte.gz',
         struct.pack('>II', 2049, count) + labels.tobytes())):  # idx1: magic 2049
      paths[filename] = directory / filename
      paths[filename].write_bytes(gzip.compress(content))
  return paths, splits


def _config(module, data_dir, **data_fields):
  config = module.get_config()
  config.training.batch_size = 4
  config.data.data_dir = str(data_dir)
  for name, value in data_fields.items():
    config.data[name] = value
  return config


def _rows(images):
  return sorted(image.tobytes() for image in images)


# --------------------------------------------------------------------------- cifar10 and mnist

def test_issue18_cifar10_real_download_and_prepare_then_ddpm_jax_pipeline(tmp_path, monkeypatch,
                                                                          offline):
  """Issue #18: `main.py --config=configs/cifar10.py` prepares CIFAR10 with tfds's real path."""
  del offline
  served, data_dir = tmp_path / 'served', tmp_path / 'tfds'
  served.mkdir()
  archive, examples = _cifar10_archive(served)
  with _serve(served) as (base_url, requested):
    url = f'{base_url}/cifar-10-binary.tar.gz'
    real_info = tfds_cifar.Cifar10._cifar_info.fget  # pylint: disable=protected-access
    monkeypatch.setattr(tfds_cifar.Cifar10, '_cifar_info',
                        property(lambda self: real_info(self)._replace(url=url)))
    _register(monkeypatch, tfds_cifar.Cifar10, {url: archive})
    # ddpm_jax's own entry point finds no prepared dataset and prepares it.
    test_images = data.load_eval_images(_config(cifar10, data_dir), 'test', 100)
  assert requested == ['/cifar-10-binary.tar.gz']  # downloaded once, then only read

  builder = tfds.builder('cifar10', data_dir=str(data_dir))
  assert builder.is_prepared()
  assert builder.info.features['label'].names == _CIFAR_LABELS  # read from batches.meta.txt
  for split, count in (('train', 15), ('test', 5)):
    got = list(builder.as_dataset(split=split).as_numpy_iterator())
    assert len(got) == count
    for example in got:  # tfds shuffles the file order: match by id
      image, label = examples[example['id'].decode()]
      np.testing.assert_array_equal(example['image'], image)
      assert example['label'] == label

  # ddpm_jax's pipeline: the same pixels (cifar10 is stored at the model's shape).
  expected_test = [image for key, (image, _) in examples.items() if key.startswith('test_')]
  assert test_images.shape == (5, 32, 32, 3) and test_images.dtype == np.uint8
  assert _rows(test_images) == _rows(expected_test)
  config = _config(cifar10, data_dir, random_flip=False)
  iterator = data.create_train_iterator(config, seed=0)
  assert isinstance(iterator, data.InMemoryIterator)
  epoch = data.to_uint8(np.concatenate([next(iterator) for _ in range(3)]))  # 12 of 15
  expected_train = _rows(image for key, (image, _) in examples.items() if key.startswith('train_'))
  assert len(set(_rows(epoch))) == 12 and set(_rows(epoch)) <= set(expected_train)


def test_issue18_mnist_real_download_and_prepare_via_the_prepare_command(tmp_path, monkeypatch,
                                                                        offline, capsys):
  """Issue #18: the advised command prepares MNIST (idx gzip files) with tfds's real path."""
  del offline
  served, data_dir = tmp_path / 'served', tmp_path / 'tfds'
  served.mkdir()
  paths, splits = _mnist_files(served)
  # The builder reads exactly 60000 / 10000 examples; the archives here are tiny.
  monkeypatch.setattr(tfds_mnist, '_TRAIN_EXAMPLES', len(splits['train'][0]))
  monkeypatch.setattr(tfds_mnist, '_TEST_EXAMPLES', len(splits['test'][0]))
  with _serve(served) as (base_url, requested):
    monkeypatch.setattr(tfds_mnist.MNIST, 'URL', base_url + '/')
    _register(monkeypatch, tfds_mnist.MNIST,
              {f'{base_url}/{name}': path for name, path in paths.items()})
    assert prepare_cli.main(['mnist', f'--data_dir={data_dir}']) == 0
  assert sorted(requested) == sorted(f'/{name}' for name in paths)
  assert f'--config.data.data_dir={data_dir}' in capsys.readouterr().out

  builder = tfds.builder('mnist', data_dir=str(data_dir))
  for split, (images, labels) in splits.items():
    got = list(builder.as_dataset(split=split).as_numpy_iterator())
    expected = sorted((image.tobytes(), int(label)) for image, label in zip(images, labels))
    assert sorted((e['image'][..., 0].tobytes(), int(e['label'])) for e in got) == expected

  # ddpm_jax's pipeline pads the 28x28 digits with background to 32x32.
  test_images = data.load_eval_images(_config(mnist, data_dir), 'test', 100)
  assert test_images.shape == (6, 32, 32, 1)
  assert np.all(test_images[:, :2] == 0) and np.all(test_images[:, :, 30:] == 0)
  assert _rows(test_images[:, 2:30, 2:30, 0]) == _rows(splits['test'][0])


def test_issue18_wrong_checksum_is_reported_with_the_command(tmp_path, monkeypatch, offline):
  """tfds's checksum verification runs on this path: a corrupted download is refused."""
  del offline
  served = tmp_path / 'served'
  served.mkdir()
  archive, _ = _cifar10_archive(served, train_per_batch=1, num_test=1)
  with _serve(served) as (base_url, _):
    url = f'{base_url}/cifar-10-binary.tar.gz'
    real_info = tfds_cifar.Cifar10._cifar_info.fget  # pylint: disable=protected-access
    monkeypatch.setattr(tfds_cifar.Cifar10, '_cifar_info',
                        property(lambda self: real_info(self)._replace(url=url)))
    monkeypatch.setattr(tfds_cifar.Cifar10, 'url_infos', {url: tfds_checksums.UrlInfo(
        size=archive.stat().st_size, checksum='0' * 64, filename=archive.name)})
    with pytest.raises(data.DatasetUnavailableError, match='NonMatchingChecksumError') as error:
      data.load_eval_images(_config(cifar10, tmp_path / 'tfds'), 'test', 1)
  command = f'python -m ddpm_jax.data.prepare cifar10 --data_dir={tmp_path / "tfds"}'
  assert command in str(error.value)


def test_issue18_unprepared_without_network_names_dataset_data_dir_and_command(tmp_path, offline):
  """The real cifar10 URL is requested (no ImportError first), and the error says how to prepare."""
  del offline
  with pytest.raises(data.DatasetUnavailableError) as error:
    data.load_eval_images(_config(cifar10, tmp_path), 'test', 4)
  message = str(error.value)
  assert 'ConnectionError' in message and 'https://www.cs.toronto.edu/~kriz/' in message
  assert "'cifar10'" in message and repr(str(tmp_path)) in message
  assert f'`python -m ddpm_jax.data.prepare cifar10 --data_dir={tmp_path}`' in message
  assert 'No module' not in message and 'pip install' not in message


# Importing TensorFlow in a fresh process: ~7 s of CPU, 30 s and more on a loaded machine.
@pytest.mark.slow
def test_issue18_missing_import_names_the_package_not_the_command(tmp_path):
  """`python -m ddpm_jax.data.prepare` starts, and an ImportError says what to install.

  In a fresh interpreter (tfds resolves its lazy imports once per process), with
  importlib_resources hidden as on a fresh install before the fix; one process for both checks
  because importing TensorFlow dominates the cost.
  """
  code = f'''
import runpy, sys
sys.modules['importlib_resources'] = None
sys.argv = ['prepare', 'cifar10', '--data_dir={tmp_path}']
runpy.run_module('ddpm_jax.data.prepare', run_name='__main__')
'''
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                        check=False, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert proc.returncode == 1, proc.stderr[-3000:]
  message = proc.stderr
  assert f"'cifar10' is not prepared in data_dir {str(tmp_path)!r}" in message
  assert "needs the Python module 'importlib_resources'" in message
  assert 'pip install "importlib_resources>=' in message and 'fails the same way' in message
  assert 'Traceback' not in message


def test_issue18_missing_module_is_found_in_the_chain():
  try:
    try:
      # pylint: disable-next=g-import-not-at-top,unused-import,import-outside-toplevel
      import ddpm_jax_no_such_module  # noqa: F401  (the import error is the point)
    except ImportError as e:
      raise RuntimeError('wrapped') from e
  except RuntimeError as e:
    assert tfds_source.missing_module(e) == 'ddpm_jax_no_such_module'
  assert tfds_source.missing_module(ImportError('Failed importing tensorflow_io. This likely')) == (
      'tensorflow_io')
  assert tfds_source.missing_module(ConnectionError('no network')) is None


# --------------------------------------------------------------------------- celeb_a_hq and lsun

def _png(image):
  return tf.io.encode_png(image).numpy()


def test_issue18_celeb_a_hq_manual_dir_missing_then_prepared(tmp_path):
  """CelebA-HQ: without the manual files the error says where to put them; with them it is read."""
  data_dir = tmp_path / 'tfds'
  config = _config(celeba_hq, data_dir, random_flip=False)
  with pytest.raises(data.DatasetUnavailableError) as error:
    data.create_train_iterator(config, seed=0)
  message = str(error.value)
  manual_dir = data_dir / 'downloads' / 'manual'
  assert "'celeb_a_hq/256'" in message and f'put the files in {manual_dir}' in message
  assert 'data1024x1024.tar' in message  # tfds's instructions
  assert f'python -m ddpm_jax.data.prepare celeb_a_hq/256 --data_dir={data_dir}' in message

  # The manual step's result: data256x256.tar of 256x256 PNGs (tfds's real tar reader).
  rng = np.random.default_rng(18)
  images = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
  manual_dir.mkdir(parents=True)
  with tarfile.open(manual_dir / 'data256x256.tar', 'w') as archive:
    for i, image in enumerate(images):
      content = _png(image)
      info = tarfile.TarInfo(f'data256x256/{i:05d}.png')
      info.size = len(content)
      archive.addfile(info, io.BytesIO(content))
  loaded = data.load_eval_images(config, 'train', 10)
  assert loaded.shape == (3, 256, 256, 3)
  assert _rows(loaded) == _rows(images)  # stored at the model's size: no resampling


def _jpeg_examples(count, seed):
  """Constant-colour JPEGs (non-square): any crop/resize of them is their colour (+-JPEG error)."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(20, 236, (count, 3), dtype=np.uint8)
  encoded = [tf.io.encode_jpeg(np.broadcast_to(c, (24, 32, 3)).copy(), quality=100).numpy()
             for c in colours]
  return colours, encoded


def _lmdb_zip(path, folder):
  """A zip holding <folder>/data.mdb (the layout tfds's lsun builder opens; contents not read)."""
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(f'{folder}/data.mdb', b'not read: tensorflow_io is missing')
    archive.writestr(f'{folder}/lock.mdb', b'')


def test_issue18_lsun_download_needs_tensorflow_io_and_says_so(tmp_path, monkeypatch, offline):
  """LSUN downloads (no manual step), then tfds needs tensorflow_io: the error names it."""
  del offline
  monkeypatch.setitem(sys.modules, 'tensorflow_io', None)  # not installable with this TF
  served = tmp_path / 'served'
  served.mkdir()
  for split in ('train', 'val'):
    _lmdb_zip(served / f'church_outdoor_{split}_lmdb.zip', f'church_outdoor_{split}_lmdb')
  with _serve(served) as (base_url, requested):
    monkeypatch.setattr(tfds_lsun, 'LSUN_SCENE_URL', base_url + '/%s_%s_lmdb.zip')
    with pytest.raises(data.DatasetUnavailableError) as error:
      data.create_train_iterator(_config(lsun_church, tmp_path / 'tfds'), seed=0)
  assert sorted(requested) == ['/church_outdoor_train_lmdb.zip', '/church_outdoor_val_lmdb.zip']
  message = str(error.value)
  assert "'lsun/church_outdoor'" in message and "needs the Python module 'tensorflow_io'" in message
  assert 'tensorflow-datasets[lsun]' in message


def test_issue18_lsun_prepared_elsewhere_is_read_without_tensorflow_io(tmp_path, monkeypatch):
  """A prepared lsun/church_outdoor (as another environment writes it) is read and fitted."""
  data_dir = tmp_path / 'tfds'
  colours, encoded = _jpeg_examples(6, seed=18)

  def split_generators(self, dl_manager):
    del dl_manager
    examples = [(i, {'id': f'{i:04x}', 'image': io.BytesIO(e)}) for i, e in enumerate(encoded)]
    return {'train': iter(examples[:4]), 'validation': iter(examples[4:])}

  with monkeypatch.context() as patch:  # stands in for the LMDB download only
    patch.setattr(tfds_lsun.Lsun, '_split_generators', split_generators)
    tfds.builder('lsun/church_outdoor', data_dir=str(data_dir)).download_and_prepare()
  monkeypatch.setitem(sys.modules, 'tensorflow_io', None)
  config = _config(lsun_church, data_dir, image_size=16, random_flip=False, shuffle_buffer=8)
  loaded = data.load_eval_images(config, 'train', 10)
  assert loaded.shape == (4, 16, 16, 3)
  for image in loaded:
    nearest = np.abs(colours.astype(int) - image[0, 0].astype(int)).sum(axis=1).argmin()
    assert np.abs(image.astype(int) - colours[nearest].astype(int)).max() <= 3
  batch = next(data.create_train_iterator(config, seed=0))  # streamed
  assert batch.shape == (4, 16, 16, 3)


# --------------------------------------------------------------------------- imports

# What tfds's preparation of the configs' datasets imports beyond `import tensorflow_datasets`
# (found by diffing sys.modules around the real preparations above): the builder modules, the
# download and extraction code, and these third-party modules. Of them only importlib_resources is
# not installed by tensorflow-datasets' own requirements; ddpm_jax declares it. tensorflow_io (lsun
# only) cannot be installed with this TensorFlow: see the lsun tests.
_PREPARATION_IMPORTS = ('importlib_resources', 'tree', 'six.moves.urllib', 'requests', 'promise',
                        'tqdm', 'etils.epath', 'tensorflow_datasets.image_classification.cifar',
                        'tensorflow_datasets.image_classification.mnist',
                        'tensorflow_datasets.datasets.celeb_a_hq.celeb_a_hq_dataset_builder',
                        'tensorflow_datasets.image.lsun',
                        'tensorflow_datasets.core.download.extractor')


def test_issue18_preparation_imports_resolve_in_a_fresh_interpreter():
  """Fails when a module needed only to prepare a dataset is missing (e.g. importlib_resources)."""
  code = ('import importlib, sys\n'
          f'for name in {_PREPARATION_IMPORTS!r}:\n'
          '  importlib.import_module(name)\n'
          'import tensorflow_datasets as tfds\n'
          # The lazy imports of the builder module (importlib_resources among them) resolve here.
          'print(tfds.builder_cls("cifar10").code_path)\n')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                        check=False, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r'cifar\.py$', proc.stdout.strip())
