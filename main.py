"""ddpm_jax entry point: train, sample or evaluate a DDPM.

  python main.py --config=configs/cifar10.py --workdir=/tmp/cifar10 [--mode=train]
  python main.py --config=configs/cifar10.py --workdir=/tmp/cifar10 --mode=sample --config.sampling.num_samples=50000
  python main.py --config=configs/cifar10.py --workdir=/tmp/cifar10 --mode=eval

Any config field can be overridden, e.g. --config.training.batch_size=64.
"""

import logging as py_logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

MODES = ('train', 'sample', 'eval', 'progressive', 'interpolate')

config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS
_QUIET_PACKAGES = (f'{os.sep}orbax{os.sep}',)  # their INFO lines (hundreds of characters per save) bury ours


def _quiet_library_info(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _QUIET_PACKAGES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ddpm_jax import data  # pylint: disable=g-import-not-at-top,unused-import  (hides accelerators from TF first)
  import jax  # pylint: disable=g-import-not-at-top
  from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
  from ddpm_jax.config import validate_config  # pylint: disable=g-import-not-at-top

  if FLAGS.verbosity <= logging.INFO:  # --verbosity=1 (debug) shows everything
    logging.get_absl_handler().addFilter(_quiet_library_info)
  config = FLAGS.config
  parallel.maybe_initialize_distributed(config.training.distributed)
  logging.info('JAX %s: process %d/%d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  if FLAGS.mode == 'train':
    from ddpm_jax.train import loop  # pylint: disable=g-import-not-at-top
    loop.train_and_evaluate(config, FLAGS.workdir)
    return
  validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
  if FLAGS.mode == 'eval':
    from ddpm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, FLAGS.workdir)
    return
  from ddpm_jax.sampling import run  # pylint: disable=g-import-not-at-top
  getattr(run, FLAGS.mode)(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
