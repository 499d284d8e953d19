"""End to end: `main.py` as users run it (train, resume, sample, eval, progressive, interpolate; bad flags)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, randomize
from ddpm_jax import images as images_lib


def _python(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  cmd = [sys.executable, *args]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  if check and proc.returncode != 0:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}')
  return proc


def _main(workdir, *args, check=True):
  return _python('main.py', '--config=configs/tiny.py', f'--workdir={workdir}', *args, check=check)


# main.py as `python main.py ...`, then one more stdout line: whether the job imported TensorFlow.
_MAIN_SAYING_IF_TF = ("import atexit, runpy, sys; "
                      "atexit.register(lambda: print('tensorflow imported:', 'tensorflow' in sys.modules)); "
                      "sys.argv[0] = 'main.py'; runpy.run_path('main.py', run_name='__main__')")
_TF_STARTUP_NOISE = ('oneDNN', 'absl::InitializeLog', 'cpu_feature_guard')


def _main_saying_if_tf(workdir, *args):
  """`_main`, and whether the job imported TensorFlow (data/tf_cpu.py: only the paths that need it)."""
  proc = _python('-c', _MAIN_SAYING_IF_TF, '--config=configs/tiny.py', f'--workdir={workdir}', *args)
  imported = proc.stdout.strip().splitlines()[-1]
  assert imported in ('tensorflow imported: True', 'tensorflow imported: False'), proc.stdout[-2000:]
  return proc, imported.endswith('True')


def _grid_tiles(path: str, num: int, size: int) -> np.ndarray:
  """The `num` [size, size] grey tiles of a training sample grid, at their original resolution."""
  grid = np.asarray(Image.open(path))
  factor, pad = images_lib.upscale_factor(size, size), images_lib.PADDING
  ncol, step = int(np.ceil(np.sqrt(num))), size * factor + pad  # make_grid's layout
  tiles = []
  for i in range(num):
    top, left = pad + (i // ncol) * step, pad + (i % ncol) * step
    tiles.append(grid[top:top + size * factor:factor, left:left + size * factor:factor])
  return np.stack(tiles)


@pytest.mark.slow
def test_train_resume_sample_eval_progressive_interpolate(tmp_path):
  """Every job of main.py on one workdir, in the order a user runs them (one test: each job after
  the first needs a trained workdir, and training one per test costs a subprocess each)."""
  workdir = str(tmp_path / 'run')
  # Training imports TensorFlow (clu's TensorBoard writer), through tf_cpu_only, which keeps TF's C++
  # start-up lines out of the job's output.
  trained, tf_imported = _main_saying_if_tf(workdir, '--config.training.num_train_steps=2')
  assert tf_imported
  for noise in _TF_STARTUP_NOISE:
    assert noise not in trained.stderr + trained.stdout, noise
  # 8 samples of 8x8 (configs/tiny.py): each varies, and no two are alike (each has its own noise).
  tiles = _grid_tiles(os.path.join(workdir, 'samples_2.png'), 8, 8).reshape(8, -1).astype(np.float64)
  assert np.all(tiles.std(axis=1) > 10), tiles.std(axis=1)
  assert min(np.abs(a - b).mean() for i, a in enumerate(tiles) for b in tiles[i + 1:]) > 10
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))

  resumed = _main(workdir, '--config.training.num_train_steps=4')
  assert 'Resuming from the checkpoint at step 2' in resumed.stderr
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))

  _, tf_imported = _main_saying_if_tf(workdir, '--mode=sample', '--config.sampling.timestep_respacing=5')
  assert not tf_imported  # sampling needs no TF: ~4 s less start-up on a CPU
  shards = sorted(f for f in os.listdir(os.path.join(workdir, 'samples')) if f.endswith('.npz'))
  assert len(shards) == 2
  with np.load(os.path.join(workdir, 'samples', shards[0])) as shard:
    images = next(iter(shard.values()))
  assert images.dtype == np.uint8 and images.shape == (8, 8, 8, 1)

  _, tf_imported = _main_saying_if_tf(workdir, '--mode=eval', '--config.eval.metrics=("bpd",)')
  assert not tf_imported  # nor the bound on in-memory digits
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  # The bound of a model trained for 4 steps, on 16 test and 16 train digits (configs/tiny.py):
  # measured 7.10 / 6.99 bits/dim (8 is a uniform guess over 256 levels); the prior term is ~1.05 with T=20.
  bpd = metrics['bpd']
  assert metrics['checkpoint_step'] == 4
  for split in ('test', 'train'):
    assert bpd[f'{split}_num_examples'] == 16
    assert 0 < bpd[f'{split}_prior_bpd'] < bpd[f'{split}_bpd'] < 12, bpd
  assert bpd['generalization_gap_bpd'] == pytest.approx(bpd['test_bpd'] - bpd['train_bpd'])

  _main(workdir, '--mode=progressive', '--config.sampling.progressive_every=5')
  _main(workdir, '--mode=interpolate', '--config.sampling.interpolation_t=10',
        '--config.sampling.interpolation_num_lambdas=3')
  pngs = [f for root, _, files in os.walk(workdir) for f in files if f.endswith('.png')]
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


@pytest.mark.slow
def test_converted_tf_checkpoint_is_sampled_by_main(tmp_path):
  """The documented path for the official weights: TF checkpoint -> convert CLI -> `main.py --mode=sample`."""
  import jax  # pylint: disable=import-outside-toplevel

  from configs import tiny  # pylint: disable=import-outside-toplevel
  from ddpm_jax import checkpoints, parallel  # pylint: disable=import-outside-toplevel
  from ddpm_jax.models import convert_tf, create_model, init_params  # pylint: disable=import-outside-toplevel

  config = tiny.get_config()
  template = init_params(create_model(config), jax.random.key(0), 8, 1)
  raw, ema = randomize(template, 1), randomize(template, 2)
  prefix = convert_tf.save_tf_checkpoint(
      str(tmp_path / 'tf' / 'model.ckpt-790000'),
      {**convert_tf.flax_to_tf(raw), **convert_tf.flax_to_tf(ema, use_ema=True),
       'global_step': np.array(790000, np.int64)})
  workdir = str(tmp_path / 'converted')
  convert = ['-m', 'ddpm_jax.convert_tf_checkpoint', f'--tf_checkpoint={prefix}', '--config=configs/tiny.py',
             f'--workdir={workdir}']
  _python(*convert)

  params, ema_params, _ = checkpoints.restore_for_inference(workdir, config, parallel.create_mesh())
  for got, want in ((params, raw), (ema_params, ema)):
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(got), want)

  # Converting into a workdir that already holds a checkpoint must not overwrite it.
  again = _python(*convert, check=False)
  assert again.returncode != 0 and 'already holds checkpoints' in again.stderr

  _main(workdir, '--mode=sample', '--config.sampling.num_samples=8')
  shards = [f for f in os.listdir(os.path.join(workdir, 'samples')) if f.endswith('.npz')]
  assert shards
  with np.load(os.path.join(workdir, 'samples', shards[0])) as shard:
    images = next(iter(shard.values()))
  assert images.dtype == np.uint8 and images.shape == (8, 8, 8, 1) and images.std() > 0
