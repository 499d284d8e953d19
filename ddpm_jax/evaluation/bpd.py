"""The negative log-likelihood bound in bits per dimension (DDPM §2 eq. 5, Table 2; iDDPM §3).

L = L_T + sum_{t>=1} L_t + L_0 evaluated over every timestep (no sampling of t): the prior KL L_T,
the T - 1 Gaussian KL terms and the discretized decoder NLL L_0. `calc_bpd_loop` does it for one
batch in one compiled loop over t; `dataset_bpd` runs it over a data set in sharded global
batches.

A class-conditional model (iDDPM's class_cond) is evaluated as improved-diffusion's image_nll.py
does: the bound on -log p(x | y) with y the image's own label, bound to the network call through
`make_model_fn(..., labels)`, so the diffusion terms stay label-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ddpm_jax import data, diffusion, parallel
from ddpm_jax.diffusion import ModelFn, model_output
from ddpm_jax.sampling import make_model_fn
from ddpm_jax.streams import per_sample_keys, per_sample_normal

# Per-example outputs of calc_bpd_loop: [B] scalars and [B, T] per-timestep terms.
SCALAR_TERMS = ('total_bpd', 'prior_bpd')
PER_T_TERMS = ('vb', 'xstart_mse', 'mse')


def _step_noise(key: jax.Array, t: jax.Array, x_start: jax.Array) -> jax.Array:
  """eps for timestep t from fold_in(key, t); per example from fold_in(key[i], t) if key is [B]."""
  if key.shape == ():
    return jax.random.normal(jax.random.fold_in(key, t), x_start.shape, x_start.dtype)
  return per_sample_normal(key, t, x_start.shape[1:], x_start.dtype)


def _check_key(key: jax.Array, batch: int) -> None:
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape not in ((), (batch,)):
    raise ValueError('calc_bpd_loop: key must be a typed key (jax.random.key) of shape [] or '
                     f'[B] = [{batch}], got dtype {key.dtype}, shape {key.shape}')


def calc_bpd_loop(coefs: diffusion.DiffusionCoefficients, model_fn: ModelFn, x_start: jax.Array,
                  key: jax.Array, *, clip_denoised: bool = False) -> dict[str, jax.Array]:
  """Every term of the variational bound for a batch, one `lax.map` over the T timesteps (iDDPM).

  Each term uses its own x_t ~ q(x_t | x_0) (an unbiased estimate of each KL), as the reference
  code does.

  Args:
    coefs: diffusion tables (all T steps; not respaced).
    model_fn: (x_t [B, H, W, C], timestep int32 [B]) -> network output (C or 2C channels).
    x_start: x_0 [B, H, W, C] on the 256-level grid of [-1, 1] (uint8 / 127.5 - 1).
    key: typed key []; or [B], one per example, which makes each example's estimate independent of
      the batch it is in. The noise at t comes from fold_in(key, t).
    clip_denoised: clip x0_hat to [-1, 1] inside p_theta.
  Returns:
    dict of
      total_bpd [B]: prior_bpd + sum_t vb[:, t], the NLL bound in bits/dim;
      prior_bpd [B]: L_T = KL(q(x_T | x_0) || N(0, I));
      vb [B, T]: column t is the term at table index t: the decoder NLL L_0 at t = 0, else the
        KL L_t between q(x_t | x_{t+1}, x_0) and p_theta(x_t | x_{t+1}) (paper indexing);
      xstart_mse [B, T]: mean squared error of x0_hat(x_{t+1}) on the [-1, 1] scale;
      mse [B, T]: mean squared error of the implied eps.
  """
  _check_key(key, x_start.shape[0])
  batch = x_start.shape[0]

  def terms_at(t_index):
    t = jnp.full((batch,), t_index, jnp.int32)
    noise = _step_noise(key, t_index, x_start)
    x_t = diffusion.q_sample(coefs, x_start, t, noise)
    out = diffusion.vb_terms_bpd(coefs, model_output(coefs, model_fn, x_t, t), x_start, x_t, t,
                                 clip_denoised=clip_denoised)
    eps = diffusion.predict_eps_from_xstart(coefs, x_t, t, out['pred_xstart'])
    return (out['output'], diffusion.mean_flat((out['pred_xstart'] - x_start)**2),
            diffusion.mean_flat((eps - noise)**2))

  per_t = jax.lax.map(terms_at, jnp.arange(coefs.num_timesteps, dtype=jnp.int32))
  vb, xstart_mse, mse = (term.T for term in per_t)  # [T, B] -> [B, T]
  prior = diffusion.prior_bpd(coefs, x_start)
  return {'total_bpd': jnp.sum(vb, axis=1) + prior, 'prior_bpd': prior, 'vb': vb,
          'xstart_mse': xstart_mse, 'mse': mse}


BpdFn = Callable[..., dict[str, jax.Array]]


def make_bpd_fn(coefs: diffusion.DiffusionCoefficients, model: Any, mesh: Mesh, *,
                clip_denoised: bool) -> BpdFn:
  """Compiles `bpd_fn(params, base_key, images, indices[, labels])` for global batches sharded over
  `data`.

  images: float32 [B, H, W, C] in [-1, 1]; indices: int32 [B] example indices; example i's noise is
  drawn from fold_in(base_key, indices[i]), so the result does not depend on the batching.
  labels: int32 [B], the class of each image, for a class-conditional model (required by it,
  refused by an unconditional one, as the network does); the bound is then that of p(x | y).
  """
  def bpd(params, base_key, images, indices, labels=None):
    keys = per_sample_keys(base_key, indices)
    return calc_bpd_loop(coefs, make_model_fn(model, params, labels), images, keys,
                         clip_denoised=clip_denoised)

  replicated, sharded = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  plain = jax.jit(bpd, in_shardings=(replicated, replicated, sharded, sharded),
                  out_shardings=sharded)
  # Traced and compiled only when first called with labels.
  conditional = jax.jit(bpd, in_shardings=(replicated, replicated, sharded, sharded, sharded),
                        out_shardings=sharded)

  def bpd_fn(params: Any, base_key: jax.Array, images: jax.Array, indices: jax.Array,
             labels: jax.Array | None = None) -> dict[str, jax.Array]:
    if labels is None:
      return plain(params, base_key, images, indices)
    return conditional(params, base_key, images, indices, labels)

  return bpd_fn


def _padded_rows(num: int, start: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Examples [start, start + batch_size) of `num`: (int32 indices, the rows to read), the tail past
  the data set reading example 0 (valid pixels and label, masked out later)."""
  indices = np.arange(start, start + batch_size, dtype=np.int32)
  return indices, np.where(indices < num, indices, 0)


def dataset_bpd(bpd_fn: BpdFn, params: Any, base_key: jax.Array, images: np.ndarray,
                batch_size: int, mesh: Mesh, *, labels: np.ndarray | None = None) -> dict[str, Any]:
  """Means over a data set of every `calc_bpd_loop` output, each example counted exactly once.

  Args:
    bpd_fn: from `make_bpd_fn`.
    params: network parameters, replicated on `mesh`.
    base_key: typed key; example i uses fold_in(base_key, i).
    images: uint8 [N, H, W, C], identical on every process.
    batch_size: global batch (divisible by the device and process counts); the last batch is padded
      and the padding masked out.
    mesh: the device mesh.
    labels: int [N], the class of each image (class-conditional models only; `load_eval_labels`),
      identical on every process; None for an unconditional model.
  Returns:
    dict: 'num_examples', 'total_bpd', 'prior_bpd' (floats) and 'vb', 'xstart_mse', 'mse' (float64
    arrays [T]), all means over the N examples.
  """
  num = len(images)
  if num < 1:
    raise ValueError('dataset_bpd: the data set is empty')
  if labels is not None and np.shape(labels) != (num,):
    raise ValueError(f'dataset_bpd: expected one label per image, shape ({num},); got '
                     f'{np.shape(labels)}')
  if labels is not None:
    labels = np.asarray(labels, np.int32)
  sums: dict[str, Any] = {}
  for start in range(0, num, batch_size):
    indices, rows = _padded_rows(num, start, batch_size)
    local = parallel.process_slice(batch_size)
    args = [parallel.shard_batch(data.to_model_range(images[rows][local]), mesh),
            parallel.shard_batch(indices[local], mesh)]
    if labels is not None:
      args.append(parallel.shard_batch(labels[rows][local], mesh))
    out = parallel.to_host(bpd_fn(params, base_key, *args))
    valid = indices < num
    for name in SCALAR_TERMS + PER_T_TERMS:
      total = np.asarray(out[name], np.float64)[valid].sum(axis=0)
      sums[name] = sums.get(name, 0.0) + total
    done = min(start + batch_size, num)
    logging.info('bits/dim: %d/%d examples, running mean %.4f', done, num, sums['total_bpd'] / done)
  means = {name: value / num for name, value in sums.items()}
  result = {'num_examples': num}
  result.update({name: float(means[name]) for name in SCALAR_TERMS})
  result.update({name: means[name] for name in PER_T_TERMS})
  return result
