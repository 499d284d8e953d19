"""Converts a released improved-diffusion checkpoint (Nichol & Dhariwal 2021, a PyTorch `.pt` file) to a
workdir, with no PyTorch and without running any pickled code (models/torch_zip.py).

  python -m ddpm_jax.convert_torch_checkpoint --checkpoint=cifar10_uncond_50M_500K.pt \
      --config=configs/iddpm_cifar10_hybrid.py --workdir=runs/iddpm_cifar10
  python main.py --config=configs/iddpm_cifar10_hybrid.py --workdir=runs/iddpm_cifar10 --mode=sample
  python main.py --config=configs/iddpm_cifar10_hybrid.py --workdir=runs/iddpm_cifar10 --mode=eval

improved-diffusion releases its EMA weights (rate 0.9999) as the model file; they become both
`params` and `ema_params` (there are no raw weights to restore). The config must describe the same
network with `model.conventions='improved_diffusion'`: the configs/iddpm_*.py files, one per
released model, carry the flags of improved-diffusion's README.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import checkpoints
from ddpm_jax.config import validate_config
from ddpm_jax.models import convert_torch, torch_zip, unet

_CONFIG = config_flags.DEFINE_config_file('config', None,
                                          'Experiment config, e.g. configs/iddpm_cifar10_hybrid.py.',
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, "improved-diffusion's .pt file (torch.save).")
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where to write the converted checkpoint.')
flags.mark_flags_as_required(['config', 'checkpoint', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  validate_config(config)
  if config.model.get('conventions') != 'improved_diffusion':
    raise app.UsageError(f"--config has model.conventions={config.model.get('conventions')!r}: an "
                         "improved-diffusion network needs 'improved_diffusion' (configs/iddpm_*.py)")
  state_dict = torch_zip.load_state_dict(_CHECKPOINT.value)
  params = convert_torch.torch_to_flax(state_dict, unet.param_shapes(config), config.model.num_heads)
  logging.info('Converted %d parameters (%d tensors) from %s; its EMA weights are used as both '
               'params and ema_params.', unet.count_params(params), len(state_dict), _CHECKPOINT.value)
  checkpoints.save_converted(_WORKDIR.value, config, params, params)


if __name__ == '__main__':
  app.run(main)
