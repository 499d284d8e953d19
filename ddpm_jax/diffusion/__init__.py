"""The mathematics of DDPM (Ho et al. 2020) and Improved DDPM (Nichol & Dhariwal 2021).

Pure functions over an immutable pytree of per-timestep tables (`DiffusionCoefficients`), in a
straight line: schedules -> respace (numpy on the betas) -> coefficients (tables, extract,
model_output) -> forward process q -> reverse process p_theta -> bound -> losses, plus the timestep
samplers. Nothing here knows about the network: it takes a model output or a model_fn. `factory`
holds the one function that reads a config.

Each enumeration is defined by the module that implements it and exported here: BETA_SCHEDULES
(schedules), MEAN_TYPES, VAR_TYPES, LOSS_TYPES (coefficients, which validates the choices its
tables carry), LEARNED_VAR_TYPES (reverse).
"""

from ddpm_jax.diffusion.coefficients import (
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    DiffusionCoefficients,
    ModelFn,
    extract,
    make_coefficients,
    model_output,
    respaced_coefficients,
)
from ddpm_jax.diffusion.factory import coefficients_from_config
from ddpm_jax.diffusion.forward import q_mean_variance, q_posterior_mean_variance, q_sample
from ddpm_jax.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    prior_bpd,
    vb_terms_bpd,
)
from ddpm_jax.diffusion.losses import draw_noise, training_losses
from ddpm_jax.diffusion.respace import respace_betas, space_timesteps
from ddpm_jax.diffusion.reverse import (
    LEARNED_VAR_TYPES,
    p_mean_variance,
    predict_eps_from_xstart,
    predict_xstart_from_eps,
    predict_xstart_from_xprev,
    split_model_output,
)
from ddpm_jax.diffusion.schedules import BETA_SCHEDULES, get_beta_schedule, one_minus_alphas_cumprod
from ddpm_jax.diffusion.timesteps import (
    LossSecondMomentState,
    init_loss_second_moment,
    loss_second_moment_probs,
    sample_loss_second_moment,
    sample_uniform,
    update_loss_second_moment,
)

__all__ = [
    'BETA_SCHEDULES', 'LEARNED_VAR_TYPES', 'LOSS_TYPES', 'MEAN_TYPES', 'VAR_TYPES',
    'DiffusionCoefficients', 'LossSecondMomentState', 'ModelFn', 'approx_standard_normal_cdf',
    'coefficients_from_config', 'discretized_gaussian_log_likelihood', 'draw_noise', 'extract',
    'get_beta_schedule', 'init_loss_second_moment', 'loss_second_moment_probs', 'make_coefficients',
    'mean_flat', 'model_output', 'normal_kl', 'one_minus_alphas_cumprod', 'p_mean_variance',
    'predict_eps_from_xstart', 'predict_xstart_from_eps', 'predict_xstart_from_xprev', 'prior_bpd',
    'q_mean_variance', 'q_posterior_mean_variance', 'q_sample', 'respace_betas',
    'respaced_coefficients', 'sample_loss_second_moment', 'sample_uniform', 'space_timesteps',
    'split_model_output', 'training_losses', 'update_loss_second_moment', 'vb_terms_bpd',
]
