"""End to end: `main.py` as users run it (train, resume, sample, eval, progressive, interpolate; bad flags)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT


def _main(workdir, *args, check=True):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  cmd = [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}', *args]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  if check and proc.returncode != 0:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
  return proc


@pytest.mark.slow
def test_train_resume_sample_eval(tmp_path):
  workdir = str(tmp_path / 'run')
  _main(workdir, '--config.training.num_train_steps=2')
  assert os.path.exists(os.path.join(workdir, 'samples_2.png'))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))

  resumed = _main(workdir, '--config.training.num_train_steps=4')
  assert 'Resuming from the checkpoint at step 2' in resumed.stderr
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))

  _main(workdir, '--mode=sample', '--config.sampling.timestep_respacing=5')
  shards = sorted(f for f in os.listdir(os.path.join(workdir, 'samples')) if f.endswith('.npz'))
  assert len(shards) == 2
  with np.load(os.path.join(workdir, 'samples', shards[0])) as shard:
    images = next(iter(shard.values()))
  assert images.dtype == np.uint8 and images.shape == (8, 8, 8, 1)

  _main(workdir, '--mode=eval', '--config.eval.metrics=("bpd",)')
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  assert 'bpd' in json.dumps(metrics)


@pytest.mark.slow
def test_progressive_and_interpolate(tmp_path):
  workdir = str(tmp_path / 'run')
  _main(workdir, '--config.training.num_train_steps=1', '--config.training.num_grid_samples=0')
  _main(workdir, '--mode=progressive', '--config.sampling.progressive_every=5')
  _main(workdir, '--mode=interpolate', '--config.sampling.interpolation_t=10',
        '--config.sampling.interpolation_num_lambdas=3')
  pngs = [f for f in os.listdir(workdir) if f.endswith('.png')] + [
      f for root, _, files in os.walk(workdir) for f in files if f.endswith('.png')]
  assert any('progressive' in f for f in pngs) and any('interpol' in f for f in pngs), pngs


def test_flag_overrides_reach_the_config_and_bad_values_fail_early(tmp_path):
  proc = _main(str(tmp_path / 'bad'), '--config.diffusion.beta_schedule=linaer', check=False)
  assert proc.returncode != 0
  assert "diffusion.beta_schedule='linaer'" in proc.stderr
  assert not os.path.exists(os.path.join(str(tmp_path / 'bad'), 'checkpoints'))

  proc = _main(str(tmp_path / 'bad2'), '--config.training.batch_sise=8', check=False)
  assert proc.returncode != 0 and 'batch_sise' in proc.stderr


def test_sampling_an_empty_workdir_says_what_to_do(tmp_path):
  proc = _main(str(tmp_path / 'empty'), '--mode=sample', check=False)
  assert proc.returncode != 0 and 'no checkpoint' in proc.stderr and '--mode=train' in proc.stderr
