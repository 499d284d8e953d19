"""Interpolation in the latent space of the diffusion (DDPM §4.4, Fig. 8).

Two images x0, x0' are encoded to the same step t with the SAME noise eps
(x_t = q_sample(x0, t, eps)), mixed linearly, x_t(lambda) = (1 - lambda) x_t + lambda x'_t, and
decoded with the reverse process from t. Every lambda of a pair also shares the decoding noise, so
lambda alone varies along a row; lambda = 0 and 1 give exactly `decode(encode(x0))` and
`decode(encode(x0'))`.

Class-conditional models (iDDPM's class_cond): the decoder is p_theta(x_{t-1} | x_t, y), and the
two ends usually have different labels y, y'. Each mixed latent is decoded with the label of the end
that weighs more in it (`interpolation_labels`: y for lambda <= 1/2, y' above), so the property
above holds per end, decode(encode(x0) | y) and decode(encode(x0') | y'), and along a row the class
switches once, at the midpoint, with the latent varying continuously on each side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddpm_jax import diffusion
from ddpm_jax.sampling.loop import StepFn, reverse_loop
from ddpm_jax.streams import per_sample_normal


def _check_t(coefs: diffusion.DiffusionCoefficients, t: int) -> None:
  if not 0 <= t < coefs.num_timesteps:
    raise ValueError(f'interpolation step t={t} must be a table index in '
                     f'[0, {coefs.num_timesteps}) (config.sampling.interpolation_t)')


def encode(coefs: diffusion.DiffusionCoefficients, x_start: jax.Array, t: int,
           keys: jax.Array) -> jax.Array:
  """x_t ~ q(x_t | x_0) for x_start [B, H, W, C] in [-1, 1], the noise of row i from keys[i].

  The encoding noise uses stream K = coefs.num_timesteps of each key, which no decoding step uses.
  """
  _check_t(coefs, t)
  noise = per_sample_normal(keys, coefs.num_timesteps, x_start.shape[1:], x_start.dtype)
  return diffusion.q_sample(coefs, x_start, jnp.full((x_start.shape[0],), t, jnp.int32), noise)


def decode(step_fn: StepFn, x_t: jax.Array, t: int, keys: jax.Array) -> jax.Array:
  """Runs the reverse process from x_t at table index t to x_0 [B, H, W, C]."""
  return reverse_loop(step_fn, x_t, keys, t)[0]


def interpolation_labels(labels_a: jax.Array, labels_b: jax.Array, lambdas: jax.Array) -> jax.Array:
  """int32 [P * L]: the class label each row of `interpolate`'s decoding batch is denoised with,
  row p * L + l being pair p at lambdas[l]: labels_a[p] while lambda <= 1/2 (x_a weighs at least as
  much as x_b in the mix; the tie goes to the first end), labels_b[p] above.

  Args:
    labels_a, labels_b: int [P], the labels of the two ends of each pair.
    lambdas: float [L] in [0, 1].
  """
  labels_a, labels_b = jnp.asarray(labels_a, jnp.int32), jnp.asarray(labels_b, jnp.int32)
  first = jnp.asarray(lambdas) <= 0.5
  return jnp.where(first[None, :], labels_a[:, None], labels_b[:, None]).reshape(-1)


def interpolate(coefs: diffusion.DiffusionCoefficients, step_fn: StepFn, x_a: jax.Array,
                x_b: jax.Array, lambdas: jax.Array, t: int, keys: jax.Array) -> jax.Array:
  """Decoded interpolations [P, L, H, W, C] between pairs (x_a[p], x_b[p]) (DDPM §4.4).

  Args:
    coefs: tables of the (full, not respaced) diffusion; t indexes them.
    step_fn: one reverse step (`sample_fn.make_step_fn`) over the decoding batch of P * L rows,
      row p * L + l being pair p at lambdas[l]; a class-conditional model's step_fn binds
      `interpolation_labels` (one label per row).
    x_a, x_b: [P, H, W, C] in [-1, 1], the two ends of each of P pairs.
    lambdas: float [L] mixing weights in [0, 1].
    t: static table index to encode to (the paper uses t = 500 of 1000).
    keys: typed keys [P], one per pair: encoding and decoding noise of pair p.
  """
  if x_a.shape != x_b.shape:
    raise ValueError('interpolation ends must have the same shape, got '
                     f'{x_a.shape} and {x_b.shape}')
  num_pairs, num_lambdas = x_a.shape[0], lambdas.shape[0]
  x_t_a, x_t_b = encode(coefs, x_a, t, keys), encode(coefs, x_b, t, keys)
  lam = lambdas.astype(x_t_a.dtype).reshape((1, num_lambdas) + (1,) * (x_a.ndim - 1))
  mixed = (1.0 - lam) * x_t_a[:, None] + lam * x_t_b[:, None]
  flat = mixed.reshape((num_pairs * num_lambdas,) + x_a.shape[1:])
  pair_of_row = jnp.repeat(jnp.arange(num_pairs), num_lambdas)
  decoded = decode(step_fn, flat, t, keys[pair_of_row])
  return decoded.reshape((num_pairs, num_lambdas) + x_a.shape[1:])
