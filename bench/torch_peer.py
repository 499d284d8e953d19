r"""ddpm_jax against PyTorch on the same network, side by side: train steps/s (or sampling images/s) and ratio.

  python bench/torch_peer.py --config=configs/digits.py --batch_size=64 --pairs=3 --windows=5 \
      --steps_per_window=20 --out=/tmp/peer_digits.json
  python bench/torch_peer.py --config=configs/digits.py --measure=sample --method=ddim100 --batch_size=500 \
      --pairs=3 --repeats=3 --out=/tmp/peer_digits_sampling.json

Needs torch (CPU build) in the same environment; ddpm_jax never depends on it. Without torch the script
prints one line saying so and exits 0.

Each of `--pairs` pairs runs, in separate processes and one after the other:
  (a) ddpm_jax: `bench/train_throughput.py` itself with the same config, batch and windows, float32, in this
      process's environment unchanged (whatever ddpm_jax does to itself on a CPU applies; no flag is added
      here), read back from its JSON record;
  (b) PyTorch: this script with `--worker`: `bench/torch_unet.py`'s U-Net (asserted to have ddpm_jax's
      parameter count) trained with DDPM's step: t uniform in [0, T), x_t = q_sample(x_0, t, eps) with the
      config's linear beta schedule (DDPM's recipe only: `check_supported`), the eps-prediction MSE
      (ddpm_jax's loss 'mse' with mean_type 'eps'), Adam with the config's betas / eps and linear
      learning-rate warm-up, global-norm gradient clipping at
      config.optim.grad_clip, then the EMA update of the weights (`TrainState.apply_gradients` does the same);
      float32, torch's default threads and kernels (oneDNN on CPU), `--warmup_steps` untimed steps, then
      `--windows` windows of `--steps_per_window` steps.
With `--measure=sample` the pairs time DDIM sampling (`--method=ddimK`) instead, `--batch_size` images a call:
  (a) ddpm_jax: `bench/sample_throughput.py --methods=ddimK` (its compiled sampler, one untimed compile run,
      then `--repeats` timed calls), float32;
  (b) PyTorch: the same U-Net in eval mode under `torch.inference_mode()`, DDIM's update (eq. 12 of Song et
      al., the config's `sampling.ddim_eta` and `clip_denoised`) over the same respaced timesteps (passed to
      the worker from `ddpm_jax.diffusion.space_timesteps`), one untimed call, then `--repeats` timed calls.
  The figure of a run is its median images/s over the calls.
The frameworks alternate (and which goes first alternates from pair to pair), so that a drift of the
machine's load or clock affects both. With `--cores=N` both processes start pinned to the first N
cores this one may use (PyTorch then with N intra-op threads; ddpm_jax picks its devices for N cores as
it does on any machine): `--cores=1` separates the speed of the two frameworks' kernels on one core from
how each spreads its work over several. Each run's figure is the median steps/s over its windows; the ratio
of a pair is ddpm_jax / PyTorch (above 1: ddpm_jax is faster). Both use one fixed random batch: the data
pipeline is timed in neither.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import ml_collections  # pylint: disable=g-import-not-at-top
from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

NO_TORCH_MESSAGE = ('torch is not installed: pip install torch (CPU build) to run the peer benchmark; '
                    'ddpm_jax never depends on it')

config_flags.DEFINE_config_file('config', None, 'Path to a config file in configs/.', lock_config=True)
flags.DEFINE_enum('measure', 'train', ['train', 'sample'],
                  'train: train steps/s; sample: DDIM sampling images/s (--method, --repeats).')
flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the config\'s training or sampling one).')
flags.DEFINE_integer('pairs', 3, 'Pairs of runs (one ddpm_jax run and one PyTorch run each).')
flags.DEFINE_integer('windows', 5, 'Timed windows per run (>= 5 for a benchmark; fewer is a smoke run).')
flags.DEFINE_integer('steps_per_window', 10, 'Train steps per timed window.')
flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps before the windows (after compilation for ddpm_jax).')
flags.DEFINE_string('method', 'ddim100', 'With --measure=sample: the sampler, ddimK (K DDIM steps).')
flags.DEFINE_integer('repeats', 3, 'With --measure=sample: timed calls per run, after one untimed call.')
flags.DEFINE_list('timesteps', None, 'Internal (--worker, --measure=sample): the respaced timesteps.')
flags.DEFINE_integer('cores', None,
                     'Run both sides on the first N cores this process may use (each process started with that '
                     'affinity; PyTorch with N intra-op threads, ddpm_jax with what it picks for N cores). '
                     '--cores=1 compares the two frameworks\' kernels on one core, without their parallel '
                     'scaling. Default: every schedulable core, each framework\'s own threads.')
flags.DEFINE_string('out', None, 'Where to write the JSON record (default: print only).')
flags.DEFINE_bool('worker', False, 'Internal: run the PyTorch side once and write its record to --out.')
FLAGS = flags.FLAGS

MIN_WINDOWS = 5
MIN_REPEATS = 3
THROUGHPUT_SCRIPT = os.path.join(_REPO_ROOT, 'bench', 'train_throughput.py')
SAMPLE_SCRIPT = os.path.join(_REPO_ROOT, 'bench', 'sample_throughput.py')
RATE = {'train': 'steps_per_s', 'sample': 'images_per_s'}  # each measure's figure (higher is faster)


def torch_available() -> bool:
  """Whether torch imports here (an ImportError of any kind, e.g. a broken install, counts as absent)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel  # noqa: F401
  except ImportError:
    return False
  return True


def summary(values: list[float]) -> dict[str, float]:
  """Median, min and max (bench.common.summary, repeated so that the worker never imports jax)."""
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def config_overrides(argv: list[str]) -> list[str]:
  """The `--config.x.y=...` arguments, passed on unchanged to both sides."""
  return [arg for arg in argv if arg.startswith('--config.')]


# ----------------------------------------------------------------------------------------------------------
# The PyTorch side (--worker): imports torch, never jax.


def linear_alphas_cumprod(config: ml_collections.ConfigDict) -> Any:
  """alpha-bar_t of DDPM's linear schedule, a float64 tensor [T], computed as ddpm_jax.diffusion.schedules
  does it (np.linspace, then the cumulative product)."""
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  d = config.diffusion
  betas = torch.linspace(d.beta_start, d.beta_end, d.num_timesteps, dtype=torch.float64)
  return torch.cumprod(1.0 - betas, dim=0)


def torch_train_step(config: ml_collections.ConfigDict, model: Any, images: Any) -> Any:
  """DDPM's train step in PyTorch, as `ddpm_jax.train.step` computes it for the 'eps' / 'mse' loss.

  Returns `step()`: one optimizer update on the fixed batch `images` [B, C, H, W]; returns the loss tensor.
  """
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  d, o = config.diffusion, config.optim
  check_supported(config)
  alphas_cumprod = linear_alphas_cumprod(config)
  sqrt_abar = alphas_cumprod.sqrt().float()
  sqrt_one_minus_abar = (1.0 - alphas_cumprod).sqrt().float()
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  opt = torch.optim.Adam(params, lr=o.learning_rate, betas=(o.beta1, o.beta2), eps=o.eps)
  batch_size, num_timesteps = images.shape[0], d.num_timesteps
  state = {'step': 0}
  model.train()  # dropout on, as in training

  def step() -> torch.Tensor:
    # optax.linear_schedule(0, lr, warmup) at the update's count; the same work for any value.
    lr = o.learning_rate * (min(1.0, state['step'] / o.warmup_steps) if o.warmup_steps else 1.0)
    for group in opt.param_groups:
      group['lr'] = lr
    t = torch.randint(0, num_timesteps, (batch_size,))
    noise = torch.randn_like(images)
    x_t = sqrt_abar[t].view(-1, 1, 1, 1) * images + sqrt_one_minus_abar[t].view(-1, 1, 1, 1) * noise
    loss = ((noise - model(x_t, t)) ** 2).mean()  # mean over pixels, then over the batch
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if o.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
    opt.step()
    with torch.no_grad():  # EMA (the first update copies the weights, as ddpm_jax's ema_update does)
      decay = 0.0 if state['step'] == 0 else config.training.ema_decay
      torch._foreach_lerp_(ema, params, 1.0 - decay)  # pylint: disable=protected-access
    state['step'] += 1
    return loss.detach()

  return step


def check_supported(config: ml_collections.ConfigDict) -> None:
  """The PyTorch side implements DDPM's recipe only: anything else would time another computation."""
  d, m = config.diffusion, config.model
  unsupported = {'diffusion.mean_type': (d.mean_type, 'eps'), 'diffusion.loss_type': (d.loss_type, 'mse'),
                 'diffusion.beta_schedule': (d.beta_schedule, 'linear'),
                 'training.importance_sampling': (config.training.importance_sampling, False),
                 'model.learn_sigma': (m.learn_sigma, False), 'model.dtype': (m.dtype, 'float32'),
                 'optim.optimizer': (config.optim.optimizer, 'adam')}
  bad = [f'{k}={v!r} (needs {want!r})' for k, (v, want) in unsupported.items() if v != want]
  if bad:
    raise NotImplementedError('the PyTorch peer trains DDPM\'s eps-prediction MSE with a linear schedule '
                              'and Adam in float32 only: ' + ', '.join(bad))


def torch_ddim_sampler(config: ml_collections.ConfigDict, model: Any, timesteps: list[int]) -> Any:
  """DDIM sampling in PyTorch over the respaced `timesteps` (ascending), as `ddpm_jax.sampling` runs it.

  Returns `sample(x_T)`: the network evaluated at each kept timestep from the last down, x_0 predicted
  from eps (clipped to [-1, 1] when `sampling.clip_denoised`) and DDIM's update with `sampling.ddim_eta`
  (Song et al. eq. 12); alpha-bar of the step before the first is 1.
  """
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  s = config.sampling
  check_supported(config)
  abar_all = linear_alphas_cumprod(config)
  abar = [float(abar_all[t]) for t in timesteps]
  abar_prev = [1.0] + abar[:-1]
  model.eval()

  def sample(x: torch.Tensor) -> torch.Tensor:
    for i in reversed(range(len(timesteps))):
      a, a_prev = abar[i], abar_prev[i]
      eps = model(x, torch.full((x.shape[0],), timesteps[i], dtype=torch.long))
      x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
      if s.clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
      eps = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)  # eps consistent with the clipped x0
      sigma = s.ddim_eta * math.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
      x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma ** 2) * eps
      if sigma > 0 and i > 0:
        x = x + sigma * torch.randn_like(x)
    return x

  return sample


def _torch_record(model: Any) -> dict[str, Any]:
  """What every PyTorch run records about itself."""
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  from bench import torch_unet  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  return {'framework': 'torch', 'torch_version': torch.__version__,
          'torch_threads': torch.get_num_threads(), 'torch_interop_threads': torch.get_num_interop_threads(),
          'mkldnn_available': torch.backends.mkldnn.is_available(),
          'num_params': torch_unet.count_params(model),
          'load_average_1m_at_start': round(os.getloadavg()[0], 2)}


def _fixed_images(config: ml_collections.ConfigDict, batch_size: int) -> Any:
  """One fixed batch in [-1, 1], [B, C, H, W], as the ddpm_jax scripts use one."""
  import numpy as np  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  c, size = config.data.num_channels, config.data.image_size
  rng = np.random.default_rng(config.seed)
  return torch.from_numpy(rng.uniform(-1.0, 1.0, (batch_size, c, size, size)).astype(np.float32))


def run_torch(config: ml_collections.ConfigDict, windows: int, steps_per_window: int,
              warmup_steps: int) -> dict[str, Any]:
  """Builds the PyTorch U-Net and times its train step: the worker's record."""
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  from bench import torch_unet  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  torch.manual_seed(config.seed)
  model = torch_unet.TorchUNet.from_config(config)
  step = torch_train_step(config, model, _fixed_images(config, config.training.batch_size))
  record = _torch_record(model)
  start = time.perf_counter()
  for _ in range(warmup_steps):
    step()
  record['warmup_s'] = time.perf_counter() - start
  seconds, loss = [], None
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps_per_window):
      loss = step()  # CPU kernels run synchronously: when step() returns, its work is done
    seconds.append(time.perf_counter() - start)
  record['final_loss'] = float(loss)
  if not math.isfinite(record['final_loss']):
    raise FloatingPointError(f'PyTorch loss is {record["final_loss"]}')
  record.update({'window_s': seconds, 'steps_per_s': summary([steps_per_window / s for s in seconds]),
                 'load_average_1m_at_end': round(os.getloadavg()[0], 2)})
  return record


def run_torch_sampler(config: ml_collections.ConfigDict, timesteps: list[int], repeats: int) -> dict[str, Any]:
  """Builds the PyTorch U-Net and times DDIM sampling of `sampling.batch_size` images: the worker's record."""
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  from bench import torch_unet  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  torch.manual_seed(config.seed)
  model = torch_unet.TorchUNet.from_config(config)
  sample = torch_ddim_sampler(config, model, timesteps)
  batch_size, c, size = config.sampling.batch_size, config.data.num_channels, config.data.image_size
  noise = torch.randn((batch_size, c, size, size), generator=torch.Generator().manual_seed(config.seed))  # x_T
  record = _torch_record(model)
  record['steps'] = len(timesteps)
  with torch.inference_mode():
    start = time.perf_counter()
    sample(noise)  # untimed, as ddpm_jax's compile run
    record['warmup_s'] = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      out = sample(noise)
      seconds.append(time.perf_counter() - start)
  if not bool(torch.isfinite(out).all()):
    raise FloatingPointError('PyTorch DDIM produced non-finite samples')
  record.update({'batch_s': seconds, 'images_per_s': summary([batch_size / s for s in seconds]),
                 'load_average_1m_at_end': round(os.getloadavg()[0], 2)})
  return record


# ----------------------------------------------------------------------------------------------------------
# The runner: one subprocess per run, alternating.


@contextlib.contextmanager
def _thread_affinity(cpus: set[int] | None) -> Iterator[None]:
  """Narrows the calling thread's cores to `cpus` (None: leaves them) until the block ends.

  A child process inherits the mask of the thread that starts it. Setting it here rather than in a
  `preexec_fn` keeps Python code out of the forked child of this multi-threaded (JAX) process.
  """
  if cpus is None:
    yield
    return
  before = os.sched_getaffinity(0)
  os.sched_setaffinity(0, cpus)
  try:
    yield
  finally:
    os.sched_setaffinity(0, before)


def _run_json(cmd: list[str], what: str, cpus: set[int] | None = None) -> dict[str, Any]:
  """Runs `cmd` (this environment, unchanged), whose last argument is `--out=PATH`; returns that JSON.

  cpus: the cores the process (and every thread it starts) may run on; None: this process's own.
  """
  with _thread_affinity(cpus):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_REPO_ROOT, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'{what} failed (exit {proc.returncode}): {" ".join(cmd)}\n'
                       f'STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-6000:]}')
  with open(cmd[-1].split('=', 1)[1]) as f:
    return json.load(f)


def pinned_cpus(cores: int | None) -> set[int] | None:
  """The first `cores` of the cores this process may run on (`--cores`); None when not given."""
  if cores is None:
    return None
  if not hasattr(os, 'sched_setaffinity'):
    raise app.UsageError(f'--cores={cores}: pinning needs os.sched_setaffinity (Linux); leave --cores out')
  available = sorted(os.sched_getaffinity(0))
  if not 1 <= cores <= len(available):
    raise app.UsageError(f'--cores={cores}: this process may run on {len(available)} cores {available}; '
                         f'allowed: 1 to {len(available)}')
  return set(available[:cores])


def jax_command(config_path: str, overrides: list[str], batch_size: int) -> list[str]:
  """The ddpm_jax run of `--measure` as a user runs it (float32), less its `--out`."""
  if FLAGS.measure == 'train':
    return [sys.executable, THROUGHPUT_SCRIPT, f'--config={config_path}', *overrides, f'--batch_size={batch_size}',
            f'--windows={FLAGS.windows}', f'--steps_per_window={FLAGS.steps_per_window}',
            f'--warmup_steps={FLAGS.warmup_steps}', '--dtype=float32']
  return [sys.executable, SAMPLE_SCRIPT, f'--config={config_path}', *overrides, f'--batch_size={batch_size}',
          f'--methods={FLAGS.method}', f'--repeats={FLAGS.repeats}', '--num_images=1000', '--dtype=float32']


def torch_command(config_path: str, overrides: list[str], batch_size: int, timesteps: list[int]) -> list[str]:
  """This script's --worker run of `--measure` in a fresh process, less its `--out`."""
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'--measure={FLAGS.measure}',
         f'--config={config_path}', *overrides, f'--batch_size={batch_size}']
  if FLAGS.cores:
    cmd.append(f'--cores={FLAGS.cores}')
  if FLAGS.measure == 'train':
    return cmd + [f'--windows={FLAGS.windows}', f'--steps_per_window={FLAGS.steps_per_window}',
                  f'--warmup_steps={FLAGS.warmup_steps}']
  return cmd + [f'--repeats={FLAGS.repeats}', '--timesteps=' + ','.join(str(t) for t in timesteps)]


def _jax_run_summary(rec: dict[str, Any]) -> dict[str, Any]:
  """The figures of a ddpm_jax record: train_throughput.py's, or sample_throughput.py's one method."""
  if FLAGS.measure == 'sample':
    keys = ('images_per_s', 'batch_s', 'first_run_s', 'trace_s', 'lower_s', 'compile_s', 'recompiles')
    out = {k: rec['methods'][0][k] for k in keys if k in rec['methods'][0]}
  else:
    keys = ('steps_per_s', 'window_s', 'warmup_s', 'lower_s', 'compile_s', 'recompiles')
    out = {k: rec[k] for k in keys if k in rec}
  out.update({k: rec[k] for k in ('devices', 'peak_memory_bytes', 'peak_memory_source') if k in rec})
  out['load_average_1m'] = [rec['machine'].get('load_average_1m_at_start'),
                            rec['machine'].get('load_average_1m_at_end')]
  return out


def network_name(config: ml_collections.ConfigDict, config_path: str) -> str:
  m = config.model
  return (f'{config_path} U-Net (ch {m.ch}, ch_mult {tuple(m.ch_mult)}, {m.num_res_blocks} res blocks, '
          f'{config.data.image_size}x{config.data.image_size}x{config.data.num_channels})')


def markdown(record: dict[str, Any]) -> str:
  """The table (one row) and the lines saying where and with what it ran."""
  from bench import common  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  rate = RATE[record['measure']]
  unit = rate.replace('_per_s', '/s')
  header = ['network', 'params', 'batch', f'ddpm_jax {unit} (median [range])',
            f'PyTorch {unit} (median [range])', 'ratio per pair', 'ratio median [range]']
  per_pair = ', '.join(f'{p["ratio"]:.2f}{" (T)" if p["first"] == "torch" else " (J)"}'
                       for p in record['pairs'])
  row = [record['network'], f'{record["num_params"]:,}', str(record['batch_size']),
         common.fmt_range(record[f'ddpm_jax_{rate}']), common.fmt_range(record[f'torch_{rate}']),
         per_pair, common.fmt_range(record['ratio'], '.2f')]
  m, v, t = record['machine'], record['versions'], record['threads']
  loads = [x for p in record['pairs'] for x in p['load_average_1m'] if x is not None]
  if record['measure'] == 'train':
    what = (f'Steps/s: the median over each run\'s windows ({record["windows"]} windows x '
            f'{record["steps_per_window"]} train steps after {record["warmup_steps"]} warm-up steps)')
  else:
    what = (f'Images/s: the median over each run\'s {record["repeats"]} timed calls ({record["method"]}: '
            f'{record["steps"]} DDIM steps, {record["batch_size"]} images a call, after one untimed call)')
  lines = [
      common.markdown_table(header, [row]), '',
      f'{what}, then median [min–max] over the pairs; ratio = ddpm_jax / PyTorch (above 1: ddpm_jax is '
      'faster). (J) / (T): which ran first in the pair. float32, each run in its own process.',
      f'Machine: {m["cpu_model"]}, {m["cpu_count"]} CPUs ({t["schedulable_cores"]} schedulable); '
      f'load average (1 min) during the runs {min(loads, default=0):.2f}–{max(loads, default=0):.2f}.',
      f'Versions: jax {v["jax"]} (jaxlib {v["jaxlib"]}, flax {v["flax"]}, optax {v["optax"]}), '
      f'torch {v["torch"]}, Python {m["python"]}.',
      f'Threads: PyTorch intra-op {t["torch_intra_op"]}, inter-op {t["torch_interop"]} '
      f'({"intra-op set by --cores" if t.get("pinned_cores") else "its defaults"}); '
      f'ddpm_jax on {t["jax_devices"]} ({t["jax_device_count"]} device(s)), XLA_FLAGS '
      f'{t["xla_flags"] or "unset"} in the environment given to it.',
  ]
  if t.get('pinned_cores'):
    lines.append(f'Pinned: both runs started with the affinity of core(s) {t["pinned_cores"]} (--cores='
                 f'{len(t["pinned_cores"])}): each framework\'s kernels on that many cores.')
  if record.get('contention_warning'):
    lines.append(f'WARNING: {record["contention_warning"]}.')
  if record.get('note'):
    lines.append(f'Note: {record["note"]}.')
  return '\n'.join(lines)


def run_pairs(config: ml_collections.ConfigDict, config_path: str, overrides: list[str]) -> dict[str, Any]:
  """The benchmark: parameter counts checked, then the pairs; returns the record."""
  import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  from bench import common, torch_unet  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from ddpm_jax import diffusion, models  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  check_supported(config)  # before anything runs
  cpus = pinned_cpus(FLAGS.cores)
  if min(FLAGS.pairs, FLAGS.windows, FLAGS.steps_per_window, FLAGS.warmup_steps, FLAGS.repeats) < 1:
    raise app.UsageError('--pairs, --windows, --steps_per_window, --warmup_steps and --repeats must be >= 1')
  measure, rate = FLAGS.measure, RATE[FLAGS.measure]
  timesteps = []
  if measure == 'sample':
    if not re.fullmatch(r'ddim[1-9]\d*', FLAGS.method):
      raise app.UsageError(f'--method={FLAGS.method!r}: the sampling peer runs DDIM only: ddimK, e.g. ddim100')
    timesteps = [int(t) for t in diffusion.space_timesteps(config.diffusion.num_timesteps, FLAGS.method)]
  batch_size = config.training.batch_size if measure == 'train' else config.sampling.batch_size
  num_params = models.count_params(models.param_shapes(config))
  torch_params = torch_unet.count_params(torch_unet.TorchUNet.from_config(config))
  if torch_params != num_params:  # not the same network: a ratio would mean nothing
    raise AssertionError(f'PyTorch U-Net has {torch_params:,} parameters, ddpm_jax\'s {num_params:,}')

  record = common.run_metadata(config_path)
  record['versions']['torch'] = torch.__version__
  record.update({'benchmark': 'torch_peer', 'network': network_name(config, config_path),
                 'measure': measure, 'batch_size': batch_size, 'dtype': 'float32', 'num_params': num_params,
                 'pairs_requested': FLAGS.pairs})
  if measure == 'train':
    record.update({'windows': FLAGS.windows, 'steps_per_window': FLAGS.steps_per_window,
                   'warmup_steps': FLAGS.warmup_steps})
    if FLAGS.windows < MIN_WINDOWS:
      record['note'] = f'smoke run: {FLAGS.windows} < {MIN_WINDOWS} windows'
  else:
    record.update({'method': FLAGS.method, 'steps': len(timesteps), 'repeats': FLAGS.repeats})
    if FLAGS.repeats < MIN_REPEATS:
      record['note'] = f'smoke run: {FLAGS.repeats} < {MIN_REPEATS} repeats'
  commands = {'ddpm_jax': (jax_command(config_path, overrides, batch_size), 'ddpm_jax (bench/'
                           + os.path.basename(THROUGHPUT_SCRIPT if measure == 'train' else SAMPLE_SCRIPT) + ')'),
              'torch': (torch_command(config_path, overrides, batch_size, timesteps),
                        'PyTorch (bench/torch_peer.py --worker)')}
  pairs = []
  with tempfile.TemporaryDirectory(prefix='torch_peer_') as tmp:
    for i in range(FLAGS.pairs):
      order = ('ddpm_jax', 'torch') if i % 2 == 0 else ('torch', 'ddpm_jax')
      runs = {}
      for side in order:
        out = os.path.join(tmp, f'{side}_{i}.json')
        print(f'pair {i + 1}/{FLAGS.pairs}: {side} ...', file=sys.stderr, flush=True)
        cmd, what = commands[side]
        runs[side] = _run_json([*cmd, f'--out={out}'], what, cpus)
      jax_rec, torch_rec = runs['ddpm_jax'], runs['torch']
      jax_run = _jax_run_summary(jax_rec)
      for name, count in (('ddpm_jax', jax_rec['num_params']), ('PyTorch', torch_rec['num_params'])):
        if count != num_params:
          raise AssertionError(f'{name} run has {count:,} parameters, expected {num_params:,}')
      ratio = jax_run[rate]['median'] / torch_rec[rate]['median']
      pairs.append({'first': order[0], 'ratio': ratio, 'ddpm_jax': jax_run,
                    'torch': torch_rec,
                    'load_average_1m': [jax_rec['machine'].get('load_average_1m_at_start'),
                                        jax_rec['machine'].get('load_average_1m_at_end'),
                                        torch_rec['load_average_1m_at_start'],
                                        torch_rec['load_average_1m_at_end']]})
  record['pairs'] = pairs
  record[f'ddpm_jax_{rate}'] = summary([p['ddpm_jax'][rate]['median'] for p in pairs])
  record[f'torch_{rate}'] = summary([p['torch'][rate]['median'] for p in pairs])
  record['ratio'] = summary([p['ratio'] for p in pairs])
  devices = pairs[0]['ddpm_jax'].get('devices', {})
  record['threads'] = {
      'torch_intra_op': pairs[0]['torch']['torch_threads'],
      'torch_interop': pairs[0]['torch']['torch_interop_threads'],
      'jax_devices': devices.get('kind', devices.get('platform', '?')),
      'jax_device_count': devices.get('count', '?'),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'schedulable_cores': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'pinned_cores': None if cpus is None else sorted(cpus)}
  record['machine']['load_average_1m_at_end'] = round(os.getloadavg()[0], 2)
  record['contention_warning'] = contention_warning(record)
  return record


def contention_warning(record: dict[str, Any]) -> str | None:
  """A warning when the load average says other processes competed for the cores, else None.

  Why it matters more than the usual noise: PyTorch's OpenMP threads wait for each other at every
  operator, so a thread that loses its core stalls all of them: on a 2-core machine at a load average of
  about 6 (other jobs), a train step of configs/digits.py ran 13x slower with torch's 2 threads than with
  1 (0.44 against 5.7 steps/s). The ratio is then the scheduler's more than the frameworks'. The runs
  themselves load the machine up to its core count, hence the margin.
  """
  cores = record['threads']['schedulable_cores'] or record['machine']['cpu_count']
  loads = [x for p in record['pairs'] for x in p['load_average_1m'] if x is not None]
  if not loads or max(loads) <= cores + 0.5:
    return None
  return (f'load average (1 min) up to {max(loads):.2f} on {cores} cores: other processes competed for '
          'the CPUs, which can slow PyTorch\'s OpenMP threads many times over; rerun on a quiet machine')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if FLAGS.batch_size is not None:
    if FLAGS.measure == 'train':
      config.training.batch_size = FLAGS.batch_size
    else:
      config.sampling.batch_size = FLAGS.batch_size
  if FLAGS.worker:
    if FLAGS.cores:  # the runner started this process on that many cores: one intra-op thread each
      import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
      torch.set_num_threads(FLAGS.cores)
    if FLAGS.measure == 'train':
      record = run_torch(config, FLAGS.windows, FLAGS.steps_per_window, FLAGS.warmup_steps)
    else:
      record = run_torch_sampler(config, [int(t) for t in FLAGS.timesteps], FLAGS.repeats)
    with open(FLAGS.out, 'w') as f:
      json.dump(record, f, indent=2, allow_nan=False)
    return
  from bench import common  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  config_path = config_flags.get_config_filename(FLAGS['config'])
  record = run_pairs(config, config_path, config_overrides(sys.argv[1:]))
  common.write_json(record, FLAGS.out)
  print(markdown(record))


if __name__ == '__main__':
  if not torch_available():
    print(NO_TORCH_MESSAGE)
    sys.exit(0)
  flags.mark_flags_as_required(['config'])
  app.run(main)
