"""The layout of a workdir, the one atomic write, and the sample shards.

A workdir holds everything a run writes:

  <workdir>/config.json                  the config of the latest run that was valid for it
  <workdir>/checkpoints/<step>/          orbax: train state, data-iterator state, meta (checkpoints.py)
  <workdir>/samples_<step>.png           EMA sample grids written during training
  <workdir>/samples/                     --mode=sample: samples_<k:05d>.npz shards + samples_meta.json
                                         (or config.eval.sample_dir)
  <workdir>/eval/                        --mode=eval: metrics.json and the metrics' caches and reports
  <workdir>/progressive/, interpolation/ the strips of --mode=progressive / --mode=interpolate

Every file is written through `atomic_write` (a temporary file in the same directory, then a rename),
so a reader, or a run resumed after a crash, only ever sees complete files.

Sample shards: shard k holds the global sample indices [k S, (k + 1) S) (S = samples_per_shard). Since
sample i depends only on (seed, i), a rerun regenerates exactly the shards that are missing.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any

import ml_collections
import numpy as np
from absl import logging

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
SAMPLES = 'samples'
EVAL = 'eval'
METRICS_FILE = 'metrics.json'
SAMPLES_META_FILE = 'samples_meta.json'
SAMPLES_GRID_FILE = 'samples_grid.png'
PROGRESSIVE = 'progressive'
LOCK_FILE = '.lock'
INTERPOLATION = 'interpolation'
# Fields that make two sample sets different; num_samples is not one (a rerun may ask for more).
SAMPLE_META_FIELDS = ('seed', 'method', 'timestep_respacing', 'ddim_eta', 'clip_denoised', 'use_ema',
                      'samples_per_shard', 'image_shape', 'checkpoint_step')


# --- writing ---------------------------------------------------------------------------------------

def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'wb', **open_kwargs: Any) -> Iterator[IO]:
  """Opens a temporary file beside `path`; renames it to `path` when the block ends without error.

  The directory is created if needed. On an error the temporary file is removed and `path` keeps its
  previous content (or stays absent): a crash never leaves a half-written file under the final name.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    # mkstemp makes the file private (0600); give it the mode an ordinary open() would (0666 & ~umask).
    os.chmod(tmp, 0o666 & ~_umask())
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> str:
  """`obj` as indented JSON with sorted keys, atomically; returns path."""
  with atomic_write(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  return path


def savez(path: str, **arrays: Any) -> str:
  """`np.savez` of `arrays`, atomically; returns path."""
  with atomic_write(path) as f:
    np.savez(f, **arrays)
  return path


class WorkdirError(RuntimeError):
  """The workdir cannot be used (not creatable, not writable, or in use by another run)."""


class WorkdirLocked(WorkdirError):
  """Another live process holds the workdir's lock."""


class DamagedFileError(ValueError):
  """A file exists but cannot be read; the message names it and says what to do."""


# What numpy / zipfile / json raise on a truncated or otherwise damaged file (not on a missing one).
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_json(path: str, remedy: str = 'delete it or restore it from a backup') -> Any:
  """The JSON in `path`; DamagedFileError naming the file and `remedy` if it cannot be parsed."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise
  except _READ_ERRORS as e:
    raise DamagedFileError(f'{path} cannot be read ({type(e).__name__}: {e}); {remedy}') from e


def read_npz(path: str, remedy: str = 'delete it or restore it from a backup') -> dict[str, np.ndarray]:
  """Every array of the .npz `path` (no pickles), read fully so that damage shows here and now.

  Raises:
    FileNotFoundError: `path` does not exist.
    DamagedFileError: it exists but is not a complete .npz; the message names it and `remedy`.
  """
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise
  except _READ_ERRORS as e:
    raise DamagedFileError(f'{path} cannot be read ({type(e).__name__}: {e}); {remedy}') from e


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%SZ')


def set_aside(path: str) -> str:
  """Renames a damaged file or directory to `<path>.damaged-<UTC time>` (kept for inspection, out of
  the way of every reader and writer); returns the new path."""
  aside = f'{path}.damaged-{_utc_stamp()}'
  while os.path.exists(aside):  # two in one second
    aside += '_'
  os.replace(path, aside)
  return aside


def read_cached_npz(path: str, what: str, set_aside_damaged: bool = True) -> dict[str, np.ndarray] | None:
  """A cache file's arrays; None when it is absent, or damaged: then a warning names it (`what` says
  which cache) and, if `set_aside_damaged`, it is renamed out of the way, so the caller recomputes it."""
  if not os.path.exists(path):
    return None
  try:
    return read_npz(path)
  except DamagedFileError as e:
    if set_aside_damaged:
      with contextlib.suppress(FileNotFoundError):  # another process was first
        logging.warning('%s: %s. Moved it to %s; recomputing it.', what, e, set_aside(path))
    else:
      logging.warning('%s: %s. Recomputing it.', what, e)
    return None


# --- the workdir: usable, and one writer at a time ------------------------------------------------

def ensure_writable(workdir: str, flag: str = '--workdir') -> str:
  """Creates `workdir` and checks that files can be created in it, before any expensive work.

  Raises:
    WorkdirError: naming `flag`, the path and the reason (a file in its place, no permission, ...).
  """
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix='.write_test.')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    reason = e.strerror or str(e)
    if isinstance(e, FileExistsError) or (os.path.exists(path) and not os.path.isdir(path)):
      reason = 'a file (not a directory) is in its place'
    elif e.errno == errno.ENOTDIR:
      reason = 'a file (not a directory) is in the place of one of its parent directories'
    raise WorkdirError(f'{flag}={workdir} cannot be used: {path}: {reason}; '
                       f'choose another {flag} or fix the location') from e
  return path


@contextlib.contextmanager
def lock(workdir: str, job: str = '') -> Iterator[str]:
  """Holds an exclusive lock on `workdir` while the block runs (one writing job per workdir).

  The lock is a `flock` on <workdir>/.lock, which the kernel releases when its process exits, however
  it exits: a lock left by a killed run is never stale. The file records the holder (host, pid, start
  time, job) for the refusal message only; it is left in place.

  Raises:
    WorkdirError: the workdir cannot be created or written (see `ensure_writable`).
    WorkdirLocked: another process holds the lock; the message names it.
  """
  path = os.path.join(ensure_writable(workdir), LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'another process'
      with contextlib.suppress(ValueError):
        h = json.loads(holder)
        holder = (f"{h.get('job') or 'a job'} (host {h.get('host')}, pid {h.get('pid')}, "
                  f"started {h.get('started')})")
      raise WorkdirLocked(f'--workdir={workdir} is in use by {holder}; wait for it to '
                          'finish (or stop it), or choose another --workdir') from None
    info = {'host': socket.gethostname(), 'pid': os.getpid(), 'job': job,
            'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    yield path
  finally:
    os.close(fd)  # releases the flock


# --- the layout ------------------------------------------------------------------------------------

def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def grid_path(workdir: str, step: int) -> str:
  """The EMA sample grid written at training step `step`."""
  return os.path.join(workdir, f'samples_{step}.png')


def sample_dir(workdir: str, override: str = '') -> str:
  """`override` (config.eval.sample_dir) if set, else <workdir>/samples."""
  return override or os.path.join(workdir, SAMPLES)


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL)


def strip_paths(workdir: str, name: str) -> tuple[str, str]:
  """(png, npz) of a progressive / interpolation strip: <workdir>/<name>/<name>.{png,npz}."""
  base = os.path.join(workdir, name, name)
  return base + '.png', base + '.npz'


# --- sample shards ---------------------------------------------------------------------------------

def shard_path(directory: str, shard: int) -> str:
  return os.path.join(directory, f'samples_{shard:05d}.npz')


def shard_ranges(num_samples: int, per_shard: int) -> list[tuple[int, int]]:
  """[start, stop) of the global sample indices of each shard."""
  return [(s, min(s + per_shard, num_samples)) for s in range(0, num_samples, per_shard)]


def sample_meta(config: ml_collections.ConfigDict, step: int) -> dict[str, Any]:
  """What the samples of a sample directory depend on (SAMPLE_META_FIELDS)."""
  s, d = config.sampling, config.data
  return {'seed': config.seed, 'method': s.method, 'timestep_respacing': s.timestep_respacing,
          'ddim_eta': float(s.ddim_eta), 'clip_denoised': bool(s.clip_denoised),
          'use_ema': bool(s.use_ema), 'samples_per_shard': s.samples_per_shard,
          'image_shape': [d.image_size, d.image_size, d.num_channels], 'checkpoint_step': step}


def check_sample_meta(directory: str, meta: dict[str, Any]) -> None:
  """Refuses to mix samples of different settings or checkpoints in one directory."""
  path = os.path.join(directory, SAMPLES_META_FILE)
  if not os.path.exists(path):
    return
  saved = read_json(path)
  diffs = [f'{k}: directory has {saved.get(k)!r}, now {meta[k]!r}' for k in SAMPLE_META_FIELDS
           if saved.get(k) != meta[k]]
  if diffs:
    raise ValueError(f'{directory} holds samples made with other settings; delete it or set '
                     'config.eval.sample_dir to another directory. Differences:\n  '
                     + '\n  '.join(diffs))


_SHARD_REMEDY = ('rerun --mode=sample (or --mode=eval) on this directory: a shard that cannot be read '
                 'is set aside and regenerated, identically, since sample i depends only on (seed, i)')


def read_shard(directory: str, shard: int) -> dict[str, np.ndarray]:
  """The arrays (images, indices) of one shard; DamagedFileError (naming it) if it cannot be read."""
  return read_npz(shard_path(directory, shard), _SHARD_REMEDY)


def missing_shards(directory: str, num_shards: int, ranges: list[tuple[int, int]] | None = None,
                   set_aside_damaged: bool = False) -> list[int]:
  """The shards of 0 .. num_shards - 1 that are not on disk, or (given their `ranges`) that cannot be
  read or do not hold exactly their samples; `set_aside_damaged` renames those with a warning."""
  missing = []
  for k in range(num_shards):
    path = shard_path(directory, k)
    if not os.path.exists(path):
      missing.append(k)
      continue
    if ranges is None:
      continue
    try:
      indices = read_shard(directory, k).get('indices')
      if indices is None or not np.array_equal(indices, np.arange(*ranges[k])):
        raise DamagedFileError(f'{path} does not hold samples {ranges[k][0]}-{ranges[k][1] - 1}')
    except DamagedFileError as e:
      missing.append(k)
      if set_aside_damaged:
        logging.warning('%s. Moved it to %s; regenerating it (sample i depends only on (seed, i), so '
                        'the new shard is what the old one held).', e, set_aside(path))
  return missing


def fill_sample_shards(directory: str, meta: dict[str, Any], num_samples: int,
                       generate: Callable[[int, int], np.ndarray | dict[str, np.ndarray]], *,
                       is_writer: bool,
                       broadcast: Callable[[np.ndarray], np.ndarray] = lambda x: x,
                       log: Callable[..., None] = lambda *args: None) -> None:
  """Writes the missing shards of the first `num_samples` samples of a sample directory.

  Args:
    directory: the sample directory (created; its samples_meta.json must agree with `meta`).
    meta: the settings the samples depend on (SAMPLE_META_FIELDS, samples_per_shard among them).
    num_samples: how many samples the directory must hold from index 0.
    generate: (start, stop) -> uint8 [stop - start, H, W, C], the samples of those global indices,
      or a dict of per-sample arrays with those samples as 'images' (and e.g. 'labels' of a
      class-conditional model), each stored in the shard under its name. Every process calls it
      (it may be a collective); only the writer writes.
    is_writer: whether this process writes files.
    broadcast: makes the writer's list of missing shards every process's (several hosts).
    log: a logging function (format, *args).
  """
  check_sample_meta(directory, meta)
  if is_writer:
    write_json(os.path.join(directory, SAMPLES_META_FILE), meta)
  ranges = shard_ranges(num_samples, meta['samples_per_shard'])
  missing = np.zeros(len(ranges), bool)
  if is_writer:  # only the writer reads (and sets aside damaged shards); the others get its list
    missing[missing_shards(directory, len(ranges), ranges, set_aside_damaged=True)] = True
  missing = np.asarray(broadcast(missing))
  for k in np.flatnonzero(missing):
    start, stop = ranges[k]
    extra = generate(start, stop)
    images = extra.pop('images') if isinstance(extra, dict) else extra
    if is_writer:
      savez(shard_path(directory, k), images=images, indices=np.arange(start, stop),
            **(extra if isinstance(extra, dict) else {}))
    log('Wrote sample shard %d/%d (samples %d-%d).', k + 1, len(ranges), start, stop - 1)


def load_samples(directory: str, num_samples: int) -> np.ndarray:
  """The first `num_samples` samples of a sample directory, uint8 [N, H, W, C], in index order.

  Raises:
    ValueError: fewer consecutive samples from index 0 are on disk, or the shards are inconsistent.
    DamagedFileError (a ValueError): a shard cannot be read (`fill_sample_shards` regenerates it).
  """
  out, have, shard = [], 0, 0
  while have < num_samples and os.path.exists(shard_path(directory, shard)):
    f = read_shard(directory, shard)
    if int(f['indices'][0]) != have:
      raise ValueError(f'{shard_path(directory, shard)} starts at sample {int(f["indices"][0])}, '
                       f'expected {have}: the directory is not one consistent sample set')
    out.append(f['images'])
    have += len(out[-1])
    shard += 1
  if have < num_samples:
    raise ValueError(f'{directory} holds {have} consecutive samples from index 0, {num_samples} '
                     'are needed: run --mode=sample with config.sampling.num_samples large enough')
  return np.concatenate(out)[:num_samples]
