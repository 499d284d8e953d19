"""Config validation: every bad field fails early, naming the field, the value and what is allowed."""

import importlib

import pytest

from configs import default, tiny
from ddpm_jax.config import validate_config

EXPERIMENTS = ('cifar10', 'cifar10_iddpm', 'celeba_hq', 'lsun_church', 'lsun_bedroom', 'mnist', 'digits', 'tiny')


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_every_shipped_config_is_valid(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  validate_config(config, num_devices=1)


def test_cifar10_is_the_paper_recipe():
  c = importlib.import_module('configs.cifar10').get_config()
  assert (c.diffusion.num_timesteps, c.diffusion.beta_schedule, c.diffusion.beta_start, c.diffusion.beta_end) == (
      1000, 'linear', 1e-4, 0.02)
  assert (c.diffusion.mean_type, c.diffusion.var_type, c.diffusion.loss_type) == ('eps', 'fixed_large', 'mse')
  assert (c.optim.optimizer, c.optim.learning_rate, c.optim.eps, c.optim.warmup_steps, c.optim.grad_clip) == (
      'adam', 2e-4, 1e-8, 5000, 1.0)
  assert (c.training.batch_size, c.training.ema_decay, c.training.num_train_steps) == (128, 0.9999, 800_000)
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks, tuple(c.model.attn_resolutions),
          c.model.dropout) == (128, (1, 2, 2, 2), 2, (16,), 0.1)
  assert c.data.random_flip


def _bad(mutate, *fragments, num_devices=1):
  config = tiny.get_config()
  mutate(config)
  with pytest.raises(ValueError) as excinfo:
    validate_config(config, num_devices=num_devices)
  for fragment in fragments:
    assert fragment in str(excinfo.value), str(excinfo.value)


def test_batch_not_divisible_by_devices():
  _bad(lambda c: setattr(c.training, 'batch_size', 12), 'training.batch_size', '12', 'devices (8)', num_devices=8)


def test_learned_variance_with_plain_mse():
  def mutate(c):
    c.diffusion.var_type = 'learned_range'
    c.model.learn_sigma = True
  _bad(mutate, 'diffusion.loss_type', "'mse'", 'hybrid')


def test_learn_sigma_must_match_var_type():
  _bad(lambda c: setattr(c.model, 'learn_sigma', True), 'model.learn_sigma', 'fixed_large')


@pytest.mark.parametrize('field,value', [('beta_schedule', 'linaer'), ('mean_type', 'score'),
                                         ('var_type', 'big'), ('loss_type', 'l1')])
def test_unknown_diffusion_names(field, value):
  _bad(lambda c: setattr(c.diffusion, field, value), f'diffusion.{field}', repr(value), 'allowed')


def test_bad_numbers():
  _bad(lambda c: setattr(c.diffusion, 'num_timesteps', 0), 'diffusion.num_timesteps', '0')
  _bad(lambda c: setattr(c.training, 'ema_decay', 1.0), 'training.ema_decay')
  _bad(lambda c: setattr(c.optim, 'learning_rate', -1.0), 'optim.learning_rate')
  _bad(lambda c: setattr(c.sampling, 'timestep_respacing', 'ddim7x'), 'sampling.timestep_respacing', 'ddim7x')


def test_model_and_data_fields_are_checked():
  _bad(lambda c: setattr(c.data, 'image_size', 32), 'data.image_size')
  _bad(lambda c: setattr(c.model, 'dtype', 'float16'), 'model.dtype', 'float16')
  def image_folder_without_path(c):
    c.data.dataset = 'image_folder'
    c.eval.metrics = ('bpd',)
  _bad(image_folder_without_path, 'data.image_folder')


def test_unknown_metric():
  _bad(lambda c: setattr(c.eval, 'metrics', ('bpd', 'kid')), 'eval.metrics', 'kid')


def test_defaults_tree_has_every_section():
  config = default.get_config()
  for section in ('training', 'data', 'model', 'diffusion', 'optim', 'sampling', 'eval'):
    assert section in config
