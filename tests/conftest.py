"""Shared test set-up: CPU unless JAX_PLATFORMS says otherwise, the fixtures and helpers several test
modules use, and a helper to run code under 8 simulated CPU devices in a subprocess.

The float64 references of the diffusion maths are in tests/references.py. Heavy imports (jax, ddpm_jax)
happen inside the helpers, so that collecting a test module costs only what that module imports.
"""

import functools
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite on a GPU or TPU (JAX_PLATFORMS=cuda,cpu: the CPU stays for jax.debug.callback and the CPU-kernel
# tests): its tolerances are float32's, checked against float64 references, so matmuls and convolutions run
# at full float32 there rather than TF32 / bfloat16 passes, JAX's default on those chips (README, "Tests").
if os.environ['JAX_PLATFORMS'] != 'cpu':
  os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# One CPU device per test process (xdist already runs one worker per core), inherited by the main.py
# subprocesses: ddpm_jax's own split of the cores (runtime.configure_runtime) leaves a set count alone.
# Tests of that split clear it.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '1')
# One persistent compilation cache for the whole session, its xdist workers and their subprocesses (many
# tests compile the same tiny programs), instead of the user's ~/.cache/ddpm_jax.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'ddpm_jax_test_cache_{os.environ.get("PYTEST_XDIST_TESTRUNUID", os.getpid())}'))

# Most of the suite's CPU time is XLA compiling programs that then run once or twice: LLVM at -O0 cuts
# it (a tiny training job's first run 26 s -> 17 s; the whole suite 923 s -> 732 s on 2 cores) and costs
# little at run time on these tiny networks. Set here for the pytest processes and inherited by their
# subprocesses; DDPM_JAX_TEST_XLA_FLAGS='' tests at XLA's default optimization instead.
TEST_XLA_FLAGS = os.environ.get('DDPM_JAX_TEST_XLA_FLAGS', '--xla_backend_optimization_level=0')
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """The minute-long tests first: xdist hands tests out in collection order, so no worker is left
  running one alone at the end while the other idles."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None
             and item.get_closest_marker('multidevice') is None)


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 900, env: dict | None = None) -> str:
  """Runs `code` in a fresh Python with `num_devices` simulated CPU devices; returns stdout, fails on error.

  XLA reads the device count once at start-up, which is why this needs its own process.
  """
  full_env = dict(os.environ)
  full_env.pop('JAX_NUM_CPU_DEVICES', None)  # it would override the flag below
  full_env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}'.strip()
  full_env['JAX_PLATFORMS'] = 'cpu'
  full_env['PYTHONPATH'] = REPO_ROOT + os.pathsep + full_env.get('PYTHONPATH', '')
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                        env=full_env, cwd=REPO_ROOT, timeout=timeout, check=False)
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-5000:]}\n'
                         f'STDERR:\n{proc.stderr[-8000:]}')
  return proc.stdout


@pytest.fixture(params=['float32', 'float64'])
def dtype(request) -> str:
  """Runs a test for float32 here and for float64 in the x64 subprocess (test_diffusion_x64.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  if request.param == 'float64' and not jax.config.jax_enable_x64:
    pytest.skip('float64 cases run in test_diffusion_x64.py (JAX_ENABLE_X64=1 subprocess)')
  return request.param


def randomize(params, seed: int, scale: float = 0.05):
  """`params` plus N(0, scale^2) numpy noise, as float32 numpy: the zero-initialised layers of a fresh
  U-Net contribute too."""
  import jax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: np.asarray(p + scale * rng.standard_normal(p.shape), np.float32), params)


def cpu_mesh():
  """A mesh of the CPU devices: the CPU-kernel choices (parallel.cpu_compiler_options) apply to it on
  any machine, the default backend a GPU or not."""
  import jax  # pylint: disable=import-outside-toplevel

  from ddpm_jax import parallel  # pylint: disable=import-outside-toplevel
  return parallel.create_mesh(jax.devices('cpu'))


def hlo_computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines, of an HLO text (optimized or as lowered, with or without
  the `%` before names)."""
  bodies: dict[str, list[str]] = {}
  lines = None
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      lines = bodies.setdefault(header.group(1), [])
    elif lines is not None and '=' in line:
      lines.append(line)
  return bodies


def ops_by_library(hlo: str, opcode: str) -> tuple[int, int]:
  """(`opcode` ops inside YNNPACK fusions, `opcode` ops XLA emits itself) of an optimized CPU HLO text."""
  ynn_bodies = {re.search(r'calls=%([\w.\-]+)', line).group(1)
                for line in hlo.splitlines() if '__ynn_fusion' in line and 'calls=%' in line}
  in_ynn = own = 0
  for computation, lines in hlo_computations(hlo).items():
    count = sum(f' {opcode}(' in line for line in lines)
    if computation in ynn_bodies:
      in_ynn += count
    else:
      own += count
  return in_ynn, own


# ------------------------------------------------------------------------ a tiny model for sampling/eval


def tiny_config(num_timesteps: int = 10):
  """configs/tiny.py shrunk further: one level of 32 channels, no attention, 8x8x1 digits, T=10."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.model.ch_mult = (1,)
  config.model.attn_resolutions = ()
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = num_timesteps
  config.sampling.num_samples = 12
  config.sampling.batch_size = 4
  config.sampling.samples_per_shard = 4
  config.sampling.progressive_every = 3
  config.sampling.interpolation_t = 5
  config.sampling.interpolation_num_lambdas = 3
  config.eval.batch_size = 4
  config.eval.num_examples = 10
  config.eval.num_train_examples = 6
  config.eval.metrics = ('bpd', 'rate_distortion')
  return config


@functools.cache
def _param_maker(model, image_shape):
  """One jitted init-and-perturb per (model, image shape), shared by every seed."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import flatten_util  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((1,) + image_shape)

  @jax.jit
  def make(key):
    init_key, noise_key = jax.random.split(key)
    params = model.init({'params': init_key}, x, jnp.zeros((1,), jnp.int32), train=False)['params']
    flat, unravel = flatten_util.ravel_pytree(params)  # one normal draw, not one per leaf
    return unravel(flat + 0.05 * jax.random.normal(noise_key, flat.shape, flat.dtype))
  return make


def random_params(config, seed: int = 0):
  """Initial weights plus N(0, 0.05^2) noise: the zero-initialised output conv of a fresh U-Net
  would otherwise make eps_theta = 0 and hide most of the sampler."""
  import jax  # pylint: disable=import-outside-toplevel

  from ddpm_jax import models  # pylint: disable=import-outside-toplevel
  d = config.data
  make = _param_maker(models.create_model(config), (d.image_size, d.image_size, d.num_channels))
  return make(jax.random.key(seed))


def write_checkpoint(workdir: str, config, seed: int = 0) -> None:
  """A step-0 checkpoint whose EMA weights differ from the raw weights."""
  from ddpm_jax import checkpoints  # pylint: disable=import-outside-toplevel
  checkpoints.save_converted(workdir, config, random_params(config, seed),
                             random_params(config, seed + 1))
