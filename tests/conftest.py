"""Shared test set-up: CPU only, and a helper to run code under 8 simulated CPU devices in a subprocess."""

import os
import subprocess
import sys
import textwrap

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 900, env: dict | None = None) -> str:
  """Runs `code` in a fresh Python with `num_devices` simulated CPU devices; returns stdout, fails on error.

  XLA reads the device count once at start-up, which is why this needs its own process.
  """
  full_env = dict(os.environ)
  full_env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  full_env['JAX_PLATFORMS'] = 'cpu'
  full_env['PYTHONPATH'] = REPO_ROOT + os.pathsep + full_env.get('PYTHONPATH', '')
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True,
                        env=full_env, cwd=REPO_ROOT, timeout=timeout, check=False)
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-5000:]}\n'
                         f'STDERR:\n{proc.stderr[-8000:]}')
  return proc.stdout
