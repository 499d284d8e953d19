"""The sub-streams of a run's seed: one key per use, so no two uses ever share randomness.

A key is `fold_in(key(config.seed), stream)`; steps and samples fold their index into it further.
Per-example randomness (a sample's chain, an example's bits/dim noise) comes from one key per
example, `per_sample_keys(base_key, indices)`, so it depends neither on the batch an example is in
nor on the number of devices.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

INIT_STREAM, TRAIN_STREAM, GRID_STREAM = 0, 1, 2
SAMPLE_STREAM, PROGRESSIVE_STREAM, INTERPOLATION_STREAM = 3, 4, 5
BPD_STREAM = 6


def stream_key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
  """The typed key of sub-stream `stream` of config.seed."""
  return jax.random.fold_in(jax.random.key(config.seed), stream)


def per_sample_keys(base_key: jax.Array, indices: jax.Array) -> jax.Array:
  """Keys [B], keys[i] = fold_in(base_key, indices[i]); indices: int [B] global sample indices."""
  return jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)


def per_sample_normal(keys: jax.Array, stream: int | jax.Array, shape: Sequence[int],
                      dtype=jnp.float32) -> jax.Array:
  """Standard normal [B, *shape], row i drawn from fold_in(keys[i], stream) alone."""
  def draw(key):
    return jax.random.normal(jax.random.fold_in(key, stream), tuple(shape), dtype)
  return jax.vmap(draw)(keys)
