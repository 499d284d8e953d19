r"""What the train step (or one network evaluation) compiles to on a target device, with no such device.

  # An H100, from a machine without a GPU (deviceless ahead-of-time compilation; see bench/README.md):
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python bench/compile_report.py --config=configs/cifar10.py \
      --what=train --batch_size=128 --dtype=bfloat16 --target=bench/targets/h100_sxm.txtpb --out=r.json
  # The local device (CPU in the tests):
  python bench/compile_report.py --config=configs/tiny.py --what=train --target=local

XLA compiles `--what` exactly as the project runs it (`train`: `ddpm_jax.train.step.jit_train_step`;
`forward`: the eval-mode U-Net, i.e. the cost of one sampling step but its elementwise update) for the
target, and the report reads the optimized executable (`hlo_kernels.py`): the kernels one run launches, by
kind and by the part of the network they come from, each kernel's bytes (operands read once, result
written once), and XLA's memory analysis (arguments, temporaries: whether the batch fits).

From these and the device's datasheet peaks comes a *floor*, not a measurement: with kernels run one after
another, memory-bound kernels take at least bytes / bandwidth and the matrix kernels at least
max(FLOPs / peak, bytes / bandwidth). No run on the device can beat it; launch gaps, imperfect overlap of
loads and math, and cuDNN / cuBLAS efficiency come on top. FLOPs come from XLA's cost analysis of the same
function lowered for the local CPU (a deviceless executable has no cost analysis). A timed run on the
device (`train_throughput.py`, `sample_throughput.py`) replaces all of this when one is available.
"""

from __future__ import annotations

import copy
import os
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
from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

from bench import common, hlo_kernels  # pylint: disable=g-import-not-at-top
from ddpm_jax import diffusion, models, parallel, runtime  # pylint: disable=g-import-not-at-top
from ddpm_jax.config import validate_config  # pylint: disable=g-import-not-at-top
from ddpm_jax.train.state import create_train_state  # pylint: disable=g-import-not-at-top
from ddpm_jax.train.step import jit_train_step  # pylint: disable=g-import-not-at-top

common.define_common_flags(flags)
flags.DEFINE_enum('what', 'train', ['train', 'forward'],
                  'train: the train step (forward, backward, Adam, EMA); forward: one eval-mode network '
                  'evaluation (what each sampling step costs).')
flags.DEFINE_string('target', 'local',
                    "'local' (this process's devices) or the path of an xla.GpuTargetConfigProto text "
                    'file describing a GPU to compile for without one (bench/targets/).')
flags.DEFINE_integer('top', 15, 'How many sources of memory-bound traffic to list.')
FLAGS = flags.FLAGS


def target_mesh(target: str) -> tuple[Mesh, str]:
  """A 1-device mesh of the target: the first local device, or a deviceless GPU from a target config."""
  if target == 'local':
    device = jax.local_devices()[0]
    return parallel.create_mesh([device]), device.device_kind
  if not os.path.isfile(target):
    raise ValueError(f"--target={target!r}: not 'local' and no such file (a GpuTargetConfigProto text "
                     'file, e.g. bench/targets/h100_sxm.txtpb)')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  with open(target) as f:
    target_config = f.read()
  try:
    topology = topologies.get_topology_desc(platform='cuda', target_config=target_config,
                                            topology='1x1x1')
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f'--target={target}: could not build a deviceless CUDA topology ({e}). It needs the CUDA plugin '
        '(pip install jax-cuda12-plugin==<jax version>; with no GPU and no cuDNN on this machine, set '
        'JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1).') from e
  mesh = topologies.make_mesh(topology, (1,), (parallel.DATA_AXIS,))
  return mesh, topology.devices[0].device_kind


def _placed(tree: Any, sharding: Any) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def lowered_function(config: ml_collections.ConfigDict, what: str, mesh: Mesh) -> Any:
  """`what`, jitted as the project runs it, lowered for `mesh` on abstract inputs (nothing allocated)."""
  model = models.create_model(config)
  repl, batch_sharding = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  size, channels = config.data.image_size, config.data.num_channels
  batch = jax.ShapeDtypeStruct((config.training.batch_size, size, size, channels), jnp.float32,
                               sharding=batch_sharding)
  if what == 'train':
    step = jit_train_step(model, diffusion.coefficients_from_config(config.diffusion), mesh,
                          config.runtime.gradient_all_reduce,
                          runtime.train_convolutions(config))
    state = jax.eval_shape(lambda key: create_train_state(config, key), jax.random.key(0))
    return step.lower(_placed(state, repl), batch, _placed(jax.eval_shape(jax.random.key, 0), repl))
  params = models.param_shapes(config)
  forward = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False))
  t = jax.ShapeDtypeStruct((config.training.batch_size,), jnp.int32, sharding=batch_sharding)
  return forward.lower(_placed(params, repl), batch, t)


def flops_on_cpu(config: ml_collections.ConfigDict, what: str) -> float:
  """FLOPs of `what` from XLA's cost analysis of the same function lowered for the local CPU (with
  XLA's attention: a cuDNN fused attention has no CPU lowering, and the same FLOPs)."""
  cpu = jax.local_devices(backend='cpu')[0]
  config = copy.deepcopy(config)
  config.model.attn_implementation = None
  flops = common.lowered_flops(lowered_function(config, what, parallel.create_mesh([cpu])))
  if flops is None:
    raise RuntimeError(f'XLA gave no FLOP count for {what!r}')
  return flops


def report(config: ml_collections.ConfigDict, what: str, target: str, top: int) -> dict[str, Any]:
  """Compiles `what` for `target` and reads the executable (see the module docstring)."""
  validate_config(config, num_devices=1, num_processes=1)
  mesh, device_kind = target_mesh(target)
  start = time.perf_counter()
  lowered = lowered_function(config, what, mesh)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  kernels = hlo_kernels.entry_kernels(compiled.as_text())
  out: dict[str, Any] = {'target_device_kind': device_kind, 'lower_s': lowered_at - start,
                         'compile_s': compiled_at - lowered_at,
                         'num_params': models.count_params(models.param_shapes(config)),
                         'flops': flops_on_cpu(config, what)}
  memory = compiled.memory_analysis()
  if memory is not None:
    out['compiled_memory_bytes'] = {
        'arguments': int(memory.argument_size_in_bytes), 'outputs': int(memory.output_size_in_bytes),
        'temporaries': int(memory.temp_size_in_bytes), 'aliased': int(memory.alias_size_in_bytes)}
  out.update(hlo_kernels.summarize(kernels, top))
  peak, peak_note = common.peak_tflops(device_kind, config.model.dtype)
  bandwidth, bandwidth_note = common.peak_bandwidth(device_kind)
  out.update({'peak_tflops': peak, 'peak_note': peak_note, 'bandwidth_tb_s': bandwidth,
              'bandwidth_note': bandwidth_note, 'floor': None})
  if peak is not None and bandwidth is not None:
    out['floor'] = hlo_kernels.roofline_floor(kernels, out['flops'], peak * 1e12, bandwidth * 1e12)
    out['floor']['max_runs_per_s'] = 1.0 / out['floor']['floor_s']
  return out


def _gb(num_bytes: float) -> str:
  return f'{num_bytes / 1e9:.2f} GB'


def markdown(record: dict[str, Any]) -> str:
  """The headline row, then the traffic by category and the top memory-bound sources."""
  floor = record['floor']
  memory = record.get('compiled_memory_bytes')
  header = ['config', 'what', 'dtype', 'batch', 'target', 'compile s', 'kernels', 'GFLOP', 'matmul bytes',
            'other bytes', 'arguments + temporaries', 'floor ms', 'at most /s']
  row = [record['config'], record['what'], record['dtype'], str(record['batch_size']),
         record['target_device_kind'], f'{record["compile_s"]:.1f}', str(record['kernels']),
         common.fmt(record['flops'] / 1e9, '.4g'),
         _gb(floor['matmul_bytes']) if floor else 'n/a', _gb(floor['other_bytes']) if floor else 'n/a',
         (_gb(memory['arguments'] + memory['temporaries']) if memory else 'n/a'),
         f'{1e3 * floor["floor_s"]:.2f}' if floor else 'n/a (no datasheet peaks for this device)',
         f'{floor["max_runs_per_s"]:.1f}' if floor else 'n/a']
  parts = [common.markdown_table(header, [row]), '']
  bandwidth = record['bandwidth_tb_s']
  def ms(num_bytes):
    return f'{1e3 * num_bytes / (bandwidth * 1e12):.2f}' if bandwidth else 'n/a'
  parts.append(common.markdown_table(
      ['category', 'kernels', 'bytes', 'ms at full bandwidth'],
      [[c['name'], str(c['kernels']), _gb(c['bytes']), ms(c['bytes'])] for c in record['by_category']]))
  parts.append('')
  parts.append(common.markdown_table(
      ['memory-bound kernels (kind, source)', 'kernels', 'bytes'],
      [[f'`{s["name"]}`', str(s['kernels']), _gb(s['bytes'])] for s in record['top_memory_bound_sources']]))
  return '\n'.join(parts)


def main(argv: list[str]) -> None:
  config, record = common.start_run(FLAGS, argv, 'compile_report')
  record.update({'what': FLAGS.what, 'target': FLAGS.target})
  record.update(report(config, FLAGS.what, FLAGS.target, FLAGS.top))
  common.write_json(record, FLAGS.out)
  print(markdown(record))


if __name__ == '__main__':
  app.run(main)
