"""TensorFlow, the data loader, kept off the accelerators: JAX owns every GPU / TPU's memory."""

from __future__ import annotations

import functools
import types

from absl import logging


@functools.cache
def tf_cpu_only() -> types.ModuleType:
  """Imports TensorFlow with every GPU / TPU hidden from it (idempotent); returns the tf module.

  `ddpm_jax.jobs.setup` calls it before anything runs; every function of `ddpm_jax.data` that uses TF
  calls it first as well.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow, and only the tf.data path needs it)
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except RuntimeError as e:
    # Raised once TF has initialised its devices (TF ops ran before this was called).
    logging.warning('Could not hide accelerators from TensorFlow (%s); call '
                    'ddpm_jax.data.tf_cpu_only() before anything runs TF ops so that TF leaves '
                    'GPU/TPU memory to JAX.', e)
  return tf
