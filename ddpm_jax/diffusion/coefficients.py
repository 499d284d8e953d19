"""The precomputed tables of the diffusion process, as one immutable pytree (DDPM eq. 4-7).

Index i of every [T] table belongs to the paper's timestep t = i + 1. All tables are computed in
float64 numpy from the betas and cast once to the requested dtype, so float32 tables carry no
accumulated round-off from the cumulative product. `respaced_coefficients` builds the tables of a
respaced process (iDDPM §4) from `respace`'s betas; `extract` and `model_output` read the tables at
a batch of timesteps.
"""

from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.diffusion import respace
from ddpm_jax.diffusion._checks import _check_betas, _check_choice, _check_t
from ddpm_jax.diffusion.schedules import one_minus_alphas_cumprod

# The network seen by the diffusion: (x_t [B, H, W, C], timestep [B]: int32, or float32 when
# rescaled, see `model_output`) -> output [B, H, W, C]
# (2C for learned variances). Parameters, dropout and mesh are bound by the caller.
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

MEAN_TYPES = ('eps', 'x0', 'xprev')
VAR_TYPES = ('fixed_small', 'fixed_large', 'learned', 'learned_range')
LOSS_TYPES = ('mse', 'rescaled_mse', 'kl', 'rescaled_kl', 'hybrid')


@flax.struct.dataclass
class DiffusionCoefficients:
  """Every per-timestep table of DDPM §2 / iDDPM §2, all of shape [T], plus the static choices.

  abar_t is the cumulative product of alpha_s = 1 - beta_s (DDPM eq. 4); `_prev` is the same table
  shifted by one step with abar_0 := 1. The posterior
  q(x_{t-1} | x_t, x_0) has mean coef1 * x_0 + coef2 * x_t and variance beta~_t (DDPM eq. 6-7);
  beta~_1 = 0, so its log is clipped to log beta~_2 (iDDPM §2; log beta_1 when T = 1, where no
  beta~_2 exists).
  """
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
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
  # None: the network sees the int32 timestep_map[t] (DDPM). A float s: it sees the float32
  # timestep_map[t] * s, improved-diffusion's rescale_timesteps with s = 1000 / T_original.
  timestep_scale: float | None = flax.struct.field(pytree_node=False, default=None)


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


def _check_timestep_scale(timestep_scale: float | None) -> float | None:
  if timestep_scale is None:
    return None
  if (isinstance(timestep_scale, bool) or not isinstance(timestep_scale, (int, float, np.number))
      or not np.isfinite(timestep_scale) or timestep_scale <= 0):
    raise ValueError(f'timestep_scale must be None or a finite number > 0, got {timestep_scale!r}.')
  return float(timestep_scale)


def _check_dtype(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f'dtype must be a floating dtype, got {dtype}.')
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(f'dtype={dtype} is not available: enable jax_enable_x64 (JAX_ENABLE_X64=1) '
                     'to build float64 coefficients.')
  return dtype


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
                      timestep_map: np.ndarray | None = None,
                      timestep_scale: float | None = None) -> DiffusionCoefficients:
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
    timestep_scale: None (the network sees the int timestep_map[t], DDPM) or s > 0: it sees the
      float32 timestep_map[t] * s. improved-diffusion's rescale_timesteps is s = 1000 / T with T the
      length of the ORIGINAL schedule (its `_WrappedModel`), so the network always sees [0, 1000).
  Returns:
    The immutable DiffusionCoefficients pytree.
  Raises:
    ValueError: on an unknown type name, betas outside (0, 1], a bad timestep_map, lambda, scale or
      dtype.
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
  timestep_scale = _check_timestep_scale(timestep_scale)
  tables = {name: jnp.asarray(value, dtype=dtype) for name, value in _tables(betas).items()}
  return DiffusionCoefficients(
      **tables, timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
      num_timesteps=int(betas.shape[0]), mean_type=mean_type, var_type=var_type,
      loss_type=loss_type, hybrid_lambda=float(hybrid_lambda), timestep_scale=timestep_scale)


def respaced_coefficients(betas: np.ndarray, use_timesteps: Sequence[int],
                          **make_coefficients_kwargs) -> DiffusionCoefficients:
  """Coefficients of the process restricted to the steps S = use_timesteps (iDDPM §4).

  beta_{S_i} = 1 - abar_{S_i} / abar_{S_{i-1}} (abar before the first step is 1), so abar of the new
  process equals the original abar at every kept step; beta~ follows from the new betas, and
  timestep_map = S so that the network still sees the original timestep (`respace.respace_betas`).

  Args:
    betas: the original float [T] schedule.
    use_timesteps: the 0-based indices to keep (e.g. from `space_timesteps`), any order.
    **make_coefficients_kwargs: mean_type, var_type, loss_type, hybrid_lambda, dtype,
      timestep_scale (relative to the original T: pass 1000 / len(betas) for improved-diffusion's
      rescale_timesteps).
  Returns:
    DiffusionCoefficients with num_timesteps = len(use_timesteps).
  """
  if 'timestep_map' in make_coefficients_kwargs:
    raise ValueError('respaced_coefficients sets timestep_map itself (to use_timesteps); do not '
                     'pass it.')
  respaced_betas, timestep_map = respace.respace_betas(betas, use_timesteps)
  return make_coefficients(respaced_betas, timestep_map=timestep_map, **make_coefficients_kwargs)


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


def model_output(coefs: DiffusionCoefficients, model_fn: ModelFn, x_t: jax.Array,
                 t: jax.Array) -> jax.Array:
  """The network's output at table indices t [B], in x_t's dtype (iDDPM §4).

  The one place the network is called, so training, sampling and the bound all condition it alike:
  on the timestep of the original process, coefs.timestep_map[t] (the index itself unless the
  tables are respaced), int32 by default; with coefs.timestep_scale = s, on the float32
  timestep_map[t] * s (improved-diffusion's rescale_timesteps: its `_WrappedModel` maps, then
  multiplies by 1000 / T_original). The cast keeps the chain or the loss in x_t's dtype whatever
  dtype the network returns (the U-Net's head is float32, like x_t: a no-op there).
  """
  t_model = coefs.timestep_map[t]
  if coefs.timestep_scale is not None:
    t_model = t_model.astype(jnp.float32) * jnp.float32(coefs.timestep_scale)
  return model_fn(x_t, t_model).astype(x_t.dtype)
