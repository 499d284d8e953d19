"""The denoising network: the DDPM U-Net with iDDPM options, and the TF checkpoint converter.

`convert_tf` (TF checkpoints) is imported on its own: `from ddpm_jax.models import convert_tf`.
"""

from ddpm_jax.models.unet import UNet
from ddpm_jax.models.unet import count_params
from ddpm_jax.models.unet import create_model
from ddpm_jax.models.unet import init_params
from ddpm_jax.models.unet import param_shapes
from ddpm_jax.models.unet import validate_model_config

__all__ = ['UNet', 'count_params', 'create_model', 'init_params', 'param_shapes',
           'validate_model_config']
