"""workdir.atomic_write, the one way ddpm_jax writes a file: all or nothing, with an ordinary mode."""

import os

import pytest

from ddpm_jax import workdir


def test_atomic_write_replaces_the_file_only_when_the_block_completes(tmp_path):
  path = str(tmp_path / 'sub' / 'metrics.json')
  workdir.write_json(path, {'a': 1})
  assert workdir.read_json(path) == {'a': 1}
  with pytest.raises(RuntimeError, match='interrupted'):
    with workdir.atomic_write(path, 'w') as f:
      f.write('{"a": 2, "half')
      raise RuntimeError('interrupted')
  assert workdir.read_json(path) == {'a': 1}  # the previous content, untouched
  assert os.listdir(tmp_path / 'sub') == ['metrics.json']  # and no temporary file left behind


def test_atomic_write_gives_the_mode_an_ordinary_open_would(tmp_path):
  old = os.umask(0o022)
  try:
    path = workdir.savez(str(tmp_path / 'x.npz'), a=[1, 2])
  finally:
    os.umask(old)
  assert os.stat(path).st_mode & 0o777 == 0o644
