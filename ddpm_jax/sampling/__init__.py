"""Samplers: ancestral (DDPM Alg. 2), respaced (iDDPM §4), DDIM, progressive, interpolation.

Each is one compiled loop over t; randomness is per sample (`fold_in(base_key, index)`), so samples
do not depend on batch size or device count. The --mode=sample / progressive / interpolate jobs that
use them are in `ddpm_jax/jobs/`; this package writes no file.
"""

from ddpm_jax.sampling.ancestral import p_sample, p_sample_loop
from ddpm_jax.sampling.ddim import ddim_sample, ddim_sample_loop
from ddpm_jax.sampling.interpolation import decode, encode, interpolate
from ddpm_jax.sampling.loop import StepNoise, prior_noise, reverse_loop, sample_loop
from ddpm_jax.sampling.progressive import progressive_sample_loop, recorded_steps
from ddpm_jax.sampling.sample_fn import (
    LABEL_STREAM,
    METHODS,
    image_shape,
    jit_sample,
    labels_for_indices,
    make_model_fn,
    make_sample_fn,
    make_step_fn,
    sample_labels,
    sampling_coefficients,
    step_fn_from_config,
)
from ddpm_jax.streams import per_sample_keys, per_sample_normal  # re-exported: the seed's streams

__all__ = [
    'LABEL_STREAM', 'METHODS', 'StepNoise', 'ddim_sample', 'ddim_sample_loop', 'decode', 'encode',
    'image_shape', 'interpolate', 'jit_sample', 'labels_for_indices', 'make_model_fn', 'make_sample_fn',
    'make_step_fn', 'p_sample', 'p_sample_loop', 'per_sample_keys', 'per_sample_normal',
    'prior_noise', 'progressive_sample_loop', 'recorded_steps', 'reverse_loop', 'sample_labels',
    'sample_loop', 'sampling_coefficients', 'step_fn_from_config',
]
