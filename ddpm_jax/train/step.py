"""The pure training step: model -> diffusion loss -> gradients -> `TrainState.apply_gradients` (DDPM Alg. 1, §4).

`make_train_step` closes over the static parts (model, coefficients) and returns
`train_step(state, batch, base_key) -> (state, metrics)`; the caller compiles it with `jax.jit` over the
mesh. Its randomness is `fold_in(base_key, state.step)`, so a run is a pure function of (config, seed).
"""

from __future__ import annotations

import functools
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


def has_dropout(model: Any) -> bool:
  """Whether the network draws dropout masks in training (then its gradient is left to XLA's sum)."""
  return float(getattr(model, 'dropout', 0.0)) > 0.0


def make_train_step(model: Any, coefs: diffusion.DiffusionCoefficients,
                    sum_gradients: Callable[..., Any] | None = None
                    ) -> Callable[..., tuple[TrainState, Metrics]]:
  """Returns the pure `train_step(state, batch, base_key) -> (state, metrics)`.

  batch: images [B, H, W, C] in [-1, 1], or (images, labels int [B]) for a class-conditional model
  (`model.num_classes > 0`; the labels are bound to the network call, the diffusion never sees them).
  sum_gradients: None (XLA sums the gradient over devices, weight by weight), or
  `parallel.sum_over_devices` bound to a mesh, which gets the gradient of each device's examples and
  sums it as one buffer (`jit_train_step` picks by `runtime.gradient_all_reduce`); only for a network
  without dropout, whose masks are drawn over the global batch. t and eps are drawn over the global batch
  first either way, so both give the same run up to float reduction order.
  """
  num_timesteps = coefs.num_timesteps
  dropout = has_dropout(model)
  if sum_gradients is not None and dropout:
    raise ValueError(f'a per-device gradient sum needs a network without dropout, got dropout={model.dropout}')

  def train_step(state: TrainState, batch: Any, base_key: jax.Array) -> tuple[TrainState, Metrics]:
    images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
    global_batch = images.shape[0]
    t_key, noise_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step), 3)
    t, weights = _sample_timesteps(state, t_key, global_batch, num_timesteps)
    examples = (images, t, weights, diffusion.draw_noise(coefs, noise_key, images),
                () if labels is None else (labels,))

    def gradients(params: Any, examples: Any) -> tuple[Any, dict[str, jax.Array]]:
      images, t, weights, noise, conditioning = examples

      def loss_fn(params):
        def model_fn(x_t, t_model):
          return model.apply({'params': params}, x_t, t_model, *conditioning, train=True,
                             rngs={'dropout': dropout_key} if dropout else None)
        terms = diffusion.training_losses(coefs, model_fn, images, t, None, noise=noise)
        share = images.shape[0] / global_batch  # of the global batch mean: 1 unless split over devices
        return jnp.mean(terms['loss'] * weights) * share, terms

      return jax.grad(loss_fn, has_aux=True)(params)

    if sum_gradients is not None:
      gradients = sum_gradients(gradients)
    grads, terms = gradients(state.params, examples)
    loss = jnp.mean(terms['loss'] * weights)

    def update(operand: tuple[TrainState, jax.Array]) -> tuple[TrainState, jax.Array]:
      state, _ = operand
      grad_norm = optax.tree.norm(grads)  # summed once, for the clip and the metric both
      new_state = state.apply_gradients(grads, grad_norm=grad_norm)
      if state.sampler_state is not None:
        new_state = new_state.replace(sampler_state=timesteps.update_loss_second_moment(
            state.sampler_state, t, terms['loss']))
      return new_state, grad_norm

    # A non-finite loss freezes the state (only `step` advances) and records the first bad step, so
    # that the loop can stop with an error at its next sync point without a NaN ever reaching a checkpoint.
    # `lax.cond` rather than a `where` over old and new states: the update then runs in place in the
    # donated buffers. The `where` kept the old state alive beside the new one: XLA copied the state's
    # arrays (984 copies in the CIFAR10 step) and selected over all of them, 2-4% of a CPU step
    # (BENCHMARKS.md); the results are bit-identical. The frozen branch must only pass its operands
    # through: XLA turns a `cond` whose branches are both cheap and neither empty into that very select
    # (ConditionalSimplifier; 17% slower on a GPU). So its NaN norm comes in as an operand, and not as a
    # constant, which JAX would move into the branch. The norm is summed inside the update, not before
    # the `cond`: there it would round otherwise than optax's clip always did (runs would move in their
    # last bits).
    ok = jnp.isfinite(loss) & (state.nonfinite_step < 0)
    frozen_norm = jnp.where(ok, 0.0, jnp.nan).astype(jnp.float32)
    new_state, grad_norm = jax.lax.cond(ok, update, lambda operand: operand, (state, frozen_norm))
    new_state = new_state.replace(
        step=state.step + 1,
        nonfinite_step=jnp.where(ok | (state.nonfinite_step >= 0), state.nonfinite_step, state.step))

    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'learning_rate': state.learning_rate(state.step)}
    metrics.update({name: jnp.mean(value) for name, value in terms.items() if name != 'loss'})
    metrics.update(loss_by_quarter(terms['loss'], t, num_timesteps))
    return new_state, metrics

  return train_step


def jit_train_step(model: Any, coefs: diffusion.DiffusionCoefficients, mesh: jax.sharding.Mesh,
                   gradient_all_reduce: str = 'auto', cpu_convolutions: str = 'ynnpack') -> Any:
  """`make_train_step` jitted for `mesh`: state and key replicated, batch split on `data`, state donated.

  gradient_all_reduce: `runtime.gradient_all_reduce` (`parallel.GRADIENT_ALL_REDUCES`): whether the
  gradient is summed over the devices as one flat buffer (`parallel.sum_over_devices`) or left to XLA;
  'auto' leaves it to XLA for a network with dropout (`make_train_step`).
  cpu_convolutions: whose convolution kernels XLA:CPU compiles the step with, 'xla' or 'ynnpack'
  (`runtime.train_convolutions`; `parallel.cpu_compiler_options`); ignored off the CPU.
  The one place the step is jitted: the training loop and the benchmarks both use it, so the benchmarks
  time and inspect exactly what training runs.
  """
  sum_gradients = None
  if parallel.flat_all_reduce(gradient_all_reduce, mesh) and not (
      gradient_all_reduce == 'auto' and has_dropout(model)):
    sum_gradients = functools.partial(parallel.sum_over_devices, mesh=mesh)
  repl, batch_sharding = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(make_train_step(model, coefs, sum_gradients), in_shardings=(repl, batch_sharding, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,),
                 compiler_options=parallel.cpu_compiler_options(mesh, convolutions=cpu_convolutions))
