r"""Training throughput of the DDPM train step on all local devices.

  python bench/train_throughput.py --config=configs/cifar10.py --batch_size=128 --dtype=bfloat16 \
      --windows=10 --steps_per_window=20 --warmup_steps=5 --out=/tmp/train_cifar10_bf16.json

What is timed is exactly what `ddpm_jax.jobs.train` runs: `ddpm_jax.train.step.jit_train_step`, with the
state replicated, the batch sharded over the `data` axis of the mesh and the state donated. The data
pipeline is not: one random batch in [-1, 1] stays on the devices (the loop prefetches, so it is off the
critical path).

Reported: trace / lower / XLA-compile times of the step (ahead of time, separately); steps/s and images/s
(median and min/max over `--windows` windows after `--warmup_steps` steps, each window ending with
`block_until_ready` on the state); FLOPs per step from XLA's cost analysis of the step as lowered; achieved
TFLOP/s and model FLOP utilisation against the device's peak; peak memory; and two checks of the timed
loop: `recompiles` (XLA compilations inside the windows, and the jit cache size, which must stay 1) and no
host transfer per step: the loop fetches nothing (metrics are dropped) and runs under
`jax.transfer_guard('disallow')`, which raises on any transfer on GPU/TPU and on host->device uploads on
CPU (where device memory is host memory, device->host copies are not guarded).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import

from bench import common  # pylint: disable=g-import-not-at-top
from ddpm_jax import diffusion, models, parallel, runtime  # pylint: disable=g-import-not-at-top
from ddpm_jax.config import validate_config  # pylint: disable=g-import-not-at-top
from ddpm_jax.streams import INIT_STREAM, TRAIN_STREAM, stream_key  # pylint: disable=g-import-not-at-top
from ddpm_jax.train.state import jit_create_train_state  # pylint: disable=g-import-not-at-top
from ddpm_jax.train.step import jit_train_step, make_train_step  # pylint: disable=g-import-not-at-top

common.define_common_flags(flags)
flags.DEFINE_integer('windows', 5, 'Timed windows (>= 5 for a benchmark; fewer is a smoke run).')
flags.DEFINE_integer('steps_per_window', 10, 'Train steps per timed window.')
flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps after compilation (>= 1).')
flags.DEFINE_string('profile_dir', None,
                    'If set, one more window (not timed) runs under jax.profiler.trace and writes a '
                    'TensorBoard / Perfetto trace here.')
FLAGS = flags.FLAGS

MIN_WINDOWS = 5


def setup(config: ml_collections.ConfigDict, mesh: Any,
          jit_step: Callable[..., Any] = jit_train_step) -> dict[str, Any]:
  """The jitted step (as the training loop builds it) and its device-resident inputs.

  jit_step: `ddpm_jax.train.step.jit_train_step`, or another module's of the same signature (an older
  revision's, for `bench/train_ab.py --step_module`).
  """
  repl = parallel.replicated_sharding(mesh)
  model = models.create_model(config)
  coefs = diffusion.coefficients_from_config(config.diffusion)
  step = jit_step(model, coefs, mesh, config.runtime.gradient_all_reduce, runtime.train_convolutions(config))
  state = jit_create_train_state(config, mesh)(stream_key(config, INIT_STREAM))
  c, size = config.data.num_channels, config.data.image_size
  rng = np.random.default_rng(config.seed)
  batch = rng.uniform(-1.0, 1.0, (config.training.batch_size, size, size, c)).astype(np.float32)
  return {'step': step, 'state': state, 'batch': parallel.shard_batch(batch, mesh),
          'key': jax.device_put(stream_key(config, TRAIN_STREAM), repl),
          'global_step': make_train_step(model, coefs)}


def step_flops(setup_: dict[str, Any]) -> float | None:
  """FLOPs of one train step over the global batch: XLA's cost analysis of the step as lowered.

  Of the plain step (`make_train_step`), jitted with no shardings: the program the analysis reads is then
  the whole batch's on any mesh (the flat gradient all-reduce would put the per-device part in a
  `shard_map`, which the analysis counts once), and it is read before the backend's passes
  (`common.lowered_flops`). Lowering only: nothing is compiled.
  """
  lowered = jax.jit(setup_['global_step']).lower(setup_['state'], setup_['batch'], setup_['key'])
  return common.lowered_flops(lowered)


def compile_step(setup_: dict[str, Any], events: common.CompileEvents) -> dict[str, Any]:
  """Lowers and compiles the step ahead of time, timing each part; the jit call then reuses it."""
  mark = events.mark()
  start = time.perf_counter()
  lowered = setup_['step'].lower(setup_['state'], setup_['batch'], setup_['key'])
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  memory = compiled.memory_analysis()
  out = {'lower_s': lowered_at - start, 'compile_s': compiled_at - lowered_at,
         'trace_s': events.durations_since(mark)['trace_s']}
  if memory is not None:
    out['compiled_memory_bytes'] = {
        'arguments': int(memory.argument_size_in_bytes), 'outputs': int(memory.output_size_in_bytes),
        'temporaries': int(memory.temp_size_in_bytes), 'aliased': int(memory.alias_size_in_bytes)}
  return out


def run_steps(setup_: dict[str, Any], num_steps: int, annotate: bool = False) -> None:
  """`num_steps` train steps, then waits for the state; fetches nothing (metrics are dropped)."""
  state = setup_['state']
  for i in range(num_steps):
    with jax.profiler.StepTraceAnnotation('train', step_num=i) if annotate else contextlib.nullcontext():
      state, _ = setup_['step'](state, setup_['batch'], setup_['key'])
  setup_['state'] = jax.block_until_ready(state)


def profile_window(setup_: dict[str, Any], steps: int, profile_dir: str) -> None:
  """One untimed window under the profiler (view: tensorboard --logdir, or ui.perfetto.dev)."""
  with jax.profiler.trace(profile_dir):
    run_steps(setup_, steps, annotate=True)
  logging.info('Wrote a profiler trace of %d steps to %s', steps, profile_dir)


def timed_windows(setup_: dict[str, Any], windows: int, steps_per_window: int) -> list[float]:
  """Seconds per window, under a transfer guard (see `common.transfer_guard_note`)."""
  seconds = []
  with jax.transfer_guard('disallow'):
    for _ in range(windows):
      start = time.perf_counter()
      run_steps(setup_, steps_per_window)
      seconds.append(time.perf_counter() - start)
  return seconds


def figures(seconds: list[float], steps_per_window: int, batch_size: int,
            flops_per_step: float | None, dtype: str, num_devices: int) -> dict[str, Any]:
  """Rates over the windows, FLOPs, achieved TFLOP/s and MFU."""
  steps_per_s = [steps_per_window / s for s in seconds]
  out = {'window_s': seconds, 'steps_per_s': common.summary(steps_per_s),
         'images_per_s': common.summary([batch_size * r for r in steps_per_s]),
         'flops_per_step': None, 'flops_per_image': None, 'achieved_tflops': None}
  achieved = None
  if flops_per_step is not None:
    out['flops_per_step'] = flops_per_step
    out['flops_per_image'] = out['flops_per_step'] / batch_size
    achieved = out['flops_per_step'] * out['steps_per_s']['median']
    out['achieved_tflops'] = achieved / 1e12
  out.update(common.mfu(achieved, jax.local_devices()[0].device_kind, dtype, num_devices))
  return out


def benchmark(config: ml_collections.ConfigDict, windows: int, steps_per_window: int,
              warmup_steps: int, profile_dir: str | None = None) -> dict[str, Any]:
  """Compiles, warms up and times the train step for `config`; returns the figures."""
  if warmup_steps < 1 or steps_per_window < 1 or windows < 1:
    raise ValueError('--warmup_steps, --steps_per_window and --windows must be >= 1')
  mesh = parallel.create_mesh(jax.local_devices())
  num_devices = mesh.devices.size
  validate_config(config, num_devices=num_devices, num_processes=jax.process_count())
  events = common.CompileEvents()
  setup_ = setup(config, mesh)
  result = {'num_params': models.count_params(setup_['state'].params)}
  result.update(compile_step(setup_, events))
  result['flops_source'] = 'XLA cost_analysis of the global train step as lowered'
  start = time.perf_counter()
  run_steps(setup_, warmup_steps)
  result['warmup_s'] = time.perf_counter() - start
  mark = events.mark()
  seconds = timed_windows(setup_, windows, steps_per_window)
  result['recompiles'] = events.compiles_since(mark)  # XLA compilations inside the timed windows
  result['jit_cache_size'] = common.cache_size(setup_['step'])  # 1: one executable for every step
  result['host_transfers_in_timed_loop'] = common.transfer_guard_note()
  profiled = 0
  if profile_dir:
    profile_window(setup_, steps_per_window, profile_dir)
    profiled, result['profile_dir'] = steps_per_window, profile_dir
  steps_done = int(jax.device_get(setup_['state'].step))
  if steps_done != warmup_steps + windows * steps_per_window + profiled:
    raise AssertionError(f'state.step={steps_done}: not every dispatched step ran')
  result.update(figures(seconds, steps_per_window, config.training.batch_size,
                        step_flops(setup_), config.model.dtype, num_devices))
  result.update(common.peak_memory())
  return result


def markdown(record: dict[str, Any]) -> str:
  """One table row (with header) summarising `record`."""
  header = ['config', 'dtype', 'batch', 'devices', 'params', 'lower + compile s',
            'steps/s (median [min–max])',
            'images/s', 'GFLOP/step', 'TFLOP/s', 'MFU', 'peak memory', 'recompiles']
  mfu_cell = 'n/a (no peak for this device)' if record['mfu'] is None else f'{100 * record["mfu"]:.1f}%'
  gflop = None if record['flops_per_step'] is None else record['flops_per_step'] / 1e9
  row = [record['config'], record['dtype'], str(record['batch_size']),
         f'{record["devices"]["count"]}× {record["devices"]["kind"]}', f'{record["num_params"] / 1e6:.2f}M',
         f'{record["lower_s"]:.2f} + {record["compile_s"]:.2f}', common.fmt_range(record['steps_per_s']),
         common.fmt(record['images_per_s']['median']), common.fmt(gflop, '.4g'),
         common.fmt(record['achieved_tflops']), mfu_cell,
         f'{common.fmt_bytes(record["peak_memory_bytes"])}'
         + (' (max RSS)' if 'RSS' in record['peak_memory_source'] else ''),
         str(record['recompiles'])]
  return common.markdown_table(header, [row])


def main(argv: list[str]) -> None:
  config, record = common.start_run(FLAGS, argv, 'train_throughput')
  record.update({'windows': FLAGS.windows, 'steps_per_window': FLAGS.steps_per_window,
                 'warmup_steps': FLAGS.warmup_steps})
  if FLAGS.windows < MIN_WINDOWS:
    logging.warning('--windows=%d < %d: a smoke run, not a benchmark.', FLAGS.windows, MIN_WINDOWS)
    record['note'] = f'smoke run: {FLAGS.windows} < {MIN_WINDOWS} windows'
  record.update(benchmark(config, FLAGS.windows, FLAGS.steps_per_window, FLAGS.warmup_steps,
                          FLAGS.profile_dir))
  record['machine']['load_average_1m_at_end'] = round(os.getloadavg()[0], 2)
  common.write_json(record, FLAGS.out)
  print(markdown(record))


if __name__ == '__main__':
  app.run(main)
