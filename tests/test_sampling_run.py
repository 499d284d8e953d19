"""The sampling jobs (ddpm_jax/jobs/): resumable .npz shards, progressive generation and interpolation outputs."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, write_checkpoint
from ddpm_jax import data, jobs
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.jobs import interpolate as interpolate_job
from ddpm_jax.jobs import progressive as progressive_job
from ddpm_jax.jobs import sample as sample_job


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('run'))
  write_checkpoint(path, tiny_config())
  return path


def _shards(directory):
  return sorted(f for f in os.listdir(directory) if f.startswith('samples_') and f.endswith('.npz'))


def _count_generate_calls(monkeypatch):
  calls = []
  original = sample_job.generate_shard

  def counting(*args):
    calls.append(args[3:5])
    return original(*args)
  monkeypatch.setattr(sample_job, 'generate_shard', counting)
  return calls


def _run(job, config, workdir):
  return job(config, workdir, jobs.setup(config))


def test_sample_writes_shards_and_an_interrupted_run_resumes_identically(workdir, tmp_path,
                                                                          monkeypatch):
  config = tiny_config()
  config.eval.sample_dir = str(tmp_path / 'a')
  directory = _run(sample_job.sample, config, workdir)
  assert _shards(directory) == ['samples_00000.npz', 'samples_00001.npz', 'samples_00002.npz']
  first = workdir_lib.load_samples(directory, 12)
  assert first.shape == (12, 8, 8, 1) and first.dtype == np.uint8 and first.std() > 0
  with np.load(workdir_lib.shard_path(directory, 1)) as f:
    np.testing.assert_array_equal(f['indices'], np.arange(4, 8))
  assert np.asarray(Image.open(os.path.join(directory, 'samples_grid.png'))).ndim == 2
  assert not [f for f in os.listdir(directory) if '.tmp' in f]

  # A run killed after its first shard: only the missing shards are generated again.
  os.remove(workdir_lib.shard_path(directory, 1))
  os.remove(workdir_lib.shard_path(directory, 2))
  calls = _count_generate_calls(monkeypatch)
  _run(sample_job.sample, config, workdir)
  assert calls == [(4, 8), (8, 12)]
  np.testing.assert_array_equal(workdir_lib.load_samples(directory, 12), first)

  # Sample i depends on (seed, i) only: another batch size gives the same images.
  config.eval.sample_dir = str(tmp_path / 'b')
  config.sampling.batch_size = 2
  np.testing.assert_array_equal(workdir_lib.load_samples(_run(sample_job.sample, config, workdir), 12), first)


def test_sample_uses_the_ema_weights_and_refuses_to_mix_settings(workdir, tmp_path):
  config = tiny_config()
  config.sampling.num_samples = config.sampling.samples_per_shard = 4
  config.eval.sample_dir = str(tmp_path / 'ema')
  ema = workdir_lib.load_samples(_run(sample_job.sample, config, workdir), 4)
  config.sampling.use_ema = False
  with pytest.raises(ValueError, match='use_ema: directory has True, now False'):
    _run(sample_job.sample, config, workdir)
  config.eval.sample_dir = str(tmp_path / 'raw')
  raw = workdir_lib.load_samples(_run(sample_job.sample, config, workdir), 4)
  assert not np.array_equal(ema, raw)
  with open(os.path.join(str(tmp_path / 'raw'), workdir_lib.SAMPLES_META_FILE)) as f:
    assert json.load(f)['use_ema'] is False
  with pytest.raises(ValueError, match='holds 4 consecutive samples'):
    workdir_lib.load_samples(str(tmp_path / 'raw'), 5)


def test_progressive_writes_a_strip_of_x0_predictions(workdir):
  config = tiny_config()
  png, npz = _run(progressive_job.progressive, config, workdir)
  with np.load(npz) as f:
    pred, timesteps = f['pred_xstart'], f['timesteps']
  # T = 10, every 3 steps: x0_hat at t = 10, 7, 4, 1 (paper numbering).
  np.testing.assert_array_equal(timesteps, [10, 7, 4, 1])
  assert pred.shape == (progressive_job.NUM_ROWS, 4, 8, 8, 1) and pred.dtype == np.uint8
  grid = np.asarray(Image.open(png))
  assert grid.shape[0] > grid.shape[1]  # 8 rows of 4 columns


def test_interpolation_strip_has_sources_at_both_ends(workdir):
  config = tiny_config()
  png, npz = _run(interpolate_job.interpolate, config, workdir)
  with np.load(npz) as f:
    decoded, sources, lambdas = f['decoded'], f['sources'], f['lambdas']
  pairs = data.load_eval_images(config, config.data.eval_split, 2 * interpolate_job.NUM_PAIRS)
  np.testing.assert_array_equal(sources[:, 0], pairs[0::2])
  np.testing.assert_array_equal(sources[:, 1], pairs[1::2])
  np.testing.assert_allclose(lambdas, [0.0, 0.5, 1.0])
  assert decoded.shape == (interpolate_job.NUM_PAIRS, 3, 8, 8, 1)
  assert not np.array_equal(decoded[:, 0], decoded[:, -1])
  assert os.path.getsize(png) > 0
  config.sampling.interpolation_num_lambdas = 1
  with pytest.raises(ValueError, match='interpolation_num_lambdas=1'):
    _run(interpolate_job.interpolate, config, workdir)


def test_sample_without_a_checkpoint_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    _run(sample_job.sample, tiny_config(), str(tmp_path))
