"""Many samples as uint8 images, batch by batch, from a compiled `sample_fn` (see `sample_fn.py`), and
the arrays of one sample shard (`generate_shard`), the same whichever job writes it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ddpm_jax import parallel
from ddpm_jax.data.preprocess import to_uint8
from ddpm_jax.sampling.sample_fn import labels_for_indices


def generate_uint8(sample_fn: Callable[..., jax.Array], params: Any, base_key: jax.Array, start: int,
                   stop: int, batch_size: int) -> np.ndarray:
  """uint8 [stop - start, H, W, C]: the samples of global indices [start, stop), `batch_size` at a
  time (the last batch padded with the next indices and cut), on every process.

  Sample i is drawn from fold_in(base_key, i) alone, so the result does not depend on batch_size.
  """
  out = []
  for first in range(start, stop, batch_size):
    indices = np.arange(first, first + batch_size, dtype=np.int32)
    samples = parallel.to_host(sample_fn(params, base_key, indices))
    out.append(to_uint8(np.asarray(samples))[:stop - first])
  return np.concatenate(out)


def generate_shard(sample_fn: Callable[..., jax.Array], params: Any, base_key: jax.Array, start: int,
                   stop: int, batch_size: int, num_classes: int = 0) -> dict[str, np.ndarray]:
  """The arrays of the sample shard of global indices [start, stop), on every process: 'images'
  (`generate_uint8`) and, for a class-conditional model (num_classes > 0), 'labels' int32 [stop - start],
  the classes `sample_fn` drew them with (`labels_for_indices`).

  --mode=sample and --mode=eval (filling the shards it misses) both write this, so a shard's content
  does not depend on which job wrote it.
  """
  shard = {'images': generate_uint8(sample_fn, params, base_key, start, stop, batch_size)}
  if num_classes:
    shard['labels'] = labels_for_indices(base_key, np.arange(start, stop), num_classes)
  return shard
