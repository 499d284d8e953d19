"""The training state: a pytree that orbax saves whole and that owns its update (DDPM §4, Appendix B).

`TrainState.apply_gradients` is the one place where the optimizer and the EMA are applied; the
optimizer, its learning-rate schedule and the EMA decay are static fields, built once per run by
`create_train_state`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import models, parallel
from ddpm_jax.diffusion import timesteps

OPTIMIZERS = ('adam', 'adamw')
# optim.lr_schedule: what follows the warm-up ('constant': DDPM's and iDDPM's; 'cosine': half a cosine
# down to 0 at training.num_train_steps).
LR_SCHEDULES = ('constant', 'cosine')


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
  """EMA of the weights; the first update copies the weights (decay 0), as the original code does."""
  decay = jnp.where(step == 0, 0.0, decay)
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-exactly: the data stream position is `step` itself.

  step: int32 [], number of optimizer updates done. params / ema_params: the U-Net weights and their
  exponential moving average (DDPM §4: samples and metrics use the EMA). opt_state: optax state.
  sampler_state: the iDDPM §3.3 loss history (None without importance sampling). nonfinite_step:
  int32 [], -1 while every loss was finite, else the first step whose loss was not; updates are frozen
  from then on. tx, learning_rate, ema_decay: static (not saved): the optimizer, its schedule and the
  EMA decay.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  sampler_state: timesteps.LossSecondMomentState | None
  nonfinite_step: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  learning_rate: optax.Schedule = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: Any, *, grad_norm: jax.Array | None = None) -> TrainState:
    """One optimizer update of `params` and the EMA update that follows it; `step` advances by one.

    grad_norm: `optax.tree.norm(grads)` when the caller has it already (the step does, for its metric):
    the clip (`clip_by_global_norm`) then reuses it instead of summing every weight's squares again.
    """
    extra_args = {} if grad_norm is None else {'grad_norm': grad_norm}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params,
                        ema_params=ema_update(self.ema_params, params, self.ema_decay, self.step),
                        opt_state=opt_state)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of each step: a linear warm-up from 0 over optim.warmup_steps (DDPM Appendix B),
  then optim.lr_schedule's.

  'constant' (DDPM, iDDPM): optim.learning_rate from then on. 'cosine': half a cosine from
  optim.learning_rate at the end of the warm-up down to 0 at training.num_train_steps (SGDR, Loshchilov
  & Hutter 2017, without restarts), lr * (1 + cos(pi * (s - w) / (N - w))) / 2: for short runs, where
  the last steps at a low rate leave the weights (and their EMA) closer to a minimum.
  """
  o = config.optim
  if o.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps,
                                              config.training.num_train_steps)
  if o.warmup_steps == 0:
    return optax.constant_schedule(o.learning_rate)
  return optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm(max_norm)`, the same formula and (empty) state, that takes the norm as
  the extra argument `grad_norm` when the caller has computed it.

  Why: the step needs the norm for its `grad_norm` metric too. With optax's clip it summed every
  weight's squares twice, once for the metric and once inside the clip, in the `lax.cond` that guards
  the update, where XLA cannot share them: ~400 more reductions in the CIFAR10 step (BENCHMARKS.md).
  """
  def update_fn(updates, state, params=None, *, grad_norm=None, **unused_extra_args):
    del params
    g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
    trigger = jnp.squeeze(g_norm < max_norm)
    updates = jax.tree.map(
        lambda u: jax.lax.select(trigger, u, (u / g_norm.astype(u.dtype)) * max_norm), updates)
    return updates, state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (or AdamW) with `schedule`, after clipping the gradient's global norm."""
  o = config.optim
  if o.optimizer == 'adam':
    opt = optax.adam(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps)
  else:
    opt = optax.adamw(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
  return optax.chain(clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array) -> TrainState:
  """A fresh state; the EMA starts as a copy of the initial weights."""
  params = models.init_params(models.create_model(config), key, config.data.image_size,
                              config.data.num_channels)
  schedule = learning_rate_schedule(config)
  tx = create_optimizer(config, schedule)
  sampler_state = None
  if config.training.importance_sampling:
    sampler_state = timesteps.init_loss_second_moment(config.diffusion.num_timesteps)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    sampler_state=sampler_state, nonfinite_step=jnp.full((), -1, jnp.int32),
                    tx=tx, learning_rate=schedule, ema_decay=config.training.ema_decay)


def jit_create_train_state(config: ml_collections.ConfigDict,
                           mesh: jax.sharding.Mesh) -> Callable[[jax.Array], TrainState]:
  """`create_train_state(config, key)` jitted for `mesh` (the state replicated), as a run-once program.

  The one place the initial state is compiled: the training loop and the benchmarks both use it. Its
  compiler options (`parallel.run_once_compiler_options`) shorten a job's start on a CPU without changing
  a bit of the state.
  """
  return jax.jit(functools.partial(create_train_state, config),
                 out_shardings=parallel.replicated_sharding(mesh),
                 compiler_options=parallel.run_once_compiler_options(mesh) or None)
