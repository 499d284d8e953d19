"""improved-diffusion's unconditional CIFAR-10, L_vlb, cosine schedule (`cifar10_uncond_vlb_50M_500K.pt`).

README flags: --image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3
--diffusion_steps 4000 --noise_schedule cosine --use_kl True --lr 1e-4 --batch_size 128
--schedule_sampler loss-second-moment.
"""

from configs import _iddpm


def get_config():
  return _iddpm.from_flags(
      dataset='cifar10', num_train_steps=500_000,
      image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True, dropout=0.3,
      diffusion_steps=4000, noise_schedule='cosine', use_kl=True,
      lr=1e-4, batch_size=128, schedule_sampler='loss-second-moment')
