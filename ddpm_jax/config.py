"""Validation of the whole config tree, once per run, before anything compiles (`jobs.setup`).

Every error has one form, naming the field, the value and what is allowed:
  ValueError: config.optim.learning_rate=nan is invalid: expected a finite number > 0
The enumerations (beta schedules, parameterizations, losses, samplers, model dtypes, attention
kernels, metrics) are imported from the modules that implement them, and the checks of the data
and the network ask data/sources.py and models/unet.py for the facts they own (what a dataset
stores, which channels carry attention); the messages are all made here. Libraries take the
validated values and check only their own arguments.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import jax
import ml_collections

from ddpm_jax import diffusion, evaluation, models, parallel, sampling, train
from ddpm_jax.data import sources
from ddpm_jax.evaluation import fid
from ddpm_jax.models import layers, unet

# Fields that must be one of an enumeration.
_CHOICES = {
    'diffusion.beta_schedule': diffusion.BETA_SCHEDULES,
    'diffusion.mean_type': diffusion.MEAN_TYPES,
    'diffusion.var_type': diffusion.VAR_TYPES,
    'diffusion.loss_type': diffusion.LOSS_TYPES,
    'optim.optimizer': train.OPTIMIZERS,
    'optim.lr_schedule': train.LR_SCHEDULES,
    'sampling.method': sampling.METHODS,
    'model.name': models.MODEL_NAMES,
    'model.dtype': tuple(models.DTYPES),
    'runtime.gradient_all_reduce': parallel.GRADIENT_ALL_REDUCES,
    'runtime.cpu_train_convolutions': parallel.CPU_CONVOLUTIONS,
    'runtime.cpu_sample_reductions': parallel.CPU_REDUCTIONS,
}

# Integer fields and the smallest value each allows.
_INTEGERS = {
    'seed': 0,
    'training.batch_size': 1, 'training.num_train_steps': 1, 'training.log_every': 1,
    'training.sample_every': 0, 'training.num_grid_samples': 0, 'training.checkpoint_every': 1,
    'training.keep_checkpoints': 1,
    'data.image_size': 1, 'data.shuffle_buffer': 1, 'data.prefetch': 0,
    'model.ch': 1, 'model.num_res_blocks': 1, 'model.num_heads': 1,
    'diffusion.num_timesteps': 1,
    'optim.warmup_steps': 0,
    'sampling.num_samples': 1, 'sampling.batch_size': 1, 'sampling.samples_per_shard': 1,
    'sampling.progressive_every': 1,
    'sampling.interpolation_num_lambdas': 2,  # lambda = 0 and 1 at least (DDPM §4.4)
    'runtime.cpu_devices': 0,  # 0: one per core (ddpm_jax.runtime)
    'eval.batch_size': 1, 'eval.num_examples': 0, 'eval.num_train_examples': 0,
    'eval.fid_num_samples': 0,
}

# Float fields: (what is allowed, the test of a finite value). NaN fails every comparison, so each
# test is written to accept, never to reject, and infinities are refused before it runs.
_Range = tuple[str, Callable[[float], bool]]
_AT_LEAST_0: _Range = ('>= 0', lambda v: v >= 0)
_ABOVE_0: _Range = ('> 0', lambda v: v > 0)
_RATE: _Range = ('in [0, 1)', lambda v: 0 <= v < 1)
_BETA: _Range = ('in (0, 1]', lambda v: 0 < v <= 1)  # a variance of the forward process (DDPM §2)
_FLOATS = {
    'training.ema_decay': _RATE,
    'model.dropout': _RATE,
    'diffusion.beta_start': _BETA, 'diffusion.beta_end': _BETA,
    'diffusion.hybrid_lambda': _AT_LEAST_0,  # lambda of L_hybrid (iDDPM §3.1)
    'optim.learning_rate': _ABOVE_0,
    'optim.beta1': _RATE, 'optim.beta2': _RATE,
    'optim.eps': _ABOVE_0,  # Adam divides by sqrt(v) + eps, and v is 0 where a gradient is
    'optim.weight_decay': _AT_LEAST_0,
    'optim.grad_clip': _AT_LEAST_0,  # 0 disables
    'sampling.ddim_eta': _AT_LEAST_0,
}

_BOOLEANS = ('training.importance_sampling', 'training.distributed', 'training.final_eval',
             'data.random_flip', 'model.scale_shift_norm', 'model.resamp_with_conv',
             'model.learn_sigma', 'sampling.clip_denoised', 'sampling.use_ema')
_NAMES = ('data.dataset', 'data.train_split', 'data.eval_split')  # non-empty strings
_OPTIONAL_PATHS = ('data.data_dir', 'data.image_folder', 'eval.inception_weights', 'eval.sample_dir')


def _fail(field: str, value: Any, allowed: str) -> NoReturn:
  raise ValueError(f'config.{field}={value!r} is invalid: {allowed}')


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _leaves(node: Any, prefix: str = '') -> Iterator[tuple[str, Any]]:
  """(dotted field, value) of every leaf of the tree; sequences are leaves."""
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _is_finite(value: Any) -> bool:
  if isinstance(value, (tuple, list)):
    return all(_is_finite(v) for v in value)
  return not _is_number(value) or math.isfinite(value)


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """The type and range of each field on its own."""
  for field, allowed in _CHOICES.items():
    if _get(config, field) not in allowed:
      _fail(field, _get(config, field), f'allowed: {allowed}')
  impl = config.model.get('attn_implementation')
  if impl not in models.ATTN_IMPLEMENTATIONS:
    _fail('model.attn_implementation', impl, f'allowed: {models.ATTN_IMPLEMENTATIONS}')
  for field, minimum in _INTEGERS.items():
    value = _get(config, field)
    if not _is_int(value) or value < minimum:
      _fail(field, value, f'expected an integer >= {minimum}')
  for field, (allowed, test) in _FLOATS.items():
    value = _get(config, field)
    if not _is_number(value) or not math.isfinite(value) or not test(value):
      _fail(field, value, f'expected a finite number {allowed}')
  for field in _BOOLEANS:
    if not isinstance(_get(config, field), bool):
      _fail(field, _get(config, field), 'expected True or False')
  for field in _NAMES:
    if not isinstance(_get(config, field), str) or not _get(config, field):
      _fail(field, _get(config, field), 'expected a non-empty string')
  for field in _OPTIONAL_PATHS:
    if _get(config, field) is not None and not isinstance(_get(config, field), str):
      _fail(field, _get(config, field), 'expected None or a path')
  if config.data.num_channels not in (1, 3):
    _fail('data.num_channels', config.data.num_channels, 'expected 1 (grey) or 3 (RGB)')
  in_memory = config.data.get('in_memory')
  if in_memory is not None and not isinstance(in_memory, bool):
    _fail('data.in_memory', in_memory, 'expected None (the source default), True or False')
  # Every other number of the tree (issue: a NaN learning rate used to train until the loss was NaN).
  for field, value in _leaves(config):
    if not _is_finite(value):
      _fail(field, value, 'expected finite numbers')


def _check_optim(config: ml_collections.ConfigDict) -> None:
  o, steps = config.optim, config.training.num_train_steps
  if o.lr_schedule == 'cosine' and o.warmup_steps >= steps:
    _fail('optim.warmup_steps', o.warmup_steps,
          f"with optim.lr_schedule='cosine' the warm-up must end before training.num_train_steps={steps} "
          "(the cosine runs from its end to the last step); use fewer warm-up steps or 'constant'")


def _check_runtime(config: ml_collections.ConfigDict) -> None:
  if config.runtime.gradient_all_reduce == 'flat' and config.model.dropout > 0:
    _fail('runtime.gradient_all_reduce', 'flat',
          f'with model.dropout={config.model.dropout}: a per-device gradient cannot draw the global '
          "batch's dropout masks; use 'auto' or 'per_weight' (or model.dropout=0)")


def _check_diffusion(config: ml_collections.ConfigDict) -> None:
  d = config.diffusion
  try:  # the schedule module knows which schedules read the range (and rescales it for T)
    diffusion.get_beta_schedule(d.beta_schedule, num_timesteps=d.num_timesteps,
                                beta_start=d.beta_start, beta_end=d.beta_end)
  except ValueError as e:
    _fail('diffusion.beta_end', d.beta_end,
          f'with diffusion.beta_start={d.beta_start!r} and beta_schedule={d.beta_schedule!r}: {e}')
  for field in ('rescale_timesteps', 'rescale_learned_sigmas'):  # improved-diffusion's flags
    if not isinstance(d.get(field, False), bool):
      _fail(f'diffusion.{field}', d.get(field), 'expected True or False')
  rescale_sigmas = d.get('rescale_learned_sigmas', False)
  if rescale_sigmas and d.loss_type not in ('mse', 'rescaled_mse'):
    _fail('diffusion.rescale_learned_sigmas', True,
          f"improved-diffusion's flag chooses between its MSE and RESCALED_MSE losses: it needs "
          f"diffusion.loss_type 'mse' or 'rescaled_mse', not {d.loss_type!r}")
  learned = d.var_type in diffusion.LEARNED_VAR_TYPES
  if learned and d.loss_type == 'mse' and not rescale_sigmas:
    _fail('diffusion.loss_type', d.loss_type,
          f'plain L_simple does not train var_type={d.var_type!r} (DDPM Table 2: unstable); use '
          'hybrid, rescaled_mse, kl or rescaled_kl (or diffusion.rescale_learned_sigmas=True), or '
          'a fixed variance')
  if learned != config.model.learn_sigma:
    _fail('model.learn_sigma', config.model.learn_sigma,
          f'must be {learned} for diffusion.var_type={d.var_type!r} (a learned variance needs 2C '
          'outputs)')


def _check_batches(config: ml_collections.ConfigDict, num_devices: int | None,
                   num_processes: int) -> None:
  for field in ('training.batch_size', 'sampling.batch_size', 'eval.batch_size'):
    value = _get(config, field)
    for count, what in ((num_devices, 'devices'), (num_processes, 'processes')):
      if count and value % count:
        _fail(field, value, f'a global batch must be divisible by the number of {what} ({count})')
  if config.sampling.samples_per_shard % config.sampling.batch_size:
    _fail('sampling.samples_per_shard', config.sampling.samples_per_shard,
          f'must be a multiple of sampling.batch_size={config.sampling.batch_size}')


def _check_sampling(config: ml_collections.ConfigDict) -> None:
  s, num_timesteps = config.sampling, config.diffusion.num_timesteps
  if s.timestep_respacing:
    try:
      diffusion.space_timesteps(num_timesteps, s.timestep_respacing)
    except ValueError as e:
      _fail('sampling.timestep_respacing', s.timestep_respacing, str(e))
  if not _is_int(s.interpolation_t) or not 0 <= s.interpolation_t < num_timesteps:
    _fail('sampling.interpolation_t', s.interpolation_t,
          f'expected an integer 0 <= t < diffusion.num_timesteps={num_timesteps}')


def _check_eval(config: ml_collections.ConfigDict) -> None:
  metrics = config.eval.metrics
  if not isinstance(metrics, (tuple, list)) or any(m not in evaluation.METRIC_NAMES
                                                   for m in metrics):
    _fail('eval.metrics', metrics, f'each metric must be one of {evaluation.METRIC_NAMES}')
  if 'digits_fid' in metrics and config.data.dataset != sources.DIGITS:
    _fail('eval.metrics', tuple(metrics), f"'digits_fid' needs data.dataset='{sources.DIGITS}'")
  e = config.eval
  if e.inception_backend not in fid.INCEPTION_BACKENDS:
    _fail('eval.inception_backend', e.inception_backend, f'expected one of {fid.INCEPTION_BACKENDS}')
  if not isinstance(e.inception_self_check, bool):
    _fail('eval.inception_self_check', e.inception_self_check, 'expected True or False')
  k = e.precision_recall_k
  if not _is_int(k) or k < 0 or ('fid' in metrics and k >= max(e.fid_num_samples, 1)):
    _fail('eval.precision_recall_k', k, 'expected an integer >= 0 (0 disables) and, with the fid '
          f'metric, < eval.fid_num_samples={e.fid_num_samples}')


def _check_data(config: ml_collections.ConfigDict) -> None:
  """The dataset exists and its images fit (data.image_size, data.num_channels)."""
  data = config.data
  source = sources.resolve_source(config)
  if source.kind == sources.TFDS and not sources.is_registered_tfds_name(data.dataset):
    _fail('data.dataset', data.dataset,
          f"expected '{sources.DIGITS}', '{sources.IMAGE_FOLDER}' or a tfds image dataset name "
          f"(e.g. {', '.join(sources.known_tfds_names())}, 'celeb_a_hq/256', 'lsun/church_outdoor')")
  if source.kind == sources.IMAGE_FOLDER and not (data.image_folder
                                                  and os.path.isdir(data.image_folder)):
    _fail('data.image_folder', data.image_folder,
          f"expected an existing directory (for data.dataset='{sources.IMAGE_FOLDER}')")
  problem = sources.fit_problem(source, data.image_size, data.num_channels)
  if problem:
    field, allowed = problem
    _fail(f'data.{field}', data[field], f'data.dataset={data.dataset!r} {allowed}')
  if data.get('in_memory') is False and source.kind != sources.TFDS:
    _fail('data.in_memory', False, f'{data.dataset!r} is always held in memory; use None or True')


def _check_model(config: ml_collections.ConfigDict) -> None:
  """The U-Net can be built for data.image_size (DDPM Appendix B; iDDPM's heads and kernels)."""
  m, image_size = config.model, config.data.image_size
  conventions = m.get('conventions', 'diffusion_tf')
  if conventions not in layers.CONVENTIONS:
    _fail('model.conventions', conventions, f'allowed: {layers.CONVENTIONS}')
  num_classes = m.get('num_classes', 0)
  if not _is_int(num_classes) or num_classes < 0:
    _fail('model.num_classes', num_classes,
          'expected an integer >= 0 (0: unconditional; else the number of class labels)')
  if m.ch % layers.NUM_GROUPS:
    _fail('model.ch', m.ch, f'must be a positive multiple of the {layers.NUM_GROUPS} GroupNorm groups')
  ch_mult = tuple(m.ch_mult) if isinstance(m.ch_mult, (tuple, list)) else None
  if not ch_mult or not all(_is_int(c) and c > 0 for c in ch_mult):
    _fail('model.ch_mult', m.ch_mult, 'must be a non-empty sequence of positive integers')
  factor = 2 ** (len(ch_mult) - 1)
  if image_size % factor:
    _fail('data.image_size', image_size,
          f'must be a positive multiple of {factor} = 2**(len(model.ch_mult) - 1) for '
          f'ch_mult={ch_mult}')
  res = unet.resolutions(image_size, ch_mult)
  attn = m.attn_resolutions
  if not isinstance(attn, (tuple, list)) or not all(_is_int(r) for r in attn):
    _fail('model.attn_resolutions', attn, 'must be a sequence of integer resolutions')
  for r in attn:
    if r not in res:
      _fail('model.attn_resolutions', tuple(attn),
            f'resolution {r} never occurs; with image_size={image_size} and ch_mult={ch_mult} the '
            f'resolutions are {res}')
  channels = sorted(unet.attention_channels(m.ch, ch_mult, attn, image_size))
  for c in channels:
    if c % m.num_heads:
      _fail('model.num_heads', m.num_heads, f'must divide the {c} channels of an attention layer')
  if m.get('attn_implementation') == 'cudnn':
    _check_cudnn(m, channels)


def _check_cudnn(m: ml_collections.ConfigDict, attn_channels: list[int]) -> None:
  # Failing here beats an error from deep inside the first compilation.
  if m.dtype not in unet.CUDNN_DTYPES:
    _fail('model.attn_implementation', 'cudnn',
          f"'cudnn' needs model.dtype={' or '.join(map(repr, unet.CUDNN_DTYPES))} "
          f"(got {m.dtype!r}); use None or 'xla' for float32")
  head_dims = sorted({c // m.num_heads for c in attn_channels})
  if any(d > unet.CUDNN_MAX_HEAD_DIM or d % unet.CUDNN_HEAD_DIM_MULTIPLE for d in head_dims):
    _fail('model.attn_implementation', 'cudnn',
          f"'cudnn' needs attention heads of at most {unet.CUDNN_MAX_HEAD_DIM} channels, a "
          f'multiple of {unet.CUDNN_HEAD_DIM_MULTIPLE}; with model.num_heads={m.num_heads} the '
          f"heads have {head_dims} channels (the DDPM networks' single head is 256 wide or more): "
          "use None or 'xla', or more heads")
  if jax.default_backend() != 'gpu':
    _fail('model.attn_implementation', 'cudnn',
          f"'cudnn' needs a CUDA GPU; this process runs on {jax.default_backend()!r} "
          "(use None or 'xla')")


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    num_processes: int = 1) -> ml_collections.ConfigDict:
  """Checks every field and combination once; returns the config unchanged.

  num_devices / num_processes: the global batches must split over them (None / 0: not checked).
  Raises:
    ValueError: `config.<field>=<value> is invalid: <what is allowed>` for the first bad field.
  """
  _check_fields(config)
  _check_diffusion(config)
  _check_optim(config)
  _check_batches(config, num_devices, num_processes)
  _check_sampling(config)
  _check_data(config)
  _check_model(config)
  _check_eval(config)
  _check_runtime(config)
  return config
