"""The sub-streams of a run's seed: one key per use, so no two uses ever share randomness.

A key is `fold_in(key(config.seed), stream)`; steps and samples fold their index into it further.
"""

import jax
import ml_collections

INIT_STREAM, TRAIN_STREAM, GRID_STREAM = 0, 1, 2
SAMPLE_STREAM, PROGRESSIVE_STREAM, INTERPOLATION_STREAM = 3, 4, 5
BPD_STREAM = 6


def stream_key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
  """The typed key of sub-stream `stream` of config.seed."""
  return jax.random.fold_in(jax.random.key(config.seed), stream)
