"""PNG grids: layout, integer upscaling of tiny images, grey and RGB, atomic write, clear errors."""

import os

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import images


def test_grid_layout_and_upscaling_of_8x8_images(tmp_path):
  tiles = np.stack([np.full((8, 8, 1), 10 * i, np.uint8) for i in range(5)])
  path = images.save_image_grid(tiles, os.path.join(tmp_path, 'sub', 'grid.png'))
  grid = np.asarray(Image.open(path))
  factor = images.upscale_factor(8, 8)
  assert factor == 4
  tile, pad = 8 * factor, images.PADDING
  # 5 images -> ceil(sqrt(5)) = 3 columns, 2 rows; grey PNG is 2-D.
  assert grid.shape == (2 * (tile + pad) + pad, 3 * (tile + pad) + pad)
  for i in range(5):
    top, left = pad + (i // 3) * (tile + pad), pad + (i % 3) * (tile + pad)
    np.testing.assert_array_equal(grid[top:top + tile, left:left + tile], 10 * i)
  assert grid[0].max() == 0  # padding is black
  assert not [f for f in os.listdir(os.path.dirname(path)) if '.tmp' in f]


def test_rgb_strip_with_explicit_columns_keeps_pixels(tmp_path):
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
  path = images.save_image_grid(tiles, os.path.join(tmp_path, 'g.png'), ncol=6)
  grid = np.asarray(Image.open(path))
  pad = images.PADDING
  assert grid.shape == (32 + 2 * pad, 6 * (32 + pad) + pad, 3)
  np.testing.assert_array_equal(grid[pad:pad + 32, pad:pad + 32], tiles[0])
  np.testing.assert_array_equal(grid[pad:pad + 32, -(32 + pad):-pad], tiles[5])


@pytest.mark.parametrize('bad, match', [
    (np.zeros((2, 8, 8, 1), np.float32), 'dtype float32'),
    (np.zeros((8, 8, 1), np.uint8), r'shape \(8, 8, 1\)'),
    (np.zeros((2, 8, 8, 2), np.uint8), 'C in'),
    (np.zeros((0, 8, 8, 1), np.uint8), 'N >= 1'),
])
def test_bad_images_are_rejected_with_a_clear_error(tmp_path, bad, match):
  with pytest.raises(ValueError, match=match):
    images.save_image_grid(bad, os.path.join(tmp_path, 'x.png'))
