"""Improved DDPM CIFAR10 (Nichol & Dhariwal 2021): cosine schedule, T=4000, L_hybrid, learned_range.

128 channels, 3 res blocks, attention at 16 and 8 with 4 heads, scale-shift norm, dropout 0.3, lr 1e-4,
batch 128. Importance sampling (for pure L_vlb training) is off by default, as for L_hybrid in the paper.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.diffusion.num_timesteps = 4000
  config.diffusion.beta_schedule = 'cosine'
  config.diffusion.var_type = 'learned_range'
  config.diffusion.loss_type = 'hybrid'
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16, 8)
  config.model.num_heads = 4
  config.model.scale_shift_norm = True
  config.model.dropout = 0.3
  config.model.learn_sigma = True
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 0
  config.training.num_train_steps = 500_000
  config.sampling.timestep_respacing = '100'
  return config
