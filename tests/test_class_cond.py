"""Class-conditional U-Net (issue #14 item 2; iDDPM's class_cond, as on ImageNet-64).

model.num_classes > 0 adds `label_emb` (improved-diffusion's label_emb.weight) to the timestep
embedding; labels come from the data, reach the network through the model_fn closure, and each
sample's label is drawn from its own key (so it depends on (seed, index) only) and stored in its shard.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from conftest import tiny_config
from ddpm_jax import data, diffusion, jobs, models, parallel, sampling
from ddpm_jax.data import image_folder
from ddpm_jax.streams import SAMPLE_STREAM, stream_key

NUM_CLASSES = 10


def _config(num_classes: int = NUM_CLASSES):
  config = tiny_config(num_timesteps=4)
  config.sampling.interpolation_t = 2
  config.model.num_classes = num_classes
  # With ch = 32 each GroupNorm group is one channel, which removes any per-channel shift such as
  # the embedding added before norm2; scale-shift norm (iDDPM's ImageNet-64 choice) applies it after.
  config.model.scale_shift_norm = True
  config.training.batch_size = 8
  return config


def _params(config, seed: int = 0):
  model = models.create_model(config)
  d = config.data
  return model, models.init_params(model, jax.random.key(seed), d.image_size, d.num_channels)


def test_label_emb_only_when_class_conditional():
  _, uncond = _params(_config(0))
  _, cond = _params(_config())
  assert 'label_emb' not in uncond
  assert set(cond) == set(uncond) | {'label_emb'}
  temb_dim = 4 * _config().model.ch
  assert cond['label_emb']['embedding'].shape == (NUM_CLASSES, temb_dim)
  assert models.count_params(cond) == models.count_params(uncond) + NUM_CLASSES * temb_dim
  # param_shapes (what checkpoints restore into) agrees.
  shapes = models.param_shapes(_config())
  assert shapes['label_emb']['embedding'].shape == (NUM_CLASSES, temb_dim)


def test_labels_change_the_output_and_are_required():
  config = _config()
  model, params = _params(config)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  x = jnp.zeros((2, 8, 8, 1))
  t = jnp.array([1, 1])
  a = model.apply({'params': params}, x, t, jnp.array([0, 1]), train=False)
  assert not np.allclose(a[0], a[1])  # same x and t, different labels
  with pytest.raises(ValueError, match='pass the labels'):
    model.apply({'params': params}, x, t, train=False)
  uncond_model, uncond_params = _params(_config(0))
  with pytest.raises(ValueError, match='unconditional'):
    uncond_model.apply({'params': uncond_params}, x, t, jnp.array([0, 1]), train=False)


def test_iterator_yields_labels_only_when_class_conditional():
  plain = data.create_train_iterator(_config(0), seed=0)
  batch = next(plain)
  assert isinstance(batch, np.ndarray)
  cond = data.create_train_iterator(_config(), seed=0)
  images, labels = next(cond)
  np.testing.assert_array_equal(images, batch)  # the same examples, in the same order
  assert labels.dtype == np.int32 and labels.shape == (8,)
  # They are the digits' labels of those examples.
  all_images, all_labels = data.load_digits_split('train')
  positions = np.arange(8)
  from ddpm_jax.data.pipeline import example_indices  # pylint: disable=import-outside-toplevel
  np.testing.assert_array_equal(labels, all_labels[example_indices(positions, len(all_images), 0)])


def test_too_few_classes_for_the_data_is_an_error():
  with pytest.raises(ValueError, match='num_classes=3 is too small'):
    data.create_train_iterator(_config(3), seed=0)


def test_class_conditional_trains_a_few_steps_and_samples():
  config = _config()
  model, params = _params(config)
  coefs = diffusion.coefficients_from_config(config.diffusion)
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels, key):
    t_key, noise_key = jax.random.split(key)
    t = jax.random.randint(t_key, (images.shape[0],), 0, coefs.num_timesteps)

    def loss_fn(p):
      model_fn = sampling.make_model_fn(model, p, labels)
      return jnp.mean(diffusion.training_losses(coefs, model_fn, images, t, noise_key)['loss'])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  iterator = data.create_train_iterator(config, seed=0)
  start = params
  for i in range(3):
    images, labels = next(iterator)
    params, opt_state, loss, grads = step(params, opt_state, images, labels, jax.random.key(i))
    assert np.isfinite(loss)
    # Only the embedding rows of the batch's labels get a gradient.
    row_norms = np.abs(np.asarray(grads['label_emb']['embedding'])).sum(axis=1)
    assert set(np.flatnonzero(row_norms)) <= set(labels.tolist())
  assert not np.allclose(params['label_emb']['embedding'], start['label_emb']['embedding'])

  # The zero-initialised output conv barely moved in 3 steps: perturb so that the labels show.
  params = jax.tree_util.tree_map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(7), p.shape), params)
  mesh = parallel.create_mesh()
  sample_fn = sampling.make_sample_fn(config, model, mesh)
  key = jax.random.key(0)
  drawn = sample_fn(params, key, np.arange(4))
  given = sample_fn(params, key, np.arange(4), sampling.labels_for_indices(key, np.arange(4),
                                                                           NUM_CLASSES))
  assert drawn.shape == (4, 8, 8, 1) and np.all(np.isfinite(drawn))
  np.testing.assert_allclose(drawn, given, atol=1e-6)  # the default labels are labels_for_indices'
  other = sample_fn(params, key, np.arange(4), np.array([9, 9, 9, 9]))
  assert not np.allclose(drawn, other)  # same noise (same key), other labels


def test_label_of_sample_i_is_independent_of_batch_size():
  key = jax.random.key(5)
  whole = sampling.labels_for_indices(key, np.arange(12), NUM_CLASSES)
  parts = np.concatenate([sampling.labels_for_indices(key, np.arange(a, b), NUM_CLASSES)
                          for a, b in ((0, 4), (4, 5), (5, 12))])
  np.testing.assert_array_equal(whole, parts)
  assert whole.dtype == np.int32 and whole.min() >= 0 and whole.max() < NUM_CLASSES
  assert len(set(whole.tolist())) > 1
  # The label stream is the sample's own key folded with LABEL_STREAM.
  keys = sampling.per_sample_keys(key, jnp.arange(12))
  np.testing.assert_array_equal(sampling.sample_labels(keys, NUM_CLASSES), whole)


def test_sample_job_stores_labels_in_shards(tmp_path):
  from ddpm_jax import checkpoints  # pylint: disable=import-outside-toplevel
  config = _config()
  workdir = str(tmp_path / 'run')
  _, params = _params(config)
  checkpoints.save_converted(workdir, config, params, params)
  directory = jobs.run('sample', config, workdir)
  key = stream_key(config, SAMPLE_STREAM)
  per_shard = config.sampling.samples_per_shard
  for shard in range(config.sampling.num_samples // per_shard):
    with np.load(os.path.join(directory, f'samples_{shard:05d}.npz')) as f:
      assert set(f.files) >= {'images', 'indices', 'labels'}
      np.testing.assert_array_equal(
          f['labels'], sampling.labels_for_indices(key, f['indices'], NUM_CLASSES))
      assert f['images'].shape == (per_shard, 8, 8, 1)


def test_image_folder_class_labels(tmp_path):
  root = tmp_path / 'folder'
  for name, count in (('zebra', 2), ('ant', 1), ('cat', 2)):
    (root / 'train' / name).mkdir(parents=True)
    for i in range(count):
      Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)).save(root / 'train' / name / f'{i}.png')
  labels = image_folder.class_labels(str(root), 'train')
  # Sorted paths: ant/0, cat/0, cat/1, zebra/0, zebra/1; sorted class names: ant 0, cat 1, zebra 2.
  np.testing.assert_array_equal(labels, [0, 1, 1, 2, 2])
  np.testing.assert_array_equal(image_folder.class_labels(str(root), 'train', limit=2), [0, 1])
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / 'train' / 'loose.png')
  with pytest.raises(ValueError, match='one sub-folder per class'):
    image_folder.class_labels(str(root), 'train')


def test_training_job_trains_a_class_conditional_model(tmp_path):
  """The train job feeds (images, labels) batches to the real train step and resumes like any run."""
  config = _config()
  config.training.num_train_steps = 2
  config.training.num_grid_samples = 4
  state = jobs.run('train', config, str(tmp_path / 'run'))
  assert int(state.step) == 2 and int(state.nonfinite_step) == -1
  embedding = np.asarray(state.params['label_emb']['embedding'])
  _, init = _params(config)
  assert embedding.shape == (NUM_CLASSES, 4 * config.model.ch)
  assert not np.allclose(embedding, np.asarray(init['label_emb']['embedding']))
  assert os.path.exists(os.path.join(str(tmp_path / 'run'), 'samples_2.png'))
