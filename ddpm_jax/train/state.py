"""The training state (a pytree that orbax saves whole) and its construction."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax import models
from ddpm_jax.diffusion import timesteps


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-exactly: the data stream position is `step` itself.

  step: int32 [], number of optimizer updates done. params / ema_params: the U-Net weights and their
  exponential moving average (DDPM §4: samples and metrics use the EMA). opt_state: optax state.
  sampler_state: the iDDPM §3.3 loss history (None without importance sampling). nonfinite_step:
  int32 [], -1 while every loss was finite, else the first step whose loss was not; updates are frozen from then on.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  sampler_state: timesteps.LossSecondMomentState | None
  nonfinite_step: jax.Array


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """DDPM: linear warm-up from 0 over `warmup_steps`, then constant."""
  lr, warmup = config.optim.learning_rate, config.optim.warmup_steps
  if warmup == 0:
    return optax.constant_schedule(lr)
  return optax.linear_schedule(0.0, lr, warmup)


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (or AdamW) with the warm-up schedule, after clipping the gradient's global norm."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  if o.optimizer == 'adam':
    opt = optax.adam(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps)
  else:
    opt = optax.adamw(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array) -> TrainState:
  """A fresh state; the EMA starts as a copy of the initial weights."""
  params = models.init_params(models.create_model(config), key, config.data.image_size,
                               config.data.num_channels)
  tx = create_optimizer(config)
  sampler_state = None
  if config.training.importance_sampling:
    sampler_state = timesteps.init_loss_second_moment(config.diffusion.num_timesteps)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    sampler_state=sampler_state, nonfinite_step=jnp.full((), -1, jnp.int32))
