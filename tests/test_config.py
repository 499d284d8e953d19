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


def test_a_cosine_learning_rate_needs_the_warm_up_to_end_before_the_last_step():
  def long_warm_up(c):
    c.optim.lr_schedule = 'cosine'
    c.optim.warmup_steps = c.training.num_train_steps
  _bad(long_warm_up, 'config.optim.warmup_steps=4 is invalid', "lr_schedule='cosine'",
       'training.num_train_steps=4')  # configs/tiny.py trains 4 steps


def test_unknown_metric():
  _bad(lambda c: setattr(c.eval, 'metrics', ('bpd', 'kid')), 'eval.metrics', 'kid')


@pytest.mark.parametrize('section, field, value, allowed', [
    ('optim', 'learning_rate', float('nan'), '> 0'),
    ('optim', 'learning_rate', float('inf'), '> 0'),
    ('optim', 'learning_rate', float('-inf'), '> 0'),
    ('training', 'ema_decay', float('nan'), 'in [0, 1)'),
    ('diffusion', 'beta_end', float('nan'), 'in (0, 1]'),
    ('diffusion', 'beta_start', float('inf'), 'in (0, 1]'),
    ('optim', 'grad_clip', float('inf'), '>= 0'),
    ('model', 'dropout', float('nan'), 'in [0, 1)'),
    ('diffusion', 'hybrid_lambda', float('inf'), '>= 0'),
    ('optim', 'eps', float('nan'), '> 0'),
    ('optim', 'beta2', float('-inf'), 'in [0, 1)'),
    ('optim', 'weight_decay', float('nan'), '>= 0'),
    ('sampling', 'ddim_eta', float('inf'), '>= 0'),
])
def test_not_finite_hyper_parameters_fail_naming_field_value_and_range(section, field, value, allowed):
  """Issue #19 item 5: `--config.optim.learning_rate=nan` used to train until the loss was NaN."""
  _bad(lambda c: setattr(c[section], field, value),
       f'config.{section}.{field}={value!r} is invalid: expected a finite number {allowed}')


def test_not_finite_numbers_anywhere_in_the_tree_fail():
  def mutate(c):
    c.model.extra = float('nan')  # a float field that no explicit check knows
  _bad(mutate, 'config.model.extra=nan is invalid: expected finite numbers')


@pytest.mark.parametrize('field, value, allowed', [
    ('model.learn_sigma', 1, 'expected True or False'),
    ('sampling.clip_denoised', 'yes', 'expected True or False'),
    ('training.batch_size', 16.0, 'expected an integer >= 1'),
    ('seed', -1, 'expected an integer >= 0'),
    ('sampling.interpolation_num_lambdas', 1, 'expected an integer >= 2'),
    ('data.num_channels', 2, 'expected 1 (grey) or 3 (RGB)'),
    ('optim.optimizer', 'sgd', "allowed: ('adam', 'adamw')"),
    ('optim.lr_schedule', 'linear', "allowed: ('constant', 'cosine')"),
    ('sampling.method', 'euler', "allowed: ('ancestral', 'ddim')"),
])
def test_field_types_fail_in_the_one_format(field, value, allowed):
  def mutate(c):
    section, _, name = field.rpartition('.')
    node = c[section] if section else c
    with node.ignore_type():
      node[name] = value
  _bad(mutate, f'config.{field}={value!r} is invalid: {allowed}')


def test_one_message_format_for_every_section():
  """Diffusion, training, data and model errors all read `config.<field>=<value!r> is invalid: ...`."""
  _bad(lambda c: setattr(c.diffusion, 'beta_schedule', 'linaer'),
       "config.diffusion.beta_schedule='linaer' is invalid: ")
  _bad(lambda c: setattr(c.data, 'image_size', 32), 'config.data.image_size=32 is invalid: ')
  _bad(lambda c: setattr(c.model, 'ch', 48), 'config.model.ch=48 is invalid: ')
  _bad(lambda c: setattr(c.data, 'dataset', 'no_such_dataset_xyz'),
       "config.data.dataset='no_such_dataset_xyz' is invalid: ")


def test_rescaled_linear_schedule_range_is_checked_by_the_schedule_module():
  def mutate(c):
    c.diffusion.beta_schedule = 'linear_rescaled'
    c.diffusion.num_timesteps = 10  # 1000 / 10 * 0.02 = 2 > 1
  _bad(mutate, 'config.diffusion.beta_end=0.02 is invalid: ', 'rescaled')


def test_enumerations_come_from_the_modules_that_implement_them():
  from ddpm_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from ddpm_jax import diffusion, evaluation, models, sampling, train  # pylint: disable=import-outside-toplevel
  assert config_lib._CHOICES['diffusion.beta_schedule'] is diffusion.BETA_SCHEDULES
  assert config_lib._CHOICES['diffusion.var_type'] is diffusion.VAR_TYPES
  assert config_lib._CHOICES['sampling.method'] is sampling.METHODS
  assert config_lib._CHOICES['model.dtype'] == tuple(models.DTYPES)
  assert config_lib._CHOICES['optim.optimizer'] is train.OPTIMIZERS
  assert evaluation.METRIC_NAMES == ('bpd', 'rate_distortion', 'fid', 'digits_fid')
  from ddpm_jax import data  # pylint: disable=import-outside-toplevel
  assert not [name for lib in (models, data) for name in dir(lib) if name.startswith('validate')]


def test_defaults_tree_has_every_section():
  config = default.get_config()
  for section in ('training', 'data', 'model', 'diffusion', 'optim', 'sampling', 'eval'):
    assert section in config
