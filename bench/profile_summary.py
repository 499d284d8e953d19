"""Where a profiled program's accelerator time goes: the kernels of a `jax.profiler` trace, summed.

  python bench/train_throughput.py --config=configs/cifar10.py --batch_size=128 --dtype=bfloat16 \\
      --windows=3 --steps_per_window=8 --warmup_steps=5 --profile_dir=/tmp/prof   # 8 profiled steps
  python bench/profile_summary.py --trace=/tmp/prof --steps=8 [--top=30] [--out=summary.json]

Reads the newest `*.xplane.pb` under `--trace` with `jax.profiler.ProfileData` and sums the events of
the device planes (`/device:GPU:0`, ...): on a GPU each event of a stream line is one kernel, so the sums
are kernel time, per category (cuDNN convolutions, matrix products, XLA's reduction / elementwise /
transpose / data-movement fusions) and per kernel name (XLA's numbered instances, `input_reduce_fusion_12`,
summed under one name). `busy` against the span of the device's activity is how much of the profiled
time a kernel ran (streams that overlap make it more than 100%). Divided by `--steps` when given.

A CPU trace has no device plane (XLA:CPU's work runs in host threads, and its convolutions partly outside
their events: BENCHMARKS.md, the Intel sitting's profile); the script says so and exits non-zero.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

from bench import common  # pylint: disable=g-import-not-at-top

flags.DEFINE_string('trace', None, 'A jax.profiler trace directory (or one .xplane.pb file).')
flags.DEFINE_integer('steps', None, 'Steps (or calls) the trace holds: sums are then per step.')
flags.DEFINE_integer('top', 25, 'Kernel names to list.')
flags.DEFINE_string('out', None, 'Write the summary as JSON here.')
FLAGS = flags.FLAGS

# First match wins: a cuDNN convolution kernel's name also says `gemm` ("implicit_gemm"), and XLA's fusions
# are named for their root (`loop_convert_fusion` is not a convolution).
CATEGORIES = (
    ('convolution (cuDNN)', re.compile(r'fprop|dgrad|wgrad|cudnn|convolve', re.I)),
    ('matrix product (cuBLAS, XLA GEMM fusions)', re.compile(r'gemm|nvjet|cublas|cutlass|xmma|dot', re.I)),
    ('XLA reduction fusions', re.compile(r'reduce', re.I)),
    ('XLA transpose fusions', re.compile(r'transpose', re.I)),
    ('data movement (copies, concatenations, slices, memset)',
     re.compile(r'memcpy|memset|copy|concatenate|slice|broadcast|pad|dynamic', re.I)),
    ('XLA elementwise fusions', re.compile(r'fusion|wrapped_|loop_', re.I)),
)
OTHER = 'other'


def category(kernel: str) -> str:
  for name, pattern in CATEGORIES:
    if pattern.search(kernel):
      return name
  return OTHER


def kernel_name(event_name: str) -> str:
  """XLA's numbered instances under one name: `input_reduce_fusion_12` and `_7` -> `input_reduce_fusion`."""
  return re.sub(r'([_.]\d+)+$', '', event_name)


def xplane_path(trace: str) -> str:
  """`trace` itself if it is a file, else the newest `*.xplane.pb` below it."""
  if os.path.isfile(trace):
    return trace
  found = glob.glob(os.path.join(trace, '**', '*.xplane.pb'), recursive=True)
  if not found:
    raise FileNotFoundError(f'--trace={trace!r}: no *.xplane.pb below it (a jax.profiler.trace directory '
                            'holds one under plugins/profile/<date>/)')
  return max(found, key=os.path.getmtime)


def device_events(profile: Any) -> Iterable[tuple[str, str, int, int]]:
  """(plane, event name, start ps, duration ps) of every event on a device plane's lines."""
  for plane in profile.planes:
    if not plane.name.startswith('/device:'):
      continue
    for line in plane.lines:
      for event in line.events:
        yield plane.name, event.name, int(event.start_ns * 1000), int(event.duration_ns * 1000)


def summarize(profile: Any, steps: int | None = None, top: int = 25) -> dict[str, Any]:
  """Kernel time per category and per kernel name; ValueError if the trace has no device plane."""
  per_step = 1.0 / steps if steps else 1.0
  by_category, by_kernel = collections.Counter(), collections.Counter()
  category_calls, calls = collections.Counter(), collections.Counter()
  spans: dict[str, list[int]] = {}
  for plane, name, start, duration in device_events(profile):
    kind, kernel = category(name), kernel_name(name)
    by_category[kind] += duration
    category_calls[kind] += 1
    by_kernel[kernel] += duration
    calls[kernel] += 1
    span = spans.setdefault(plane, [start, start + duration])
    span[0], span[1] = min(span[0], start), max(span[1], start + duration)
  if not spans:
    raise ValueError('the trace has no /device: plane (a CPU trace?): nothing to summarize')
  total = sum(by_category.values())
  span_ps = sum(end - begin for begin, end in spans.values())
  ms = lambda ps: ps * 1e-9 * per_step  # noqa: E731
  return {
      'devices': sorted(spans), 'steps': steps, 'kernels_per_step': sum(calls.values()) * per_step,
      'kernel_ms': ms(total), 'span_ms': ms(span_ps), 'busy': total / span_ps if span_ps else None,
      'categories': [{'category': c, 'ms': ms(t), 'share': t / total, 'calls': category_calls[c] * per_step}
                     for c, t in by_category.most_common()],
      'top_kernels': [{'kernel': k, 'category': category(k), 'ms': ms(t), 'share': t / total,
                       'calls': calls[k] * per_step} for k, t in by_kernel.most_common(top)],
  }


def print_summary(summary: dict[str, Any], path: str) -> None:
  unit = 'per step' if summary['steps'] else 'in the trace'
  print(f'{path}: {", ".join(summary["devices"])}; {summary["kernel_ms"]:.2f} ms of kernels {unit} '
        f'({summary["kernels_per_step"]:.0f} kernels), {summary["busy"]:.0%} of the '
        f'{summary["span_ms"]:.2f} ms span of device activity\n')
  cells = lambda row: [f'{row["ms"]:.3f}', f'{row["share"]:.1%}', f'{row["calls"]:.4g}']  # noqa: E731
  print(common.markdown_table(['category', f'ms {unit}', 'share', f'calls {unit}'],
                              [[row['category'], *cells(row)] for row in summary['categories']]))
  print()
  print(common.markdown_table(['kernel', 'category', f'ms {unit}', 'share', f'calls {unit}'],
                              [[f'`{row["kernel"]}`', row['category'], *cells(row)]
                               for row in summary['top_kernels']]))


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.trace:
    raise app.UsageError('--trace: required (a jax.profiler trace directory or .xplane.pb file)')
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  path = xplane_path(FLAGS.trace)
  try:
    summary = summarize(ProfileData.from_file(path), FLAGS.steps, FLAGS.top)
  except ValueError as e:
    raise SystemExit(f'{path}: {e}') from None
  print_summary(summary, path)
  common.write_json({'trace': path, **summary}, FLAGS.out)


if __name__ == '__main__':
  app.run(main)
