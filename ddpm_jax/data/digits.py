"""The embedded default data: scikit-learn's 8x8 handwritten digits (1,797 images; shipped, no download).

The 17 grey levels (0..16) are mapped onto the 8-bit grid (round(v * 255 / 16)), so the digits go
through exactly the same {0..255} -> [-1, 1] path as CIFAR10 and the discretized decoder of DDPM §3.3
applies unchanged. The train/test split is fixed (80/20 after a seed-0 permutation) and shared by the
data pipeline and the digits quality metric.
"""

from __future__ import annotations

import functools

import numpy as np

DIGITS_SPLITS = ('train', 'test')
NUM_TEST = 360


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  bunch = load_digits()
  images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [N, 8, 8, 1]
  perm = np.random.default_rng(0).permutation(len(images))
  return images[perm], bunch.target[perm].astype(np.int32)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 8, 8, 1] on the 8-bit grid, labels int32 [N]) of 'train' (1437) or 'test' (360)."""
  if split not in DIGITS_SPLITS:
    raise ValueError(f'data split for digits: got {split!r}, expected one of {DIGITS_SPLITS}')
  images, labels = _all_digits()
  if split == 'train':
    return images[:-NUM_TEST], labels[:-NUM_TEST]
  return images[-NUM_TEST:], labels[-NUM_TEST:]
