"""The workdir as a durable store (issue #19): damaged files are recovered from or named, a second writer
is refused, nothing saved is lost, and bad inputs fail before the expensive work.

Each test first damages the workdir exactly as a user would find it (a file deleted or truncated, an
empty data position, a live second trainer, ...), then checks the recovery or the clear refusal.
"""

import errno
import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import tiny
from conftest import REPO_ROOT, run_with_devices, tiny_config, write_checkpoint
from ddpm_jax import checkpoints, data, jobs, parallel
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.evaluation import digits_metric, fid


def _train_config(steps: int):
  config = tiny.get_config()
  config.training.num_train_steps = steps
  config.training.num_grid_samples = 0
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> str:
  """A workdir trained 4 steps (checkpoints at steps 2 and 4), copied by each test that damages it."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  jobs.run('train', _train_config(4), workdir)
  return workdir


def _copy(trained: str, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  return workdir


def _array_files(workdir: str, step: int) -> list[str]:
  return glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', '**', 'd', '*'), recursive=True)


def _largest_array_file(workdir: str, step: int) -> str:
  return max(_array_files(workdir, step), key=os.path.getsize)


def _damaged_dirs(workdir: str) -> list[str]:
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, 'checkpoints', '*.damaged-*')))


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _warnings(caplog) -> str:
  return '\n'.join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# --- item 1: a damaged newest checkpoint ---------------------------------------------------------

def test_deleted_file_in_newest_checkpoint_falls_back_keeps_it_and_training_continues(trained, tmp_path,
                                                                                    caplog):
  workdir = _copy(trained, tmp_path)
  os.remove(_largest_array_file(workdir, 4))
  caplog.set_level(logging.WARNING)
  state = jobs.run('train', _train_config(6), workdir)
  assert int(state.step) == 6
  warnings = _warnings(caplog)
  assert 'checkpoints/4 does not restore' in warnings and 'Encountered error while reading' in warnings
  assert 'Skipped the damaged checkpoint step 4' in warnings and 'step 2 instead' in warnings
  # Kept for inspection, out of orbax's way: training went on from step 2 and saved 4 and 6 again.
  damaged = _damaged_dirs(workdir)
  assert len(damaged) == 1 and damaged[0].startswith('4.damaged-')
  assert checkpoints.create_manager(workdir).all_steps() == [2, 4, 6]
  # The resumed run is the uninterrupted one: the step-4 weights equal those of the undamaged run.
  mesh = parallel.create_mesh()
  good, _, _ = checkpoints.restore_for_inference(trained, _train_config(4), mesh)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  redone, _, step = checkpoints.restore_for_inference(workdir, _train_config(4), mesh)
  assert step == 4
  for a, b in zip(_leaves(good), _leaves(redone)):
    np.testing.assert_array_equal(a, b)


# Before the fix, the failed reads' leftovers (RuntimeError('Event loop is closed') from tensorstore
# threads, unawaited coroutines holding read errors) reached stderr as hundreds of lines of "Exception
# ignored" tracebacks, also through main.py; here they would fail the test.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_truncated_array_file_falls_back_to_the_previous_step(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  # Every array file: which arrays orbax groups into which file varies from run to run, and inference
  # reads only the weights, so one truncated file may hold only Adam moments (a CI run found that).
  for path in _array_files(workdir, 4):
    with open(path, 'r+b') as f:
      f.truncate(min(100, os.path.getsize(path) // 2))
  caplog.set_level(logging.WARNING)
  config = _train_config(4)
  # Sampling skips it (and leaves it: only training moves checkpoints) ...
  _, _, step = checkpoints.restore_for_inference(workdir, config, parallel.create_mesh())
  assert step == 2 and 'Skipped the damaged checkpoint step 4' in _warnings(caplog)
  assert _damaged_dirs(workdir) == []
  # ... training sets it aside.
  manager = checkpoints.create_manager(workdir)
  state = checkpoints.restore_for_training(manager, config, parallel.create_mesh())
  assert int(state.step) == 2 and manager.all_steps() == [2]
  assert _damaged_dirs(workdir)[0].startswith('4.damaged-')


def test_no_restorable_step_is_one_clear_error_and_nothing_is_moved(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (2, 4):
    os.remove(_largest_array_file(workdir, step))
  manager = checkpoints.create_manager(workdir)
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=r'(?s)no checkpoint in .* restores completely.*step 4 .*step 2 '):
    checkpoints.restore_for_training(manager, _train_config(6), parallel.create_mesh())
  assert _damaged_dirs(workdir) == [] and manager.all_steps() == [2, 4]


# --- item 2: a damaged data-iterator state ---------------------------------------------------------

@pytest.mark.parametrize('damage', ['empty', 'missing'])
def test_damaged_data_position_falls_back_to_a_step_whose_every_item_restores(trained, tmp_path, caplog,
                                                                               damage):
  workdir = _copy(trained, tmp_path)
  (state_file,) = glob.glob(os.path.join(workdir, 'checkpoints', '4', 'data', '*.json'))
  if damage == 'empty':
    open(state_file, 'w').close()
  else:
    os.remove(state_file)
  caplog.set_level(logging.WARNING)
  config = _train_config(4)
  iterator = data.create_train_iterator(config, seed=config.seed, start_step=4)
  manager = checkpoints.create_manager(workdir)
  state = checkpoints.restore_for_training(manager, config, parallel.create_mesh(), iterator)
  assert int(state.step) == 2 and iterator.step == 2
  assert 'checkpoints/4 does not restore' in _warnings(caplog)
  assert _damaged_dirs(workdir)[0].startswith('4.damaged-')


# --- item 4: one writer per workdir -------------------------------------------------------------

_HOLD_LOCK = '''
import sys, time
from ddpm_jax import workdir
with workdir.lock(sys.argv[1], job='--mode=train'):
  print('locked', flush=True)
  time.sleep(600)
'''


def _lock_holder(workdir: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  proc = subprocess.Popen([sys.executable, '-c', textwrap.dedent(_HOLD_LOCK), workdir], cwd=REPO_ROOT,
                          env=env, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
  workdir = str(tmp_path / 'busy')
  config = tiny_config()
  write_checkpoint(workdir, config)
  holder = _lock_holder(workdir)
  try:
    for mode in ('train', 'sample', 'eval'):
      with pytest.raises(workdir_lib.WorkdirLocked,
                         match=rf'--workdir={workdir} is in use by --mode=train \(host .*, pid {holder.pid}, '
                               r'started .*\); wait for it'):
        jobs.run(mode, config, workdir)
  finally:
    holder.kill()  # SIGKILL: no clean-up runs; the kernel releases the flock
    holder.wait()
  assert not os.path.exists(os.path.join(workdir, 'samples'))  # the refusal came before any work
  with workdir_lib.lock(workdir):  # not stale
    # The same process, another open file: refused too (two trainers in one notebook).
    with pytest.raises(workdir_lib.WorkdirLocked, match=f'pid {os.getpid()}'):
      with workdir_lib.lock(workdir):
        pass


# --- item 6: damaged sample shards and caches ------------------------------------------------------

def test_truncated_sample_shard_is_named_set_aside_and_regenerated_identically(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  config = tiny_config()
  write_checkpoint(workdir, config)
  directory = jobs.run('sample', config, workdir)
  path = workdir_lib.shard_path(directory, 1)
  original = workdir_lib.read_shard(directory, 1)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(workdir_lib.DamagedFileError,
                     match=rf'{path} cannot be read \(BadZipFile.*regenerated, identically'):
    workdir_lib.load_samples(directory, config.sampling.num_samples)
  caplog.set_level(logging.WARNING)
  jobs.run('sample', config, workdir)
  assert f'{path} cannot be read' in _warnings(caplog) and 'regenerating it' in _warnings(caplog)
  redone = workdir_lib.read_shard(directory, 1)
  np.testing.assert_array_equal(redone['images'], original['images'])
  assert len(glob.glob(path + '.damaged-*')) == 1


def test_damaged_caches_are_recomputed_with_a_warning_naming_them(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  # The bound terms of eval/: a truncated cache is recomputed, to the same numbers.
  workdir = str(tmp_path / 'run')
  config = tiny_config()
  config.eval.metrics = ('bpd',)
  write_checkpoint(workdir, config)
  first = jobs.run('eval', config, workdir)
  terms = os.path.join(workdir, 'eval', f'terms_{config.data.eval_split}.npz')
  with open(terms, 'r+b') as f:
    f.truncate(50)
  os.remove(os.path.join(workdir, 'eval', 'metrics.json'))
  assert jobs.run('eval', config, workdir) == first
  assert f'{terms} cannot be read' in _warnings(caplog)
  # FID reference statistics.
  stats = str(tmp_path / 'fid_reference.npz')
  fid.save_stats(stats, np.zeros(3), np.eye(3))
  with open(stats, 'r+b') as f:
    f.truncate(30)
  with pytest.warns(UserWarning, match=f'{stats} cannot be read'):
    mu, sigma = fid.load_or_compute_reference_stats(stats, lambda: (np.ones(3), 2 * np.eye(3)))
  np.testing.assert_array_equal(mu, np.ones(3))
  np.testing.assert_array_equal(fid.load_stats(stats)[1], 2 * np.eye(3))
  # The digits classifier.
  cache = str(tmp_path / 'digits')
  clf = digits_metric.load_or_train_digits_classifier(cache)
  with open(os.path.join(cache, digits_metric.CLASSIFIER_FILE), 'wb'):
    pass
  again = digits_metric.load_or_train_digits_classifier(cache)
  assert 'digits classifier cache' in _warnings(caplog)
  for a, b in zip(clf, again):
    np.testing.assert_array_equal(a, b)
  # A damaged file a user gave is named with what to do.
  with pytest.raises(workdir_lib.DamagedFileError, match=f'{stats}.damaged-.* cannot be read'):
    fid.load_stats(glob.glob(stats + '.damaged-*')[0])


# --- item 8: a workdir that cannot be created -------------------------------------------------------

def test_a_workdir_that_cannot_be_created_is_named_up_front(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  config = tiny_config()
  for workdir in (str(blocker), str(blocker / 'run')):
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf'--workdir={workdir} cannot be used: .*a file \(not a directory\)'):
      jobs.run('train', config, workdir)
  if os.geteuid() != 0:  # root writes anywhere
    read_only = tmp_path / 'read_only'
    read_only.mkdir(mode=0o555)
    with pytest.raises(workdir_lib.WorkdirError, match='Permission denied'):
      jobs.run('train', config, str(read_only / 'run'))


# --- item 9: a resumed run with a changed config ----------------------------------------------------

def test_changed_optimizer_structure_names_every_differing_field_and_which_may_change(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = _train_config(6)
  config.optim.grad_clip = 0.0  # drops clip_by_global_norm from the optimizer: another state pytree
  config.optim.learning_rate = 5e-4
  with pytest.raises(ValueError) as raised:
    jobs.run('train', config, workdir)
  message = str(raised.value)
  assert ('optim.grad_clip: checkpoint has 1.0, config has 0.0 (changes the structure of the train '
          'state: set it back)') in message
  assert 'optim.learning_rate: checkpoint has 0.001, config has 0.0005 (may change between runs)' in message
  assert 'training.num_train_steps: checkpoint has 4, config has 6 (may change between runs)' in message
  assert _damaged_dirs(workdir) == []  # a config mismatch is not damage: nothing is moved
  # Fields that may change do: a new learning rate resumes.
  config.optim.grad_clip = 1.0
  assert int(jobs.run('train', config, workdir).step) == 6


# --- item 10: a failing save ends with one message ------------------------------------------------

@pytest.mark.multidevice
def test_saving_a_replicated_state_compiles_nothing_and_older_checkpoints_restore(tmp_path):
  """On 2 CPU devices orbax's default split each replicated array among the devices to write it,
  compiling a slicing program per shape and device at the first save (~3 s of the digits job); the
  state is now written from one replica, with no compilation. A checkpoint written the previous way
  (orbax's StandardCheckpointHandler, replica-parallel) restores, for training and for inference."""
  out = run_with_devices(f"""
      import jax, numpy as np
      import orbax.checkpoint as ocp
      from configs import tiny
      from ddpm_jax import checkpoints, parallel
      from ddpm_jax.train.state import jit_create_train_state

      compiles = []
      jax.monitoring.register_event_duration_secs_listener(
          lambda event, secs, **kw: compiles.append(event)
          if event == '/jax/core/compile/backend_compile_duration' else None)
      config = tiny.get_config()
      mesh = parallel.create_mesh()
      state = jit_create_train_state(config, mesh)(jax.random.key(0))
      manager = checkpoints.create_manager({str(tmp_path / 'new')!r})
      before = len(compiles)
      checkpoints.save(manager, state, config)
      manager.close()
      print('compiles during save', len(compiles) - before)

      # The previous writer: orbax's standard handler (replica-parallel on a CPU).
      old = ocp.CheckpointManager(
          {str(tmp_path / 'old' / 'checkpoints')!r},
          options=ocp.CheckpointManagerOptions(create=True),
          item_handlers={{checkpoints.STATE: ocp.StandardCheckpointHandler(),
                         checkpoints.META: ocp.JsonCheckpointHandler()}})
      meta = dict(checkpoints.compatibility_meta(config))
      old.save(0, args=ocp.args.Composite(**{{checkpoints.STATE: ocp.args.StandardSave(state),
                                             checkpoints.META: ocp.args.JsonSave(meta)}}))
      old.wait_until_finished()
      old.close()
      manager = checkpoints.create_manager({str(tmp_path / 'old')!r})
      restored = checkpoints.restore_for_training(manager, config, mesh)
      manager.close()
      params, ema, step = checkpoints.restore_for_inference({str(tmp_path / 'old')!r}, config, mesh)
      same = all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(state)), strict=True))
      same_ema = all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(jax.device_get(ema)), jax.tree.leaves(jax.device_get(state.ema_params)), strict=True))
      print('old checkpoint restores', same, same_ema, step)
      """, num_devices=2)
  assert 'compiles during save 0' in out, out
  assert 'old checkpoint restores True True 0' in out, out


def test_disk_full_during_save_raises_and_closes_the_checkpoint_manager(tmp_path, monkeypatch):
  closed = []
  real_close = checkpoints.ocp.CheckpointManager.close

  def close(self):
    closed.append(True)
    real_close(self)

  def no_space(self, directory, args):  # what a full disk does to the first file orbax writes
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, 'close', close)
  monkeypatch.setattr(checkpoints.DataIteratorHandler, 'save', no_space)
  workdir = str(tmp_path / 'full')
  with pytest.raises(checkpoints.CheckpointWriteError,
                     match=rf'the checkpoint of step 2 could not be written to {workdir}/checkpoints: no '
                           'space left on device. Free some space or choose another --workdir, then '
                           r'rerun: training resumes from step 0 \(none is complete\)'):
    jobs.run('train', _train_config(2), workdir)
  assert closed


@pytest.mark.slow
def test_main_prints_one_error_line_and_exits_cleanly(tmp_path):
  """main.py on a full disk (simulated as above) and on a workdir that is a file."""
  code = textwrap.dedent('''
    import errno, sys
    from absl import app
    import main
    from ddpm_jax import checkpoints
    def no_space(self, directory, args):
      raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
    checkpoints.DataIteratorHandler.save = no_space
    app.run(main.main, argv=['main.py'] + sys.argv[1:])
  ''')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  args = ['--config=configs/tiny.py', '--config.training.num_train_steps=2',
          '--config.training.num_grid_samples=0']
  proc = subprocess.run([sys.executable, '-c', code, *args, f'--workdir={tmp_path / "full"}'],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1
  assert 'error: the checkpoint of step 2 could not be written' in proc.stderr
  assert 'no space left on device' in proc.stderr
  assert 'Traceback' not in proc.stderr and 'Event loop is closed' not in proc.stderr
  (tmp_path / 'file').write_text('')
  proc = subprocess.run([sys.executable, 'main.py', *args, f'--workdir={tmp_path / "file"}'],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert f'error: --workdir={tmp_path / "file"} cannot be used' in proc.stderr


# --- item 11: missing inputs fail before the expensive work ----------------------------------------

def test_missing_inception_weights_fail_before_any_sample_or_training_step(tmp_path):
  missing = str(tmp_path / 'classify_image_graph_def.pb')
  config = tiny_config()
  config.eval.metrics = ('fid',)
  config.eval.inception_weights = missing
  workdir = str(tmp_path / 'run')
  write_checkpoint(workdir, config)
  with pytest.raises(FileNotFoundError, match=rf'config.eval.inception_weights={missing!r} does not exist'):
    jobs.run('eval', config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'samples'))
  train_config = _train_config(2)
  train_config.training.final_eval = True
  train_config.eval.metrics = ('fid',)
  train_config.eval.inception_weights = missing
  with pytest.raises(FileNotFoundError, match='does not exist'):
    jobs.run('train', train_config, str(tmp_path / 'train'))
  assert not os.path.exists(os.path.join(str(tmp_path / 'train'), 'checkpoints'))
