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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from ddpm_jax import parallel, workdir as workdir_lib
from ddpm_jax.train.state import TrainState, create_train_state

# Fields of the config that a checkpoint must agree with (everything else may change on resume).
COMPATIBILITY_FIELDS = ('model', 'diffusion', 'data.image_size', 'data.num_channels',
                        'training.importance_sampling', 'optim.optimizer')
# Recorded, but free to change between runs: how the network is computed, not what it computes
# (e.g. train in float32, sample in bfloat16 with cuDNN attention).
RUNTIME_FIELDS = frozenset({'model.dtype', 'model.attn_implementation'})
STATE, DATA, META = 'state', 'data', 'meta'
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


def check_compatible(saved: dict[str, Any], config: ml_collections.ConfigDict, path: str) -> None:
  """Raises ValueError listing every field where `config` differs from the checkpoint's."""
  current, saved = _flatten(compatibility_meta(config)), _flatten(_lists(saved))
  diffs = [f'{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}'
           for k in sorted((set(current) | set(saved)) - RUNTIME_FIELDS)
           if current.get(k) != saved.get(k)]
  if diffs:
    raise ValueError(f'checkpoint {path} was written with a different config; use another --workdir or '
                     'restore the original config. Differences:\n  ' + '\n  '.join(diffs))


# --- managers, save, restore -----------------------------------------------------------------------

def create_manager(workdir: str, keep: int = 3, *, for_inference: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of <workdir>/checkpoints; `for_inference` reads the state partially."""
  state_handler = ocp.PyTreeCheckpointHandler() if for_inference else ocp.StandardCheckpointHandler()
  handlers = {STATE: state_handler, META: ocp.JsonCheckpointHandler(), DATA: DataIteratorHandler()}
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
  items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(compatibility_meta(config))}
  if data_iterator is not None and hasattr(data_iterator, 'save_state'):
    items[DATA] = DataIteratorSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()


def _checked_latest(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict) -> int | None:
  """The latest step, after checking its meta against `config`; None if there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
  check_compatible(meta, config, os.path.join(str(manager.directory), str(step)))
  return step


def restore_for_training(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict, mesh: Mesh,
                         data_iterator: Any = None) -> TrainState | None:
  """The latest checkpoint's whole state on `mesh` (None if there is none); checks the config first.

  `data_iterator`, if given, is moved to the saved position when the checkpoint holds one.
  """
  step = _checked_latest(manager, config)
  if step is None:
    return None
  path = os.path.join(str(manager.directory), str(step))
  items = {STATE: ocp.args.StandardRestore(abstract_train_state(config, mesh))}
  if (data_iterator is not None and hasattr(data_iterator, 'restore_state')
      and os.path.isdir(os.path.join(path, DATA))):
    items[DATA] = DataIteratorRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'checkpoint {path} does not match the train state of this config: {e}') from e
  return restored[STATE]


def restore_for_inference(workdir: str, config: ml_collections.ConfigDict,
                          mesh: Mesh) -> tuple[Any, Any, int]:
  """(params, ema_params, step) of the latest checkpoint of `workdir`, replicated on `mesh`.

  Reads neither the optimizer moments nor the data position. A clear error if there is no checkpoint.
  """
  manager = create_manager(workdir, keep=config.training.keep_checkpoints, for_inference=True)
  step = _checked_latest(manager, config)
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir_lib.checkpoint_dir(workdir)}: train first '
                            '(--mode=train) or convert an official one (python -m '
                            'ddpm_jax.convert_tf_checkpoint)')
  state = abstract_train_state(config, mesh)
  target = {name: getattr(state, name) for name in INFERENCE_FIELDS}
  path = os.path.join(str(manager.directory), str(step))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))[STATE]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'checkpoint {path} does not match the network of this config: {e}') from e
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
