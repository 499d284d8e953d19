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
import json
import os
import tempfile
from typing import IO, Any, Callable, Iterator

import ml_collections
import numpy as np

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
SAMPLES = 'samples'
EVAL = 'eval'
METRICS_FILE = 'metrics.json'
SAMPLES_META_FILE = 'samples_meta.json'
SAMPLES_GRID_FILE = 'samples_grid.png'
PROGRESSIVE = 'progressive'
INTERPOLATION = 'interpolation'
# Fields that make two sample sets different; num_samples is not one (a rerun may ask for more).
SAMPLE_META_FIELDS = ('seed', 'method', 'timestep_respacing', 'ddim_eta', 'clip_denoised', 'use_ema',
                      'samples_per_shard', 'image_shape', 'checkpoint_step')


# --- writing ---------------------------------------------------------------------------------------

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


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


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


def missing_shards(directory: str, num_shards: int) -> list[int]:
  """The shards of 0 .. num_shards - 1 that are not on disk."""
  return [k for k in range(num_shards) if not os.path.exists(shard_path(directory, k))]


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
  missing[missing_shards(directory, len(ranges))] = True
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
  """
  out, have, shard = [], 0, 0
  while have < num_samples and os.path.exists(shard_path(directory, shard)):
    with np.load(shard_path(directory, shard)) as f:
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
