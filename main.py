"""ddpm_jax entry point: train, sample or evaluate a DDPM.

  python main.py --config=configs/cifar10.py --workdir=/tmp/cifar10 [--mode=train]
  python main.py --config=configs/cifar10.py --workdir=/tmp/cifar10 --mode=sample --config.sampling.num_samples=50000
  python main.py --config=configs/cifar10.py --workdir=/tmp/cifar10 --mode=eval

Any config field can be overridden, e.g. --config.training.batch_size=64. Modes (ddpm_jax/jobs/):
train (then the final evaluation of config.eval.metrics on the EMA weights), sample, eval,
progressive, interpolate.
"""

import logging as py_logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import  # noqa: E402
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top  # noqa: E402

from ddpm_jax import jobs  # pylint: disable=g-import-not-at-top  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', list(jobs.JOBS), 'What to run (a job of ddpm_jax/jobs/).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS
_QUIET_PACKAGES = (f'{os.sep}orbax{os.sep}',)  # their INFO lines (hundreds of characters per save) bury ours


def _quiet_library_info(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _QUIET_PACKAGES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.verbosity <= logging.INFO:  # --verbosity=1 (debug) shows everything
    logging.get_absl_handler().addFilter(_quiet_library_info)
  config = FLAGS.config
  mesh = jobs.setup(config)
  jobs.JOBS[FLAGS.mode](config, FLAGS.workdir, mesh)


if __name__ == '__main__':
  app.run(main)
