"""`config.runtime`: the CPU split into one device per core and the persistent compilation cache.

The split must happen before JAX creates its CPU client, so every check of it runs in a fresh Python
(without the one-device setting conftest gives the test processes).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from configs import digits, tiny
from conftest import REPO_ROOT
from ddpm_jax import runtime

_PROBE = '''
import json, os, sys
import jax
from configs import {module}
from ddpm_jax import runtime
config = {module}.get_config()
for field, value in json.loads(sys.argv[1]).items():
  group, name = field.split('.')
  config[group][name] = value
runtime.configure_runtime(config)
print(json.dumps({{'devices': jax.device_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                  'cache': jax.config.jax_compilation_cache_dir}}))
'''


def _probe(overrides: dict, env: dict | None = None, module: str = 'digits') -> dict:
  """configure_runtime(config) in a fresh process whose CPU the test process has not set."""
  full_env = {k: v for k, v in os.environ.items()
              if k not in ('JAX_NUM_CPU_DEVICES', 'XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}
  full_env.update(PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu', **(env or {}))
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(_PROBE.format(module=module)),
                         json.dumps(overrides)], capture_output=True, text=True, env=full_env,
                        cwd=REPO_ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('cores, batches, expected', [
    (2, (64, 500, 120), 2),    # configs/digits.py on a 2-core machine
    (8, (64, 500, 120), 4),    # 8 does not divide 500 or 120; 4 divides all three
    (3, (64, 500, 120), 2),    # 3 divides none
    (1, (64, 500, 120), 1),
    (64, (128, 256, 256), 8),  # at most MAX_CPU_DEVICES (each holds a replica of the state)
    (4, (7, 500, 120), 1),     # a prime batch: one device
])
def test_auto_cpu_devices(cores, batches, expected):
  config = digits.get_config()
  config.training.batch_size, config.sampling.batch_size, config.eval.batch_size = batches
  n = runtime.auto_cpu_devices(config, cores)
  assert n == expected
  assert all(b % n == 0 for b in batches)


def test_cpu_is_split_into_one_single_threaded_device_per_core():
  cores = len(os.sched_getaffinity(0))
  if cores < 2:
    pytest.skip('needs 2 cores')
  out = _probe({'runtime.compilation_cache_dir': ''})
  assert out['devices'] == runtime.auto_cpu_devices(digits.get_config(), cores) >= 2
  assert ('--xla_cpu_multi_thread_eigen=false' in out['xla_flags']) == (out['devices'] >= cores)
  assert out['cache'] is None  # '' turns the cache off


def test_one_cpu_device_on_request_and_the_users_own_settings_win():
  out = _probe({'runtime.cpu_devices': 1, 'runtime.compilation_cache_dir': ''})
  assert out == {'devices': 1, 'xla_flags': '', 'cache': None}
  # The user's XLA flag (here 3 devices, which divide nothing of configs/digits.py's batches) is kept.
  out = _probe({}, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=3'})
  assert out['devices'] == 3 and out['xla_flags'] == '--xla_force_host_platform_device_count=3'
  out = _probe({}, env={'JAX_NUM_CPU_DEVICES': '1'})
  assert out['devices'] == 1 and out['xla_flags'] == ''


def test_compilation_cache_location(tmp_path):
  # The default: the user's cache directory (XDG_CACHE_HOME if set).
  out = _probe({'runtime.cpu_devices': 1}, env={'XDG_CACHE_HOME': str(tmp_path / 'xdg')})
  assert out['cache'] == str(tmp_path / 'xdg' / 'ddpm_jax' / 'jax')
  out = _probe({'runtime.cpu_devices': 1, 'runtime.compilation_cache_dir': str(tmp_path / 'mine')})
  assert out['cache'] == str(tmp_path / 'mine')
  # JAX's own setting wins over the config's.
  out = _probe({'runtime.cpu_devices': 1, 'runtime.compilation_cache_dir': str(tmp_path / 'mine')},
               env={'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax')})
  assert out['cache'] == str(tmp_path / 'jax')


@pytest.mark.slow
def test_a_second_run_loads_its_programs_from_the_cache(tmp_path):
  """The train step of configs/tiny.py compiles for over a second; the second process finds it."""
  cache = tmp_path / 'cache'
  code = textwrap.dedent('''
      import sys, time
      import jax
      from configs import tiny
      from ddpm_jax import jobs, diffusion, models
      from ddpm_jax.train.step import jit_train_step
      from ddpm_jax.train.state import create_train_state
      config = tiny.get_config()
      config.runtime.cpu_devices = 1
      config.runtime.compilation_cache_dir = sys.argv[1]
      mesh = jobs.setup(config)
      step = jit_train_step(models.create_model(config), diffusion.coefficients_from_config(config.diffusion), mesh)
      state = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0)))
      batch = jax.ShapeDtypeStruct((config.training.batch_size, 8, 8, 1), 'float32')
      start = time.perf_counter()
      step.lower(state, batch, jax.random.key(0)).compile()
      print(time.perf_counter() - start)
  ''')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  seconds = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, '-c', code, str(cache)], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seconds.append(float(proc.stdout.strip().splitlines()[-1]))
  assert any(name.startswith('jit_train_step') for name in os.listdir(cache)), os.listdir(cache)
  assert seconds[1] < seconds[0] / 2, seconds


def test_runtime_fields_are_validated():
  from ddpm_jax.config import validate_config  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.runtime.cpu_devices = -1
  with pytest.raises(ValueError, match=r'config\.runtime\.cpu_devices=-1 is invalid'):
    validate_config(config)
