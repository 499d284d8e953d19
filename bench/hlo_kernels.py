"""What a compiled XLA executable launches, read from its optimized HLO text: one record per kernel.

Used by `compile_report.py` to study an executable compiled for a GPU that is not present (deviceless
ahead-of-time compilation). After XLA's GPU pipeline every instruction of the ENTRY computation that is
not bookkeeping (parameter, get-tuple-element, bitcast, tuple, constant) is one kernel launch: a fusion
(`kLoop` elementwise, `kInput` reduction-rooted, `kCustom` Triton GEMM / cuDNN fusions), a library call
(`__cudnn$conv*`, `__cublas$*`), a layout-changing `copy`, ...

Bytes are the floor of memory traffic: each operand read once, each result written once (METHOD: "the
fewest bytes it must move"). A kernel that re-reads an operand, or reads only part of it (a slice fused
into its consumer), moves more, or less; this is the count XLA's own cost model starts from.
"""

from __future__ import annotations

import collections
import re
from typing import Any, NamedTuple

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 'bf16': 2, 'f16': 2, 's16': 2,
                'u16': 2, 'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8,
                'c128': 16}
_ARRAY = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([\d,]*)\]')
# `%name = <shape> <opcode>(<operands>), attributes...`; the shape may be a tuple with nested layouts.
_INSTRUCTION = re.compile(r'^(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(?:,|$)')
_NOT_A_KERNEL = frozenset({'parameter', 'get-tuple-element', 'bitcast', 'tuple', 'constant',
                           'after-all', 'partition-id', 'replica-id', 'opt-barrier'})
_MATMUL_OPCODES = frozenset({'convolution', 'dot'})


class Kernel(NamedTuple):
  """One launch: its kind (`fusion:kLoop`, `__cudnn$convForward`, `copy`, ...), traffic, and source."""
  kind: str
  bytes_read: int
  bytes_written: int
  op_name: str  # the JAX source op of the instruction, e.g. jit(train_step)/jvp(UNet)/mid/attn_1/...


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (arrays or tuples of arrays); layouts and tokens count nothing."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = 1
    for dim in filter(None, dims.split(',')):
      size *= int(dim)
    total += size * _DTYPE_BYTES[dtype]
  return total


def entry_computation(hlo_text: str) -> list[str]:
  """The instruction lines of the module's ENTRY computation."""
  match = re.search(r'^ENTRY [^\n]*\{\n(.*?)\n\}', hlo_text, re.S | re.M)
  if match is None:
    raise ValueError('no ENTRY computation in this HLO text')
  return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def _kind(opcode: str, line: str) -> str:
  if opcode == 'custom-call':
    target = re.search(r'custom_call_target="([^"]+)"', line)
    return target.group(1) if target else 'custom-call'
  if opcode == 'fusion':
    kind = re.search(r'kind=(k\w+)', line)
    return f'fusion:{kind.group(1)}' if kind else 'fusion'
  return opcode


def entry_kernels(hlo_text: str) -> list[Kernel]:
  """The kernels the ENTRY computation launches, in program order (loop bodies are not unrolled)."""
  sizes: dict[str, int] = {}
  kernels = []
  for line in entry_computation(hlo_text):
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    name, shape, opcode, operands = match.groups()
    sizes[name] = shape_bytes(shape)
    if opcode in _NOT_A_KERNEL:
      continue
    read = sum(sizes.get(operand, 0) for operand in re.findall(r'%([\w.\-]+)', operands))
    op_name = re.search(r'op_name="([^"]*)"', line)
    kernels.append(Kernel(_kind(opcode, line), read, sizes[name], op_name.group(1) if op_name else ''))
  return kernels


def is_matmul(kind: str) -> bool:
  """Kernels on the matrix units: cuDNN convolutions, cuBLAS GEMMs, Triton GEMM fusions, bare HLO dots."""
  return (kind.startswith(('__cudnn$', '__cublas$')) or kind == 'fusion:kCustom'
          or kind in _MATMUL_OPCODES)


def roofline_floor(kernels: list[Kernel], flops: float, peak_flops: float,
                   bandwidth: float) -> dict[str, float]:
  """A lower bound on the time of one run, with kernels executed one after another (one stream).

  Kernels off the matrix units are bound by their bytes; the matrix kernels together take at least
  max(all FLOPs / peak, their bytes / bandwidth). `flops` are the executable's total (nearly all of it
  in the matrix kernels); launch gaps are not counted.
  """
  matmul_bytes = sum(k.bytes_read + k.bytes_written for k in kernels if is_matmul(k.kind))
  other_bytes = sum(k.bytes_read + k.bytes_written for k in kernels if not is_matmul(k.kind))
  other_s = other_bytes / bandwidth
  matmul_s = max(flops / peak_flops, matmul_bytes / bandwidth)
  return {'matmul_bytes': matmul_bytes, 'other_bytes': other_bytes, 'other_s': other_s,
          'matmul_compute_s': flops / peak_flops, 'matmul_memory_s': matmul_bytes / bandwidth,
          'floor_s': other_s + matmul_s}


def source(op_name: str) -> str:
  """The network-level origin of an op, repeated layers merged: `up/block/norm1/reduce_sum`, with a
  `grad:` prefix for the backward pass (JAX names it transpose(jvp(UNet)))."""
  grad = 'transpose(' in op_name
  name = re.sub(r'^jit\([^)]*\)/', '', op_name)
  name = re.sub(r'(transpose\()?jvp\((\w+)\)\)?/', '', name)
  name = re.sub(r'^UNet/', '', name)
  name = re.sub(r'\b(down|up)_\d+/', r'\1/', name)
  name = re.sub(r'\b(block|attn)_\d+/', r'\1/', name)
  return ('grad:' if grad else '') + (name or '(no source)')


def category(kernel: Kernel) -> str:
  """A coarse bucket: matrix units vs the rest, split by the part of the network the op comes from."""
  unit = 'matmul' if is_matmul(kernel.kind) else 'memory'
  name = kernel.op_name
  if re.search(r'/norm\w*/', name):
    part = 'GroupNorm'
  elif re.search(r'/attn_\d+/', name):
    part = 'attention'
  elif re.search(r'\bUNet\b', name):  # jvp(UNet)/... in the train step, UNet/... in a forward pass
    part = 'rest of the network'
  else:
    part = 'loss, optimizer, EMA, bookkeeping'
  return f'{unit}: {part}'


def summarize(kernels: list[Kernel], top: int = 15) -> dict[str, Any]:
  """Counts and bytes by kernel kind, by category, and the `top` sources of non-matmul traffic."""
  def table(key):
    count, traffic = collections.Counter(), collections.Counter()
    for k in kernels:
      count[key(k)] += 1
      traffic[key(k)] += k.bytes_read + k.bytes_written
    return [{'name': name, 'kernels': count[name], 'bytes': traffic[name]}
            for name, _ in traffic.most_common()]
  memory_bound = [k for k in kernels if not is_matmul(k.kind)]
  sources = collections.Counter()
  launches = collections.Counter()
  for k in memory_bound:
    key = f'{k.kind} {source(k.op_name)}'
    sources[key] += k.bytes_read + k.bytes_written
    launches[key] += 1
  return {'kernels': len(kernels), 'by_kind': table(lambda k: k.kind),
          'by_category': table(category),
          'top_memory_bound_sources': [{'name': name, 'kernels': launches[name], 'bytes': b}
                                       for name, b in sources.most_common(top)]}
