"""Shared 256x256 recipe of DDPM (Appendix B): 114M-parameter U-Net, lr 2e-5, batch 64, dropout 0."""

from configs import default


def get_config(dataset: str, random_flip: bool = True):
  config = default.get_config()
  config.data.dataset = dataset
  config.data.image_size = 256
  config.data.random_flip = random_flip
  config.data.shuffle_buffer = 1_000
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.optim.learning_rate = 2e-5
  config.training.batch_size = 64
  config.training.num_train_steps = 2_400_000
  config.training.num_grid_samples = 16
  config.sampling.batch_size = 32
  config.eval.batch_size = 32
  return config
