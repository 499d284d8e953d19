"""--mode=eval on a tiny checkpoint: bpd, rate-distortion, digits, FID wiring, safe reruns."""

import csv
import json
import os

import numpy as np
import pytest

from conftest import tiny_config, write_checkpoint
from ddpm_jax import jobs
from ddpm_jax.evaluation import bpd as bpd_lib
from ddpm_jax.evaluation import digits_metric
from ddpm_jax.jobs import evaluate as evaluate_job


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('eval'))
  write_checkpoint(path, tiny_config())
  return path


def _config():
  config = tiny_config()
  config.eval.metrics = ('bpd', 'rate_distortion', 'digits_fid')
  config.eval.fid_num_samples = 8
  return config


def _evaluate(config, workdir):
  return evaluate_job.evaluate(config, workdir, jobs.setup(config))


def _fail(*args, **kwargs):
  raise AssertionError('recomputed a metric that was already saved')


def test_evaluate_writes_every_metric_and_skips_saved_ones_on_rerun(workdir, monkeypatch):
  metrics = _evaluate(_config(), workdir)
  eval_dir = os.path.join(workdir, 'eval')
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    assert json.load(f) == metrics
  assert metrics['checkpoint_step'] == 0

  b = metrics['bpd']
  assert b['test_num_examples'] == 10 and b['train_num_examples'] == 6
  assert 0 < b['test_prior_bpd'] < b['test_bpd'] < 50 and np.isfinite(b['train_bpd'])
  assert b['generalization_gap_bpd'] == pytest.approx(b['test_bpd'] - b['train_bpd'])
  with open(os.path.join(eval_dir, 'bpd_test.json')) as f:
    terms = json.load(f)
  assert len(terms['vb']) == 10
  assert terms['total_bpd'] == pytest.approx(terms['prior_bpd'] + sum(terms['vb']), rel=1e-6)
  with open(os.path.join(eval_dir, 'bpd_train.csv')) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['t', 'vb_bpd', 'xstart_mse', 'eps_mse'] and len(rows) == 11

  rd = metrics['rate_distortion']
  assert rd['distortion_bpd'] == pytest.approx(terms['vb'][0], rel=1e-6)
  assert rd['rate_bpd'] == pytest.approx(terms['total_bpd'] - terms['vb'][0], rel=1e-6)
  assert rd['rmse'] > 0 and os.path.exists(rd['csv']) and os.path.getsize(rd['png']) > 1000

  d = metrics['digits_fid']
  assert d['num_samples'] == 8 and np.isfinite(d['frechet_distance'])
  assert len(os.listdir(os.path.join(workdir, 'samples'))) > 0  # made on demand

  # A rerun (e.g. after preemption) computes nothing that is already saved...
  monkeypatch.setattr(bpd_lib, 'dataset_bpd', _fail)
  monkeypatch.setattr(digits_metric, 'digits_metrics', _fail)
  assert _evaluate(_config(), workdir) == metrics
  # ...and a metric lost before it was saved is redone from the cached bound terms.
  del metrics['rate_distortion']
  with open(os.path.join(eval_dir, 'metrics.json'), 'w') as f:
    json.dump(metrics, f)
  again = _evaluate(_config(), workdir)
  assert again['rate_distortion'] == rd


def test_final_evaluation_of_a_training_run_uses_the_weights_in_memory(tmp_path, monkeypatch, capsys):
  """#12: the final evaluation neither re-reads the checkpoint nor runs the sample job."""
  from ddpm_jax import checkpoints  # pylint: disable=import-outside-toplevel
  from ddpm_jax.jobs import sample as sample_job  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(checkpoints, 'restore_for_inference', _fail)
  monkeypatch.setattr(sample_job, 'sample', _fail)
  config = _config()
  config.training.num_train_steps = 1
  config.training.num_grid_samples = 0
  config.training.final_eval = True
  config.eval.metrics = ('digits_fid',)
  workdir = str(tmp_path / 'run')
  state = jobs.train_and_evaluate(config, workdir, jobs.setup(config))
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['checkpoint_step'] == int(state.step) == 1
  assert np.isfinite(metrics['digits_fid']['frechet_distance'])
  assert 'Final evaluation:' in capsys.readouterr().out
