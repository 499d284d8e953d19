"""Checkpoints with orbax: the whole `TrainState` plus the config it was trained with.

Layout: `<workdir>/checkpoints/<step>/{state, meta}`. Orbax writes each step to a temporary directory and
renames it when complete, so an interrupted save never replaces the last good checkpoint. `meta` holds the
fields that define the state's shapes and meaning (model, diffusion, data geometry); restoring into a
different config is an error that lists the fields that differ.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from ddpm_jax import parallel
from ddpm_jax.train.state import TrainState, create_train_state

# Fields of the config that a checkpoint must agree with (everything else may change on resume).
COMPATIBILITY_FIELDS = ('model', 'diffusion', 'data.image_size', 'data.num_channels',
                        'training.importance_sampling', 'optim.optimizer')
# Recorded, but free to change between runs: how the network is computed, not what it computes
# (e.g. train in float32, sample in bfloat16 with cuDNN attention).
RUNTIME_FIELDS = frozenset({'model.dtype', 'model.attn_implementation'})


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, keep: int = 3) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


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


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state, without allocating it."""
  shapes = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0)))
  sharding = parallel.replicated_sharding(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def save(manager: ocp.CheckpointManager, state: TrainState, config: ml_collections.ConfigDict,
         *, force: bool = True) -> None:
  """Saves `state` at its step (blocking until it is complete and renamed into place)."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(compatibility_meta(config))),
               force=force)
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> TrainState | None:
  """The latest checkpoint's state placed on `mesh`, or None if there is none; checks the config first."""
  step = manager.latest_step()
  if step is None:
    return None
  path = os.path.join(str(manager.directory), str(step))
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  check_compatible(meta, config, path)
  target = abstract_train_state(config, mesh)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f'checkpoint {path} does not match the train state of this config: {e}') from e
  return restored.state


def load_for_inference(workdir: str, config: ml_collections.ConfigDict, mesh: Mesh) -> TrainState:
  """The latest state of `workdir` for sampling / evaluation; a clear error if there is none."""
  manager = create_manager(workdir, keep=config.training.keep_checkpoints)
  state = restore_latest(manager, config, mesh)
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoint_dir(workdir)}: train first (--mode=train) or '
                            'convert an official one (python -m ddpm_jax.convert_tf_checkpoint)')
  return state


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
    raise FileExistsError(f'{checkpoint_dir(workdir)} already holds checkpoints; choose an empty --workdir '
                          'so that nothing saved is overwritten')
  save(manager, state, config)
  return os.path.join(checkpoint_dir(workdir), '0')
