"""DDPM LSUN Bedroom 256x256 (FID 6.36 for this 114M model). tfds `lsun/bedroom`; no random flips, as in the paper."""

from configs import _large256


def get_config():
  config = _large256.get_config('lsun/bedroom', random_flip=False)
  config.training.num_train_steps = 2_400_000
  return config
