"""TensorFlow, the data loader, kept off the accelerators: JAX owns every GPU / TPU's memory.

`tf_cpu_only()` is the package's one way into TensorFlow: nothing imports TF before it is needed (a job
that never reads data through TF, e.g. sampling or the digits metric, never imports it: a 100-sample
digits job takes 7-9 s instead of 15-17 s on a 2-core CPU), and every path that needs TF, including the
libraries that import it (clu's summary writer, tensorflow_datasets), calls `tf_cpu_only()` first.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
import types
from collections.abc import Iterator
from typing import IO

from absl import logging


@contextlib.contextmanager
def captured_native_stderr() -> Iterator[list[str]]:
  """Sends file descriptor 2 to a temporary file inside the block; the yielded list then holds the text.

  For C++ libraries that write to the process's stderr directly, past Python's `sys.stderr`. If the
  block raises, the text is written to stderr at once (above the traceback it may explain).
  """
  sys.stderr.flush()
  text: list[str] = []
  saved_fd = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield text
    except BaseException:
      _restore(saved_fd, capture, text)
      sys.stderr.write(text[0])
      sys.stderr.flush()
      raise
    _restore(saved_fd, capture, text)


def _restore(saved_fd: int, capture: IO[bytes], text: list[str]) -> None:
  sys.stderr.flush()
  os.dup2(saved_fd, 2)
  os.close(saved_fd)
  capture.seek(0)
  text.append(capture.read().decode(errors='replace'))


@functools.cache
def tf_cpu_only() -> types.ModuleType:
  """Imports TensorFlow with every GPU / TPU hidden from it (idempotent); returns the tf module.

  TF's C++ start-up lines (oneDNN's notice, absl's 'All log messages before absl::InitializeLog() ...')
  ignore TF_CPP_MIN_LOG_LEVEL in TF 2.21 and only concern TF, so they go to the debug log
  (`main.py --verbosity=1` shows them); an import that fails prints them above its traceback.
  """
  with captured_native_stderr() as startup:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow, and only the TF paths need it)
  if startup[0].strip():
    logging.debug('TensorFlow start-up output:\n%s', startup[0].rstrip())
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except RuntimeError as e:
    # Raised once TF has initialised its devices (TF ops ran before this was called).
    logging.warning('Could not hide accelerators from TensorFlow (%s); call '
                    'ddpm_jax.data.tf_cpu_only() before anything runs TF ops so that TF leaves '
                    'GPU/TPU memory to JAX.', e)
  return tf
