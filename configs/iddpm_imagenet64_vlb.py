"""improved-diffusion's unconditional ImageNet-64, L_vlb, cosine (`imagenet64_uncond_vlb_100M_1500K.pt`).

README flags: --image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True
--diffusion_steps 4000 --noise_schedule cosine --use_kl True --lr 1e-4 --batch_size 128
--schedule_sampler loss-second-moment.
Data: tfds `imagenet_resized/64x64`.
"""

from configs import _iddpm


def get_config():
  return _iddpm.from_flags(
      dataset='imagenet_resized/64x64', num_train_steps=1_500_000,
      image_size=64, num_channels=128, num_res_blocks=3, learn_sigma=True,
      diffusion_steps=4000, noise_schedule='cosine', use_kl=True,
      lr=1e-4, batch_size=128, schedule_sampler='loss-second-moment')
