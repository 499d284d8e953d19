r"""Sampling throughput: ancestral (DDPM Alg. 2), respaced (iDDPM §4) and DDIM, on all local devices.

  python bench/sample_throughput.py --config=configs/cifar10.py --batch_size=256 --dtype=bfloat16 \
      --methods=ancestral,ddim50,ddim100,respaced50,respaced100 --repeats=3 --out=/tmp/sample_cifar10.json

A method is `ancestral` (all T steps), `respacedK` (ancestral over K respaced steps, config
`sampling.timestep_respacing='K'`) or `ddimK` (DDIM, eta from the config, respacing 'ddimK'). Each runs
the project's `make_sample_fn` (one compiled `fori_loop` over the steps) on random-weight parameters:
the work per step does not depend on the weights, so neither does the speed.

Per method: trace / lower / XLA-compile seconds of the compile run (from jax.monitoring), then the median
and min/max of `--repeats` timed runs (each ends with `block_until_ready` and runs under
`jax.transfer_guard('disallow')`), images/s, seconds per 1,000 images and the time `--num_images`
samples would take at the measured rate (an extrapolation). `--ancestral_timesteps=N` runs the
ancestral chain with T = N instead of the config's T and scales the time by T / N: every ancestral step
costs one network evaluation and the same update, whatever T is (say so when you report it). Achieved
TFLOP/s count the network's forward FLOPs (XLA cost analysis of the forward pass as lowered) times the
steps.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import time
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

from bench import common  # pylint: disable=g-import-not-at-top
from ddpm_jax import diffusion, models, parallel, sampling  # pylint: disable=g-import-not-at-top
from ddpm_jax.config import validate_config  # pylint: disable=g-import-not-at-top
from ddpm_jax.streams import SAMPLE_STREAM, stream_key  # pylint: disable=g-import-not-at-top

common.define_common_flags(flags)
flags.DEFINE_list('methods', ['ancestral', 'ddim50', 'ddim100', 'respaced50', 'respaced100'],
                  'Samplers to time: ancestral, respacedK, ddimK.')
flags.DEFINE_integer('repeats', 3, 'Timed runs per method after the compile run (>= 3 for a benchmark).')
flags.DEFINE_integer('ancestral_timesteps', None,
                     'Run `ancestral` with this T and extrapolate to the config\'s T (for slow machines).')
flags.DEFINE_integer('num_images', 50_000, 'Extrapolate the time to sample this many images.')
FLAGS = flags.FLAGS

MIN_REPEATS = 3
_METHOD = re.compile(r'^(ancestral|respaced(\d+)|ddim(\d+))$')


def method_config(config: ml_collections.ConfigDict, method: str,
                  ancestral_timesteps: int | None) -> tuple[ml_collections.ConfigDict, int, int]:
  """(config for `method`, steps it runs, steps it stands for) from a method name."""
  match = _METHOD.match(method)
  if match is None:
    raise ValueError(f'--methods: {method!r} is not ancestral, respacedK or ddimK')
  config = copy.deepcopy(config)
  target_steps = config.diffusion.num_timesteps
  if match.group(2):
    config.sampling.method, config.sampling.timestep_respacing = 'ancestral', match.group(2)
  elif match.group(3):
    config.sampling.method, config.sampling.timestep_respacing = 'ddim', f'ddim{match.group(3)}'
  else:
    config.sampling.method, config.sampling.timestep_respacing = 'ancestral', ''
    if ancestral_timesteps:
      config.diffusion.num_timesteps = ancestral_timesteps
  steps = len(diffusion.space_timesteps(config.diffusion.num_timesteps, config.sampling.timestep_respacing))
  if config.sampling.timestep_respacing:
    target_steps = steps
  return config, steps, target_steps


def forward_flops_per_image(model: Any, params: Any, config: ml_collections.ConfigDict,
                            batch_size: int) -> float | None:
  """The network's forward FLOPs per image: XLA cost analysis of the eval-mode forward pass as lowered."""
  size, channels = config.data.image_size, config.data.num_channels
  x = jnp.zeros((batch_size, size, size, channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  forward = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False))
  flops = common.lowered_flops(forward.lower(params, x, t))
  return None if flops is None else flops / batch_size


def time_sampler(config: ml_collections.ConfigDict, model: Any, inputs: dict[str, Any], repeats: int,
                 events: common.CompileEvents) -> dict[str, Any]:
  """Compile run (timed by phase), then `repeats` timed runs of the sampler built from `config`."""
  sample_fn = sampling.make_sample_fn(config, model, inputs['mesh'])
  args = (inputs['params'], inputs['key'], inputs['indices'])
  mark, start = events.mark(), time.perf_counter()
  samples = jax.block_until_ready(sample_fn(*args))
  out = {'first_run_s': time.perf_counter() - start, **events.durations_since(mark)}
  mark, seconds = events.mark(), []
  with jax.transfer_guard('disallow'):
    for _ in range(repeats):
      start = time.perf_counter()
      samples = jax.block_until_ready(sample_fn(*args))
      seconds.append(time.perf_counter() - start)
  out['recompiles'] = events.compiles_since(mark)
  out['host_transfers_in_timed_runs'] = common.transfer_guard_note()
  out['batch_s'] = common.summary(seconds)
  if not np.isfinite(np.asarray(jax.device_get(samples))).all():
    raise FloatingPointError(f'{config.sampling.method} produced non-finite samples')
  return out


def rates(timing: dict[str, Any], batch_size: int, steps: int, target_steps: int, num_images: int,
          flops_per_image_step: float | None) -> dict[str, Any]:
  """images/s (scaled to `target_steps`), s per 1,000 images, time for `num_images`, TFLOP/s."""
  batch_s, scale = timing['batch_s'], steps / target_steps  # the slowest run gives the min rate
  images_per_s = {'median': batch_size / batch_s['median'] * scale,
                  'min': batch_size / batch_s['max'] * scale, 'max': batch_size / batch_s['min'] * scale}
  achieved = None
  if flops_per_image_step is not None:
    achieved = flops_per_image_step * steps * batch_size / timing['batch_s']['median']
  return {'images_per_s': images_per_s, 's_per_1000_images': 1000 / images_per_s['median'],
          'time_for_num_images_s': num_images / images_per_s['median'],
          'achieved_tflops': None if achieved is None else achieved / 1e12}


def prepare(config: ml_collections.ConfigDict, batch_size: int) -> tuple[Any, dict[str, Any]]:
  """The model and the device-resident sampler inputs: random params, the key and the indices."""
  mesh = parallel.create_mesh(jax.local_devices())
  validate_config(config, num_devices=mesh.devices.size, num_processes=jax.process_count())
  parallel.check_batch_divisible(batch_size, mesh, '--batch_size')
  model = models.create_model(config)
  repl = parallel.replicated_sharding(mesh)
  params = models.init_params(model, jax.random.key(config.seed), config.data.image_size,
                              config.data.num_channels)
  indices = jnp.arange(batch_size, dtype=jnp.int32)
  return model, {'mesh': mesh, 'params': jax.device_put(params, repl),
                 'key': jax.device_put(stream_key(config, SAMPLE_STREAM), repl),
                 'indices': jax.device_put(indices, parallel.data_sharding(mesh))}


def benchmark(config: ml_collections.ConfigDict, methods: list[str], batch_size: int, repeats: int,
              ancestral_timesteps: int | None, num_images: int) -> dict[str, Any]:
  """Times every method; returns the shared figures and one entry per method."""
  if repeats < 1:
    raise ValueError('--repeats must be >= 1')
  model, inputs = prepare(config, batch_size)
  num_devices = inputs['mesh'].devices.size
  flops = forward_flops_per_image(model, inputs['params'], config, max(1, batch_size // num_devices))
  events = common.CompileEvents()
  device_kind = jax.local_devices()[0].device_kind
  results = []
  for method in methods:
    method_cfg, steps, target_steps = method_config(config, method, ancestral_timesteps)
    entry = {'method': method, 'sampling_method': method_cfg.sampling.method,
             'timestep_respacing': method_cfg.sampling.timestep_respacing, 'steps': target_steps,
             'measured_steps': steps, 'extrapolated': steps != target_steps}
    entry.update(time_sampler(method_cfg, model, inputs, repeats, events))
    entry.update(rates(entry, batch_size, steps, target_steps, num_images, flops))
    tflops = entry['achieved_tflops']
    entry.update(common.mfu(None if tflops is None else tflops * 1e12, device_kind, config.model.dtype,
                            num_devices))
    results.append(entry)
  out = {'num_params': models.count_params(inputs['params']), 'forward_flops_per_image': flops,
         'forward_flops_source': 'XLA cost_analysis of the forward pass (train=False) as lowered',
         'params_note': 'random-weight parameters: the work per step does not depend on the weights',
         'methods': results}
  out.update(common.peak_memory())
  return out


def fmt_duration(seconds: float) -> str:
  if seconds >= 3600:
    return f'{seconds / 3600:.1f} h'
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.1f} s'


def markdown(record: dict[str, Any]) -> str:
  """One table row per method (with header)."""
  header = ['config', 'dtype', 'batch', 'devices', 'method', 'steps', 'trace + lower + compile s',
            'images/s (median [min–max])', 's / 1,000 images', f'{record["num_images"]:,} images',
            'TFLOP/s', 'MFU', 'note']
  rows = []
  for m in record['methods']:
    note = f'extrapolated from {m["measured_steps"]} steps' if m['extrapolated'] else 'measured'
    rows.append([record['config'], record['dtype'], str(record['batch_size']),
                 f'{record["devices"]["count"]}× {record["devices"]["kind"]}', m['method'], str(m['steps']),
                 f'{m["trace_s"]:.1f} + {m["lower_s"]:.1f} + {m["compile_s"]:.1f}',
                 common.fmt_range(m['images_per_s']), common.fmt(m['s_per_1000_images']),
                 fmt_duration(m['time_for_num_images_s']), common.fmt(m['achieved_tflops']),
                 'n/a' if m['mfu'] is None else f'{100 * m["mfu"]:.1f}%', note])
  return common.markdown_table(header, rows)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  dtype = common.apply_dtype(config, FLAGS.dtype)
  batch_size = config.sampling.batch_size = FLAGS.batch_size or config.sampling.batch_size
  if config.sampling.samples_per_shard % batch_size:  # the benchmark writes no shards: any batch will do
    config.sampling.samples_per_shard = batch_size
  runtime = common.configure_runtime(config)
  record = common.run_metadata(common.config_name(FLAGS))
  record['runtime'] = runtime
  record.update({'benchmark': 'sample_throughput', 'batch_size': batch_size, 'dtype': dtype,
                 'repeats': FLAGS.repeats, 'num_images': FLAGS.num_images,
                 'ancestral_timesteps': FLAGS.ancestral_timesteps})
  if FLAGS.repeats < MIN_REPEATS:
    record['note'] = f'smoke run: {FLAGS.repeats} < {MIN_REPEATS} repeats'
  record.update(benchmark(config, FLAGS.methods, batch_size, FLAGS.repeats, FLAGS.ancestral_timesteps,
                          FLAGS.num_images))
  record['machine']['load_average_1m_at_end'] = round(os.getloadavg()[0], 2)
  common.write_json(record, FLAGS.out)
  print(markdown(record))


if __name__ == '__main__':
  app.run(main)
