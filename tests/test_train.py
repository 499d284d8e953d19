"""Training: the pure step's pieces, exact resume, preemption, NaN handling, 1 vs 8 devices, 2 processes."""

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

from configs import tiny
from conftest import REPO_ROOT, cpu_mesh, hlo_computations, ops_by_library, run_with_devices
from ddpm_jax import checkpoints, data, diffusion, jobs, models, parallel, runtime
from ddpm_jax.jobs import train as train_job
from ddpm_jax.train import state as state_lib
from ddpm_jax.train import step as step_lib


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_ema_first_update_copies_the_weights_then_decays():
  ema, params = {'w': jnp.zeros(3)}, {'w': jnp.array([1.0, 2.0, 3.0])}
  first = state_lib.ema_update(ema, params, 0.9, jnp.array(0))
  np.testing.assert_allclose(first['w'], [1.0, 2.0, 3.0])
  second = state_lib.ema_update(first, {'w': jnp.array([2.0, 2.0, 2.0])}, 0.9, jnp.array(1))
  np.testing.assert_allclose(second['w'], 0.9 * np.array([1.0, 2.0, 3.0]) + 0.1 * 2.0, rtol=1e-6)


def test_loss_by_quarter_against_numpy():
  rng = np.random.default_rng(0)
  t = rng.integers(0, 100, size=64)
  loss = rng.random(64)
  got = step_lib.loss_by_quarter(jnp.asarray(loss), jnp.asarray(t), 100)
  for q in range(4):
    mask = (t >= 25 * q) & (t < 25 * (q + 1))
    np.testing.assert_allclose(got[f'loss_q{q}'], loss[mask].mean(), rtol=1e-5)
  empty = step_lib.loss_by_quarter(jnp.ones(4), jnp.zeros(4, jnp.int32), 100)
  assert float(empty['loss_q3']) == 0.0


def test_learning_rate_warms_up_linearly_then_stays():
  config = tiny.get_config()
  config.optim.warmup_steps = 10
  schedule = state_lib.learning_rate_schedule(config)
  lr = config.optim.learning_rate
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), lr / 2, rtol=1e-6)
  np.testing.assert_allclose([float(schedule(10)), float(schedule(10_000))], [lr, lr], rtol=1e-6)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(warmup=st.integers(0, 50), decay=st.integers(1, 300),
                  lr=st.floats(1e-5, 1e-2, allow_nan=False))
def test_cosine_learning_rate_warms_up_then_falls_along_half_a_cosine_to_zero(warmup, decay, lr):
  """optim.lr_schedule='cosine' against the formula in float64: lr * s / w during the warm-up, then
  lr * (1 + cos(pi * (s - w) / (N - w))) / 2 until s = N, and 0 after."""
  config = tiny.get_config()
  config.optim.update(lr_schedule='cosine', warmup_steps=warmup, learning_rate=lr)
  config.training.num_train_steps = n = warmup + decay
  schedule = state_lib.learning_rate_schedule(config)
  steps = np.unique(np.r_[0, warmup // 2, warmup, warmup + 1, warmup + decay // 3, n - 1, n, n + 7])
  want = np.where(steps < warmup, lr * steps / max(warmup, 1),
                  lr * (1 + np.cos(np.pi * np.minimum(steps - warmup, decay) / decay)) / 2)
  got = np.array([float(schedule(int(s))) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=lr * 1e-6)


def _equations(jaxpr, cond_branch=None):
  """Every equation of `jaxpr` and of the jaxprs nested in it (jit, custom_vjp, scan bodies...); of a
  `cond`, only branch `cond_branch` when given (the guard's are (frozen, applied): -1 is what an applied
  step runs)."""
  for eqn in jaxpr.eqns:
    yield eqn
    if cond_branch is not None and eqn.primitive.name == 'cond':
      yield from _equations(eqn.params['branches'][cond_branch].jaxpr, cond_branch)
      continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _equations(sub.jaxpr, cond_branch)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _equations(sub, cond_branch)


def _tiny_step_and_args(config):
  """The plain train step of `config` (configs/tiny.py or a variant) and abstract (state, batch, key)."""
  train_step = step_lib.make_train_step(models.create_model(config),
                                        diffusion.coefficients_from_config(config.diffusion))
  state = jax.eval_shape(lambda key: state_lib.create_train_state(config, key), jax.random.key(0))
  return train_step, (state, jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32), jax.random.key(0))


def _matmul_dtypes(dtype):
  """(primitive, operand dtypes, result dtype) -> count over the whole train step (forward + backward)."""
  config = tiny.get_config()
  config.model.dtype = dtype
  train_step, args = _tiny_step_and_args(config)
  jaxpr = jax.make_jaxpr(train_step)(*args).jaxpr
  return collections.Counter(
      (eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype))
      for eqn in _equations(jaxpr) if eqn.primitive.name in ('conv_general_dilated', 'dot_general'))


def test_bfloat16_train_step_has_no_float32_matmul_islands():
  """Mixed precision as layers.py states it: every convolution and matmul of the bf16 step is bf16
  except the float32 output head and time-embedding MLP (a dense layer left in float32 would run
  its forward and both gradients on the slow path; on an H100 that is TF32 at half the bf16 rate)."""
  f32, bf16 = 'float32', 'bfloat16'
  full = _matmul_dtypes(f32)
  convs = full.pop(('conv_general_dilated', (f32, f32), f32))
  assert set(full) == {('dot_general', (f32, f32), f32)}  # float32 mode: all float32
  mixed = _matmul_dtypes(bf16)
  # conv_out: forward, input gradient, kernel gradient.
  assert mixed.pop(('conv_general_dilated', (f32, f32), f32)) == 3
  assert mixed.pop(('conv_general_dilated', (bf16, bf16), bf16)) == convs - 3
  # temb dense0 (forward, kernel gradient) and dense1 (forward, input and kernel gradients).
  assert mixed.pop(('dot_general', (f32, f32), f32)) == 5
  # What is left has bf16 operands: the layers themselves, and float32-accumulated attention logits
  # and their gradients (the softmax is computed in float32).
  assert mixed and all(bf16 in operands for _, operands, _ in mixed), mixed


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(scale=st.floats(1e-3, 1e3), max_norm=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_clip_by_global_norm_is_optaxs_with_or_without_the_norm_handed_in(scale, max_norm, seed):
  """state_lib.clip_by_global_norm: u * min(1, max_norm / ||u||) (float64 reference), bit-identical to
  optax's clip whether it sums the norm itself or takes the step's (`grad_norm=`), with optax's state
  (so checkpoints written with optax's clip restore)."""
  rng = np.random.default_rng(seed)
  tree = {'w': jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32),
          'b': [jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)]}
  ours, optaxs = state_lib.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
  assert ours.init(tree) == optaxs.init(tree)
  want, _ = jax.jit(optaxs.update)(tree, optaxs.init(tree))
  norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
  for hand_in in (False, True):
    got, _ = jax.jit(lambda t, s, hand_in=hand_in: ours.update(
        t, s, **({'grad_norm': optax.tree.norm(t)} if hand_in else {})))(tree, ours.init(tree))
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), np.asarray(w)), got, want)
    jax.tree.map(lambda g, x: np.testing.assert_allclose(
        g, np.asarray(x, np.float64) * min(1.0, max_norm / norm), rtol=1e-5), got, tree)


def _reductions_per_applied_step(grad_clip: float) -> tuple[int, int]:
  """(reduce_sum equations a step that applies its update runs, the weights' count) of the tiny step."""
  config = tiny.get_config()
  config.optim.grad_clip = grad_clip
  train_step, args = _tiny_step_and_args(config)
  jaxpr = jax.make_jaxpr(train_step)(*args).jaxpr
  return (sum(eqn.primitive.name == 'reduce_sum' for eqn in _equations(jaxpr, cond_branch=-1)),
          len(jax.tree.leaves(args[0].params)))


def test_the_clip_adds_no_reduction_to_the_step():
  """The gradient's norm is summed once a step, for the clip and the `grad_norm` metric both. optax's
  clip summed every weight's squares again inside the update's `cond`, where XLA cannot share the
  metric's sums: one more reduction per weight (328 kernel launches in the CIFAR10 step on a GPU,
  BENCHMARKS.md)."""
  (unclipped, num_weights), (clipped, _) = (_reductions_per_applied_step(c) for c in (0.0, 1.0))
  assert num_weights > 50 and unclipped > num_weights
  assert clipped == unclipped, (clipped, unclipped, num_weights)


def _run(tmp_path, name, steps, **overrides):
  config = tiny.get_config()
  config.training.num_train_steps = steps
  config.training.num_grid_samples = 0
  for field, value in overrides.items():
    section, key = field.split('__')
    config[section][key] = value
  return config, jobs.run('train', config, str(tmp_path / name))


@pytest.mark.slow  # ~40-50 s on 2 cores
def test_resume_is_bit_exact(tmp_path):
  _, straight = _run(tmp_path, 'straight', 6)
  _run(tmp_path, 'resumed', 3)
  config, resumed = _run(tmp_path, 'resumed', 6)
  assert int(resumed.step) == 6
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert checkpoints.create_manager(str(tmp_path / 'resumed')).latest_step() == 6
  # The EMA moved away from the raw weights (decay 0.9 over 6 steps) yet stays finite.
  assert all(np.isfinite(x).all() for x in _leaves(resumed.ema_params))


def test_resume_with_another_model_is_a_clear_error(tmp_path):
  _run(tmp_path, 'run', 2)
  with pytest.raises(ValueError, match=r'model\.ch: checkpoint has 32, config has 64'):
    _run(tmp_path, 'run', 4, model__ch=64)
  # How the network is computed may change (float32 training, bfloat16 sampling); what it is may not.
  config, _ = _run(tmp_path, 'run', 2)
  config.model.dtype = 'bfloat16'
  _, _, step = checkpoints.restore_for_inference(str(tmp_path / 'run'), config, parallel.create_mesh())
  assert step == 2


def test_data_states_are_items_of_their_checkpoints_and_pruned_with_them(tmp_path):
  config, _ = _run(tmp_path, 'run', 6, training__keep_checkpoints=1)
  manager = checkpoints.create_manager(str(tmp_path / 'run'))
  assert manager.all_steps() == [6]
  # The data position is committed with the weights, inside the step's directory: no side folder.
  assert {'data', 'meta', 'state'} <= set(os.listdir(tmp_path / 'run' / 'checkpoints' / '6'))
  assert not os.path.exists(tmp_path / 'run' / 'data_state')
  # A fresh iterator (built at step 0) is moved to the saved position by the restore.
  iterator = data.create_train_iterator(config, seed=config.seed)
  state = checkpoints.restore_for_training(manager, config, parallel.create_mesh(), iterator)
  assert int(state.step) == 6 and iterator.step == 6
  np.testing.assert_array_equal(next(iterator), data.create_train_iterator(
      config, seed=config.seed, start_step=6).batch_at(6))


class _Batches:
  """Digits batches like the real pipeline, with a hook called before batch number `at` (1-based)."""

  def __init__(self, config, at, hook):
    self._it = data.create_train_iterator(config, seed=config.seed)
    self._count, self._at, self._hook = 0, at, hook

  def __next__(self):
    self._count += 1
    batch = next(self._it)
    return self._hook(batch) if self._count == self._at else batch


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny.get_config()
  config.training.num_train_steps = 8
  config.training.num_grid_samples = 0
  batches = _Batches(config, at=3, hook=lambda b: np.full_like(b, np.nan))
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train_job.NonFiniteLossError, match='step 3'):
    train_job.train(config, workdir, jobs.setup(config), data_iterator=batches)
  manager = checkpoints.create_manager(workdir)
  assert manager.all_steps() == [2]
  restored = checkpoints.restore_for_training(manager, config, parallel.create_mesh())
  assert all(np.isfinite(x).all() for x in _leaves(restored.params))


def test_a_non_finite_step_freezes_the_whole_state_bit_exactly():
  """The step's guard (a `lax.cond` since issue #16): from the first non-finite loss on, params, EMA,
  Adam moments and sampler history keep their last good bits; only `step` moves, and
  `nonfinite_step` records the first bad step and stays."""
  config = tiny.get_config()
  config.training.importance_sampling = True
  mesh = parallel.create_mesh(jax.local_devices()[:1])
  step = step_lib.jit_train_step(models.create_model(config),
                                 diffusion.coefficients_from_config(config.diffusion), mesh)
  state = state_lib.create_train_state(config, jax.random.key(0))
  good = np.random.default_rng(0).uniform(-1, 1, (config.training.batch_size, 8, 8, 1)).astype(np.float32)
  key = jax.random.key(1)
  state, _ = step(state, good, key)
  frozen = _leaves((state.params, state.ema_params, state.opt_state, state.sampler_state))
  state, metrics = step(state, np.full_like(good, np.nan), key)
  assert not np.isfinite(float(metrics['loss']))
  for _ in range(2):  # ... and a finite loss afterwards does not thaw it
    assert (int(state.step), int(state.nonfinite_step)) in ((2, 1), (3, 1))
    assert np.isnan(float(metrics['grad_norm']))  # no update, no clip: no norm either
    for a, b in zip(frozen, _leaves((state.params, state.ema_params, state.opt_state, state.sampler_state))):
      np.testing.assert_array_equal(a, b)
    state, metrics = step(state, good, key)
  assert int(state.step) == 4 and int(state.nonfinite_step) == 1


def test_the_guard_stays_a_conditional_with_an_empty_frozen_branch():
  """The guard's frozen branch only passes its operands through (parameter, get-tuple-element, tuple),
  for any platform's XLA: a `cond` whose branches are both cheap and neither empty is turned into a
  select over old and new states by XLA's ConditionalSimplifier, which made the bfloat16 CIFAR10 step
  17% slower on an H200 when the branch returned a NaN constant for the `grad_norm` metric (BENCHMARKS.md)."""
  train_step, args = _tiny_step_and_args(tiny.get_config())
  hlo = jax.jit(train_step).lower(*args).as_text(dialect='hlo')
  bodies = {name: [re.search(r'= \S+(?: \S+)*? ([a-z\-]+)\(', line).group(1) for line in lines]
            for name, lines in hlo_computations(hlo).items()}
  conditionals = [line for line in hlo.splitlines() if ' conditional(' in line]
  assert len(conditionals) == 1, conditionals
  branches = re.findall(r'%?([\w.\-]+)', re.search(r'branch_computations=\{([^}]*)\}',
                                                    conditionals[0]).group(1))
  empty = [b for b in branches if set(bodies[b]) <= {'parameter', 'get-tuple-element', 'tuple'}]
  assert len(branches) == 2 and len(empty) == 1, {b: sorted(set(bodies[b]))[:12] for b in branches}


def test_sigterm_checkpoints_and_stops(tmp_path):
  config = tiny.get_config()
  config.training.num_train_steps = 1000
  config.training.checkpoint_every = 1000
  config.training.num_grid_samples = 0

  def send_sigterm(batch):
    os.kill(os.getpid(), signal.SIGTERM)
    return batch

  workdir = str(tmp_path / 'preempted')
  state = train_job.train(config, workdir, jobs.setup(config),
                          data_iterator=_Batches(config, at=3, hook=send_sigterm))
  assert int(state.step) == 3
  params, _, step = checkpoints.restore_for_inference(workdir, config, parallel.create_mesh())
  assert step == 3
  for a, b in zip(_leaves(state.params), _leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_importance_sampler_state_is_trained_and_checkpointed(tmp_path):
  config, state = _run(tmp_path, 'is', 3, training__importance_sampling=True)
  counts = np.asarray(state.sampler_state.counts)
  assert counts.sum() > 0 and counts.max() <= state.sampler_state.history.shape[1]
  manager = checkpoints.create_manager(str(tmp_path / 'is'))
  restored = checkpoints.restore_for_training(manager, config, parallel.create_mesh())
  np.testing.assert_array_equal(np.asarray(restored.sampler_state.history), np.asarray(state.sampler_state.history))


_TRAIN_AND_DUMP = '''
import sys, numpy as np, jax
from configs import tiny
from ddpm_jax import jobs
config = tiny.get_config()
config.training.num_train_steps = 2
config.training.num_grid_samples = 0
config.model.dropout = 0.0
state = jobs.run('train', config, sys.argv[1] if len(sys.argv) > 1 else {workdir!r})
if jax.process_index() == 0:
  np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))])
print('devices', jax.device_count())
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


_TWO_PROCESSES = textwrap.dedent('''
    import sys, jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', num_processes=2,
                               process_id=int(sys.argv[1]), local_device_ids=[0])
    import numpy as np
    from configs import tiny
    from ddpm_jax import jobs
    config = tiny.get_config()
    config.training.num_train_steps = 2
    config.training.num_grid_samples = 0
    config.model.dropout = 0.0
    state = jobs.run('train', config, {workdir!r})
    np.savez({out!r} + sys.argv[1] + '.npz', *[np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))])
    assert jax.process_count() == 2 and jax.device_count() == 2
  ''')


def _train_two_processes(tmp_path) -> list[np.lib.npyio.NpzFile]:
  """Two processes of one device each (jax.distributed over gloo), their trained params."""
  code = _TWO_PROCESSES.format(port=_free_port(), workdir=str(tmp_path / 'w2p'), out=str(tmp_path / 'params_2p_'))
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(i)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, output in zip(procs, outputs):
    assert p.returncode == 0, output[-4000:]
  return [np.load(str(tmp_path / f'params_2p_{i}.npz')) for i in range(2)]


@pytest.mark.multidevice
def test_one_device_eight_devices_and_two_processes_agree(tmp_path):
  """The same 2 training steps on 1 device, on 8 devices and on two processes (jax.distributed) give the
  same params: one code path from 1 CPU to several hosts. (One test: the 1-device run is the reference
  of both comparisons.)"""
  outs = {}
  for n in (1, 8):
    out = str(tmp_path / f'params_{n}.npz')
    stdout = run_with_devices(_TRAIN_AND_DUMP.format(workdir=str(tmp_path / f'w{n}'), out=out), num_devices=n)
    assert f'devices {n}' in stdout
    outs[n] = np.load(out)
  for key in outs[1].files:
    np.testing.assert_allclose(outs[1][key], outs[8][key], rtol=2e-4, atol=2e-6)

  a, b = _train_two_processes(tmp_path)
  for key in a.files:  # the processes hold the same replicated params ...
    np.testing.assert_array_equal(a[key], b[key])
  for key in a.files:  # ... and they equal a single-process run on the same global batch.
    np.testing.assert_allclose(a[key], outs[1][key], rtol=2e-4, atol=2e-6)


_FLAT_AND_PER_WEIGHT = r'''
import re, numpy as np, jax
from configs import tiny
from ddpm_jax import diffusion, models, parallel
from ddpm_jax.train import state as state_lib, step as step_lib
config = tiny.get_config()
config.model.dropout = 0.0
config.training.importance_sampling = True
mesh = parallel.create_mesh()
assert parallel.flat_all_reduce('auto', mesh) and not parallel.flat_all_reduce('per_weight', mesh)
model, coefs = models.create_model(config), diffusion.coefficients_from_config(config.diffusion)
batch = np.random.default_rng(0).uniform(-1, 1, (config.training.batch_size, 8, 8, 1)).astype(np.float32)

def all_reduce_outputs(text):
  return [line.split(' all-reduce(')[0] for line in text.splitlines() if ' all-reduce(' in line]

out = {}
for mode in ('per_weight', 'flat'):
  step = step_lib.jit_train_step(model, coefs, mesh, mode)
  state = jax.device_put(state_lib.create_train_state(config, jax.random.key(0)),
                         parallel.replicated_sharding(mesh))
  args = (parallel.shard_batch(batch, mesh), jax.random.key(1))
  compiled = step.lower(state, *args).compile()  # run below: one compilation, not two
  outputs = all_reduce_outputs(compiled.as_text())
  operands = sum(len(re.findall(r'f32\[[\d,]*\]', o)) for o in outputs)
  vectors = [int(n) for o in outputs for n in re.findall(r'f32\[(\d+)\]', o)]
  for _ in range(2):
    state, metrics = compiled(state, *args)
  leaves = jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.sampler_state)))
  out[mode] = (jax.device_get(metrics), leaves, operands, vectors)
(m_pw, l_pw, ops_pw, _), (m_fl, l_fl, ops_fl, vectors_fl) = out['per_weight'], out['flat']
n_params = sum(x.size for x in jax.tree.leaves(state.params))
n_leaves = len(jax.tree.leaves(state.params))
print('operands', ops_pw, ops_fl, 'leaves', n_leaves, 'flat buffer', n_params in vectors_fl)
for name in m_pw:
  np.testing.assert_allclose(m_fl[name], m_pw[name], rtol=1e-5, atol=1e-7, err_msg=name)
for a, b in zip(l_pw, l_fl):
  np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6)
print('agree')
'''


@pytest.mark.multidevice
def test_flat_gradient_all_reduce_matches_xlas_per_weight_sum_on_eight_devices():
  """runtime.gradient_all_reduce (issue #16): the step whose gradient is summed as one flat buffer
  ('flat', shard_map + psum) gives the metrics (grad_norm included: a gradient summed twice would be
  8x) and the state of XLA's per-weight all-reduces, and its compiled program all-reduces the whole
  gradient as one operand instead of one operand per weight."""
  stdout = run_with_devices(_FLAT_AND_PER_WEIGHT, num_devices=8)
  assert 'agree' in stdout and 'flat buffer True' in stdout, stdout
  per_weight, flat, _, leaves = stdout.split('operands ')[1].split()[:4]
  per_weight, flat, leaves = int(per_weight), int(flat), int(leaves)
  assert per_weight >= leaves > 20 > flat, stdout  # one operand per weight, vs the flat gradient + scalars


def test_gradient_all_reduce_is_validated_and_flat_needs_a_network_without_dropout():
  """One device never sums (every mode is off); a bad mode and 'flat' with dropout are config errors."""
  one = parallel.create_mesh(jax.local_devices()[:1])
  assert not any(parallel.flat_all_reduce(mode, one) for mode in ('auto', 'flat', 'per_weight'))
  with pytest.raises(ValueError, match="gradient_all_reduce='ring'"):
    parallel.flat_all_reduce('ring', one)
  config = tiny.get_config()  # dropout 0.1
  config.runtime.gradient_all_reduce = 'flat'
  from ddpm_jax.config import validate_config  # pylint: disable=import-outside-toplevel
  flat_with_dropout = r"config\.runtime\.gradient_all_reduce='flat' is invalid: with model\.dropout=0\.1"
  with pytest.raises(ValueError, match=flat_with_dropout):
    validate_config(config)
  config.runtime.gradient_all_reduce = 'ring'
  with pytest.raises(ValueError, match=r"config\.runtime\.gradient_all_reduce='ring' is invalid: allowed"):
    validate_config(config)
  model, coefs = models.create_model(config), diffusion.coefficients_from_config(config.diffusion)
  with pytest.raises(ValueError, match='without dropout'):
    step_lib.make_train_step(model, coefs, sum_gradients=lambda fn: fn)


def test_checkpoints_written_before_newer_config_fields_still_restore(tmp_path):
  """A checkpoint whose meta predates model.num_classes, model.conventions and diffusion.rescale_* was
  made with their defaults: it restores; a config that sets one of them differently is refused."""
  config, _ = _run(tmp_path, 'run', 2)
  meta_path = tmp_path / 'run' / 'checkpoints' / '2' / 'meta' / 'metadata'
  meta = json.loads(meta_path.read_text())
  for field in checkpoints.ADDED_FIELD_DEFAULTS:
    section, key = field.split('.')
    del meta[section][key]
  meta.pop(checkpoints.CONFIG_KEY, None)
  meta_path.write_text(json.dumps(meta))
  _, _, step = checkpoints.restore_for_inference(str(tmp_path / 'run'), config, parallel.create_mesh())
  assert step == 2
  config.model.num_classes = 10
  with pytest.raises(ValueError, match=r'model\.num_classes: checkpoint has 0, config has 10'):
    checkpoints.restore_for_inference(str(tmp_path / 'run'), config, parallel.create_mesh())


def test_initial_state_compiles_as_a_run_once_program_and_is_bit_identical(monkeypatch):
  """`jit_create_train_state` compiles the init without LLVM's optimisations on a CPU (it runs once):
  the state is bit for bit the one the optimised program makes. A level in the user's XLA_FLAGS wins."""
  config = tiny.get_config()
  mesh = cpu_mesh()
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=3')
  assert parallel.run_once_compiler_options(mesh) == {}
  # (the suite's own XLA_FLAGS set level 0 for every program: without them ddpm_jax sets it for this one)
  monkeypatch.setenv('XLA_FLAGS', '')
  assert parallel.run_once_compiler_options(mesh) == {'xla_backend_optimization_level': 0}
  key = jax.random.key(7)
  fast = state_lib.jit_create_train_state(config, mesh)(key)
  with jax.default_device(mesh.devices.flat[0]):
    optimised = jax.jit(lambda k: state_lib.create_train_state(config, k),
                        compiler_options={'xla_backend_optimization_level': 3})(key)
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(fast)]
  assert paths == [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(optimised)]
  for a, b in zip(_leaves(fast), _leaves(optimised), strict=True):
    np.testing.assert_array_equal(a, b)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(fast))


class _Marker:
  """A stand-in for a step's loss array: records when the host waited for it."""

  def __init__(self, step, waited):
    self.step, self._waited = step, waited

  def block_until_ready(self):
    self._waited.append(self.step)
    return self


def test_dispatch_queue_waits_for_the_step_limit_back():
  waited = []
  queue = train_job._DispatchQueue(limit=3)
  for step in range(1, 8):
    queue.push(_Marker(step, waited))
    # After pushing step s the host has waited for every step up to s - 3: at most 3 stay queued.
    assert waited == list(range(1, max(step - 3, 0) + 1))


def test_training_loop_keeps_at_most_max_steps_in_flight(tmp_path, monkeypatch):
  """XLA:CPU with several devices can deadlock in the step's all-reduce when hundreds of steps are
  queued (found with 300 queued digits steps on 2 devices, jaxlib 0.10.2); the loop bounds the queue."""
  pushed = []
  original = train_job._DispatchQueue

  class Spy(original):
    def __init__(self, limit):
      super().__init__(limit)
      self.limit = limit

    def push(self, marker):
      pushed.append((self.limit, marker.shape))
      super().push(marker)

  monkeypatch.setattr(train_job, '_DispatchQueue', Spy)
  _run(tmp_path, 'run', 5)
  assert pushed == [(train_job.MAX_STEPS_IN_FLIGHT, ())] * 5
  assert 1 <= train_job.MAX_STEPS_IN_FLIGHT <= 8


@pytest.mark.slow  # ~40-50 s on 2 cores
def test_cpu_train_convolutions_pick_the_kernels_and_agree():
  """runtime.cpu_train_convolutions (issue #16): 'xla' compiles the train step with XLA's own convolutions
  (YNNPACK's are the CPU default, and their weight gradients at 16x16 and up are slow on an Intel Xeon),
  'ynnpack' with YNNPACK's; the two steps agree to float32 rounding; 'auto' picks by image size; a bad
  value is a config error."""
  config = tiny.get_config()
  config.data.image_size = 16
  assert runtime.train_convolutions(config) == 'xla'
  config.runtime.cpu_train_convolutions = 'ynnpack'
  assert runtime.train_convolutions(config) == 'ynnpack'
  assert runtime.train_convolutions(tiny.get_config()) == 'ynnpack'  # 8x8: 'auto' keeps YNNPACK's
  mesh = cpu_mesh()
  model, coefs = models.create_model(config), diffusion.coefficients_from_config(config.diffusion)
  batch = np.random.default_rng(0).uniform(-1, 1, (config.training.batch_size, 16, 16, 1)).astype(np.float32)
  out = {}
  for kernels in ('ynnpack', 'xla'):
    step = step_lib.jit_train_step(model, coefs, mesh, 'auto', kernels)
    state = jax.device_put(state_lib.create_train_state(config, jax.random.key(0)),
                           parallel.replicated_sharding(mesh))
    args = (parallel.shard_batch(batch, mesh), jax.random.key(1))
    compiled = step.lower(state, *args).compile()  # run below: one compilation, not two
    counts = ops_by_library(compiled.as_text(), 'convolution')
    for _ in range(2):
      state, metrics = compiled(state, *args)
    out[kernels] = counts, jax.device_get((metrics, state.params, state.opt_state))
  (ynn_in, ynn_own), (xla_in, xla_own) = out['ynnpack'][0], out['xla'][0]
  assert ynn_in > 2 * ynn_own, out['ynnpack'][0]  # YNNPACK takes most (not a strided one's gradient)
  assert xla_in == 0 and xla_own == ynn_in + ynn_own, out['xla'][0]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6),
               out['ynnpack'][1], out['xla'][1])
  assert parallel.cpu_compiler_options(mesh, convolutions='ynnpack') == {}
  with pytest.raises(ValueError, match="convolutions='auto' is invalid"):
    parallel.cpu_compiler_options(mesh, convolutions='auto')
  config.runtime.cpu_train_convolutions = 'onednn'
  from ddpm_jax.config import validate_config  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"config\.runtime\.cpu_train_convolutions='onednn' is invalid: allowed"):
    validate_config(config)


def test_the_users_xla_flags_choose_the_cpu_kernels_over_ddpm_jax(monkeypatch):
  """XLA_FLAGS that set YNNPACK's fusions themselves win: ddpm_jax then passes no option of its own."""
  mesh = cpu_mesh()
  assert parallel.cpu_compiler_options(mesh, convolutions='xla') == {
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
  assert parallel.cpu_compiler_options(mesh, reductions='xla') == {
      'xla_cpu_experimental_ynn_fusion_type':
          'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=')
  assert parallel.cpu_compiler_options(mesh, convolutions='xla') == {}
  assert parallel.cpu_compiler_options(mesh, reductions='xla') == {}


def test_programs_on_an_accelerator_get_no_cpu_compiler_option():
  """On a GPU / TPU mesh ddpm_jax passes none of XLA:CPU's options: XLA would reject them there."""
  accelerators = [d for d in jax.devices() if d.platform != 'cpu']
  if not accelerators:
    pytest.skip('no GPU / TPU here (run the suite with JAX_PLATFORMS=cuda,cpu on one)')
  mesh = parallel.create_mesh(accelerators)
  assert parallel.cpu_compiler_options(mesh, convolutions='xla', reductions='xla') == {}
  assert parallel.run_once_compiler_options(mesh) == {}
  state = state_lib.jit_create_train_state(tiny.get_config(), mesh)(jax.random.key(0))
  assert {d.platform for leaf in jax.tree.leaves(state) for d in leaf.devices()} == {accelerators[0].platform}
