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
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before any path imports TensorFlow (data/tf_cpu.py)

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from ddpm_jax import jobs  # pylint: disable=g-import-not-at-top

config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', list(jobs.JOBS), 'What to run (a job of ddpm_jax/jobs/).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS
# Their INFO lines bury ours: orbax's (hundreds of characters per save) and JAX's backend probe ("Unable
# to initialize backend 'tpu'" on every machine without one).
_QUIET_PACKAGES = (f'{os.sep}orbax{os.sep}', f'{os.sep}jax{os.sep}_src{os.sep}xla_bridge.py')


def _quiet_library_info(record: py_logging.LogRecord) -> bool:
  return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in _QUIET_PACKAGES)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.verbosity <= logging.INFO:  # --verbosity=1 (debug) shows everything
    logging.get_absl_handler().addFilter(_quiet_library_info)
  config = FLAGS.config
  try:
    mesh = jobs.setup(config)
    with jobs.locked(FLAGS.workdir, FLAGS.mode):
      jobs.JOBS[FLAGS.mode](config, FLAGS.workdir, mesh)
  except jobs.ERRORS as e:
    # One clear line (what, which path, what to do) instead of a traceback; the jobs have closed
    # their checkpoint managers, so no background thread prints after it.
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {_one_line(e)}\n(--verbosity=1 shows the traceback)', file=sys.stderr, flush=True)
    sys.exit(1)


def _one_line(e: BaseException) -> str:
  """The message of `e`, with the type for a bare library exception (e.g. a raw OSError)."""
  message = str(e) or type(e).__name__
  return message if e.__class__.__module__.startswith('ddpm_jax') or isinstance(e, ValueError) \
      else f'{type(e).__name__}: {message}'


if __name__ == '__main__':
  app.run(main)
