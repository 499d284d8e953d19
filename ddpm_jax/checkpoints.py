"""Checkpoints with orbax: one composite checkpoint per step, restored for training or for inference.

Layout: `<workdir>/checkpoints/<step>/{state, data, meta}`:
  state  the whole `TrainState` (weights, EMA, optimizer moments, importance-sampler history);
  data   the data iterator's position (`TrainIterator.save_state`; a tf.data stream's buffers);
  meta   the fields that define the state's shapes and meaning (model, diffusion, data geometry).
Orbax writes each step into a temporary directory and renames it when every item is complete, so the
weights and the data position are committed together and an interrupted save never replaces the last
good checkpoint; `training.keep_checkpoints` prunes old steps, data positions included. Restoring
into a different config is an error that lists every field that differs. Inference restores only
`params` and `ema_params` (about a third of what a training restore reads).

A step that exists but does not restore completely (a file deleted or truncated, an empty data
position) is damaged: restoring falls back to the newest step that restores, says which step it
skipped and why, and (for training) renames the damaged one to `<step>.damaged-<UTC time>`, which
orbax does not take for a step, so that it is kept for inspection and out of the way of later saves
and of `keep_checkpoints`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging as py_logging
import os
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh

from ddpm_jax import parallel
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.train.state import TrainState, create_train_state

# Fields of the config that a checkpoint must agree with (everything else may change on resume).
COMPATIBILITY_FIELDS = ('model', 'diffusion', 'data.image_size', 'data.num_channels',
                        'training.importance_sampling', 'optim.optimizer')
# Recorded, but free to change between runs: how the network is computed, not what it computes
# (e.g. train in float32, sample in bfloat16 with cuDNN attention).
RUNTIME_FIELDS = frozenset({'model.dtype', 'model.attn_implementation'})
# Fields added to the config after checkpoints were first written: a checkpoint that does not record
# one was made with this value (so checkpoints of earlier versions still restore).
ADDED_FIELD_DEFAULTS = {'model.num_classes': 0, 'model.conventions': 'diffusion_tf',
                        'diffusion.rescale_timesteps': False, 'diffusion.rescale_learned_sigmas': False}
STATE, DATA, META = 'state', 'data', 'meta'
# The meta item's record of the whole config the step was saved with (not checked: only reported).
CONFIG_KEY = 'config'
INFERENCE_FIELDS = ('params', 'ema_params')


# --- the data iterator as an orbax item ------------------------------------------------------------

class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves / restores a `TrainIterator` into its item directory (one file set per process)."""

  def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
    os.makedirs(directory, exist_ok=True)
    args.iterator.save_state(os.fspath(directory))

  def restore(self, directory: epath.Path, args: DataIteratorRestore) -> Any:
    args.iterator.restore_state(os.fspath(directory))
    return args.iterator

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


# --- compatibility of a checkpoint with a config ---------------------------------------------------

def compatibility_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The JSON-able fields a checkpoint records and checks on restore."""
  meta = {}
  for field in COMPATIBILITY_FIELDS:
    node = config
    for part in field.split('.'):
      node = node[part]
    meta[field] = node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node
  # JSON has no tuples: normalise so that the saved and the current meta compare equal.
  return _lists(meta)


def _lists(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _lists(v) for k, v in sorted(tree.items())}
  if isinstance(tree, (list, tuple)):
    return [_lists(v) for v in tree]
  return tree


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}.{k}' if prefix else k))
    return out
  return {prefix: tree}


def _with_added_defaults(flat: dict[str, Any]) -> dict[str, Any]:
  """A flat saved record with the fields added since it was written set to the value it was made with."""
  return {**ADDED_FIELD_DEFAULTS, **flat}


def check_compatible(saved: dict[str, Any], config: ml_collections.ConfigDict, path: str) -> None:
  """Raises ValueError listing every field where `config` differs from the checkpoint's."""
  saved = {k: v for k, v in saved.items() if k != CONFIG_KEY}
  current, saved = _flatten(compatibility_meta(config)), _with_added_defaults(_flatten(_lists(saved)))
  diffs = [f'{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}'
           for k in sorted((set(current) | set(saved)) - RUNTIME_FIELDS)
           if current.get(k) != saved.get(k)]
  if diffs:
    raise ValueError(f'checkpoint {path} was written with a different config; use another --workdir or '
                     'restore the original config. Differences:\n  ' + '\n  '.join(diffs))


def _config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The whole config as JSON (what <workdir>/config.json holds), for the meta item."""
  return json.loads(config.to_json_best_effort())


def changes_state_structure(field: str, saved: Any, current: Any) -> bool:
  """Whether changing `field` from `saved` to `current` changes the train state's pytree, so that a
  checkpoint cannot be restored into it: a COMPATIBILITY_FIELDS field, or optim.grad_clip between 0
  and > 0 (clip_by_global_norm is chained into the optimizer only when it is > 0)."""
  if field in RUNTIME_FIELDS:
    return False
  if any(field == f or field.startswith(f + '.') for f in COMPATIBILITY_FIELDS):
    return True
  if field == 'optim.grad_clip':
    return (float(saved or 0) > 0) != (float(current or 0) > 0)
  return False


def config_differences(saved_config: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """One line per field where `config` differs from `saved_config` (a config record), saying whether
  the field changes the train state's structure or may change between runs."""
  saved = _with_added_defaults(_flatten(_lists(saved_config)))
  current = _flatten(_lists(_config_record(config)))
  lines = []
  for k in sorted(set(saved) | set(current)):
    if saved.get(k) != current.get(k):
      kind = ('changes the structure of the train state: set it back'
              if changes_state_structure(k, saved.get(k), current.get(k)) else 'may change between runs')
      lines.append(f'{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r} ({kind})')
  return lines


def _saved_config(meta: dict[str, Any], checkpoint_dir: str) -> dict[str, Any] | None:
  """The config a step was saved with: its meta record, or (older checkpoints) <workdir>/config.json,
  which a training run writes only once its checkpoint is known to fit."""
  if CONFIG_KEY in meta:
    return meta[CONFIG_KEY]
  try:
    return workdir_lib.read_json(workdir_lib.config_path(os.path.dirname(checkpoint_dir)))
  except (OSError, ValueError):
    return None


class DamagedCheckpointError(ValueError):
  """No checkpoint step of a workdir restores completely."""


# --- managers, save, restore -----------------------------------------------------------------------

def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The state item's handler: orbax's standard types, with each replicated array written from one device.

  Orbax's default (`ArrayHandler(use_replica_parallel=True)`) splits a replicated array among its
  replicas, each writing a slice; on one host with several CPU devices that slices every array once per
  device, compiling one small program per shape and device at a process's first save: 3.3 of the 4.8 s
  of the digits state's first save on the 2-core CPU, and 0.3-0.5 s of each later one (BENCHMARKS.md),
  to spread writes that one process makes anyway. The files are the same either way, so checkpoints
  written by either restore with either.
  """
  handlers = ocp.type_handlers
  default = handlers.get_type_handler(jax.Array)
  # The default handler's per-array metadata store, found as orbax finds it (the store has no public name).
  store = getattr(default, '_array_metadata_store', None)
  registry = handlers.create_type_handler_registry(
      *[(ty, handlers.get_type_handler(ty)) for ty in handlers.supported_types() if ty is not jax.Array],
      (jax.Array, handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=store)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def create_manager(workdir: str, keep: int = 3, *, for_inference: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of <workdir>/checkpoints; `for_inference` reads the state partially."""
  handlers = {STATE: _state_handler(), META: ocp.JsonCheckpointHandler(), DATA: DataIteratorHandler()}
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not for_inference)
  return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir), options=options,
                               item_handlers=handlers)


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state, without allocating it."""
  shapes = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0)))
  sharding = parallel.replicated_sharding(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def save(manager: ocp.CheckpointManager, state: TrainState, config: ml_collections.ConfigDict,
         data_iterator: Any = None) -> None:
  """Saves `state` (and the data iterator's position) at the state's step, blocking until committed."""
  step = int(jax.device_get(state.step))
  meta = dict(compatibility_meta(config), **{CONFIG_KEY: _config_record(config)})
  items = {STATE: ocp.args.PyTreeSave(state), META: ocp.args.JsonSave(meta)}
  if data_iterator is not None and hasattr(data_iterator, 'save_state'):
    items[DATA] = DataIteratorSave(data_iterator)
  quiet = _OrbaxFailureFilter()
  loggers = [py_logging.getLogger(name) for name in ('absl', 'asyncio')]
  for logger in loggers:
    logger.addFilter(quiet)
  try:
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore: ValueError, OSError, ...)
    # Leave the filter installed: orbax's failed asyncio tasks report again when they are collected.
    raise _write_error(manager, step, e) from e
  for logger in loggers:
    logger.removeFilter(quiet)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the previous checkpoints are intact."""


class _OrbaxFailureFilter(py_logging.Filter):
  """Drops orbax's error records (tracebacks of its writer threads and failed asyncio tasks) during a
  save: the failure is raised once, as `CheckpointWriteError`, with the reason and what to do."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR:
      return True
    return f'{os.sep}orbax{os.sep}' not in record.pathname and 'orbax' not in record.getMessage()


def _write_error(manager: ocp.CheckpointManager, step: int, e: Exception) -> CheckpointWriteError:
  full = getattr(e, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(e)
  what = 'no space left on device' if full else _reason(e)
  try:
    manager.reload()
    previous = [s for s in manager.all_steps() if s != step]
  except Exception:  # pylint: disable=broad-except  (the message matters more than the list)
    previous = []
  resume = f'the last complete checkpoint, step {max(previous)}' if previous else 'step 0 (none is complete)'
  return CheckpointWriteError(
      f'the checkpoint of step {step} could not be written to {manager.directory}: {what}. '
      f'{"Free some space or choose another --workdir" if full else "Fix the cause"}, then rerun: '
      f'training resumes from {resume}.')


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The meta item of `step`; DamagedCheckpointError if it cannot be read."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  except Exception as e:  # orbax / tensorstore raise many types for missing or damaged files
    raise DamagedCheckpointError(f'its meta item cannot be read ({_reason(e)})') from e


def _reason(e: BaseException) -> str:
  # TensorStore appends a spec of several kilobytes to "Encountered error while reading array index".
  text = ' '.join(str(e).split()).split(' See full TensorStore details')[0]
  return f'{type(e).__name__}: {text[:300]}{"..." if len(text) > 300 else ""}'


# What the reads of a failed restore leave behind (see _ignore_late_reads_of_failed_restores).
_LOOP_CLOSED = 'Event loop is closed'
_READ_FAILED = 'Encountered error while reading array index'  # orbax's message for a failed array read


def _ignore_late_reads_of_failed_restores() -> None:
  """Keeps the leftovers of a failed restore out of stderr (installed once, for the process).

  When one array of a step fails to read, orbax's restore raises and closes its asyncio event loop while
  the step's other reads are still running: each read that fails too leaves its exception in a coroutine
  nobody awaits any more, and each that completes calls back into the closed loop from a tensorstore
  thread (RuntimeError('Event loop is closed')). Python prints all of them as ignored exceptions, each
  with TensorStore's multi-kilobyte spec: hundreds of lines for one damaged step, after the one warning
  that already names the step and the reason. Exactly these two kinds are dropped; any other unraisable
  exception reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'ddpm_jax_filter', False):
    return

  def hook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    late_read = (isinstance(exc, RuntimeError) and str(exc) == _LOOP_CLOSED) or str(exc).startswith(_READ_FAILED)
    if not late_read:
      previous(unraisable)

  hook.ddpm_jax_filter = True
  sys.unraisablehook = hook


def _restore_newest(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict,
                    restore_step: Any, *, set_aside: bool) -> tuple[Any, int] | None:
  """(restore_step(step, meta), step) of the newest step that restores completely; None if none.

  Steps that fail to restore are skipped with a warning naming them and the reason; once an older
  step restored, the skipped (damaged) ones are renamed `<step>.damaged-<time>` when `set_aside`
  (process 0 only). A step written with an incompatible config is an error, not damage.

  Raises:
    ValueError: the newest readable step does not fit `config` (every differing field is named).
    DamagedCheckpointError: steps exist but none restores; lists each step and why.
  """
  failures, first_diffs = [], None
  _ignore_late_reads_of_failed_restores()
  for step in sorted(manager.all_steps(), reverse=True):
    path = _step_path(manager, step)
    try:
      meta = _read_meta(manager, step)
    except DamagedCheckpointError as e:
      failures.append((step, path, str(e)))
      logging.warning('Checkpoint %s is damaged: %s. Trying the previous step.', path, e)
      continue
    check_compatible(meta, config, path)
    saved_config = _saved_config(meta, str(manager.directory))
    diffs = config_differences(saved_config, config) if saved_config is not None else []
    first_diffs = diffs if first_diffs is None else first_diffs
    if any('changes the structure' in d for d in diffs):
      raise ValueError(f'checkpoint {path} cannot be restored with this config: fields that change the '
                       'structure of the train state differ from the config it was saved with; set '
                       'them back or use another --workdir. Differences:\n  ' + '\n  '.join(diffs))
    try:
      restored = restore_step(step, meta)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read the step's files)
      failures.append((step, path, _reason(e)))
      logging.warning('Checkpoint %s does not restore: %s. Trying the previous step.', path, _reason(e))
      continue
    for bad_step, bad_path, reason in failures:
      if set_aside and parallel.is_writer():
        aside = workdir_lib.set_aside(bad_path)
        logging.warning('Skipped the damaged checkpoint step %d (%s); kept it as %s for inspection.',
                        bad_step, reason, aside)
      else:
        logging.warning('Skipped the damaged checkpoint step %d (%s) at %s.', bad_step, reason, bad_path)
    if failures:
      manager.reload()
      logging.warning('Using the checkpoint at step %d instead.', step)
    return restored, step
  if not failures:
    return None
  lines = [f'step {step} ({path}): {reason}' for step, path, reason in failures]
  if first_diffs:  # every step failing alike may be a change of config rather than damage
    lines.append('fields that differ from the config of the newest step:\n    ' + '\n    '.join(first_diffs))
  raise DamagedCheckpointError(
      f'no checkpoint in {manager.directory} restores completely; move the damaged steps aside (or '
      'use another --workdir) to start from scratch. Steps tried:\n  ' + '\n  '.join(lines))


def restore_for_training(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict, mesh: Mesh,
                         data_iterator: Any = None) -> TrainState | None:
  """The newest checkpoint's whole state on `mesh` (None if there is none); checks the config first.

  `data_iterator`, if given, is moved to the saved position when the checkpoint holds one. A step
  that does not restore completely (weights, optimizer state or data position) is set aside as
  `<step>.damaged-<time>` and the previous one is used (see `_restore_newest`).
  """
  target = abstract_train_state(config, mesh)

  def restore_step(step: int, meta: dict[str, Any]) -> TrainState:
    del meta
    items = {STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))}
    if (data_iterator is not None and hasattr(data_iterator, 'restore_state')
        and os.path.isdir(os.path.join(_step_path(manager, step), DATA))):
      items[DATA] = DataIteratorRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))[STATE]

  found = _restore_newest(manager, config, restore_step, set_aside=True)
  return None if found is None else found[0]


def restore_for_inference(workdir: str, config: ml_collections.ConfigDict,
                          mesh: Mesh) -> tuple[Any, Any, int]:
  """(params, ema_params, step) of the latest checkpoint of `workdir`, replicated on `mesh`.

  Reads neither the optimizer moments nor the data position. A clear error if there is no checkpoint.
  """
  manager = create_manager(workdir, keep=config.training.keep_checkpoints, for_inference=True)
  state = abstract_train_state(config, mesh)
  target = {name: getattr(state, name) for name in INFERENCE_FIELDS}

  def restore_step(step: int, meta: dict[str, Any]) -> Any:
    del meta
    return manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))[STATE]

  # Damaged steps are skipped, not set aside: only a training run (the writer of checkpoints) moves them.
  found = _restore_newest(manager, config, restore_step, set_aside=False)
  manager.close()
  if found is None:
    raise FileNotFoundError(f'no checkpoint in {workdir_lib.checkpoint_dir(workdir)}: train first '
                            '(--mode=train) or convert an official one (python -m '
                            'ddpm_jax.convert_tf_checkpoint)')
  restored, step = found
  return restored['params'], restored['ema_params'], step


def restore_sampling_params(workdir: str, config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[Any, int]:
  """(the weights to sample with, checkpoint step): the EMA weights if config.sampling.use_ema."""
  params, ema_params, step = restore_for_inference(workdir, config, mesh)
  return (ema_params if config.sampling.use_ema else params), step


def save_converted(workdir: str, config: ml_collections.ConfigDict, params: Any, ema_params: Any) -> str:
  """Writes converted weights (e.g. the official TF DDPM checkpoints) as a step-0 checkpoint of `workdir`.

  The optimizer state is fresh, so `--mode=train` on this workdir fine-tunes from these weights, and
  `--mode=sample` / `--mode=eval` load them exactly as a checkpoint trained here.
  """
  mesh = parallel.create_mesh()
  state = create_train_state(config, jax.random.key(config.seed))
  state = state.replace(params=params, ema_params=ema_params)
  state = parallel.replicate(state, mesh)
  manager = create_manager(workdir, keep=config.training.keep_checkpoints)
  if manager.latest_step() is not None:
    raise FileExistsError(f'{workdir_lib.checkpoint_dir(workdir)} already holds checkpoints; choose an '
                          'empty --workdir so that nothing saved is overwritten')
  save(manager, state, config)
  return os.path.join(workdir_lib.checkpoint_dir(workdir), '0')
