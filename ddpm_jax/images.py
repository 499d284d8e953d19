"""PNG image grids: training sample grids, sampling grids, progressive and interpolation strips."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ddpm_jax import workdir

# Tiles smaller than this (e.g. the 8x8 digits) are enlarged by an integer nearest-neighbour factor.
MIN_TILE_SIZE = 32
PADDING = 2


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3)
      or not len(images)):
    raise ValueError('save_image_grid: images must be uint8 [N, H, W, C] with N >= 1 and C in '
                     f'(1, 3); got dtype {images.dtype}, shape {images.shape} (convert with '
                     'ddpm_jax.data.to_uint8)')
  return images


def upscale_factor(height: int, width: int) -> int:
  """The smallest integer factor that makes a tile at least MIN_TILE_SIZE pixels on each side."""
  return max(1, math.ceil(MIN_TILE_SIZE / min(height, width)))


def make_grid(images: np.ndarray, ncol: int | None = None) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] row by row into uint8 [rows*(h+p)+p, ncol*(w+p)+p, C].

  Tiles are upscaled by `upscale_factor` and separated by PADDING black pixels; ncol defaults to
  ceil(sqrt(N)).
  """
  images = _check_images(images)
  num, height, width, channels = images.shape
  ncol = math.ceil(math.sqrt(num)) if ncol is None else ncol
  if ncol < 1:
    raise ValueError(f'save_image_grid: ncol must be >= 1, got {ncol}')
  factor = upscale_factor(height, width)
  images = images.repeat(factor, axis=1).repeat(factor, axis=2)
  h, w = height * factor, width * factor
  nrow = math.ceil(num / ncol)
  grid_shape = (nrow * (h + PADDING) + PADDING, ncol * (w + PADDING) + PADDING, channels)
  grid = np.zeros(grid_shape, np.uint8)
  for i, image in enumerate(images):
    top, left = PADDING + (i // ncol) * (h + PADDING), PADDING + (i % ncol) * (w + PADDING)
    grid[top:top + h, left:left + w] = image
  return grid


def save_strip(strip: np.ndarray, path: str) -> str:
  """Writes uint8 strips [rows, cols, H, W, C] as one PNG grid of `rows` rows (DDPM Fig. 6, 8)."""
  rows, cols = strip.shape[:2]
  return save_image_grid(strip.reshape((rows * cols,) + strip.shape[2:]), path, ncol=cols)


def save_image_grid(images: np.ndarray, path: str, ncol: int | None = None) -> str:
  """Writes `make_grid(images, ncol)` as a PNG at `path` atomically (temporary file, then rename).

  Args:
    images: uint8 [N, H, W, C], C = 1 (grey) or 3 (RGB).
    path: output .png path; its directory is created if needed.
    ncol: images per row (default ceil(sqrt(N))); a strip of R rows x L columns uses ncol = L.
  Returns:
    path.
  """
  grid = make_grid(images, ncol)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  with workdir.atomic_write(path) as f:
    image.save(f, format='PNG')
  return path
