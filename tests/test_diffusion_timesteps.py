"""Tests of the timestep samplers (DDPM Algorithm 1; iDDPM §3.3 loss-second-moment resampling)."""

import flax
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion


def sequential_update(history: np.ndarray, counts: np.ndarray, ts, losses):
  """iDDPM §3.3 as a plain loop: each (t, loss) in batch order joins row t, dropping the oldest."""
  history, counts = history.copy(), counts.copy()
  size = history.shape[1]
  for t, loss in zip(ts, losses):
    if counts[t] == size:
      history[t] = np.append(history[t, 1:], loss)
    else:
      history[t, counts[t]] = loss
      counts[t] += 1
  return history, counts


def reference_probs(history: np.ndarray, counts: np.ndarray, uniform_prob: float = 0.001):
  num_timesteps, size = history.shape
  if not np.all(counts == size):
    return np.full(num_timesteps, 1 / num_timesteps)
  rms = np.sqrt((history.astype(np.float64)**2).mean(axis=1))
  return (1 - uniform_prob) * rms / rms.sum() + uniform_prob / num_timesteps


def warm_state(table: np.ndarray, size: int = 10, seed: int = 0) -> diffusion.LossSecondMomentState:
  """A full history: row t holds `size` losses scattered around table[t]."""
  rng = np.random.default_rng(seed)
  history = table[:, None] * rng.uniform(0.5, 1.5, (len(table), size))
  return diffusion.LossSecondMomentState(history=jnp.asarray(history, jnp.float32),
                                         counts=jnp.full(len(table), size, jnp.int32))


def test_sample_uniform():
  t, weights = diffusion.sample_uniform(jax.random.key(0), 40_000, 10)
  assert t.shape == weights.shape == (40_000,)
  assert t.dtype == jnp.int32 and weights.dtype == jnp.float32
  np.testing.assert_array_equal(weights, 1.0)
  counts = np.bincount(np.asarray(t), minlength=10)
  assert counts.sum() == 40_000 and len(counts) == 10
  np.testing.assert_allclose(counts / 40_000, 0.1, atol=0.01)  # ~6 standard errors


def test_init_state():
  state = diffusion.init_loss_second_moment(7)
  assert state.history.shape == (7, 10) and state.history.dtype == jnp.float32
  assert state.counts.shape == (7,) and state.counts.dtype == jnp.int32
  assert not np.any(state.history) and not np.any(state.counts)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    num_timesteps=st.sampled_from([1, 5]), size=st.sampled_from([1, 3]),
    batches=st.lists(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 99)), min_size=6,
                              max_size=6), min_size=1, max_size=5))
def test_update_equals_sequential_reference(num_timesteps, size, batches):
  """Including duplicate t within a batch and rows that overflow inside one batch.

  (Few distinct shapes, so that eager JAX reuses its compiled ops across examples.)
  """
  state = diffusion.init_loss_second_moment(num_timesteps, size)
  history, counts = np.zeros((num_timesteps, size), np.float32), np.zeros(num_timesteps, np.int64)
  for batch in batches:
    ts = np.array([t % num_timesteps for t, _ in batch], np.int32)
    losses = np.array([loss for _, loss in batch], np.float32) / 7
    state = diffusion.update_loss_second_moment(state, jnp.asarray(ts), jnp.asarray(losses))
    history, counts = sequential_update(history, counts, ts, losses)
    np.testing.assert_array_equal(state.history, history)
    np.testing.assert_array_equal(state.counts, counts)


def test_update_is_jittable_and_donatable():
  rng = np.random.default_rng(0)
  ts = rng.integers(0, 6, (4, 16)).astype(np.int32)
  losses = rng.uniform(0, 3, (4, 16)).astype(np.float32)
  update = jax.jit(diffusion.update_loss_second_moment, donate_argnums=0)
  state = diffusion.init_loss_second_moment(6, 3)
  history, counts = np.zeros((6, 3), np.float32), np.zeros(6, np.int64)
  for t_batch, loss_batch in zip(ts, losses):
    state = update(state, jnp.asarray(t_batch), jnp.asarray(loss_batch))
    history, counts = sequential_update(history, counts, t_batch, loss_batch)
  np.testing.assert_array_equal(state.history, history)
  np.testing.assert_array_equal(state.counts, counts)


def test_state_is_a_checkpointable_pytree():
  state = warm_state(np.arange(1.0, 6.0), size=4)
  leaves = jax.tree_util.tree_leaves(state)
  assert len(leaves) == 2
  restored = flax.serialization.from_bytes(diffusion.init_loss_second_moment(5, 4),
                                           flax.serialization.to_bytes(state))
  assert isinstance(restored, diffusion.LossSecondMomentState)
  np.testing.assert_array_equal(restored.history, state.history)
  np.testing.assert_array_equal(restored.counts, state.counts)
  doubled = jax.tree_util.tree_map(lambda x: x * 2, state)
  np.testing.assert_array_equal(doubled.counts, 8)


def test_probs_uniform_until_every_t_is_full():
  table = np.array([1.0, 2.0, 4.0, 8.0])
  state = warm_state(table, size=3)
  cold = state.replace(counts=state.counts.at[2].set(2))  # one row one loss short
  np.testing.assert_allclose(diffusion.loss_second_moment_probs(cold), 0.25, rtol=1e-7)
  t, weights = diffusion.sample_loss_second_moment(cold, jax.random.key(0), 64)
  np.testing.assert_allclose(weights, 1.0, rtol=1e-6)
  assert t.dtype == jnp.int32 and t.shape == (64,)
  # Warm: p proportional to sqrt(E[L^2]), mixed with 0.1% uniform.
  probs = diffusion.loss_second_moment_probs(state)
  assert probs.dtype == jnp.float32
  np.testing.assert_allclose(probs, reference_probs(np.asarray(state.history), state.counts),
                             rtol=1e-6)
  np.testing.assert_allclose(np.sum(probs), 1.0, rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_second_moment_probs(state, uniform_prob=0.5),
                             reference_probs(np.asarray(state.history), state.counts, 0.5),
                             rtol=1e-6)


def test_warm_up_through_updates():
  state = diffusion.init_loss_second_moment(3, 2)
  for t, loss in [(0, 1.0), (1, 1.0), (2, 3.0), (0, 1.0), (1, 1.0)]:
    state = diffusion.update_loss_second_moment(state, jnp.array([t]), jnp.array([loss]))
    np.testing.assert_allclose(diffusion.loss_second_moment_probs(state), 1 / 3, rtol=1e-6)
  state = diffusion.update_loss_second_moment(state, jnp.array([2]), jnp.array([3.0]))
  np.testing.assert_allclose(diffusion.loss_second_moment_probs(state, uniform_prob=0.0),
                             [0.2, 0.2, 0.6], rtol=1e-6)


def test_reweighting_is_unbiased_on_a_fixed_loss_table():
  """E_{t~p}[L_t / (T p_t)] = mean_t L_t, and with a lower variance than uniform t (iDDPM §3.3)."""
  table = np.geomspace(0.01, 50.0, 25)  # losses spanning ~4 orders, like L_t over t
  state = warm_state(table)
  probs = np.asarray(diffusion.loss_second_moment_probs(state), np.float64)
  np.testing.assert_allclose(np.sum(probs / (25 * probs) * table), table.mean(), rtol=1e-12)
  t, weights = diffusion.sample_loss_second_moment(state, jax.random.key(1), 200_000)
  np.testing.assert_allclose(weights, 1 / (25 * probs[np.asarray(t)]), rtol=1e-6)
  estimates = np.asarray(weights, np.float64) * table[np.asarray(t)]
  stderr = estimates.std() / np.sqrt(len(estimates))
  assert abs(estimates.mean() - table.mean()) < 5 * stderr
  # Sampled frequencies follow p.
  freq = np.bincount(np.asarray(t), minlength=25) / len(estimates)
  np.testing.assert_allclose(freq, probs, atol=5 * np.sqrt(probs.max() / len(estimates)))
  assert estimates.std() < 0.5 * (table * 1.0).std()


def test_samplers_reject_bad_arguments():
  with pytest.raises(ValueError, match='batch_size must be an int >= 1, got 0'):
    diffusion.sample_uniform(jax.random.key(0), 0, 10)
  with pytest.raises(ValueError, match='num_timesteps must be an int >= 1'):
    diffusion.init_loss_second_moment(0)
  with pytest.raises(ValueError, match='history_per_term'):
    diffusion.init_loss_second_moment(10, 0)
  state = diffusion.init_loss_second_moment(4)
  with pytest.raises(ValueError, match=r't and losses must both be \[B\] arrays'):
    diffusion.update_loss_second_moment(state, jnp.zeros(3, jnp.int32), jnp.zeros(2))
  with pytest.raises(ValueError, match='uniform_prob'):
    diffusion.loss_second_moment_probs(state, uniform_prob=1.5)
