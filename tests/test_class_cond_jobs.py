"""Class-conditional models in the progressive, interpolate and bits/dim jobs (issue #14).

Before these paths bound labels, a class-conditional checkpoint made each of them fail in the network
('pass the labels'). Each test runs the real job on a tiny class-conditional U-Net (digits have
labels) and checks that the intended label reached the network: the output equals a computation
with that label, and differs from one with another label. The sample shards --mode=eval fills in are
those --mode=sample writes, labels included.
"""

import os
import zipfile

import jax
import numpy as np
import pytest

from conftest import randomize
from ddpm_jax import checkpoints, data, diffusion, jobs, models, parallel, sampling
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.data.pipeline import load_eval_labels
from ddpm_jax.evaluation import bpd as bpd_lib
from ddpm_jax.jobs import evaluate as evaluate_job
from ddpm_jax.jobs import progressive as progressive_job
from ddpm_jax.sampling import interpolation
from ddpm_jax.streams import BPD_STREAM, INTERPOLATION_STREAM, PROGRESSIVE_STREAM, stream_key
from test_class_cond import NUM_CLASSES, _config, _params


def _other(labels: np.ndarray) -> np.ndarray:
  """Every label replaced by another class."""
  return ((np.asarray(labels) + 1) % NUM_CLASSES).astype(np.int32)


def _assert_made_with(got: np.ndarray, right: np.ndarray, wrong: np.ndarray) -> None:
  """uint8 images `got` are `right` (two compiled programs may round one level apart) and not
  `wrong`, the same computation with other labels."""
  got = got.astype(int)
  assert np.abs(got - right.astype(int)).max() <= 1
  assert np.abs(got - wrong.astype(int)).max() > 2


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, params): a step-0 class-conditional checkpoint, EMA = raw weights, perturbed
  so that the zero-initialised output conv does not hide the labels."""
  config = _config()
  workdir = str(tmp_path_factory.mktemp('cond'))
  params = randomize(_params(config)[1], seed=3)
  checkpoints.save_converted(workdir, config, params, params)
  return config, workdir, params


def test_progressive_row_i_is_sample_i_with_its_drawn_label(run):
  """Row i uses the sample job's rule (label drawn from row i's own key), stored as `labels`; its
  last column is make_sample_fn's sample i for the same key, and another label changes it."""
  config, workdir, params = run
  _, npz = jobs.run('progressive', config, workdir)
  rows = np.arange(progressive_job.NUM_ROWS)
  key = stream_key(config, PROGRESSIVE_STREAM)
  with np.load(npz) as f:
    labels, pred = f['labels'], f['pred_xstart']
  np.testing.assert_array_equal(labels, sampling.labels_for_indices(key, rows, NUM_CLASSES))
  sample_fn = sampling.make_sample_fn(config, models.create_model(config), parallel.create_mesh())
  final = lambda y: data.to_uint8(np.asarray(sample_fn(params, key, rows, y)))
  # Step 0's x0_hat is the (clipped) sample.
  _assert_made_with(pred[:, -1], final(labels), final(_other(labels)))


def test_interpolation_decodes_each_end_with_its_own_test_label(run):
  """The sources' labels come from the eval split; lambda = 0 and 1 are exactly decode(encode(x))
  under that end's label, and the labels used for every column are stored."""
  config, workdir, params = run
  _, npz = jobs.run('interpolate', config, workdir)
  with np.load(npz) as f:
    sources, labels, decoded, decoded_labels = (f['sources'], f['labels'], f['decoded'],
                                                f['decoded_labels'])
  num_pairs = len(sources)
  pool = load_eval_labels(config, config.data.eval_split, 2 * num_pairs)
  np.testing.assert_array_equal(labels, pool.reshape(num_pairs, 2))
  lambdas = np.linspace(0.0, 1.0, config.sampling.interpolation_num_lambdas, dtype=np.float32)
  np.testing.assert_array_equal(decoded_labels,
                                interpolation.interpolation_labels(labels[:, 0], labels[:, 1],
                                                                   lambdas).reshape(num_pairs, -1))
  np.testing.assert_array_equal(decoded_labels[:, 0], labels[:, 0])
  np.testing.assert_array_equal(decoded_labels[:, -1], labels[:, 1])

  coefs = sampling.sampling_coefficients(config, respacing='')
  model, t = models.create_model(config), config.sampling.interpolation_t
  keys = sampling.per_sample_keys(stream_key(config, INTERPOLATION_STREAM), np.arange(num_pairs))

  def reconstruct(x, y):
    step = sampling.step_fn_from_config(config, coefs, sampling.make_model_fn(model, params, y))
    x0 = interpolation.decode(step, interpolation.encode(coefs, data.to_model_range(x), t, keys), t,
                              keys)
    return data.to_uint8(np.asarray(x0))

  for end, column in ((0, 0), (1, -1)):
    _assert_made_with(decoded[:, column], reconstruct(sources[:, end], labels[:, end]),
                      reconstruct(sources[:, end], _other(labels[:, end])))


def test_bpd_and_rate_distortion_use_each_test_image_true_label(run):
  """--mode=eval's bound terms are p(x | y) with y the image's label from the eval split (as
  improved-diffusion's image_nll.py with class_cond); other labels give another bound."""
  config, workdir, params = run
  metrics = jobs.run('eval', config, workdir)
  split = config.data.eval_split
  assert np.isfinite(metrics['bpd'][f'{split}_bpd']) and np.isfinite(metrics['rate_distortion']['rate_bpd'])
  with np.load(f'{workdir_lib.eval_dir(workdir)}/terms_{split}.npz') as f:
    job_vb = np.asarray(f['vb'])

  mesh = parallel.create_mesh()
  num = config.eval.num_examples
  images, labels = data.load_eval_images(config, split, num), load_eval_labels(config, split, num)
  bpd_fn = bpd_lib.make_bpd_fn(diffusion.coefficients_from_config(config.diffusion),
                               models.create_model(config), mesh,
                               clip_denoised=evaluate_job.BPD_CLIP_DENOISED)
  key = stream_key(config, BPD_STREAM)
  terms = lambda y: bpd_lib.dataset_bpd(bpd_fn, params, key, images, config.eval.batch_size, mesh,
                                        labels=y)
  true, other = terms(labels), terms(_other(labels))
  np.testing.assert_allclose(job_vb, true['vb'], rtol=1e-6)
  assert metrics['bpd'][f'{split}_bpd'] == pytest.approx(true['total_bpd'], rel=1e-6)
  assert abs(true['total_bpd'] - other['total_bpd']) > 1e-3
  # The first test image alone: its bound changes with its label (the label reaches the network).
  one = lambda y: bpd_lib.dataset_bpd(bpd_fn, params, key, images[:1], 4, mesh, labels=y)['total_bpd']
  assert one(labels[:1]) != one(_other(labels[:1]))
  # Labels as a plain list (or int64) are converted once: the same bound.
  assert one([int(labels[0])]) == one(labels[:1])


def _members(path: str) -> list[tuple[str, bytes]]:
  """The (name, bytes) of every array of a .npz, in file order: its content without the zip's
  timestamps, which differ between two writes of the same arrays."""
  with zipfile.ZipFile(path) as f:
    return [(name, f.read(name)) for name in f.namelist()]


def test_eval_fills_the_shards_the_sample_job_writes(run, tmp_path):
  """A sample directory's shards do not depend on which job wrote them: --mode=eval's digits_fid,
  filling the missing shards itself, writes each shard the sample job wrote, labels included."""
  config, _, params = run
  config = config.copy_and_resolve_references()
  config.eval.metrics = ('digits_fid',)
  config.eval.fid_num_samples = config.sampling.num_samples
  workdir = str(tmp_path / 'run')
  checkpoints.save_converted(workdir, config, params, params)
  directory = jobs.run('sample', config, workdir)
  num_shards = len(workdir_lib.shard_ranges(config.sampling.num_samples,
                                            config.sampling.samples_per_shard))
  written = [_members(workdir_lib.shard_path(directory, k)) for k in range(num_shards)]
  assert all('labels.npy' in dict(shard) for shard in written)
  for k in range(num_shards):
    os.remove(workdir_lib.shard_path(directory, k))
  metrics = jobs.run('eval', config, workdir)
  assert metrics['digits_fid']['num_samples'] == config.sampling.num_samples
  for k in range(num_shards):
    assert _members(workdir_lib.shard_path(directory, k)) == written[k], f'shard {k}'


def test_bpd_labels_are_checked(run):
  config, _, params = run
  mesh = parallel.create_mesh()
  images = data.load_eval_images(config, config.data.eval_split, 4)
  bpd_fn = bpd_lib.make_bpd_fn(diffusion.coefficients_from_config(config.diffusion),
                               models.create_model(config), mesh, clip_denoised=True)
  with pytest.raises(ValueError, match='one label per image'):
    bpd_lib.dataset_bpd(bpd_fn, params, jax.random.key(0), images, 4, mesh,
                        labels=np.zeros(3, np.int32))


def test_interpolation_labels_follow_the_heavier_end():
  lambdas = np.array([0.0, 0.25, 0.5, 0.75, 1.0], np.float32)
  got = interpolation.interpolation_labels(np.array([3, 0]), np.array([7, 5]), lambdas)
  # Row p * L + l: pair p at lambdas[l]; the tie at 1/2 goes to the first end.
  np.testing.assert_array_equal(got, [3, 3, 3, 7, 7, 0, 0, 0, 5, 5])
