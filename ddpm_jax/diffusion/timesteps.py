"""Timestep samplers of the training loss: uniform, and loss-second-moment importance sampling.

iDDPM §3.3. The importance sampler's state is a pytree of arrays, updated by a pure, jit-able
function, so it can live in the train state, be checkpointed and be donated like any other array.
"""

import flax
import jax
import jax.numpy as jnp

from ddpm_jax.diffusion._checks import _check_positive_int


def sample_uniform(key: jax.Array, batch_size: int,
                   num_timesteps: int) -> tuple[jax.Array, jax.Array]:
  """t ~ Uniform{0, ..., T-1} (DDPM Algorithm 1, line 3), with unit importance weights.

  Returns:
    (t int32 [batch_size], weights float32 [batch_size] of ones).
  """
  _check_positive_int('batch_size', batch_size)
  _check_positive_int('num_timesteps', num_timesteps)
  t = jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  return t, jnp.ones((batch_size,), jnp.float32)


@flax.struct.dataclass
class LossSecondMomentState:
  """The last H losses of every timestep (iDDPM §3.3), oldest first.

  history: float32 [T, H]; row t holds counts[t] losses in columns 0..counts[t]-1 (zeros after).
  counts: int32 [T], how many losses row t holds (at most H).
  """
  history: jax.Array
  counts: jax.Array


def init_loss_second_moment(num_timesteps: int,
                            history_per_term: int = 10) -> LossSecondMomentState:
  """An empty loss history: T rows of H = 10 slots in iDDPM §3.3.

  Returns:
    LossSecondMomentState with history float32 [T, H] of zeros and counts int32 [T] of zeros.
  """
  _check_positive_int('num_timesteps', num_timesteps)
  _check_positive_int('history_per_term', history_per_term)
  return LossSecondMomentState(history=jnp.zeros((num_timesteps, history_per_term), jnp.float32),
                               counts=jnp.zeros((num_timesteps,), jnp.int32))


def loss_second_moment_probs(state: LossSecondMomentState,
                             uniform_prob: float = 0.001) -> jax.Array:
  """p_t proportional to sqrt(E[L_t^2]) over the history, once every t has H losses (iDDPM §3.3).

  Before that, p is uniform. After warm-up p = (1 - uniform_prob) p + uniform_prob / T, so that no
  timestep's probability reaches zero.

  Returns:
    float32 [T], summing to 1.
  """
  if not 0.0 <= uniform_prob <= 1.0:
    raise ValueError(f'uniform_prob must lie in [0, 1], got {uniform_prob!r}.')
  num_timesteps, history_per_term = state.history.shape
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  rms = jnp.sqrt(jnp.mean(jnp.square(state.history.astype(jnp.float32)), axis=-1))
  total = jnp.sum(rms)
  # All-zero losses carry no information: stay uniform rather than divide by zero.
  safe_total = jnp.where(total > 0, total, 1.0)
  mixed = (1.0 - uniform_prob) * rms / safe_total + uniform_prob / num_timesteps
  warm = jnp.all(state.counts == history_per_term) & (total > 0)
  return jnp.where(warm, mixed, uniform)


def sample_loss_second_moment(state: LossSecondMomentState, key: jax.Array, batch_size: int,
                              uniform_prob: float = 0.001) -> tuple[jax.Array, jax.Array]:
  """Draws t ~ p from `loss_second_moment_probs`, with weights 1 / (T p_t) (iDDPM §3.3).

  E_{t~p}[w_t L_t] = E_{t~uniform}[L_t], so weighting each example's loss by w_t keeps the loss an
  unbiased estimate of the uniform-t objective while reducing its variance.

  Returns:
    (t int32 [batch_size], weights float32 [batch_size]).
  """
  _check_positive_int('batch_size', batch_size)
  probs = loss_second_moment_probs(state, uniform_prob)
  num_timesteps = probs.shape[0]
  t = jax.random.choice(key, num_timesteps, (batch_size,), p=probs).astype(jnp.int32)
  return t, 1.0 / (num_timesteps * probs[t])


def update_loss_second_moment(state: LossSecondMomentState, t: jax.Array,
                              losses: jax.Array) -> LossSecondMomentState:
  """Pushes each (t_i, loss_i) of a batch into the history of t_i, in batch order (iDDPM §3.3).

  Equal to the sequential update of iDDPM's reference code: loss_i lands in row t_i after the losses
  already there and after those of earlier examples with the same t; once a row holds H losses the
  oldest are dropped. Vectorised: every loss knows its final slot in advance, so one gather and one
  scatter replace the loop.

  Args:
    state: the current history.
    t: int [B] timestep indices of the batch (duplicates allowed).
    losses: float [B] per-example losses at t (the unweighted 'loss' term).
  Returns:
    the new LossSecondMomentState.
  """
  num_timesteps, history_per_term = state.history.shape
  if jnp.shape(t) != jnp.shape(losses) or jnp.ndim(t) != 1:
    raise ValueError(f't and losses must both be [B] arrays, got shapes {list(jnp.shape(t))} and '
                     f'{list(jnp.shape(losses))}.')
  t = t.astype(jnp.int32)
  same = t[:, None] == t[None, :]
  # Number of earlier examples with the same t: the order in which the batch's losses arrive.
  rank = jnp.sum(jnp.tril(same, k=-1), axis=1)
  new_per_t = jnp.zeros((num_timesteps,), jnp.int32).at[t].add(1)
  total = state.counts + new_per_t                       # losses ever seen this round, per row
  start = jnp.maximum(total - history_per_term, 0)       # how many of them fall off the front

  # Old losses shift left by `start`; freed slots stay zero unless a new loss lands there.
  cols = jnp.arange(history_per_term)[None, :] + start[:, None]
  kept = cols < state.counts[:, None]
  old = jnp.take_along_axis(state.history, jnp.minimum(cols, history_per_term - 1), axis=1)
  history = jnp.where(kept, old, 0.0).astype(state.history.dtype)

  dest = state.counts[t] + rank - start[t]
  dest = jnp.where(dest >= 0, dest, history_per_term)   # pushed out within this batch: dropped
  history = history.at[t, dest].set(losses.astype(history.dtype), mode='drop')
  return LossSecondMomentState(history=history,
                               counts=jnp.minimum(total, history_per_term).astype(jnp.int32))
