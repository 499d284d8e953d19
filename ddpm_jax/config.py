"""Validation of the whole config tree, in one place, before anything compiles.

Each error names the field, the value and what is allowed, e.g.
`ValueError: diffusion.loss_type='mse' cannot train var_type='learned_range' ...`.
"""

from __future__ import annotations

from typing import Any, Iterable

import ml_collections

_ALLOWED = {
    'diffusion.beta_schedule': ('linear', 'linear_rescaled', 'quad', 'warmup10', 'warmup50', 'const', 'jsd',
                                'cosine'),
    'diffusion.mean_type': ('eps', 'x0', 'xprev'),
    'diffusion.var_type': ('fixed_small', 'fixed_large', 'learned', 'learned_range'),
    'diffusion.loss_type': ('mse', 'rescaled_mse', 'kl', 'rescaled_kl', 'hybrid'),
    'optim.optimizer': ('adam', 'adamw'),
    'sampling.method': ('ancestral', 'ddim'),
    'model.dtype': ('float32', 'bfloat16'),
}
EVAL_METRICS = ('bpd', 'rate_distortion', 'fid', 'digits_fid')
LEARNED_VARS = ('learned', 'learned_range')


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ValueError(f'config field {field}={value!r} is invalid: {allowed}')


def _check_positive(config, fields: Iterable[str], allow_zero: bool = False) -> None:
  for field in fields:
    value = _get(config, field)
    if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
      _fail(field, value, 'expected a number ' + ('>= 0' if allow_zero else '> 0'))


def validate_diffusion(config: ml_collections.ConfigDict) -> None:
  for field, allowed in _ALLOWED.items():
    if _get(config, field) not in allowed:
      _fail(field, _get(config, field), f'allowed: {allowed}')
  d = config.diffusion
  if not isinstance(d.num_timesteps, int) or d.num_timesteps < 1:
    _fail('diffusion.num_timesteps', d.num_timesteps, 'expected an integer >= 1')
  if d.beta_schedule in ('linear', 'linear_rescaled', 'quad', 'warmup10', 'warmup50', 'const'):
    if not 0 < d.beta_start <= d.beta_end <= 1:
      _fail('diffusion.beta_start/beta_end', (d.beta_start, d.beta_end), 'expected 0 < beta_start <= beta_end <= 1')
  learned = d.var_type in LEARNED_VARS
  if learned and d.loss_type == 'mse':
    _fail('diffusion.loss_type', d.loss_type,
          f'plain L_simple does not train var_type={d.var_type!r} (DDPM Table 2: unstable); use hybrid, '
          'rescaled_mse, kl or rescaled_kl, or a fixed variance')
  if learned != bool(config.model.learn_sigma):
    _fail('model.learn_sigma', config.model.learn_sigma,
          f'must be {learned} for diffusion.var_type={d.var_type!r} (a learned variance needs 2C outputs)')
  if not 0 <= d.hybrid_lambda:
    _fail('diffusion.hybrid_lambda', d.hybrid_lambda, 'expected >= 0')


def validate_training(config: ml_collections.ConfigDict, num_devices: int | None,
                      num_processes: int) -> None:
  t = config.training
  _check_positive(config, ['training.batch_size', 'training.num_train_steps', 'training.log_every',
                           'training.checkpoint_every', 'training.keep_checkpoints',
                           'optim.learning_rate', 'sampling.batch_size',
                           'sampling.num_samples', 'sampling.samples_per_shard', 'eval.batch_size'])
  _check_positive(config, ['training.sample_every', 'training.num_grid_samples', 'optim.warmup_steps', 'optim.grad_clip',
                           'optim.weight_decay', 'sampling.ddim_eta', 'eval.num_examples',
                           'eval.num_train_examples', 'eval.fid_num_samples'], allow_zero=True)
  if not 0.0 <= t.ema_decay < 1.0:
    _fail('training.ema_decay', t.ema_decay, 'expected 0 <= decay < 1')
  for field in ('training.batch_size', 'sampling.batch_size', 'eval.batch_size'):
    value = _get(config, field)
    for count, what in ((num_devices, 'devices'), (num_processes, 'processes')):
      if count and value % count:
        _fail(field, value, f'a global batch must be divisible by the number of {what} ({count})')
  if config.sampling.samples_per_shard % config.sampling.batch_size:
    _fail('sampling.samples_per_shard', config.sampling.samples_per_shard,
          f'must be a multiple of sampling.batch_size={config.sampling.batch_size}')
  for metric in config.eval.metrics:
    if metric not in EVAL_METRICS:
      _fail('eval.metrics', tuple(config.eval.metrics), f'each metric must be one of {EVAL_METRICS}')
  if 'digits_fid' in config.eval.metrics and config.data.dataset != 'digits':
    _fail('eval.metrics', tuple(config.eval.metrics), "'digits_fid' needs data.dataset='digits'")
  if not 0 <= config.sampling.interpolation_t < config.diffusion.num_timesteps:
    _fail('sampling.interpolation_t', config.sampling.interpolation_t,
          f'expected 0 <= t < diffusion.num_timesteps={config.diffusion.num_timesteps}')


def validate_respacing(config: ml_collections.ConfigDict) -> None:
  from ddpm_jax.diffusion import respace  # pylint: disable=g-import-not-at-top
  spacing = config.sampling.timestep_respacing
  if spacing:
    try:
      respace.space_timesteps(config.diffusion.num_timesteps, spacing)
    except ValueError as e:
      _fail('sampling.timestep_respacing', spacing, str(e))


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_processes: int = 1) -> ml_collections.ConfigDict:
  """Checks every field and combination; returns the config unchanged or raises ValueError naming the field."""
  from ddpm_jax.data import validate_data_config  # pylint: disable=g-import-not-at-top
  from ddpm_jax.models import validate_model_config  # pylint: disable=g-import-not-at-top
  validate_diffusion(config)
  validate_training(config, num_devices, num_processes)
  validate_respacing(config)
  validate_data_config(config)
  validate_model_config(config)
  return config
