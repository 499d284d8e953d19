"""The denoising network: the DDPM U-Net with iDDPM options, and the TF checkpoint converter.

`convert_tf` (TF checkpoints) is imported on its own: `from ddpm_jax.models import convert_tf`.
"""

from ddpm_jax.models.unet import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    MODEL_NAMES,
    UNet,
    count_params,
    create_model,
    init_params,
    num_classes,
    param_shapes,
)

__all__ = ['ATTN_IMPLEMENTATIONS', 'DTYPES', 'MODEL_NAMES', 'UNet', 'count_params', 'create_model',
           'init_params', 'num_classes', 'param_shapes']
