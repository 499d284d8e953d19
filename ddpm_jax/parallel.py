"""Devices and hosts: the one module that knows about them.

Everything else is written for one global batch. Here the global batch is laid out on a 1-D `Mesh` of all
devices (of all processes) along the `data` axis; parameters, optimizer state and EMA are replicated. The
same code runs on 1 CPU, 8 simulated CPU devices, a GPU, a TPU slice and several hosts (`jax.distributed`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
# How the train step sums its gradient over devices (`runtime.gradient_all_reduce`): 'per_weight', XLA's
# SPMD partitioner all-reduces each weight's gradient where it is produced (on accelerators XLA can overlap
# these with the backward pass); 'flat', one all-reduce of the whole gradient as a single buffer
# (`sum_over_devices`); 'auto', 'flat' on a CPU mesh of several devices, else 'per_weight' (and 'per_weight'
# for a network with dropout, whose masks are drawn over the global batch: `train.step.jit_train_step`).
GRADIENT_ALL_REDUCES = ('auto', 'flat', 'per_weight')
# Whose convolution kernels XLA:CPU uses in the train step (`runtime.cpu_train_convolutions`): 'ynnpack',
# XLA:CPU's default (its YNNPACK library fusions); 'xla', XLA's own (Eigen) convolutions, with YNNPACK kept
# for dots and reductions; 'auto', 'xla' for images of AUTO_XLA_CONVOLUTIONS_MIN_SIZE pixels or more
# (`ddpm_jax.runtime.train_convolutions`). Why: YNNPACK's weight gradients of 3x3 convolutions over 16x16
# and larger activations run at a third to a half of Eigen's rate on an Intel Xeon (BENCHMARKS.md).
CPU_CONVOLUTIONS = ('auto', 'xla', 'ynnpack')
AUTO_XLA_CONVOLUTIONS_MIN_SIZE = 16
# Whose reduction kernels XLA:CPU uses in the sampler (`runtime.cpu_sample_reductions`): 'xla', XLA's own
# (YNNPACK kept for convolutions and dots); 'ynnpack', XLA:CPU's default. Why: GroupNorm's moments over
# a sampling batch are a third of the digits sampler's time in YNNPACK's reductions and a tenth in XLA's
# (Intel Xeon, BENCHMARKS.md); in the train step YNNPACK's are the faster, so it keeps them. The sampler's
# convolutions stay YNNPACK's: XLA's own race inside its loop on single-threaded devices (jaxlib 0.10.2,
# BENCHMARKS.md "Back on Zen 3"; tests/test_sampling.py checks the sampler is deterministic).
CPU_REDUCTIONS = ('xla', 'ynnpack')
_YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# LLVM's optimisation level for XLA's backend: 0 for programs that run once (`run_once_compiler_options`).
_RUN_ONCE_OPTION = 'xla_backend_optimization_level'
# XLA:CPU's default YNNPACK fusions in jaxlib 0.10.2: individual convolutions, individual dots, reductions.
_YNN_CONVOLUTION, _YNN_DOT, _YNN_REDUCE = (f'LIBRARY_FUSION_TYPE_{kind}' for kind in (
    'INDIVIDUAL_CONVOLUTION', 'INDIVIDUAL_DOT', 'REDUCE'))


def maybe_initialize_distributed(enabled: bool) -> None:
  """Calls `jax.distributed.initialize()` (coordinator, process id etc. from the environment) when `enabled`.

  Must run before anything touches a device, so it is the first thing each job does.
  """
  if enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def host_cores() -> int:
  """The CPU cores this process may run on (its affinity mask, which a container or `taskset` narrows)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def split_host_cpu(num_devices: int) -> bool:
  """Makes JAX's CPU backend `num_devices` devices, single-threaded when there is one per core.

  Why: a U-Net's convolutions on small images are too small for XLA:CPU's intra-op threads to keep
  the cores busy (a train step of configs/digits.py runs as fast on one thread as on two), while
  data parallelism over one device per core does (1.3-1.6x on 2 cores, BENCHMARKS.md "CPU levers").
  It only concerns the CPU backend: on a GPU / TPU host the mesh is built from the accelerators.

  Must run before anything touches a device. Leaves everything as it is (and returns False) when
  `num_devices` <= 1, when the user chose the CPU device count already (`jax_num_cpu_devices`, or
  `--xla_force_host_platform_device_count` in XLA_FLAGS), or when JAX's backends are already up
  (a notebook or test that ran JAX first); returns True when it split the CPU.
  """
  xla_flags = os.environ.get('XLA_FLAGS', '')
  if (num_devices <= 1 or jax.config.jax_num_cpu_devices != -1
      or 'xla_force_host_platform_device_count' in xla_flags):
    return False
  try:
    jax.config.update('jax_num_cpu_devices', num_devices)
  except RuntimeError:  # the backends are initialised: too late, and the process keeps its devices
    return False
  if num_devices >= host_cores() and 'xla_cpu_multi_thread_eigen' not in xla_flags:
    # Read by XLA when the CPU client is created, i.e. at the first device access, which is after this.
    os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_cpu_multi_thread_eigen=false'.strip()
  return True


def _may_set_cpu_option(mesh: Mesh, option: str) -> bool:
  """Whether ddpm_jax may give a program on `mesh` the XLA:CPU compiler option `option`: only on a CPU
  mesh, and never when the user's XLA_FLAGS name that option (theirs wins, for every program)."""
  return mesh.devices.flat[0].platform == 'cpu' and option not in os.environ.get('XLA_FLAGS', '')


def cpu_compiler_options(mesh: Mesh, *, convolutions: str = 'ynnpack',
                         reductions: str = 'ynnpack') -> dict[str, str]:
  """`jax.jit(..., compiler_options=...)` that give a program on a CPU mesh these kernels.

  convolutions: 'xla' or 'ynnpack' (`CPU_CONVOLUTIONS`, 'auto' resolved by the caller); reductions:
  'xla' or 'ynnpack' (`CPU_REDUCTIONS`). 'ynnpack' leaves the kind in XLA:CPU's default YNNPACK
  fusions, 'xla' takes it out (to XLA's own kernels). Empty (XLA's defaults) when both are 'ynnpack',
  on any other platform, and when the user's XLA_FLAGS choose the YNNPACK fusions themselves.
  """
  for field, value, allowed in (('convolutions', convolutions, ('xla', 'ynnpack')),
                                ('reductions', reductions, CPU_REDUCTIONS)):
    if value not in allowed:
      raise ValueError(f'{field}={value!r} is invalid: allowed: {", ".join(allowed)}')
  if convolutions == reductions == 'ynnpack' or not _may_set_cpu_option(mesh, _YNN_FUSION_TYPE):
    return {}
  kinds = [kind for kind, library in ((_YNN_CONVOLUTION, convolutions), (_YNN_DOT, 'ynnpack'),
                                      (_YNN_REDUCE, reductions)) if library == 'ynnpack']
  return {_YNN_FUSION_TYPE: ','.join(kinds)}


def run_once_compiler_options(mesh: Mesh) -> dict[str, int]:
  """`jax.jit(..., compiler_options=...)` for a program that runs once per job (the weights' initialisation).

  On a CPU mesh: XLA's backend without LLVM's optimisations (`xla_backend_optimization_level=0`). Such a
  program is all random draws, one per weight, and compiling it costs far more than running it: the
  initial train state of configs/digits.py compiles in 3 s instead of 11 s and of configs/cifar10.py's
  U-Net in 11 s instead of 17 s; the whole init (compile + run) is 1.04-3.2x faster from the 0.7M- to the
  121M-parameter U-Nets, and its values are bit-identical (integer hashing and exactly rounded float
  operations, which LLVM's optimisations do not reorder without fast-math; BENCHMARKS.md). Empty (XLA's
  defaults) on other platforms and when the user's XLA_FLAGS set `xla_backend_optimization_level`
  themselves (which also turns this off: `--xla_backend_optimization_level=3`).
  """
  return {_RUN_ONCE_OPTION: 0} if _may_set_cpu_option(mesh, _RUN_ONCE_OPTION) else {}


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path`: a later run of the same job loads its executables.

  Programs that compile in under half a second are not stored (they cost less than the lookup's disk
  traffic is worth); a cache directory the user set for JAX itself (JAX_COMPILATION_CACHE_DIR) wins.
  """
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def is_writer() -> bool:
  """Whether this process writes files (process 0; every process computes)."""
  return jax.process_index() == 0


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices of all processes, axis `data`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def flat_all_reduce(mode: str, mesh: Mesh) -> bool:
  """Whether `mode` (one of GRADIENT_ALL_REDUCES) sums the gradient as one flat buffer on `mesh`.

  'auto' does on a CPU mesh of several devices: XLA:CPU runs an all-reduce of many operands as one
  rendezvous of the devices per operand (154 per step of configs/digits.py's 145 weights, a fifth of its
  step on 2 cores), while one buffer needs one (BENCHMARKS.md, issue #16). One device needs neither.
  """
  if mode not in GRADIENT_ALL_REDUCES:
    raise ValueError(f'gradient_all_reduce={mode!r}: expected one of {GRADIENT_ALL_REDUCES}')
  if mesh.devices.size == 1:
    return False
  return mode == 'flat' or (mode == 'auto' and mesh.devices.flat[0].platform == 'cpu')


def sum_over_devices(fn: Callable[[Any, Any], tuple[Any, Any]],
                     mesh: Mesh) -> Callable[[Any, Any], tuple[Any, Any]]:
  """`fn(replicated, examples) -> (tree, per_example)` run on each device's share of `examples`, `tree`
  summed over the devices as ONE flat buffer.

  `examples` is a pytree of arrays whose leading axis is the global batch, split over `data`; `fn` sees
  the device's rows and returns a pytree to sum (a gradient: each device's share of a loss already divided
  by the global batch) and per-example arrays, which come back as global arrays. The sum ravels `tree`
  into one vector (`jax.flatten_util.ravel_pytree`), `psum`s it and unravels it: one all-reduce, whatever
  the number of leaves. The result equals the global `fn` up to float reduction order; any randomness must
  already be in `examples` (drawn over the global batch), so that it does not depend on the device count.
  """
  def per_device(replicated: Any, examples: Any) -> tuple[Any, Any]:
    # Marked as varying over `data` first: otherwise shard_map's autodiff would psum the gradient of each
    # replicated leaf itself (one all-reduce operand per weight again) before the flat psum below.
    tree, per_example = fn(jax.lax.pcast(replicated, DATA_AXIS, to='varying'), examples)
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, DATA_AXIS)), per_example

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P(DATA_AXIS)))


def check_batch_divisible(global_batch: int, mesh: Mesh, field: str) -> None:
  """Raises if `global_batch` cannot be split evenly over the devices and processes."""
  num_devices, num_processes = mesh.devices.size, jax.process_count()
  if global_batch % num_devices or global_batch % num_processes:
    raise ValueError(f'{field}={global_batch} must be divisible by the number of devices ({num_devices}) '
                     f'and processes ({num_processes})')


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree (identical on every process) on all devices, replicated."""
  sharding = replicated_sharding(mesh)
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """Turns this process's slice of the global batch into one global array sharded over `data`."""
  return jax.make_array_from_process_local_data(data_sharding(mesh), local_batch)


def process_slice(global_size: int) -> slice:
  """The contiguous part of a global batch of `global_size` that this process feeds."""
  per_process = global_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def run_replicated(fn: Callable[..., Any], mesh: Mesh, *args: Any) -> Any:
  """Runs a small computation replicated on every device of `mesh`; numpy result, same on every process."""
  out = jax.jit(fn, out_shardings=replicated_sharding(mesh))(*args)
  return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), out)


def broadcast_from_writer(x: np.ndarray) -> np.ndarray:
  """Process 0's value of a host array on every process (identity with one process)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def to_host(x: Any) -> Any:
  """Fetches (a pytree of) global arrays to numpy on every process, gathering across hosts if needed."""
  if jax.process_count() == 1:
    return jax.device_get(x)
  return multihost_utils.process_allgather(x, tiled=True)
