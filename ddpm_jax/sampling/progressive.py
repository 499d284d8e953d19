"""Progressive generation (DDPM §4.3, Fig. 6): the x0 prediction along the reverse chain.

Large-scale features (layout, colour) appear first and details last; each recorded column is x0_hat
at one step, the last column (step 0) is the final sample's x0_hat.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.sampling.loop import StepFn, record_slots, sample_loop


def recorded_steps(num_steps: int, every: int) -> np.ndarray:
  """int [R]: the table indices that `progressive_sample_loop` records, in column order."""
  slots = record_slots(num_steps - 1, every)
  steps = np.nonzero(slots >= 0)[0]
  return steps[np.argsort(slots[steps])]


def progressive_sample_loop(coefs: diffusion.DiffusionCoefficients, step_fn: StepFn,
                            keys: jax.Array, shape: Sequence[int], *,
                            every: int) -> tuple[jax.Array, jax.Array]:
  """Samples like the plain loop (same keys -> same x0) and keeps x0_hat every `every` steps.

  Args:
    coefs: the sampler's tables (K = coefs.num_timesteps steps).
    step_fn: one reverse step (`sample_fn.make_step_fn`).
    keys: typed keys [B], one per sample.
    shape: [B, H, W, C].
    every: record interval in sampler steps (config.sampling.progressive_every).
  Returns:
    (x0 [B, H, W, C], pred_xstart [B, R, H, W, C]) where column r is x0_hat at step
    `recorded_steps(K, every)[r]`.
  """
  x0, records = sample_loop(step_fn, keys, shape, coefs.num_timesteps, coefs.betas.dtype,
                            record_every=every)
  return x0, records.swapaxes(0, 1)
