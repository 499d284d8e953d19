"""Helpers shared by the benchmark scripts: run metadata, peak FLOP/s, memory, statistics, JSON and markdown.

Nothing here is timed; the scripts time only compiled device work, ending each timed window with
`jax.block_until_ready`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from absl import app
from ml_collections import config_flags

from ddpm_jax import runtime
from ddpm_jax.models.unet import DTYPES

# Peak dense TFLOP/s per device, by (device kind family, computation dtype). Sources: NVIDIA H100 SXM
# datasheet (bf16 989.4, TF32 494.7, FP32 66.9 dense; the H200 has the same compute), A100 datasheet
# (bf16 312, TF32 156), Google Cloud TPU system architecture pages (per chip, bf16: v3 123, v4 275,
# v5e 197, v5p 459).
# float32 on NVIDIA: JAX's default matmul/conv precision lets cuDNN/cuBLAS use TF32 tensor cores, so the
# TF32 peak is the relevant ceiling (the plain FP32 figure is kept in the note). float32 on TPU: the default
# precision runs f32 matmuls as one bf16 pass, so the bf16 peak applies.
_PEAK_TFLOPS = (
    # (substring of device_kind, lower case), bfloat16, float32, float32 label
    ('h100', 989.0, 495.0, 'TF32 dense (plain FP32 is 67)'),
    ('h200', 989.0, 495.0, 'TF32 dense (plain FP32 is 67)'),
    ('a100', 312.0, 156.0, 'TF32 dense (plain FP32 is 19.5)'),
    # A v3 chip (123) has 2 TensorCores that JAX lists as 2 devices; v4 and v5p chips are one device each.
    ('tpu v3', 61.5, 61.5, 'bf16 peak per TensorCore (123 per chip of 2 devices); f32 matmuls run in bf16'),
    ('tpu v4', 275.0, 275.0, 'bf16 peak: TPU default precision runs f32 matmuls in one bf16 pass'),
    ('tpu v5 lite', 197.0, 197.0, 'bf16 peak: TPU default precision runs f32 matmuls in one bf16 pass'),
    ('tpu v5e', 197.0, 197.0, 'bf16 peak: TPU default precision runs f32 matmuls in one bf16 pass'),
    ('tpu v5p', 459.0, 459.0, 'bf16 peak: TPU default precision runs f32 matmuls in one bf16 pass'),
    ('tpu v5', 459.0, 459.0, 'bf16 peak (device kind "TPU v5" is the v5p)'),
)


# Peak memory bandwidth per device in TB/s (datasheets: H100 SXM 3.35, H100 PCIe 2.0, H200 4.8, A100 80GB
# 2.04 / 40GB 1.555; Cloud TPU pages: v3 900 GB/s per chip of 2 devices, v4 1.2, v5e 0.82, v5p 2.77).
# Order matters: the first matching substring wins.
_PEAK_BANDWIDTH_TB_S = (
    ('h100 pcie', 2.0), ('h100', 3.35), ('h200', 4.8), ('a100-sxm4-80gb', 2.04), ('a100 80gb', 2.04),
    ('a100', 1.555), ('tpu v3', 0.45), ('tpu v4', 1.2), ('tpu v5 lite', 0.82), ('tpu v5e', 0.82),
    ('tpu v5', 2.77),
)


def define_common_flags(flags_module: Any) -> None:
  """The flags both scripts take: --config (with --config.x.y=... overrides), --batch_size, --dtype, --out."""
  config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.', lock_config=True)
  flags_module.DEFINE_integer('batch_size', None, 'Global batch size (default: the config\'s).')
  flags_module.DEFINE_enum('dtype', None, list(DTYPES), 'Computation dtype (default: config.model.dtype).')
  flags_module.DEFINE_string('out', None, 'Where to write the JSON record (default: print only).')
  flags_module.mark_flags_as_required(['config'])


def config_name(flag_values: Any) -> str:
  """The config file's path as given on the command line, e.g. `configs/cifar10.py`."""
  return config_flags.get_config_filename(flag_values['config'])


def apply_dtype(config: ml_collections.ConfigDict, dtype: str | None) -> str:
  """Sets config.model.dtype when `dtype` is given; returns the dtype in effect."""
  if dtype is not None:
    config.model.dtype = dtype
  return config.model.dtype


def start_run(flag_values: Any, argv: list[str], benchmark: str) -> tuple[ml_collections.ConfigDict,
                                                                          dict[str, Any]]:
  """The config with --dtype and --batch_size (the training batch) applied, and the record's first fields."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flag_values.config
  dtype = apply_dtype(config, flag_values.dtype)
  if flag_values.batch_size is not None:
    config.training.batch_size = flag_values.batch_size
  runtime = configure_runtime(config)
  record = run_metadata(config_name(flag_values))
  record['runtime'] = runtime
  record.update({'benchmark': benchmark, 'batch_size': config.training.batch_size, 'dtype': dtype})
  return config, record


def configure_runtime(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Applies what main.py runs with (`ddpm_jax.runtime.configure_runtime`: one device per core on a CPU)
  before any device is touched, except the compilation cache (the scripts time compilation); returns
  the settings for the record."""
  config.runtime.compilation_cache_dir = ''
  runtime.configure_runtime(config)
  return {'cpu_devices': config.runtime.cpu_devices, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'cpu_train_convolutions': runtime.train_convolutions(config),
          'cpu_sample_reductions': config.runtime.cpu_sample_reductions}


def cpu_model() -> str:
  """The CPU's `model name` from /proc/cpuinfo (or platform.processor() elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def run_metadata(config_path: str) -> dict[str, Any]:
  """Machine, devices, versions, command line and date of this run."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  devices = jax.local_devices()
  return {
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'command': shlex.join(['python', os.path.relpath(sys.argv[0])] + sys.argv[1:]),
      'config': config_path,
      'machine': {'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(), 'platform': platform.platform(),
                  'python': platform.python_version(),
                  'load_average_1m_at_start': round(os.getloadavg()[0], 2)},
      'devices': {'platform': devices[0].platform, 'kind': devices[0].device_kind, 'count': len(devices)},
      'versions': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
                   'optax': optax.__version__},
  }


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """Peak dense TFLOP/s of one device for `dtype`, and a note saying which figure it is (None if unknown)."""
  kind = device_kind.lower()
  for key, bf16, fp32, fp32_label in _PEAK_TFLOPS:
    if key in kind:
      if dtype == 'bfloat16':
        return bf16, f'{device_kind}: bf16 dense peak {bf16:g} TFLOP/s per device'
      return fp32, f'{device_kind}: {fp32_label}, {fp32:g} TFLOP/s per device'
  return None, f'no peak FLOP/s known for device kind {device_kind!r} (CPU or unlisted): MFU not computed'


def peak_bandwidth(device_kind: str) -> tuple[float | None, str]:
  """Datasheet memory bandwidth of one device in TB/s, and a note (None for CPUs and unlisted kinds)."""
  kind = device_kind.lower()
  for key, value in _PEAK_BANDWIDTH_TB_S:
    if key in kind:
      return value, f'{device_kind}: datasheet memory bandwidth {value:g} TB/s per device'
  return None, f'no memory bandwidth known for device kind {device_kind!r}: no roofline floor'


def mfu(flops_per_s: float | None, device_kind: str, dtype: str, num_devices: int) -> dict[str, Any]:
  """Model FLOP utilisation: achieved FLOP/s over the peak of all devices (None with a note when unknown)."""
  peak, note = peak_tflops(device_kind, dtype)
  value = None
  if peak is not None and flops_per_s is not None:
    value = flops_per_s / (peak * 1e12 * num_devices)
  return {'mfu': value, 'peak_tflops_per_device': peak, 'peak_note': note}


def peak_memory() -> dict[str, Any]:
  """Peak memory: the largest `peak_bytes_in_use` over local devices, else the process's max RSS
  (labelled as such)."""
  peaks = []
  for device in jax.local_devices():
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  if peaks:
    return {'peak_memory_bytes': max(peaks),
            'peak_memory_source': f'device peak_bytes_in_use (max over {len(peaks)} devices)'}
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {'peak_memory_bytes': int(rss_kib) * 1024,
          'peak_memory_source': 'process max RSS (device memory_stats unavailable; includes host code)'}


def lowered_flops(lowered: Any) -> float | None:
  """Total `flops` from XLA's cost analysis of a lowered program (None if the backend gives none).

  The program as lowered, before the backend's passes, not the compiled executable: on a GPU the
  executable's convolutions are cuDNN custom calls that the analysis does not count (the digits train step
  came to 0.81 GFLOP instead of 5.1 on an H200, BENCHMARKS.md), while the lowered program counts every
  convolution and dot the same way on every platform.
  """
  analysis = lowered.cost_analysis() or _cpu_cost_analysis(lowered)
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per partition
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  flops = float(analysis['flops'])
  return flops if flops > 0 else None


def _cpu_cost_analysis(lowered: Any) -> dict[str, float] | None:
  """XLA's HLO cost analysis of `lowered`'s module, run by the CPU client.

  A backend behind PJRT's C API (the CUDA plugin, for one) has no cost analysis of a lowered program: jax's
  `Lowered.cost_analysis()` returns None there (jax 0.11.2 on an H200, BENCHMARKS.md). The analysis only
  reads the HLO, so the CPU client, which every jax has, counts the same module. It is jax's own call
  behind `Lowered.cost_analysis()`, not public API: None where a jax lacks it.
  """
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    module = lowered.compiler_ir('hlo').as_hlo_module()
    return _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), module)
  except (ImportError, AttributeError, RuntimeError) as e:
    print(f'bench: no FLOP count ({type(e).__name__}: {e})', file=sys.stderr)
    return None


class CompileEvents:
  """Records JAX's tracing / lowering / XLA-compile durations (jax.monitoring) so that compilations inside a
  region can be timed and counted: any XLA compile inside a timed window is a recompilation."""

  TRACE = '/jax/core/compile/jaxpr_trace_duration'
  LOWER = '/jax/core/compile/jaxpr_to_mlir_module_duration'
  COMPILE = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.events: list[tuple[str, float, str]] = []
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event: str, duration: float, **kwargs: Any) -> None:
    if event in (self.TRACE, self.LOWER, self.COMPILE):
      self.events.append((event, float(duration), str(kwargs.get('fun_name', ''))))

  def mark(self) -> int:
    return len(self.events)

  def compiles_since(self, mark: int) -> int:
    """Number of XLA compilations since `mark`."""
    return sum(1 for event, _, _ in self.events[mark:] if event == self.COMPILE)

  def durations_since(self, mark: int) -> dict[str, float]:
    """Seconds spent since `mark` tracing (the outermost trace, which contains nested ones), lowering to
    MLIR and compiling with XLA (summed over executables)."""
    def of(kind):
      return [d for event, d, _ in self.events[mark:] if event == kind]
    return {'trace_s': max(of(self.TRACE), default=0.0), 'lower_s': sum(of(self.LOWER)),
            'compile_s': sum(of(self.COMPILE))}


def transfer_guard_note() -> str:
  """What running the timed region under `jax.transfer_guard('disallow')` proves on this platform."""
  if jax.local_devices()[0].platform == 'cpu':
    return ('no host->device transfer (jax.transfer_guard("disallow") raises on one); device->host copies '
            'are not guarded on CPU, where device memory is host memory: the loop fetches nothing by '
            'construction')
  return 'no transfer in either direction (jax.transfer_guard("disallow") raises on any)'


def summary(values: Sequence[float]) -> dict[str, float]:
  """Median, min and max of a list of measurements."""
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def cache_size(jitted: Callable[..., Any]) -> int | None:
  """How many compiled versions a `jax.jit` function holds (None if this jax hides it)."""
  size = getattr(jitted, '_cache_size', None)
  return size() if callable(size) else None


def write_json(record: dict[str, Any], path: str | None) -> None:
  """Writes `record` (indented, keys in insertion order) to `path` if given."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=2, allow_nan=False)
    f.write('\n')


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """A GitHub markdown table: header, separator and the rows."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def fmt(value: float | None, spec: str = '.3g') -> str:
  """Formats a number for a table cell; None becomes 'n/a'."""
  return 'n/a' if value is None else format(value, spec)


def fmt_range(stats: dict[str, float], spec: str = '.3g') -> str:
  """`median [min–max]`."""
  return f'{fmt(stats["median"], spec)} [{fmt(stats["min"], spec)}–{fmt(stats["max"], spec)}]'


def fmt_bytes(num_bytes: int) -> str:
  return f'{num_bytes / 2**30:.2f} GiB' if num_bytes >= 2**30 else f'{num_bytes / 2**20:.0f} MiB'
