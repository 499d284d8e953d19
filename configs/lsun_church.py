"""DDPM LSUN Church 256x256 (FID 7.89). tfds `lsun/church_outdoor`; images are centre-cropped and resized."""

from configs import _large256


def get_config():
  config = _large256.get_config('lsun/church_outdoor')
  config.training.num_train_steps = 1_200_000
  return config
