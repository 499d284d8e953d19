"""Converts an official DDPM TensorFlow checkpoint (Ho et al. 2020, diffusion_tf) to a workdir.

  python -m ddpm_jax.convert_tf_checkpoint \
      --tf_checkpoint=diffusion_cifar10_model/model.ckpt-790000 \
      --config=configs/cifar10.py --workdir=runs/cifar10_official

The EMA weights (`<name>/ExponentialMovingAverage`) become `ema_params` and the raw weights
`params`; a checkpoint without EMA copies gives both from the raw weights. The config must describe
the same network (configs/cifar10.py for the CIFAR10 model, configs/celeba_hq.py / lsun_*.py for the
256x256 ones).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import checkpoints
from ddpm_jax.config import validate_config
from ddpm_jax.models import convert_tf, unet

_CONFIG = config_flags.DEFINE_config_file('config', None,
                                          'Experiment config, e.g. configs/cifar10.py.',
                                          lock_config=True)
_TF_CHECKPOINT = flags.DEFINE_string('tf_checkpoint', None,
                                     'TF checkpoint prefix (model.ckpt-N) or its directory.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where to write the converted checkpoint.')
flags.mark_flags_as_required(['config', 'tf_checkpoint', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  validate_config(config)
  template = unet.param_shapes(config)
  tf_vars = convert_tf.load_tf_checkpoint(_TF_CHECKPOINT.value)
  params, ema_params = convert_tf.convert_tf_vars(tf_vars, template)
  logging.info('Converted %d parameters from %s (EMA copies: %s).', unet.count_params(params),
               _TF_CHECKPOINT.value,
               'yes' if convert_tf.has_ema(tf_vars) else 'none, using the raw weights')
  checkpoints.save_converted(_WORKDIR.value, config, params, ema_params)


if __name__ == '__main__':
  app.run(main)
