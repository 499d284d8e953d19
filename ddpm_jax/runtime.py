"""How this machine runs a job (`config.runtime`): JAX's CPU devices and its compilation cache.

Neither changes what a result means (the CPU split changes float32 reduction order only); both must be
applied before anything touches a device: `ddpm_jax.jobs.setup` and the bench scripts call
`configure_runtime` first.
"""

from __future__ import annotations

import os

import ml_collections

from ddpm_jax import parallel

MAX_CPU_DEVICES = 8  # each holds a replica of the params and optimizer state: 8 x 572 MB for CIFAR10


def configure_runtime(config: ml_collections.ConfigDict) -> None:
  """The speed settings of `config.runtime`, applied before any device is touched.

  - JAX's persistent compilation cache (`runtime.compilation_cache_dir`; '' turns it off), so that a
    second run of a job loads its compiled programs instead of compiling them again.
  - On a CPU, one JAX device per core (`runtime.cpu_devices`; 0 picks the most, up to
    MAX_CPU_DEVICES, that every global batch size splits over): see `parallel.split_host_cpu`.
    Results then differ from a single-device run only by float32 reduction order. Not applied to a
    multi-host run (`training.distributed`), whose device layout is the launcher's.

  Ill-typed fields are left for `validate_config` to report.
  """
  runtime = config.runtime
  cache = runtime.compilation_cache_dir
  if cache is None:
    cache = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache'), 'ddpm_jax', 'jax')
  if cache:
    parallel.enable_compilation_cache(cache)
  if not config.training.distributed and isinstance(runtime.cpu_devices, int) and runtime.cpu_devices >= 0:
    parallel.split_host_cpu(runtime.cpu_devices or auto_cpu_devices(config, parallel.host_cores()))


def train_convolutions(config: ml_collections.ConfigDict) -> str:
  """`runtime.cpu_train_convolutions` with 'auto' resolved by `data.image_size`: 'xla' or 'ynnpack'.

  'auto' is 'xla' from `parallel.AUTO_XLA_CONVOLUTIONS_MIN_SIZE` pixels on: on the 2-core Intel Xeon of
  BENCHMARKS.md XLA's own kernels make the CIFAR10 (32x32) train step 1.7x faster, while YNNPACK's are as
  fast or faster on the 8x8 digits network.
  """
  choice = config.runtime.cpu_train_convolutions
  if choice != 'auto':
    return choice
  return 'xla' if config.data.image_size >= parallel.AUTO_XLA_CONVOLUTIONS_MIN_SIZE else 'ynnpack'


def auto_cpu_devices(config: ml_collections.ConfigDict, cores: int) -> int:
  """The most CPU devices, at most one per core and MAX_CPU_DEVICES, that every global batch splits over."""
  batches = (config.training.batch_size, config.sampling.batch_size, config.eval.batch_size)
  return next((n for n in range(min(cores, MAX_CPU_DEVICES), 0, -1)
              if all(isinstance(b, int) and b % n == 0 for b in batches)), 1)
