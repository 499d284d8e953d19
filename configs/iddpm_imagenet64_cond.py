"""improved-diffusion's class-conditional ImageNet-64, 270M parameters (`imagenet64_cond_270M_250K.pt`).

README flags: --image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True
--class_cond True --diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False
--rescale_timesteps False --lr 3e-4 --batch_size 2048.
Data: tfds `imagenet_resized/64x64` (with its labels).
"""

from configs import _iddpm


def get_config():
  return _iddpm.from_flags(
      dataset='imagenet_resized/64x64', num_train_steps=250_000,
      image_size=64, num_channels=192, num_res_blocks=3, learn_sigma=True, class_cond=True,
      diffusion_steps=4000, noise_schedule='cosine', rescale_learned_sigmas=False,
      rescale_timesteps=False,
      lr=3e-4, batch_size=2048)
