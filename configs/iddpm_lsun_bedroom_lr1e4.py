"""improved-diffusion's LSUN bedroom 256, lr 1e-4 (`lsun_uncond_100M_1200K_bs128.pt`).

README flags: --image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True
--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear
--rescale_learned_sigmas False --rescale_timesteps False --lr 1e-4 --batch_size 128.
"""

from configs import _iddpm


def get_config():
  return _iddpm.from_flags(
      dataset='lsun/bedroom', num_train_steps=1_200_000,
      image_size=256, num_channels=128, num_res_blocks=2, num_heads=1, learn_sigma=True,
      use_scale_shift_norm=False, attention_resolutions='16',
      diffusion_steps=1000, noise_schedule='linear', rescale_learned_sigmas=False,
      rescale_timesteps=False,
      lr=1e-4, batch_size=128)
