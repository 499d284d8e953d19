"""The jobs behind `main.py --mode=...`, the one set-up they share, and the table that dispatches them.

Each job is `job(config, workdir, mesh)`: it decides what to compute, calls the libraries, and is the
only code that reads or writes the workdir (through `ddpm_jax.workdir` and `ddpm_jax.checkpoints`).
No job calls another; `train_and_evaluate` composes the training job with the evaluation of the EMA
weights it holds in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from ddpm_jax import parallel, runtime
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.config import validate_config
from ddpm_jax.jobs import evaluate, interpolate, progressive, sample, train

Job = Callable[[ml_collections.ConfigDict, str, Mesh], Any]


def setup(config: ml_collections.ConfigDict) -> Mesh:
  """Once per process, before any job: hosts, the CPU runtime, the mesh, the config checked.

  Joins the other hosts first (`training.distributed`: nothing may touch a device before), applies
  `runtime.configure_runtime` (CPU devices, compilation cache), builds the mesh of all devices and
  validates the whole config against it. Returns the mesh. TensorFlow is not imported here: the paths
  that need it go through `ddpm_jax.data.tf_cpu_only`, which hides every GPU / TPU from it first.
  """
  parallel.maybe_initialize_distributed(config.training.distributed)
  runtime.configure_runtime(config)
  mesh = parallel.create_mesh()
  validate_config(config, num_devices=mesh.devices.size, num_processes=jax.process_count())
  logging.info('JAX %s: process %d/%d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  return mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh,
                       **train_kwargs: Any) -> Any:
  """The training job, then (config.training.final_eval, once every step is done) the evaluation job
  on the weights still in memory (EMA unless config.sampling.use_ema is off); prints the final
  metrics. Returns the train state."""
  if config.training.final_eval:
    evaluate.check_inputs(config)  # a missing input of the final evaluation fails before training
  state = train.train(config, workdir, mesh, **train_kwargs)
  step = int(jax.device_get(state.step))
  if config.training.final_eval and step == config.training.num_train_steps:
    params = state.ema_params if config.sampling.use_ema else state.params
    results = evaluate.evaluate(config, workdir, mesh, params=params, step=step)
    if parallel.is_writer():
      print('Final evaluation:', json.dumps(results, indent=1, default=str), flush=True)
      print('\n'.join(final_summary(config, workdir, results, step)), flush=True)
  return state


def final_summary(config: ml_collections.ConfigDict, workdir: str, results: dict[str, Any],
                  step: int) -> list[str]:
  """One line per artefact or number of the final evaluation, saying where it is or what it means."""
  lines = []
  grid = workdir_lib.grid_path(workdir, step)
  if os.path.exists(grid):
    lines.append(f'Samples: {grid} ({config.training.num_grid_samples} EMA samples after step {step})')
  if 'digits_fid' in results:
    r = results['digits_fid']
    lines.append(f'digits Fréchet distance {r["frechet_distance"]:.4f} of {r["num_samples"]} samples '
                 f'(lower is better; the real-data floor is {r["floor_frechet_distance"]:.4f})')
    lines.append(f'classifier IS {r["classifier_is"]:.2f} (higher is better, at most 10; the held-out '
                 f'digits score {r["test_classifier_is"]:.2f})')
  if 'fid' in results:
    r = results['fid']
    lines.append(f'FID {r["fid"]:.2f} of {r["num_samples"]} samples (lower is better; the papers\' '
                 'numbers use 50,000)')
    lines.append(f'Inception Score {r["inception_score"]:.2f} (higher is better)')
  if 'bpd' in results:
    r = results['bpd']
    for split in (config.data.eval_split, config.data.train_split):
      if f'{split}_bpd' in r:
        lines.append(f'{split} bits/dim {r[f"{split}_bpd"]:.3f} (the variational bound on the negative '
                     f'log-likelihood of {r[f"{split}_num_examples"]} images; lower is better)')
  if 'rate_distortion' in results:
    lines.append(f'Rate-distortion curve: {results["rate_distortion"]["png"]}')
  lines.append(f'All metrics: {os.path.join(workdir_lib.eval_dir(workdir), workdir_lib.METRICS_FILE)}')
  return lines


JOBS: dict[str, Job] = {
    'train': train_and_evaluate,
    'sample': sample.sample,
    'eval': evaluate.evaluate,
    'progressive': progressive.progressive,
    'interpolate': interpolate.interpolate,
}


ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError)  # what a job reports as one message


# Every job writes into the workdir (checkpoints, samples, eval/, strips): one at a time per workdir.
@contextlib.contextmanager
def locked(workdir: str, mode: str = '') -> Iterator[None]:
  """Creates `workdir`, checks that it is writable and holds its lock while the block runs.

  Only process 0 takes the lock (the other hosts write nothing but their data positions, inside
  checkpoints process 0 commits). Raises workdir.WorkdirError / WorkdirLocked (naming the path, the
  reason, or the holder: host, pid, start time) before any expensive work.
  """
  if not parallel.is_writer():
    yield
    return
  with workdir_lib.lock(workdir, job=f'--mode={mode}' if mode else ''):
    yield


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> Any:
  """`setup`, the workdir's lock, then `JOBS[mode]`: what `main.py` does, for notebooks and tests."""
  if mode not in JOBS:
    raise ValueError(f'--mode={mode!r} is invalid: allowed: {sorted(JOBS)}')
  mesh = setup(config)
  with locked(workdir, mode):
    return JOBS[mode](config, workdir, mesh)
