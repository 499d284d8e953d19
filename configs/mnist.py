"""MNIST 28x28 padded to 32x32 (a small-compute DDPM exercise; not in the paper). No flips for digits."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = 'mnist'
  config.data.image_size = 32
  config.data.num_channels = 1
  config.data.random_flip = False
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.attn_resolutions = (16,)
  config.optim.warmup_steps = 1000
  config.training.num_train_steps = 100_000
  config.training.sample_every = 5_000
  config.training.checkpoint_every = 5_000
  return config
