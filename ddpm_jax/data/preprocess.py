"""Pixel conversions shared by every source, and the centre-crop geometry.

DDPM (§3.3) models images on the 8-bit grid scaled to [-1, 1]: x = u / 127.5 - 1 for u in {0..255}.
Every source yields uint8 first (even after resizing, which is rounded back onto the grid) so the
discretized Gaussian decoder's bins of width 2/255 sit exactly on the data.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_HALF_RANGE = np.float32(127.5)


def to_model_range(images: npt.ArrayLike) -> np.ndarray:
  """Pixels (uint8 or integers) {0..255}, any shape -> float32 in [-1, 1]; 0 -> -1, 255 -> 1."""
  return np.asarray(images).astype(np.float32) / _HALF_RANGE - np.float32(1.0)


def to_uint8(images: npt.ArrayLike) -> np.ndarray:
  """Floats in [-1, 1] (numpy or jax), any shape -> uint8 {0..255}; rounds to nearest, clips."""
  scaled = (np.asarray(images, dtype=np.float32) + np.float32(1.0)) * _HALF_RANGE
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def centre_square(height: int, width: int) -> tuple[int, int, int]:
  """(top, left, side) of the largest centred square inside a height x width image."""
  side = min(height, width)
  return (height - side) // 2, (width - side) // 2, side


def flip_horizontally(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Mirrors the W axis of images[i] where mask[i] (in place; returned).

  images: [B, H, W, C], any dtype; mask: bool [B].
  """
  images[mask] = images[mask, :, ::-1]
  return images
