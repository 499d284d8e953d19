"""The benchmark scripts run end to end on configs/tiny.py and write valid records (no speed is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any

import pytest

from conftest import REPO_ROOT
from bench import common

TINY = ['--config=configs/tiny.py']
META_KEYS = ('date', 'command', 'config', 'machine', 'devices', 'versions', 'batch_size', 'dtype',
             'num_params', 'peak_memory_bytes', 'peak_memory_source')


def _run(script: str, args: list[str], out: str) -> tuple[dict[str, Any], str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, os.path.join('bench', script), *TINY, *args, f'--out={out}'],
                        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900, check=False)
  assert proc.returncode == 0, f'STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}'
  with open(out) as f:
    return json.load(f), proc.stdout


def _positive(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_summary(stats: dict[str, float]) -> None:
  assert set(stats) == {'median', 'min', 'max'}
  assert all(_positive(v) for v in stats.values()), stats
  assert stats['min'] <= stats['median'] <= stats['max']


def _check_markdown(stdout: str, rows: int) -> None:
  lines = [line for line in stdout.splitlines() if line.startswith('|')]
  assert len(lines) == rows + 2, stdout
  assert lines[1].startswith('|---')
  assert all(line.count('|') == lines[0].count('|') for line in lines)
  assert all('configs/tiny.py' in line for line in lines[2:])


@pytest.mark.slow
def test_train_throughput_tiny(tmp_path):
  profile_dir = tmp_path / 'trace'
  record, stdout = _run('train_throughput.py', ['--windows=2', '--steps_per_window=2', '--warmup_steps=1',
                                                '--batch_size=8', f'--profile_dir={profile_dir}'],
                        str(tmp_path / 'train.json'))
  traces = [f for _, _, files in os.walk(profile_dir) for f in files if '.xplane.pb' in f]
  assert record['profile_dir'] == str(profile_dir) and traces, list(os.walk(profile_dir))
  for key in META_KEYS + ('lower_s', 'compile_s', 'steps_per_s', 'images_per_s', 'flops_per_step',
                          'achieved_tflops', 'mfu', 'recompiles', 'jit_cache_size', 'window_s'):
    assert key in record, key
  assert record['benchmark'] == 'train_throughput' and record['batch_size'] == 8
  assert len(record['window_s']) == 2 and all(_positive(s) for s in record['window_s'])
  _check_summary(record['steps_per_s'])
  _check_summary(record['images_per_s'])
  assert math.isclose(record['images_per_s']['median'], 8 * record['steps_per_s']['median'])
  for key in ('lower_s', 'compile_s', 'flops_per_step', 'achieved_tflops', 'peak_memory_bytes'):
    assert _positive(record[key]), (key, record[key])
  assert record['recompiles'] == 0 and record['jit_cache_size'] == 1
  assert record['mfu'] is None and 'no peak' in record['peak_note']  # CPU: no peak FLOP/s
  _check_markdown(stdout, rows=1)


@pytest.mark.slow
def test_sample_throughput_tiny(tmp_path):
  record, stdout = _run('sample_throughput.py', ['--methods=ancestral,ddim5,respaced5', '--batch_size=4',
                                                 '--repeats=2', '--ancestral_timesteps=10'],
                        str(tmp_path / 'sample.json'))
  for key in META_KEYS + ('forward_flops_per_image', 'methods', 'num_images'):
    assert key in record, key
  assert _positive(record['forward_flops_per_image'])
  by_name = {m['method']: m for m in record['methods']}
  assert set(by_name) == {'ancestral', 'ddim5', 'respaced5'}
  ancestral = by_name['ancestral']
  assert ancestral['steps'] == 20 and ancestral['measured_steps'] == 10 and ancestral['extrapolated']
  assert by_name['ddim5']['sampling_method'] == 'ddim' and by_name['ddim5']['steps'] == 5
  assert by_name['respaced5']['sampling_method'] == 'ancestral' and not by_name['respaced5']['extrapolated']
  for m in record['methods']:
    _check_summary(m['batch_s'])
    _check_summary(m['images_per_s'])
    for key in ('compile_s', 's_per_1000_images', 'time_for_num_images_s', 'achieved_tflops'):
      assert _positive(m[key]), (m['method'], key, m[key])
    assert m['recompiles'] == 0
    assert math.isclose(m['time_for_num_images_s'], 50 * m['s_per_1000_images'])
  _check_markdown(stdout, rows=3)


def test_peak_table_names_its_figure():
  assert common.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16')[0] == 989.0
  value, note = common.peak_tflops('NVIDIA H100 80GB HBM3', 'float32')
  assert value == 495.0 and 'TF32' in note
  assert common.peak_tflops('NVIDIA H200', 'bfloat16')[0] == 989.0
  assert common.peak_tflops('TPU v4', 'bfloat16')[0] == 275.0
  assert common.peak_tflops('TPU v5 lite', 'bfloat16')[0] == 197.0
  assert common.peak_tflops('TPU v5p', 'bfloat16')[0] == 459.0
  assert common.peak_tflops('cpu', 'float32')[0] is None


def test_mfu_is_achieved_over_peak_of_all_devices():
  out = common.mfu(382e12, 'NVIDIA H100 80GB HBM3', 'bfloat16', 1)
  assert math.isclose(out['mfu'], 382 / 989)
  # A TPU v3-8 is 4 chips of 123 TFLOP/s, listed by JAX as 8 devices.
  assert math.isclose(common.mfu(382e12, 'TPU v3', 'bfloat16', 8)['mfu'], 382 / (4 * 123))
  assert common.mfu(1e12, 'cpu', 'float32', 1)['mfu'] is None


def test_summary_and_markdown_table():
  assert common.summary([3.0, 1.0, 2.0]) == {'median': 2.0, 'min': 1.0, 'max': 3.0}
  table = common.markdown_table(['a', 'b'], [['1', '2']])
  assert table.splitlines() == ['| a | b |', '|---|---|', '| 1 | 2 |']
  assert common.fmt(None) == 'n/a'
