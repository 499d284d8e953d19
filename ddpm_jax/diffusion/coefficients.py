"""The precomputed tables of the diffusion process, as one immutable pytree (DDPM eq. 4-7).

Index i of every [T] table belongs to the paper's timestep t = i + 1. All tables are computed in
float64 numpy from the betas and cast once to the requested dtype, so float32 tables carry no
accumulated round-off from the cumulative product.
"""

from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax.diffusion import schedules

MEAN_TYPES = ('eps', 'x0', 'xprev')
VAR_TYPES = ('fixed_small', 'fixed_large', 'learned', 'learned_range')
LOSS_TYPES = ('mse', 'rescaled_mse', 'kl', 'rescaled_kl', 'hybrid')


@flax.struct.dataclass
class DiffusionCoefficients:
  """Every per-timestep table of DDPM §2 / iDDPM §2, all of shape [T], plus the static choices.

  abar_t is the cumulative product of alpha_s = 1 - beta_s (DDPM eq. 4); `_prev` / `_next` are the
  same table shifted by one step with abar_0 := 1 and abar_{T+1} := 0. The posterior
  q(x_{t-1} | x_t, x_0) has mean coef1 * x_0 + coef2 * x_t and variance beta~_t (DDPM eq. 6-7);
  beta~_1 = 0, so its log is clipped to log beta~_2 (iDDPM §2; log beta_1 when T = 1, where no
  beta~_2 exists).
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  alphas_cumprod_next: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array
  timestep_map: jax.Array  # int32 [T]: the timestep the network sees for each index.
  num_timesteps: int = flax.struct.field(pytree_node=False, default=0)
  mean_type: str = flax.struct.field(pytree_node=False, default='eps')
  var_type: str = flax.struct.field(pytree_node=False, default='fixed_large')
  loss_type: str = flax.struct.field(pytree_node=False, default='mse')
  hybrid_lambda: float = flax.struct.field(pytree_node=False, default=0.001)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not one of {tuple(allowed)}.')


def _check_betas(betas: np.ndarray) -> np.ndarray:
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f'betas must be a 1-D array of length T >= 1, got shape {betas.shape}.')
  if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
    raise ValueError(f'betas must lie in (0, 1] (DDPM §2); got min {betas.min()!r}, '
                     f'max {betas.max()!r}.')
  return betas


def _check_timestep_map(timestep_map: np.ndarray | None, num_timesteps: int) -> np.ndarray:
  if timestep_map is None:
    return np.arange(num_timesteps, dtype=np.int32)
  timestep_map = np.asarray(timestep_map)
  if timestep_map.shape != (num_timesteps,) or not np.issubdtype(timestep_map.dtype, np.integer):
    raise ValueError(f'timestep_map must be an integer array of shape ({num_timesteps},) like '
                     f'betas, got {timestep_map.dtype} {timestep_map.shape}.')
  if np.any(timestep_map < 0):
    raise ValueError(f'timestep_map must be >= 0, got min {timestep_map.min()}.')
  return timestep_map.astype(np.int32)


def _check_dtype(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f'dtype must be a floating dtype, got {dtype}.')
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(f'dtype={dtype} is not available: enable jax_enable_x64 (JAX_ENABLE_X64=1) '
                     'to build float64 coefficients.')
  return dtype


def one_minus_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """1 - abar_t = 1 - prod_{s<=t} (1 - beta_s) for t = 1..T, float64 [T], without cancellation.

  Subtracting abar ~ 1 - 1e-5 from 1 would keep only ~11 of float64's 16 digits at the first
  steps; accumulating g <- g + beta (1 - g) instead keeps every term positive and full precision
  (DDPM eq. 4).
  """
  out = np.empty(len(betas), dtype=np.float64)
  g = 0.0
  for i, beta in enumerate(np.asarray(betas, dtype=np.float64)):
    g = g + beta * (1.0 - g)
    out[i] = g
  return out


def _tables(betas: np.ndarray) -> dict[str, np.ndarray]:
  """The float64 tables of DDPM eq. 4-7 (names as the DiffusionCoefficients fields)."""
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  one_minus_abar = one_minus_alphas_cumprod(betas)
  one_minus_abar_prev = np.append(0.0, one_minus_abar[:-1])
  posterior_variance = betas * one_minus_abar_prev / one_minus_abar
  # beta~_1 = 0 would give log 0; iDDPM clips to beta~_2 (beta_1 if there is no second step).
  first = posterior_variance[1] if betas.shape[0] > 1 else betas[0]
  # 'jsd' ends at abar_T = 0: the reciprocals there are legitimately infinite.
  with np.errstate(divide='ignore'):
    recip_abar = 1.0 / abar
    recipm1_abar = one_minus_abar / abar
    # log(1 - abar) -> 0 as abar -> 0 (abar_T ~ 1e-10 for cosine): there log1p(-abar) is exact.
    log_one_minus_abar = np.where(abar < 0.5, np.log1p(-abar), np.log(one_minus_abar))
  return {
      'betas': betas,
      'alphas_cumprod': abar,
      'alphas_cumprod_prev': abar_prev,
      'alphas_cumprod_next': np.append(abar[1:], 0.0),
      'sqrt_alphas_cumprod': np.sqrt(abar),
      'sqrt_one_minus_alphas_cumprod': np.sqrt(one_minus_abar),
      'log_one_minus_alphas_cumprod': log_one_minus_abar,
      'sqrt_recip_alphas_cumprod': np.sqrt(recip_abar),
      'sqrt_recipm1_alphas_cumprod': np.sqrt(recipm1_abar),
      'posterior_variance': posterior_variance,
      'posterior_log_variance_clipped': np.log(np.append(first, posterior_variance[1:])),
      'posterior_mean_coef1': betas * np.sqrt(abar_prev) / one_minus_abar,
      'posterior_mean_coef2': one_minus_abar_prev * np.sqrt(alphas) / one_minus_abar,
  }


def make_coefficients(betas: np.ndarray, *, mean_type: str = 'eps', var_type: str = 'fixed_large',
                      loss_type: str = 'mse', hybrid_lambda: float = 0.001, dtype=jnp.float32,
                      timestep_map: np.ndarray | None = None) -> DiffusionCoefficients:
  """Precomputes the tables of DDPM eq. 4-7 (and iDDPM §2) for a beta schedule.

  Args:
    betas: float array [T] of forward-process variances in (0, 1] (see `get_beta_schedule`).
    mean_type: what the network predicts (DDPM §3.2): 'eps' (noise), 'x0' or 'xprev' (mu~ directly).
    var_type: the reverse-process variance (DDPM §3.2, iDDPM §3.1): 'fixed_small' (beta~_t),
      'fixed_large' (beta_t), 'learned' (raw log variance) or 'learned_range' (iDDPM eq. 15).
    loss_type: the training objective (DDPM §3.4, iDDPM §3.1), one of LOSS_TYPES.
    hybrid_lambda: lambda of L_hybrid = L_simple + lambda L_vlb (iDDPM §3.1, 0.001), >= 0.
    dtype: floating dtype of the tables (float64 needs jax_enable_x64); the math is float64
      throughout.
    timestep_map: int array [T], the timestep the network is conditioned on at each index
      (respacing, iDDPM §4); defaults to arange(T).
  Returns:
    The immutable DiffusionCoefficients pytree.
  Raises:
    ValueError: on an unknown type name, betas outside (0, 1], a bad timestep_map, lambda or dtype.
  """
  _check_choice('mean_type', mean_type, MEAN_TYPES)
  _check_choice('var_type', var_type, VAR_TYPES)
  _check_choice('loss_type', loss_type, LOSS_TYPES)
  if (isinstance(hybrid_lambda, bool) or not isinstance(hybrid_lambda, (int, float, np.number))
      or not np.isfinite(hybrid_lambda) or hybrid_lambda < 0):
    raise ValueError(f'hybrid_lambda must be a finite number >= 0, got {hybrid_lambda!r}.')
  betas = _check_betas(betas)
  dtype = _check_dtype(dtype)
  timestep_map = _check_timestep_map(timestep_map, betas.shape[0])
  tables = {name: jnp.asarray(value, dtype=dtype) for name, value in _tables(betas).items()}
  return DiffusionCoefficients(
      **tables, timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
      num_timesteps=int(betas.shape[0]), mean_type=mean_type, var_type=var_type,
      loss_type=loss_type, hybrid_lambda=float(hybrid_lambda))


def coefficients_from_config(diffusion_config: ml_collections.ConfigDict, *, respacing: str = '',
                             dtype=jnp.float32) -> DiffusionCoefficients:
  """DiffusionCoefficients for `config.diffusion` (DDPM §2, §4; iDDPM §3, §4 when respaced).

  Args:
    diffusion_config: the `diffusion` sub-config (num_timesteps, beta_schedule, beta_start,
      beta_end, mean_type, var_type, loss_type, hybrid_lambda).
    respacing: '' for all T steps, else a `space_timesteps` spec ('250', '10,10,10', 'ddim50'), e.g.
      `config.sampling.timestep_respacing`.
    dtype: floating dtype of the tables.
  Raises:
    ValueError: naming the `diffusion.` field (or `respacing`) that is invalid.
  """
  # Imported here: respace builds on this module.
  from ddpm_jax.diffusion import respace  # pylint: disable=g-import-not-at-top
  c = diffusion_config
  try:
    betas = schedules.get_beta_schedule(c.beta_schedule, num_timesteps=c.num_timesteps,
                                        beta_start=c.beta_start, beta_end=c.beta_end)
    kwargs = dict(mean_type=c.mean_type, var_type=c.var_type, loss_type=c.loss_type,
                  hybrid_lambda=c.hybrid_lambda, dtype=dtype)
    if not respacing:
      return make_coefficients(betas, **kwargs)
  except ValueError as e:
    raise ValueError(f'Invalid config.diffusion: {e}') from e
  try:
    use_timesteps = respace.space_timesteps(c.num_timesteps, respacing)
  except ValueError as e:
    raise ValueError(f'Invalid respacing={respacing!r}: {e}') from e
  return respace.respaced_coefficients(betas, use_timesteps, **kwargs)


def _check_t(t: jax.Array, num_timesteps: int, batch: int | None) -> None:
  """Shape/dtype checks always; range checks when t is concrete (outside jit)."""
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


def extract(a: jax.Array, t: jax.Array, shape: Sequence[int]) -> jax.Array:
  """a[t] reshaped to [B, 1, ..., 1] so that it broadcasts against a tensor of `shape` (DDPM §2).

  Args:
    a: table [T] (a DiffusionCoefficients leaf).
    t: int array [B] of 0-based timestep indices (index 0 is the paper's t = 1).
    shape: shape of the tensor the result will multiply, [B, ...] (e.g. [B, H, W, C]).
  Returns:
    array [B, 1, ..., 1] with len(shape) dims and a's dtype.
  Raises:
    ValueError: if t is not an integer [B] array with B = shape[0], or (outside jit) out of range.
  """
  if jnp.ndim(a) != 1:
    raise ValueError(f'a must be a [T] table, got shape {list(jnp.shape(a))}.')
  if len(shape) < 1:
    raise ValueError(f'shape must start with the batch dimension, got {tuple(shape)}.')
  _check_t(t, jnp.shape(a)[0], shape[0])
  return jnp.reshape(jnp.asarray(a)[t], (shape[0],) + (1,) * (len(shape) - 1))
