"""Training: the state that owns its update, and the pure step (the loop is `ddpm_jax.jobs.train`)."""

from ddpm_jax.train.state import LR_SCHEDULES, OPTIMIZERS, TrainState, create_train_state, jit_create_train_state
from ddpm_jax.train.step import jit_train_step, make_train_step

__all__ = ['LR_SCHEDULES', 'OPTIMIZERS', 'TrainState', 'create_train_state', 'jit_create_train_state',
           'jit_train_step', 'make_train_step']
