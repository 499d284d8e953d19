"""Training: the state, the pure step, and the loop."""

from ddpm_jax.train.state import TrainState, create_optimizer, create_train_state
from ddpm_jax.train.step import jit_train_step, make_train_step
