"""The pure training step: model -> diffusion loss -> gradients -> `TrainState.apply_gradients` (DDPM Alg. 1, §4).

`make_train_step` closes over the static parts (model, coefficients) and returns
`train_step(state, batch, base_key) -> (state, metrics)`; the caller compiles it with `jax.jit` over the
mesh. Its randomness is `fold_in(base_key, state.step)`, so a run is a pure function of (config, seed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ddpm_jax import diffusion, parallel
from ddpm_jax.diffusion import timesteps
from ddpm_jax.train.state import TrainState

Metrics = dict[str, jax.Array]
NUM_QUARTERS = 4


def loss_by_quarter(loss: jax.Array, t: jax.Array, num_timesteps: int) -> Metrics:
  """Mean loss of the examples whose t/T lies in [0, .25), [.25, .5), ... (NaN-free: empty quarters give 0)."""
  quarter = (t * NUM_QUARTERS) // num_timesteps
  out = {}
  for q in range(NUM_QUARTERS):
    mask = (quarter == q).astype(loss.dtype)
    out[f'loss_q{q}'] = jnp.sum(loss * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return out


def _sample_timesteps(state: TrainState, key: jax.Array, batch_size: int, num_timesteps: int):
  if state.sampler_state is None:
    return timesteps.sample_uniform(key, batch_size, num_timesteps)
  return timesteps.sample_loss_second_moment(state.sampler_state, key, batch_size)


def make_train_step(model: Any,
                    coefs: diffusion.DiffusionCoefficients) -> Callable[..., tuple[TrainState, Metrics]]:
  """Returns the pure `train_step(state, batch, base_key) -> (state, metrics)`.

  batch: images [B, H, W, C] in [-1, 1], or (images, labels int [B]) for a class-conditional model
  (`model.num_classes > 0`; the labels are bound to the network call, the diffusion never sees them).
  """
  num_timesteps = coefs.num_timesteps

  def train_step(state: TrainState, batch: Any, base_key: jax.Array) -> tuple[TrainState, Metrics]:
    images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
    conditioning = () if labels is None else (labels,)
    t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step), 3)
    t, weights = _sample_timesteps(state, t_key, images.shape[0], num_timesteps)

    def loss_fn(params):
      def model_fn(x_t, t_model):
        return model.apply({'params': params}, x_t, t_model, *conditioning, train=True,
                           rngs={'dropout': dropout_key})
      terms = diffusion.training_losses(coefs, model_fn, images, t, noise_key)
      return jnp.mean(terms['loss'] * weights), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

    def update(state: TrainState) -> TrainState:
      new_state = state.apply_gradients(grads)
      if state.sampler_state is not None:
        new_state = new_state.replace(sampler_state=timesteps.update_loss_second_moment(
            state.sampler_state, t, terms['loss']))
      return new_state

    # A non-finite loss freezes the state (only `step` advances) and records the first bad step, so
    # that the loop can stop with an error at its next sync point without a NaN ever reaching a checkpoint.
    # `lax.cond` rather than a `where` over old and new states: the update then runs in place in the
    # donated buffers. The `where` kept the old state alive beside the new one: XLA copied the state's
    # arrays (984 copies in the CIFAR10 step) and selected over all of them, 2-4% of a CPU step
    # (BENCHMARKS.md); the results are bit-identical.
    ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)
    new_state = jax.lax.cond(ok, update, lambda state: state, state)
    new_state = new_state.replace(
        step=state.step + 1,
        nonfinite_step=jnp.where(ok | (state.nonfinite_step >= 0), state.nonfinite_step, state.step))

    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
               'learning_rate': state.learning_rate(state.step)}
    metrics.update({name: jnp.mean(value) for name, value in terms.items() if name != 'loss'})
    metrics.update(loss_by_quarter(terms['loss'], t, num_timesteps))
    return new_state, metrics

  return train_step


def jit_train_step(model: Any, coefs: diffusion.DiffusionCoefficients, mesh: jax.sharding.Mesh) -> Any:
  """`make_train_step` jitted for `mesh`: state and key replicated, batch split on `data`, state donated.

  The one place the step is jitted: the training loop and the benchmarks both use it, so the benchmarks
  time and inspect exactly what training runs.
  """
  repl, batch_sharding = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(make_train_step(model, coefs), in_shardings=(repl, batch_sharding, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))
