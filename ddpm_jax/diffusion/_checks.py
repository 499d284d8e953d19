"""Argument checks shared by the diffusion modules (private: each public function names its own
arguments in the message, so a caller always learns which argument and which values are allowed).

Checks run at trace time on shapes and dtypes; value checks only where the values are concrete, so
that every function stays usable under `jit`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
  """`value` is one of the names an enumeration (MEAN_TYPES, BETA_SCHEDULES, ...) allows."""
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not one of {tuple(allowed)}.')


def _check_positive_int(name: str, value: int) -> None:
  """A count (T, a batch size, a history length): a Python or numpy int >= 1, never a bool."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be an int >= 1, got {value!r} ({type(value).__name__}).')


def _check_betas(betas: np.ndarray) -> np.ndarray:
  """betas as float64 [T], T >= 1, every beta in (0, 1] (DDPM §2)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f'betas must be a 1-D array of length T >= 1, got shape {betas.shape}.')
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError(f'betas must lie in (0, 1] (DDPM §2); got min {betas.min()!r}, '
                     f'max {betas.max()!r}.')
  return betas


def _check_same_shape(**arrays: jax.Array) -> None:
  """All keyword arrays have one shape; the message names them (e.g. 'x_start and noise')."""
  shapes = {name: tuple(jnp.shape(x)) for name, x in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f'{" and ".join(shapes)} must have the same shape, got '
                     + ', '.join(f'{name} {list(s)}' for name, s in shapes.items()) + '.')


def _check_t(t: jax.Array, num_timesteps: int, batch: int | None) -> None:
  """t is an int [B] array of table indices; its range is checked when t is concrete (outside jit)."""
  t_shape, t_dtype = jnp.shape(t), jnp.result_type(t)
  if len(t_shape) != 1 or (batch is not None and t_shape[0] != batch):
    want = f'[{batch}]' if batch is not None else '[B]'
    raise ValueError(f't must be an int array of shape {want} (one index per example), got shape '
                     f'{list(t_shape)}.')
  if not jnp.issubdtype(t_dtype, jnp.integer):
    raise ValueError(f't must hold integer timestep indices, got dtype {t_dtype}.')
  try:
    t_np = np.asarray(t)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # Traced: jnp indexing would clamp silently, nothing more can be checked here.
  if t_np.size and (t_np.min() < 0 or t_np.max() >= num_timesteps):
    raise ValueError(f't must lie in [0, {num_timesteps - 1}] (0-based index of the paper\'s '
                     f't = 1..{num_timesteps}), got values in [{t_np.min()}, {t_np.max()}].')
