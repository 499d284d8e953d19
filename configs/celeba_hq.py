"""DDPM CelebA-HQ 256x256 (Appendix B). tfds `celeb_a_hq/256` needs a manual download (see tfds docs)."""

from configs import _large256


def get_config():
  config = _large256.get_config('celeb_a_hq/256')
  config.training.num_train_steps = 500_000
  return config
