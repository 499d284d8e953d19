"""The benchmark scripts run end to end on configs/tiny.py and write valid records (no speed is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from bench import common, hlo_kernels
from conftest import REPO_ROOT, TEST_XLA_FLAGS

TINY = ['--config=configs/tiny.py']
META_KEYS = ('date', 'command', 'config', 'machine', 'devices', 'versions', 'batch_size', 'dtype',
             'num_params', 'peak_memory_bytes', 'peak_memory_source')  # the last two: timed runs only


def _run(script: str, args: list[str], out: str, env: dict[str, str] | None = None
         ) -> tuple[dict[str, Any], str]:
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  full_env['XLA_FLAGS'] = TEST_XLA_FLAGS  # no device-count flags; the suite's compile speed-up
  full_env.pop('JAX_COMPILATION_CACHE_DIR', None)  # the scripts time compilation: no cache hits
  full_env.update(env or {})
  env = {k: v for k, v in full_env.items() if v}  # an empty value removes the variable
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


def _printed_rows(stdout: str) -> list[list[str]]:
  """The cells of the rows of the table a script prints (header and separator left out)."""
  lines = [line for line in stdout.splitlines() if line.startswith('|')]
  return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[2:]]


def test_lowered_flops_counts_every_multiply_add_of_a_convolution_and_a_dot():
  """The count comes from the program as lowered, so a backend that turns convolutions into library calls
  (cuDNN on a GPU) cannot drop them: against a count of the in-bounds taps of a SAME convolution."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  n, size, k, c_in, c_out = 2, 8, 3, 3, 5
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  lowered = conv.lower(jax.ShapeDtypeStruct((n, size, size, c_in), jnp.float32),
                       jax.ShapeDtypeStruct((k, k, c_in, c_out), jnp.float32))
  pos = np.arange(size)[:, None] + np.arange(k)[None, :] - k // 2  # input row each tap reads
  taps_per_axis = int(((pos >= 0) & (pos < size)).sum())
  assert common.lowered_flops(lowered) == 2 * n * taps_per_axis ** 2 * c_in * c_out
  dot = jax.jit(lambda a, b: a @ b).lower(jax.ShapeDtypeStruct((4, 6), jnp.float32),
                                          jax.ShapeDtypeStruct((6, 7), jnp.float32))
  assert common.lowered_flops(dot) == 2 * 4 * 6 * 7

  class PjrtCApiLowered:  # jax's Lowered on a backend behind PJRT's C API (the CUDA plugin): no cost analysis
    def __init__(self, lowered):
      self.compiler_ir = lowered.compiler_ir

    def cost_analysis(self):
      return None

  assert common.lowered_flops(PjrtCApiLowered(lowered)) == 2 * n * taps_per_axis ** 2 * c_in * c_out
  assert common.lowered_flops(PjrtCApiLowered(dot)) == 2 * 4 * 6 * 7


def _global_train_step_flops(overrides: dict[str, Any]) -> float:
  """XLA's count for one train step of configs/tiny.py over its global batch, on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from configs import tiny  # pylint: disable=import-outside-toplevel
  from ddpm_jax import diffusion, models  # pylint: disable=import-outside-toplevel
  from ddpm_jax.train.state import create_train_state  # pylint: disable=import-outside-toplevel
  from ddpm_jax.train.step import make_train_step  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.update_from_flattened_dict(overrides)
  state = jax.eval_shape(lambda key: create_train_state(config, key), jax.random.key(0))
  size, channels = config.data.image_size, config.data.num_channels
  batch = jax.ShapeDtypeStruct((config.training.batch_size, size, size, channels), jnp.float32)
  step = make_train_step(models.create_model(config), diffusion.coefficients_from_config(config.diffusion))
  return common.lowered_flops(jax.jit(step).lower(state, batch, jax.eval_shape(jax.random.key, 0)))


@pytest.mark.slow
def test_train_throughput_tiny(tmp_path):
  profile_dir = tmp_path / 'trace'
  # Two CPU devices and the flat gradient all-reduce, whose per-device part is a shard_map: the FLOPs
  # reported must still be the whole batch's.
  overrides = {'training.batch_size': 8, 'model.dropout': 0.0, 'runtime.gradient_all_reduce': 'flat'}
  record, stdout = _run('train_throughput.py', ['--windows=2', '--steps_per_window=2', '--warmup_steps=1',
                                                '--batch_size=8', f'--profile_dir={profile_dir}',
                                                '--config.model.dropout=0.0',
                                                '--config.runtime.gradient_all_reduce=flat'],
                        str(tmp_path / 'train.json'), env={'JAX_NUM_CPU_DEVICES': '2'})
  assert record['devices']['count'] == 2, record['devices']
  assert record['flops_per_step'] == _global_train_step_flops(overrides), record['flops_source']
  traces = [f for _, _, files in os.walk(profile_dir) for f in files if '.xplane.pb' in f]
  assert record['profile_dir'] == str(profile_dir) and traces, list(os.walk(profile_dir))
  for key in META_KEYS + ('lower_s', 'compile_s', 'steps_per_s', 'images_per_s', 'flops_per_step',
                          'achieved_tflops', 'mfu', 'recompiles', 'jit_cache_size', 'window_s'):
    assert key in record, key
  assert record['benchmark'] == 'train_throughput' and record['batch_size'] == 8
  assert record['runtime']['cpu_train_convolutions'] == 'ynnpack'  # 8x8: 'auto' keeps YNNPACK's
  assert len(record['window_s']) == 2 and all(_positive(s) for s in record['window_s'])
  _check_summary(record['steps_per_s'])
  _check_summary(record['images_per_s'])
  assert math.isclose(record['images_per_s']['median'], 8 * record['steps_per_s']['median'])
  for key in ('lower_s', 'compile_s', 'flops_per_step', 'achieved_tflops', 'peak_memory_bytes'):
    assert _positive(record[key]), (key, record[key])
  assert record['recompiles'] == 0 and record['jit_cache_size'] == 1
  assert record['mfu'] is None and 'no peak' in record['peak_note']  # CPU: no peak FLOP/s
  # The printed summary is the record's: the same run, the same measurements.
  (row,) = _printed_rows(stdout)
  assert row[0] == 'configs/tiny.py' and common.fmt_range(record['steps_per_s']) in row, row
  assert common.fmt(record['images_per_s']['median']) in row and row[-1] == '0', row


@pytest.mark.slow  # ~40-50 s on 2 cores
def test_train_ab_alternates_variants_and_reports_per_round_ratios(tmp_path):
  """bench/train_ab.py: every variant built from its overrides (and variant b from another file's step,
  `--step_module`), timed in every round, its per-round ratio to the first; a field the config lacks, or a
  step module for no variant, is an error naming it."""
  step_file, marker = tmp_path / 'step_elsewhere.py', tmp_path / 'built_from_elsewhere'
  with open(os.path.join(REPO_ROOT, 'ddpm_jax', 'train', 'step.py')) as f:
    step_file.write_text(f.read() + textwrap.dedent(f'''
        _jit_train_step = jit_train_step
        def jit_train_step(*args, **kwargs):
          open({str(marker)!r}, 'a').write('built\\n')
          return _jit_train_step(*args, **kwargs)
        '''))
  variants = ['--variant=a:', '--variant=b:training.ema_decay=0.5;optim.grad_clip=2.0',
              f'--step_module=b={step_file}']
  record, stdout = _run('train_ab.py', ['--rounds=3', '--steps_per_window=1', '--warmup_steps=1',
                                        '--batch_size=8', *variants], str(tmp_path / 'ab.json'))
  assert record['benchmark'] == 'train_ab' and record['rounds'] == 3
  assert record['variants'] == {'a': {}, 'b': {'training.ema_decay': 0.5, 'optim.grad_clip': 2.0}}
  assert record['step_modules'] == {'b': str(step_file)}
  assert marker.read_text() == 'built\n'  # variant b's step, and only b's, came from the file
  for res in record['results'].values():
    _check_summary(res['steps_per_s'])
  assert record['results']['a']['ratio_to_first'] == {'median': 1.0, 'min': 1.0, 'max': 1.0}
  assert [row[0] for row in _printed_rows(stdout)] == ['a', 'b']
  proc = subprocess.run([sys.executable, 'bench/train_ab.py', *TINY, '--variant=a:',
                         '--variant=b:training.no_such=1'], capture_output=True, text=True, cwd=REPO_ROOT,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300, check=False)
  assert proc.returncode != 0 and "config has no field 'training.no_such'" in proc.stderr, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, 'bench/train_ab.py', *TINY, '--variant=a:', '--variant=b:',
                         f'--step_module=c={step_file}'], capture_output=True, text=True, cwd=REPO_ROOT,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300, check=False)
  assert proc.returncode != 0 and "--step_module='c=" in proc.stderr and "one of the variants ['a', 'b']" in \
      proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_gpu_targets_script_runs_every_figure_and_reports_the_one_that_fails(tmp_path):
  """bench/gpu_targets.sh, shrunk to configs/tiny.py: every figure runs in its own process and writes its
  record; a figure that fails (DDIM-100 on T=20) is named with the end of its log, and the rest still run."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS=TEST_XLA_FLAGS,
             PYTHON=sys.executable, CONFIG='configs/tiny.py', TRAIN_BATCH='8', SAMPLE_BATCH='6', WINDOWS='1',
             STEPS='1', WARMUP='1', REPEATS='1', ANCESTRAL_T='4', METHODS='ddim5,respaced5',
             FP32_METHODS='ddim100', LIMIT_S='300')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  proc = subprocess.run(['bash', 'bench/gpu_targets.sh', str(tmp_path)], capture_output=True, text=True,
                        cwd=REPO_ROOT, env=env, timeout=900, check=False)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert '### sample_fp32 FAILED' in proc.stdout and 'cannot take exactly 100 steps' in proc.stdout
  assert '### 1 of 5 figures failed' in proc.stdout
  for name, benchmark in (('train_bf16', 'train_throughput'), ('sample_bf16', 'sample_throughput'),
                          ('train_fp32', 'train_throughput'), ('ancestral_bf16', 'sample_throughput')):
    with open(tmp_path / f'{name}.json') as f:
      record = json.load(f)
    assert record['benchmark'] == benchmark and record['config'] == 'configs/tiny.py', name
    assert record['dtype'] == ('float32' if 'fp32' in name else 'bfloat16'), name
  assert not (tmp_path / 'sample_fp32.json').exists()
  # Each figure's rows are printed: one per train run, one per sampler.
  assert sum(line.startswith('| configs/tiny.py |') for line in proc.stdout.splitlines()) == 5, proc.stdout


@pytest.mark.slow
def test_sample_throughput_tiny(tmp_path):
  # --batch_size=6 does not divide configs/tiny.py's sampling.samples_per_shard=8, which the benchmark
  # (it writes no shards) must not refuse: `--batch_size=1000` failed so for configs/cifar10.py on an H200.
  record, stdout = _run('sample_throughput.py', ['--methods=ancestral,ddim5,respaced5', '--batch_size=6',
                                                 '--repeats=2', '--ancestral_timesteps=10'],
                        str(tmp_path / 'sample.json'))
  for key in META_KEYS + ('forward_flops_per_image', 'methods', 'num_images'):
    assert key in record, key
  assert _positive(record['forward_flops_per_image'])
  assert record['runtime']['cpu_sample_reductions'] == 'xla'  # what the sampler is compiled with
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
  # One printed row per method, each with that method's measurements.
  rows = {row[4]: row for row in _printed_rows(stdout)}
  assert set(rows) == set(by_name), rows
  for name, m in by_name.items():
    assert rows[name][0] == 'configs/tiny.py' and rows[name][5] == str(m['steps']), rows[name]
    assert common.fmt_range(m['images_per_s']) in rows[name], rows[name]


def test_every_row_of_the_peak_tables_is_reachable():
  """The lookups take the first row whose key is in the device kind: an earlier key inside a later one
  (e.g. 'tpu v5' before 'tpu v5e') would hide the later row."""
  for key, bf16, fp32, _ in common._PEAK_TFLOPS:  # pylint: disable=protected-access
    kind = f'Some {key.upper()} variant'  # JAX's device_kind strings are not lower case
    assert common.peak_tflops(kind, 'bfloat16')[0] == bf16, key
    value, note = common.peak_tflops(kind, 'float32')
    assert value == fp32 and f'{fp32:g}' in note, (key, note)
  for key, tb_s in common._PEAK_BANDWIDTH_TB_S:  # pylint: disable=protected-access
    value, note = common.peak_bandwidth(key.upper())
    assert value == tb_s and f'{tb_s:g}' in note, (key, note)


def test_device_kinds_as_jax_names_them_find_their_rows():
  tflops = {key: row for key, *row in common._PEAK_TFLOPS}  # pylint: disable=protected-access
  bandwidth = dict(common._PEAK_BANDWIDTH_TB_S)  # pylint: disable=protected-access
  assert common.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16')[0] == tflops['h100'][0]
  assert common.peak_tflops('TPU v5 lite', 'bfloat16')[0] == tflops['tpu v5 lite'][0]
  assert common.peak_tflops('TPU v5p', 'bfloat16')[0] == tflops['tpu v5p'][0]
  assert common.peak_bandwidth('NVIDIA H100 PCIe')[0] == bandwidth['h100 pcie'] != bandwidth['h100']
  assert common.peak_bandwidth('NVIDIA H100 80GB HBM3')[0] == bandwidth['h100']
  # float32 on NVIDIA runs on TF32 tensor cores by default; the note says so.
  assert 'TF32' in common.peak_tflops('NVIDIA H100 80GB HBM3', 'float32')[1]
  # Unknown kinds (CPUs) have no peak: MFU and the roofline floor are not computed, and the note says why.
  value, note = common.peak_tflops('cpu', 'float32')
  assert value is None and 'MFU not computed' in note
  assert common.peak_bandwidth('cpu')[0] is None


def test_mfu_is_achieved_over_peak_of_all_devices():
  out = common.mfu(382e12, 'NVIDIA H100 80GB HBM3', 'bfloat16', 1)
  assert math.isclose(out['mfu'], 382 / 989)
  # A TPU v3-8 is 4 chips of 123 TFLOP/s, listed by JAX as 8 devices.
  assert math.isclose(common.mfu(382e12, 'TPU v3', 'bfloat16', 8)['mfu'], 382 / (4 * 123))
  assert common.mfu(1e12, 'cpu', 'float32', 1)['mfu'] is None


def test_summary_is_median_min_max_of_unordered_measurements():
  assert common.summary([3.0, 1.0, 2.0]) == {'median': 2.0, 'min': 1.0, 'max': 3.0}
  assert common.summary([4.0, 1.0, 3.0, 2.0]) == {'median': 2.5, 'min': 1.0, 'max': 4.0}


# An optimized GPU module in the form XLA prints it (shapes with layouts, tuple results, metadata).
_HLO = """HloModule jit_step, is_scheduled=true

%fused_add (p0: f32[4,8], p1: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  ROOT %add.1 = f32[4,8]{1,0} add(%p0, %p1)
}

ENTRY %main.9 (Arg_0.1: f32[4,8], Arg_1.2: bf16[3,3,8,16]) -> (f32[4,8], bf16[2,4,4,16]) {
  %Arg_0.1 = f32[4,8]{1,0} parameter(0), metadata={op_name="x"}
  %Arg_1.2 = bf16[3,3,8,16]{3,2,1,0} parameter(1)
  %loop_add_fusion = f32[4,8]{1,0} fusion(%Arg_0.1, %Arg_0.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/transpose(jvp(UNet))/up_1/block_2/norm1/add_any"}
  %copy.3 = bf16[3,3,8,16]{0,1,2,3} copy(%Arg_1.2)
  %conv = (bf16[2,4,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%copy.3, %copy.3), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp(UNet)/down_0/block_0/conv1/conv_general_dilated"}
  %get-tuple-element.4 = bf16[2,4,4,16]{3,2,1,0} get-tuple-element(%conv), index=0
  ROOT %tuple.5 = (f32[4,8]{1,0}, bf16[2,4,4,16]{3,2,1,0}) tuple(%loop_add_fusion, %get-tuple-element.4)
}
"""  # noqa: E501  (XLA prints each instruction on one line)


def test_hlo_kernels_reads_the_entry_computation():
  kernels = hlo_kernels.entry_kernels(_HLO)
  f32_4x8, weights, conv_out = 4 * 8 * 4, 3 * 3 * 8 * 16 * 2, 2 * 4 * 4 * 16 * 2
  assert kernels == [
      hlo_kernels.Kernel('fusion:kLoop', 2 * f32_4x8, f32_4x8,
                         'jit(step)/transpose(jvp(UNet))/up_1/block_2/norm1/add_any'),
      hlo_kernels.Kernel('copy', weights, weights, ''),
      hlo_kernels.Kernel('__cudnn$convForward', 2 * weights, conv_out,
                         'jit(step)/jvp(UNet)/down_0/block_0/conv1/conv_general_dilated')]
  assert [hlo_kernels.is_matmul(k.kind) for k in kernels] == [False, False, True]
  assert hlo_kernels.source(kernels[0].op_name) == 'grad:up/block/norm1/add_any'
  assert hlo_kernels.category(kernels[0]) == 'memory: GroupNorm'
  assert hlo_kernels.category(kernels[2]) == 'matmul: rest of the network'
  assert hlo_kernels.shape_bytes('(f32[2,3]{1,0}, bf16[5]{0}, u8[0]{0})') == 24 + 10
  with pytest.raises(ValueError, match='no ENTRY'):
    hlo_kernels.entry_kernels('HloModule m')


def test_roofline_floor_adds_memory_bound_kernels_to_the_matmuls():
  kernels = [hlo_kernels.Kernel('fusion:kLoop', 300, 100, ''),
             hlo_kernels.Kernel('__cublas$lt$matmul', 50, 50, '')]
  compute_bound = hlo_kernels.roofline_floor(kernels, flops=1000.0, peak_flops=10.0, bandwidth=100.0)
  assert compute_bound['other_bytes'] == 400 and compute_bound['matmul_bytes'] == 100
  assert math.isclose(compute_bound['floor_s'], 400 / 100 + 1000 / 10)
  memory_bound = hlo_kernels.roofline_floor(kernels, flops=1.0, peak_flops=10.0, bandwidth=100.0)
  assert math.isclose(memory_bound['floor_s'], 400 / 100 + 100 / 100)


def _check_compile_report(record: dict[str, Any]) -> None:
  for key in META_KEYS[:-2] + ('what', 'target_device_kind', 'lower_s', 'compile_s', 'flops', 'kernels',
                          'by_kind', 'by_category', 'top_memory_bound_sources', 'floor'):
    assert key in record, key
  assert _positive(record['flops']) and record['kernels'] > 10
  assert sum(c['kernels'] for c in record['by_category']) == record['kernels']
  assert sum(k['kernels'] for k in record['by_kind']) == record['kernels']
  assert {c['name'] for c in record['by_category']} >= {'memory: GroupNorm', 'memory: rest of the network'}


@pytest.mark.slow
def test_compile_report_tiny_on_the_local_cpu(tmp_path):
  # The forward pass compiles in seconds; the train step is compiled by the H100 test below.
  record, stdout = _run('compile_report.py', ['--what=forward', '--batch_size=8', '--target=local'],
                        str(tmp_path / 'report.json'))
  _check_compile_report(record)
  assert record['target_device_kind'] == 'cpu' and record['floor'] is None  # no datasheet peaks
  assert record['compiled_memory_bytes']['arguments'] >= 4 * record['num_params']  # float32 params
  assert 'configs/tiny.py | forward | float32 | 8 | cpu' in stdout


def test_compile_report_names_a_missing_target(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, 'bench/compile_report.py', *TINY, '--target=no/such.txtpb'],
                        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600, check=False)
  assert proc.returncode != 0 and "--target='no/such.txtpb'" in proc.stderr, proc.stderr[-2000:]


def _has_cuda_plugin() -> bool:
  try:
    import jax_plugins.xla_cuda12  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_cuda_plugin(), reason='needs jax-cuda12-plugin (not a project dependency)')
def test_compile_report_for_an_h100_without_a_gpu(tmp_path):
  """Deviceless compilation for bench/targets/h100_sxm.txtpb (runs where the CUDA plugin is installed)."""
  record, _ = _run('compile_report.py',
                   ['--what=train', '--batch_size=8', '--dtype=bfloat16',
                    '--target=bench/targets/h100_sxm.txtpb'], str(tmp_path / 'report.json'),
                   env={'JAX_PLATFORMS': '', 'JAX_SKIP_CUDA_CONSTRAINTS_CHECK': '1'})
  _check_compile_report(record)
  assert record['target_device_kind'] == 'NVIDIA H100 80GB HBM3'
  kinds = {k['name'] for k in record['by_kind']}
  assert {'__cudnn$convBiasActivationForward', '__cudnn$convBackwardInput',
          '__cudnn$convBackwardFilter'} <= kinds, kinds
  assert record['floor']['floor_s'] > 0 and record['bandwidth_tb_s'] == 3.35


# --- bench/torch_peer.py: ddpm_jax against the same network in PyTorch (torch is never a dependency) ---

def test_torch_peer_without_torch_says_how_to_get_it_and_exits_0(tmp_path):
  """The real script, in a Python where `import torch` fails (whether or not torch is installed)."""
  out = tmp_path / 'peer.json'
  code = ('import runpy, sys; sys.modules["torch"] = None; '  # None in sys.modules: ImportError on import
          f'sys.argv = ["bench/torch_peer.py", "--config=configs/tiny.py", "--out={out}"]; '
          'runpy.run_path("bench/torch_peer.py", run_name="__main__")')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO_ROOT,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == ('torch is not installed: pip install torch (CPU build) to run the peer '
                                 'benchmark; ddpm_jax never depends on it'), proc.stdout
  assert not out.exists()


def _config(name: str) -> Any:
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', ['digits', 'tiny'])
def test_torch_unet_has_the_parameter_count_of_ddpm_jax(name):
  pytest.importorskip('torch')
  from bench import torch_unet  # pylint: disable=g-import-not-at-top
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  config = _config(name)
  expected = models.count_params(models.param_shapes(config))
  assert torch_unet.count_params(torch_unet.TorchUNet.from_config(config)) == expected


def _torch_name(path: tuple[str, ...], num_levels: int) -> str:
  """The PyTorch parameter of a Flax parameter path, e.g. ('down_0', 'attn_0', 'q', 'kernel') ->
  'down.0.attns.0.q.weight' (the up path is stored in the order it runs: up_{L-1} first)."""
  *scopes, leaf = path
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]
  head, rest = scopes[0], list(scopes[1:])
  if head == 'temb':
    return f'temb_{rest[0]}.{leaf}'
  if head == 'mid':
    return f'mid_{rest[0]}.' + '.'.join(rest[1:] + [leaf])
  if head.startswith(('down_', 'up_')):
    side, level = head.split('_')
    index = int(level) if side == 'down' else num_levels - 1 - int(level)
    kind = rest[0]
    if kind.startswith(('block_', 'attn_')):
      group, i = kind.split('_')
      rest = [f'{group}s', i] + rest[1:]
    return '.'.join([side, str(index)] + rest + [leaf])
  return '.'.join(scopes + [leaf])


def _twin_networks(config: Any) -> tuple[Any, Any, Any]:
  """(ddpm_jax model, its params, the PyTorch U-Net in eval mode holding the same weights).

  Random values everywhere (the zero-initialised layers would hide most of the network).
  """
  torch = pytest.importorskip('torch')
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bench import torch_unet  # pylint: disable=g-import-not-at-top
  from ddpm_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(config)
  shapes = models.param_shapes(config)
  rng = np.random.default_rng(0)
  flat = {path: rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), list(flat.values()))
  net = torch_unet.TorchUNet.from_config(config).eval()
  state = net.state_dict()
  loaded = {}
  for path, value in flat.items():
    name = _torch_name(tuple(k.key for k in path), len(config.model.ch_mult))
    target = state[name]
    if value.ndim == 4:  # conv [kh, kw, in, out] -> [out, in, kh, kw]
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:  # dense / nin [in, out] -> Linear [out, in] or 1x1 conv [out, in, 1, 1]
      value = value.T.reshape(target.shape)
    loaded[name] = torch.from_numpy(np.ascontiguousarray(value))
  assert set(loaded) == set(state)  # every PyTorch parameter set, once
  net.load_state_dict(loaded)
  return model, params, net


def test_torch_unet_computes_the_function_of_ddpm_jax():
  """Same weights in, same eps out: the peer times ddpm_jax's network, not one with the same count only.

  Dropout off (eval mode).
  """
  torch = pytest.importorskip('torch')
  import numpy as np  # pylint: disable=g-import-not-at-top
  config = _config('tiny')
  config.model.attn_resolutions = (8, 4)  # attention on both levels, and the middle one
  model, params, net = _twin_networks(config)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  t = np.array([0, 7, 19], np.int32)
  want = np.asarray(model.apply({'params': params}, x, t, train=False))
  with torch.no_grad():
    got = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t).long()).numpy()
  np.testing.assert_allclose(got.transpose(0, 2, 3, 1), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_torch_ddim_sampler_computes_the_samples_of_ddpm_jax():
  """The sampling peer runs ddpm_jax's DDIM chain: same weights and x_T, same respaced steps, same x_0.

  eta = 0 (the digits recipe's and the peer's default): with eta > 0 the frameworks draw their own noise.
  """
  torch = pytest.importorskip('torch')
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bench import torch_peer  # pylint: disable=g-import-not-at-top
  from ddpm_jax import diffusion  # pylint: disable=g-import-not-at-top
  from ddpm_jax.sampling import loop, sample_fn  # pylint: disable=g-import-not-at-top
  config = _config('tiny')
  config.model.attn_resolutions = (8, 4)
  config.sampling.method, config.sampling.timestep_respacing = 'ddim', 'ddim5'
  config.sampling.ddim_eta = 0.0
  model, params, net = _twin_networks(config)
  timesteps = [int(t) for t in diffusion.space_timesteps(config.diffusion.num_timesteps, 'ddim5')]
  assert timesteps == [0, 4, 8, 12, 16]  # iDDPM's "ddimK": range(0, T, T // K)
  x_t = np.random.default_rng(2).standard_normal((4, 8, 8, 1)).astype(np.float32)
  step = sample_fn.step_fn_from_config(config, sample_fn.sampling_coefficients(config),
                                       sample_fn.make_model_fn(model, params))
  want, _ = loop.sample_loop(step, None, x_t.shape, len(timesteps), jnp.float32, noise=jnp.asarray(x_t),
                             step_noise=lambda t: jnp.zeros_like(x_t))
  with torch.inference_mode():
    got = torch_peer.torch_ddim_sampler(config, net, timesteps)(torch.from_numpy(x_t.transpose(0, 3, 1, 2).copy()))
  want = np.asarray(want)
  assert np.abs(want).max() > 0.1  # the network's output moved the samples: a comparison that can fail
  np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_peer_one_pair_on_tiny(tmp_path):
  pytest.importorskip('torch')
  record, stdout = _run('torch_peer.py', ['--pairs=1', '--windows=2', '--steps_per_window=2',
                                          '--warmup_steps=1', '--batch_size=8'], str(tmp_path / 'peer.json'))
  for key in META_KEYS[:-2] + ('network', 'pairs', 'ddpm_jax_steps_per_s', 'torch_steps_per_s', 'ratio',
                               'threads'):
    assert key in record, key
  assert record['benchmark'] == 'torch_peer' and record['num_params'] == 701_345
  (pair,) = record['pairs']
  assert pair['first'] == 'ddpm_jax' and pair['torch']['num_params'] == 701_345
  assert len(pair['ddpm_jax']['window_s']) == len(pair['torch']['window_s']) == 2
  _check_summary(record['ratio'])
  assert math.isclose(record['ratio']['median'], record['ddpm_jax_steps_per_s']['median']
                      / record['torch_steps_per_s']['median'])
  assert record['versions']['torch'] and record['threads']['torch_intra_op'] >= 1
  (row,) = _printed_rows(stdout)
  assert row[1] == '701,345' and row[2] == '8' and common.fmt_range(record['ratio'], '.2f') == row[-1], row


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity'), reason='pinning needs os.sched_setaffinity')
def test_torch_peer_on_one_core_pins_both_runs(tmp_path):
  """--cores=1: both processes start on one core, so ddpm_jax makes one device and PyTorch one thread."""
  pytest.importorskip('torch')
  first_core = min(os.sched_getaffinity(0))
  record, stdout = _run('torch_peer.py', ['--pairs=1', '--windows=2', '--steps_per_window=2', '--warmup_steps=1',
                                          '--batch_size=8', '--cores=1'], str(tmp_path / 'peer.json'))
  threads = record['threads']
  assert threads['pinned_cores'] == [first_core]
  assert threads['torch_intra_op'] == 1 and threads['jax_device_count'] == 1, threads
  assert f'Pinned: both runs started with the affinity of core(s) [{first_core}] (--cores=1)' in stdout
  assert 'intra-op set by --cores' in stdout


def test_torch_peer_refuses_more_cores_than_it_may_use(tmp_path):
  pytest.importorskip('torch')
  too_many = len(os.sched_getaffinity(0)) + 1 if hasattr(os, 'sched_getaffinity') else 2
  proc = subprocess.run([sys.executable, 'bench/torch_peer.py', *TINY, f'--cores={too_many}',
                         f'--out={tmp_path / "peer.json"}'], capture_output=True, text=True, cwd=REPO_ROOT,
                        timeout=300, check=False)
  assert proc.returncode != 0 and f'--cores={too_many}' in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / 'peer.json').exists()


@pytest.mark.slow
def test_torch_peer_sampling_one_pair_on_tiny(tmp_path):
  pytest.importorskip('torch')
  record, stdout = _run('torch_peer.py', ['--measure=sample', '--method=ddim3', '--pairs=1', '--repeats=2',
                                          '--batch_size=8'], str(tmp_path / 'peer.json'))
  assert record['measure'] == 'sample' and record['method'] == 'ddim3' and record['steps'] == 3
  assert record['batch_size'] == 8 and record['num_params'] == 701_345
  (pair,) = record['pairs']
  assert pair['ddpm_jax']['batch_s']['median'] > 0 and len(pair['torch']['batch_s']) == 2
  assert pair['torch']['steps'] == 3 and pair['ddpm_jax']['recompiles'] == 0
  _check_summary(record['ratio'])
  assert math.isclose(record['ratio']['median'], record['ddpm_jax_images_per_s']['median']
                      / record['torch_images_per_s']['median'])
  (row,) = _printed_rows(stdout)
  assert row[2] == '8' and common.fmt_range(record['ratio'], '.2f') == row[-1], row
  assert 'Images/s: the median over each run\'s 2 timed calls (ddim3: 3 DDIM steps' in stdout


def test_torch_peer_sampling_refuses_a_sampler_it_does_not_run(tmp_path):
  pytest.importorskip('torch')
  proc = subprocess.run([sys.executable, 'bench/torch_peer.py', *TINY, '--measure=sample', '--method=ddpm',
                         f'--out={tmp_path / "peer.json"}'], capture_output=True, text=True, cwd=REPO_ROOT,
                        timeout=300, check=False)
  assert proc.returncode != 0
  assert "--method='ddpm': the sampling peer runs DDIM only: ddimK, e.g. ddim100" in proc.stderr
  assert not (tmp_path / 'peer.json').exists()


def _xspace(planes: list[tuple[str, list[list[tuple[str, int, int]]]]]) -> bytes:
  """A serialized XSpace (the profiler's .xplane.pb format): planes of lines of (name, start, length) in us."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  text = []
  for plane_id, (plane, lines) in enumerate(planes, 1):
    names = sorted({name for line in lines for name, _, _ in line})
    body = [f'lines {{ id: {i} name: "stream {i}" timestamp_ns: 0 ' +
            ' '.join(f'events {{ metadata_id: {names.index(n) + 1} offset_ps: {s * 10**6} '
                     f'duration_ps: {d * 10**6} }}' for n, s, d in line) + ' }'
            for i, line in enumerate(lines, 1)]
    body += [f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for i, n in enumerate(names, 1)]
    text.append(f'planes {{ id: {plane_id} name: "{plane}" {" ".join(body)} }}')
  return ProfileData.text_proto_to_serialized_xspace('\n'.join(text))


def test_profile_summary_sums_a_gpu_traces_kernels_per_category_and_name(tmp_path):
  """Two steps of kernels on two overlapping streams: numbered instances summed under one name, each in
  its category (a fusion named for a convert is no convolution), sums per step, busy against the span."""
  step = [('input_reduce_fusion_3', 0, 2), ('input_reduce_fusion_12', 2, 4), ('loop_convert_fusion', 6, 1),
          ('sm90_xmma_fprop_implicit_gemm_bf16_cudnn', 7, 10), ('nvjet_sm90_tst_128x128', 17, 3)]
  stream = [(name, start + 20 * s, length) for s in range(2) for name, start, length in step]
  copies = [('memcpy32_post', 30, 5)]  # on a second stream, overlapping the first
  trace = tmp_path / 'plugins' / 'profile' / '2026_12_04'
  trace.mkdir(parents=True)
  (trace / 'vm.xplane.pb').write_bytes(_xspace([('/host:CPU', []), ('/device:GPU:0', [stream, copies])]))
  out = tmp_path / 'summary.json'
  proc = subprocess.run([sys.executable, 'bench/profile_summary.py', f'--trace={tmp_path}', '--steps=2',
                         f'--out={out}'], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(out.read_text())
  assert summary['devices'] == ['/device:GPU:0'] and summary['kernels_per_step'] == 5.5
  assert summary['kernel_ms'] == pytest.approx((20 + 20 + 5) / 2 / 1000)
  assert summary['busy'] == pytest.approx(45 / 40)  # 45 us of kernels in the 40 us from first start to last end
  categories = {row['category']: (round(row['ms'] * 1000, 9), row['calls']) for row in summary['categories']}
  assert categories == {
      'XLA reduction fusions': (6, 2), 'XLA elementwise fusions': (1, 1), 'convolution (cuDNN)': (10, 1),
      'matrix product (cuBLAS, XLA GEMM fusions)': (3, 1),
      'data movement (copies, concatenations, slices, memset)': (2.5, 0.5)}
  kernels = {row['kernel']: (round(row['ms'] * 1000, 9), row['calls']) for row in summary['top_kernels']}
  assert kernels['input_reduce_fusion'] == (6, 2)
  assert summary['top_kernels'][0]['kernel'] == 'sm90_xmma_fprop_implicit_gemm_bf16_cudnn'
  assert '| XLA reduction fusions | 0.006 | 26.7% | 2 |' in proc.stdout
  assert '| data movement (copies, concatenations, slices, memset) | 0.003 | 11.1% | 0.5 |' in proc.stdout


def test_profile_summary_says_a_cpu_trace_has_no_device_plane(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  with jax.profiler.trace(str(tmp_path)):
    jax.jit(lambda x: x * 2)(jnp.ones(4)).block_until_ready()
  proc = subprocess.run([sys.executable, 'bench/profile_summary.py', f'--trace={tmp_path}'],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)
  assert proc.returncode != 0 and 'no /device: plane (a CPU trace?)' in proc.stderr, proc.stderr[-2000:]
  missing = subprocess.run([sys.executable, 'bench/profile_summary.py', f'--trace={tmp_path / "none"}'],
                           capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)
  assert missing.returncode != 0 and 'no *.xplane.pb below it' in missing.stderr
