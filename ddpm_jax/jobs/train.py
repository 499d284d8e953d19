"""--mode=train: the training loop (DDPM §4, Appendix B).

Data (this process's shard) -> global batch on the mesh -> jitted `train_step` (state replicated, batch
sharded, state donated) -> metrics every `log_every` steps (the only host syncs), EMA sample grids,
orbax checkpoints (train state and data position together) every `checkpoint_every` steps and on
SIGTERM. Restarting on the same workdir resumes from the latest checkpoint; because batches and keys
are functions of (seed, step), the resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ddpm_jax import checkpoints, data, diffusion, images, models, parallel, runtime, sampling
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.streams import GRID_STREAM, INIT_STREAM, TRAIN_STREAM, stream_key
from ddpm_jax.train import TrainState, jit_create_train_state, jit_train_step


class NonFiniteLossError(FloatingPointError):
  """The loss was NaN or inf; nothing from that step on was applied or saved."""


class _Preemption:
  """Sets a flag on SIGTERM (and SIGINT) so the loop can checkpoint and exit at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('Received signal %d: checkpointing and stopping after this step.', signum)
    self.requested = True

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_finite(state: TrainState) -> None:
  bad_step = int(jax.device_get(state.nonfinite_step))
  if bad_step >= 0:
    raise NonFiniteLossError(
        f'non-finite loss at step {bad_step + 1}: training stopped; the last good checkpoint is kept. '
        'Lower optim.learning_rate, check the data, or enable optim.grad_clip.')


# Train steps dispatched ahead of the devices at most. With several XLA:CPU devices (ddpm_jax's default
# on a CPU), hundreds of queued steps can deadlock in the step's all-reduce (jaxlib 0.10.2: 300 queued
# digits steps on 2 devices abort in rendezvous.cc after 40 s); a short queue costs no throughput
# (BENCHMARKS.md) and bounds the batches held on the devices.
MAX_STEPS_IN_FLIGHT = 4


class _DispatchQueue:
  """Lets the host run at most `limit` steps ahead: `push` waits for the step `limit` back."""

  def __init__(self, limit: int):
    self._limit = limit
    self._pending: collections.deque[jax.Array] = collections.deque()

  def push(self, marker: jax.Array) -> None:
    self._pending.append(marker)
    if len(self._pending) > self._limit:
      self._pending.popleft().block_until_ready()


@jax.jit
def _accumulate(total: dict[str, jax.Array], metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  # A running sum on the device instead of a list of log_every per-step buffers reduced op by op
  # at log time (whose last, shorter window retraced the reduction); still no host sync per step.
  # Not donated: a step's loss stays valid for the dispatch queue.
  return jax.tree.map(jnp.add, total, metrics)


def _summarize(total: dict[str, jax.Array], count: int) -> dict[str, float]:
  return {k: float(v) / count for k, v in parallel.to_host(total).items()}


def _write_sample_grid(config: ml_collections.ConfigDict, sample_fn: Any, mesh: Mesh,
                       params: Any, workdir: str, step: int) -> str:
  """EMA samples of fixed noise (the same every time, so grids show progress) as `samples_<step>.png`."""
  n = config.training.num_grid_samples
  indices = np.arange(n + (-n) % mesh.devices.size, dtype=np.int32)
  samples = parallel.to_host(sample_fn(params, stream_key(config, GRID_STREAM), indices))
  path = workdir_lib.grid_path(workdir, step)
  if parallel.is_writer():
    images.save_image_grid(data.to_uint8(np.asarray(samples)[:n]), path)
  return path


def _metric_writer(workdir: str, num_steps: int, every_steps: int) -> tuple[Any, Any]:
  """clu's metric writer (TensorBoard events and the log) and its steps/s reporter.

  clu's writer imports TensorFlow: it is imported here, after `tf_cpu_only`, so that the other jobs
  never import TF and TF never sees an accelerator.
  """
  data.tf_cpu_only()
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=not parallel.is_writer())
  return writer, periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                                 every_steps=every_steps)


def _initial_state(config: ml_collections.ConfigDict, manager: Any, mesh: Mesh,
                   data_iterator: Any) -> TrainState:
  """The latest checkpoint's state (and data position), or a fresh state from the seed."""
  state = checkpoints.restore_for_training(manager, config, mesh, data_iterator)
  if state is not None:
    logging.info('Resuming from the checkpoint at step %d.', int(state.step))
    return state
  return jit_create_train_state(config, mesh)(stream_key(config, INIT_STREAM))


def train(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
          data_iterator: Iterator[np.ndarray] | None = None) -> TrainState:
  """Trains `config.training.num_train_steps` steps in `workdir` (resuming if it has checkpoints).

  `data_iterator` (optional, for tests) replaces the configured data source; it must yield this
  process's float32 [-1, 1] batches starting at the resumed step.
  """
  manager = checkpoints.create_manager(workdir, keep=config.training.keep_checkpoints)
  start_step = manager.latest_step() or 0
  try:
    state = _train(config, workdir, mesh, manager, start_step, data_iterator)
  except BaseException:
    # Also on an error: orbax's background threads stop here, not in the interpreter's shutdown
    # (where they would print tracebacks after the error message); the error in flight is the one
    # to report.
    with contextlib.suppress(Exception):
      manager.close()
    raise
  manager.close()
  return state


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, manager: Any, start_step: int,
           data_iterator: Iterator[np.ndarray] | None) -> TrainState:
  own_iterator = data_iterator is None
  if own_iterator:
    data_iterator = data.create_train_iterator(
        config, seed=config.seed, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())
  state = _initial_state(config, manager, mesh, data_iterator)
  restored_step = int(jax.device_get(state.step))
  if own_iterator and restored_step != start_step and getattr(data_iterator, 'step', None) != restored_step:
    # The newest step was damaged and an older one without a data position was restored: the
    # batches are functions of (seed, step), so an iterator built at the restored step is exact.
    data_iterator = data.create_train_iterator(
        config, seed=config.seed, start_step=restored_step, process_index=jax.process_index(),
        process_count=jax.process_count())
  # Only now, with the checkpoint known to fit this config, is the config recorded.
  if parallel.is_writer():
    with workdir_lib.atomic_write(workdir_lib.config_path(workdir), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  start_step, num_steps = restored_step, config.training.num_train_steps

  model = models.create_model(config)
  train_step = jit_train_step(model, diffusion.coefficients_from_config(config.diffusion), mesh,
                              config.runtime.gradient_all_reduce,
                              runtime.train_convolutions(config))
  train_key = stream_key(config, TRAIN_STREAM)

  writer, progress = _metric_writer(workdir, num_steps, config.training.log_every)
  preemption = _Preemption()
  t = config.training
  metric_sum: dict[str, jax.Array] | None = None
  metric_count = 0
  grid_sample_fn = None
  dispatched = _DispatchQueue(MAX_STEPS_IN_FLIGHT)

  try:
    for step in range(start_step + 1, num_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        # images, or (images, labels) for a class-conditional model: each split over `data`.
        batch = jax.tree.map(lambda x: parallel.shard_batch(x, mesh), next(data_iterator))
        state, metrics = train_step(state, batch, train_key)
      dispatched.push(metrics['loss'])
      metric_sum = metrics if metric_sum is None else _accumulate(metric_sum, metrics)
      metric_count += 1
      progress(step)
      last = step == num_steps
      if step % t.log_every == 0 or last:
        _check_finite(state)
        writer.write_scalars(step, _summarize(metric_sum, metric_count))
        metric_sum, metric_count = None, 0
      if t.num_grid_samples and ((t.sample_every and step % t.sample_every == 0) or last):
        _check_finite(state)
        if grid_sample_fn is None:  # built once: every grid reuses the compiled sampler
          grid_sample_fn = sampling.make_sample_fn(config, model, mesh)
        path = _write_sample_grid(config, grid_sample_fn, mesh, state.ema_params, workdir, step)
        logging.info('Wrote EMA samples to %s', path)
      preempted = preemption.requested or manager.reached_preemption(step)
      if step % t.checkpoint_every == 0 or last or preempted:
        _check_finite(state)  # never let a NaN state replace the last good checkpoint
        checkpoints.save(manager, state, config, data_iterator)
      if preempted:
        logging.warning('Stopped at step %d after checkpointing (preemption).', step)
        break
  finally:
    preemption.restore()
    writer.flush()
    manager.wait_until_finished()
  return state
