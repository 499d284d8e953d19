"""improved-diffusion's command-line flags -> a ddpm_jax config, for its released models.

`from_flags(**flags)` takes the flags of improved-diffusion's README (MODEL_FLAGS,
DIFFUSION_FLAGS, TRAIN_FLAGS), with the defaults of its `script_util.model_and_diffusion_defaults`
for the flags a README line leaves out, and builds what its `create_model_and_diffusion` builds:
  image_size -> channel_mult (1,1,2,2,4,4) at 256, (1,2,3,4) at 64, (1,2,2,2) at 32;
  learn_sigma -> 6 output channels and LEARNED_RANGE; else FIXED_LARGE (FIXED_SMALL if sigma_small);
  use_kl -> RESCALED_KL; else rescale_learned_sigmas -> RESCALED_MSE; else MSE, which with a
    learned variance adds the bound term unweighted (L_simple + L_{t-1}: 'hybrid' at lambda = 1/T);
  noise_schedule 'linear' -> betas 1e-4 * 1000/T .. 0.02 * 1000/T; 'cosine' -> iDDPM eq. 17;
  class_cond -> 1000 classes; attention_resolutions are resolutions; num_heads_upsample -1 (= num_heads).
The network uses improved-diffusion's conventions (layers.CONVENTIONS) so that its checkpoints,
converted by `python -m ddpm_jax.convert_torch_checkpoint`, compute what they computed there.
Its training loop: AdamW with weight decay 0 (= Adam), no warm-up, no gradient clipping, EMA 0.9999,
no random flips; `schedule_sampler loss-second-moment` is training.importance_sampling.
"""

from configs import default

_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
NUM_CLASSES = 1000  # improved-diffusion's script_util.NUM_CLASSES (ImageNet)


def from_flags(*, dataset: str, num_train_steps: int, image_size: int = 64, num_channels: int = 128,
               num_res_blocks: int = 2, num_heads: int = 4, num_heads_upsample: int = -1,
               attention_resolutions: str = '16,8', dropout: float = 0.0, learn_sigma: bool = False,
               sigma_small: bool = False, class_cond: bool = False, diffusion_steps: int = 1000,
               noise_schedule: str = 'linear', use_kl: bool = False, predict_xstart: bool = False,
               rescale_timesteps: bool = True, rescale_learned_sigmas: bool = True,
               use_scale_shift_norm: bool = True, lr: float = 1e-4, batch_size: int = 128,
               schedule_sampler: str = 'uniform'):
  """The config of improved-diffusion's run with these flags (defaults: model_and_diffusion_defaults)."""
  if num_heads_upsample not in (-1, num_heads):
    raise ValueError('num_heads_upsample != num_heads has no counterpart in ddpm_jax.models.UNet')
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.random_flip = False  # improved-diffusion's image_datasets.py does not flip

  m = config.model
  m.conventions = 'improved_diffusion'
  m.ch = num_channels
  m.ch_mult = _CHANNEL_MULT[image_size]
  m.num_res_blocks = num_res_blocks
  m.attn_resolutions = tuple(int(r) for r in attention_resolutions.split(','))
  m.num_heads = num_heads
  m.scale_shift_norm = use_scale_shift_norm
  m.dropout = dropout
  m.resamp_with_conv = True  # UNetModel's conv_resample default
  m.learn_sigma = learn_sigma
  m.num_classes = NUM_CLASSES if class_cond else 0

  d = config.diffusion
  d.num_timesteps = diffusion_steps
  d.beta_schedule = noise_schedule
  if noise_schedule == 'linear':  # gaussian_diffusion.get_named_beta_schedule('linear')
    scale = 1000 / diffusion_steps
    d.beta_start, d.beta_end = scale * 0.0001, scale * 0.02
  d.mean_type = 'x0' if predict_xstart else 'eps'
  d.var_type = 'learned_range' if learn_sigma else ('fixed_small' if sigma_small else 'fixed_large')
  d.rescale_timesteps = rescale_timesteps
  # Its loss choice. With use_kl, rescale_learned_sigmas is never read there: it is left False here.
  d.rescale_learned_sigmas = rescale_learned_sigmas and not use_kl
  if use_kl:
    d.loss_type = 'rescaled_kl'
  elif learn_sigma and not rescale_learned_sigmas:
    d.loss_type, d.hybrid_lambda = 'hybrid', 1.0 / diffusion_steps  # MSE + the unweighted bound term
  else:
    d.loss_type = 'mse'  # with rescale_learned_sigmas and a learned variance: 'rescaled_mse'

  config.optim.optimizer = 'adam'
  config.optim.learning_rate = lr
  config.optim.warmup_steps = 0
  config.optim.grad_clip = 0.0
  config.training.batch_size = batch_size
  config.training.num_train_steps = num_train_steps
  config.training.ema_decay = 0.9999
  config.training.importance_sampling = schedule_sampler == 'loss-second-moment'
  if image_size == 256:  # the 256x256 batches of DDPM's recipe (configs/_large256.py)
    config.data.shuffle_buffer = 1_000
    config.training.num_grid_samples = 16
    config.sampling.batch_size = config.eval.batch_size = 32
  return config
