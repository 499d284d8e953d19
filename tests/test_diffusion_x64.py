"""The float64 half of the diffusion tests: every `dtype`-parametrised test, with jax_enable_x64.

x64 is process-wide and cannot be switched off again cleanly, so the float64 cases run in their own
Python (pytest inside a subprocess with JAX_ENABLE_X64=1); in this process they are skipped.
"""

import re

from conftest import run_with_devices

MODULES = ['schedules', 'coefficients', 'forward', 'reverse', 'likelihood', 'losses', 'timesteps',
           'respace']

CODE = """
import sys
import jax
import pytest
assert jax.config.jax_enable_x64, 'JAX_ENABLE_X64 did not reach the subprocess'
sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', '-k', 'float64'] + {files!r}))
"""


def test_float64_cases_pass_under_x64():
  files = [f'tests/test_diffusion_{name}.py' for name in MODULES]
  out = run_with_devices(CODE.format(files=files), 1, env={'JAX_ENABLE_X64': '1'})
  summary = re.search(r'(\d+) passed', out)
  assert summary and int(summary.group(1)) >= 60, out[-3000:]
  assert 'skipped' not in out.splitlines()[-1], out[-3000:]
