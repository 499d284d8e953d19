"""The compiled reverse-process loop shared by every sampler, and the per-sample noise feeding it.

Reproducibility contract: sample i of a run owns one key, `keys[i] = fold_in(base_key, i)` with i
its global index. Everything random about the sample derives from that key alone: x_T from
`fold_in(keys[i], K)` and the noise of step t (0-based table index, K = number of steps) from
`fold_in(keys[i], t)`, each drawn per sample under `vmap`. A sample therefore depends neither on
the other samples of its batch, nor on the batch size, nor on the number of devices.

A sampler is a `step_fn(x_t, t, noise) -> {'sample': x_{t-1}, 'pred_xstart': x0_hat}`
(x_t [B, H, W, C], t int32 [B], noise [B, H, W, C] ~ N(0, I)); `reverse_loop` runs it for
t = first_step .. 0 in one `lax.fori_loop`, so a chain of any length is one compiled program.
`sample_loop` is the whole of DDPM Algorithm 2 for any step_fn (x_T, then the reverse loop): the
public samplers, progressive generation and the compiled `make_sample_fn` all run it.

Injected noise: to replay another codebase's trajectory step by step, both loops take x_T (`noise`)
and a per-step noise source `step_noise` instead of the keys' streams: an array [K, B, H, W, C]
whose row t is the z of table index t (row order = index order, the reverse of loop order; the
row of t = 0 is read but the ancestral and DDIM steps ignore it), or a function t -> [B, H, W, C]
of the traced int32 scalar t. With both given, `keys` may be None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.streams import per_sample_normal

StepFn = Callable[[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]
# A per-step noise source: [K, B, H, W, C] indexed by table index t, or t (int32 scalar) -> noise.
StepNoise = jax.Array | np.ndarray | Callable[[jax.Array], jax.Array]


def prior_noise(keys: jax.Array, num_steps: int, shape: Sequence[int],
                dtype=jnp.float32) -> jax.Array:
  """x_T ~ N(0, I) (DDPM Alg. 2, line 1): [B, *shape], drawn from stream `num_steps` of each key.

  Step noises use streams 0 .. num_steps - 1, so x_T never shares randomness with a step.
  """
  return per_sample_normal(keys, num_steps, shape, dtype)


def _check_keys(keys: jax.Array | None, batch: int) -> None:
  if keys is None:
    raise ValueError(f'keys must be a typed key array of shape [B] = ({batch},), one key per '
                     'sample, unless the noise of every step is given (step_noise); got None')
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or keys.shape != (batch,):
    raise ValueError(f'keys must be a typed key array of shape [B] = ({batch},), one key per '
                     'sample (e.g. per_sample_keys(jax.random.key(seed), indices)); got dtype '
                     f'{keys.dtype}, shape {keys.shape}')


def record_slots(first_step: int, every: int) -> np.ndarray:
  """int32 [first_step + 1]: the slot where step t is recorded (-1 = not recorded).

  Recorded steps are first_step, first_step - every, ... and always the last step 0, so that the
  final x0 prediction is the last column (DDPM §4.3 progressive generation). This counts from the
  top, so the first column is the very first prediction (from pure noise). The DDPM original
  (`diffusion_utils_2.p_sample_loop_progressive`, include_xstartpred_freq = k) counts from the
  bottom instead: T // k columns, column j holding x0_hat at t = j k (0, k, 2k, ...; ascending t,
  so its first column is the final prediction and t = T - 1 is not recorded unless k = 1). Both
  record t = 0; for T = 1000, k = 100 this records t = 999, 899, ..., 99, 0 (11 columns) where the
  original records 0, 100, ..., 900 (10 columns).
  """
  if every < 1:
    raise ValueError(f'progressive recording interval must be >= 1 step, got {every}')
  steps = list(range(first_step, -1, -every))
  if steps[-1] != 0:
    steps.append(0)
  slots = np.full((first_step + 1,), -1, np.int32)
  slots[steps] = np.arange(len(steps), dtype=np.int32)
  return slots


def _check_step_noise(step_noise: StepNoise | None, first_step: int,
                      x_shape: Sequence[int]) -> None:
  if step_noise is None or callable(step_noise):
    return
  expected = (first_step + 1,) + tuple(x_shape)
  if tuple(np.shape(step_noise)) != expected:
    raise ValueError(f'step_noise must be [K, B, H, W, C] = {expected} (row t: the noise of table '
                     f'index t), or a function t -> noise; got shape {tuple(np.shape(step_noise))}')


def _step_noise(step_noise: StepNoise | None, keys: jax.Array | None, t: jax.Array,
                image_shape: Sequence[int], dtype) -> jax.Array:
  """The z of table index t: from the keys' stream t by default, else from the given source."""
  if step_noise is None:
    return per_sample_normal(keys, t, image_shape, dtype)
  if callable(step_noise):
    return jnp.asarray(step_noise(t)).astype(dtype)
  return jnp.asarray(step_noise)[t].astype(dtype)


def reverse_loop(step_fn: StepFn, x_init: jax.Array, keys: jax.Array | None, first_step: int,
                 *, record_every: int = 0,
                 step_noise: StepNoise | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Runs the reverse process from x_{first_step} down to x_0 in one `lax.fori_loop` (DDPM Alg. 2).

  Args:
    step_fn: one reverse step (see the module docstring).
    x_init: [B, H, W, C], the state at table index `first_step` (x_T for a full run); its dtype
      is the dtype of the whole chain.
    keys: typed keys [B], one per sample; step t's noise comes from fold_in(keys[i], t). May be
      None when `step_noise` is given.
    first_step: static int, the table index of x_init (K - 1 for a full run over K steps).
    record_every: if > 0, also return x0_hat at steps first_step, first_step - every, ..., 0
      (see `record_slots` for how this differs from the DDPM original).
    step_noise: optional per-step noise instead of the keys' (module docstring): an array
      [first_step + 1, B, H, W, C] (row t for table index t) or a function t -> [B, H, W, C].
  Returns:
    (x0 [B, H, W, C], records [R, B, H, W, C] or None).
  """
  batch, image_shape, dtype = x_init.shape[0], x_init.shape[1:], x_init.dtype
  if step_noise is None or keys is not None:
    _check_keys(keys, batch)
  _check_step_noise(step_noise, first_step, x_init.shape)
  if record_every > 0:
    slots_np = record_slots(first_step, record_every)
    slots = jnp.asarray(slots_np)
    records = jnp.zeros((int(slots_np.max()) + 1,) + x_init.shape, dtype)
  else:
    slots, records = None, None

  def body(i, carry):
    x, records = carry
    t = first_step - i
    noise = _step_noise(step_noise, keys, t, image_shape, dtype)
    out = step_fn(x, jnp.full((batch,), t, jnp.int32), noise)
    if records is not None:
      slot = slots[t]
      keep = jnp.maximum(slot, 0)
      # A masked write instead of lax.cond keeps the loop body branch-free.
      records = records.at[keep].set(jnp.where(slot >= 0, out['pred_xstart'].astype(dtype),
                                               records[keep]))
    return out['sample'].astype(dtype), records

  return jax.lax.fori_loop(0, first_step + 1, body, (x_init, records))


def sample_loop(step_fn: StepFn, keys: jax.Array | None, shape: Sequence[int], num_steps: int,
                dtype, *, noise: jax.Array | None = None, record_every: int = 0,
                step_noise: StepNoise | None = None) -> tuple[jax.Array, jax.Array | None]:
  """DDPM Algorithm 2 for any sampler: x_T ~ N(0, I), then `num_steps` reverse steps to x_0.

  Args:
    step_fn: one reverse step over table indices num_steps - 1 .. 0.
    keys: typed keys [B], one per sample; x_T comes from stream `num_steps` of each key (see
      `prior_noise`), the noise of step t from stream t. May be None when both `noise` and
      `step_noise` are given.
    shape: [B, H, W, C] of the samples.
    num_steps: K, the number of steps of the sampler's tables (coefs.num_timesteps).
    dtype: dtype of the whole chain (the tables' dtype).
    noise: optional x_T [B, H, W, C] instead of drawing it from the keys; cast to dtype.
    record_every: as `reverse_loop`.
    step_noise: optional per-step noise [num_steps, B, H, W, C] or t -> noise (`reverse_loop`).
  Returns:
    (x_0 [B, H, W, C], records as `reverse_loop`).
  """
  if noise is None:
    if keys is None:
      raise ValueError('sample_loop needs keys to draw x_T, or x_T itself (noise=...).')
    x_init = prior_noise(keys, num_steps, shape[1:], dtype)
  elif tuple(noise.shape) != tuple(shape):
    raise ValueError(f'noise (x_T) must have the sample shape {tuple(shape)}, '
                     f'got {tuple(noise.shape)}')
  else:
    x_init = noise.astype(dtype)
  return reverse_loop(step_fn, x_init, keys, num_steps - 1, record_every=record_every,
                      step_noise=step_noise)
