"""A directory tree of PNG / JPEG (/ BMP, GIF, WebP) files as a dataset, decoded with Pillow.

Files are found recursively and taken in sorted path order, so a folder always means the same
sequence of images. A split name selects the subfolder `<folder>/<split>` when it exists (the usual
train/ and test/ layout); otherwise every split is the whole tree. Each image is centre-cropped to a
square and resized with Pillow's antialiased bicubic filter (the same filter family as the tf.data
path), then converted to 1 (L) or 3 (RGB) channels.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
from PIL import Image, ImageOps

from ddpm_jax.data import preprocess

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
_MODES = {1: 'L', 3: 'RGB'}
_MAX_DECODE_THREADS = 8


def list_image_files(folder: str, split: str | None = None) -> list[str]:
  """Sorted paths of the image files under `folder` (or `folder/split` where that is a directory).

  Raises:
    ValueError: the folder does not exist or holds no image file (message names the folder).
  """
  if not os.path.isdir(folder):
    raise ValueError(f'data.image_folder: {folder!r} is not a directory')
  split_dir = os.path.join(folder, split) if split else None
  root = split_dir if split_dir and os.path.isdir(split_dir) else folder
  paths = sorted(
      os.path.join(dirpath, name)
      for dirpath, _, names in os.walk(root)
      # Dot-files are skipped: macOS '._x.jpg' companions and the like are not images.
      for name in names if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'))
  if not paths:
    raise ValueError(f'data.image_folder: no image files ({", ".join(IMAGE_EXTENSIONS)}) found '
                     f'under {root!r}')
  return paths


def load_image(path: str, image_size: int, num_channels: int) -> np.ndarray:
  """Decodes one file -> uint8 [image_size, image_size, num_channels] (centre crop, bicubic resize).

  Raises:
    ValueError: the file cannot be decoded (message names the file).
  """
  try:
    with Image.open(path) as image:
      # Camera JPEGs store their rotation in EXIF; apply it so the crop sees the upright image.
      image = ImageOps.exif_transpose(image).convert(_MODES[num_channels])
  # Pillow signals corrupt or truncated data with several exception types (OSError, SyntaxError,
  # ValueError, struct.error...), so any failure here is reported as an undecodable file.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'data.image_folder: cannot decode image file {path!r} '
                     f'({type(e).__name__}: {e})') from e
  top, left, side = preprocess.centre_square(image.height, image.width)
  if (side, side) != (image.height, image.width):
    # An explicit crop: resize(box=...) would let the filter reach into the discarded margins.
    image = image.crop((left, top, left + side, top + side))
  if side != image_size:
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, num_channels)


def load_image_folder(folder: str, split: str | None, image_size: int, num_channels: int,
                      limit: int | None = None) -> np.ndarray:
  """The first `limit` (default all) images of folder/split, sorted order -> uint8 [N, S, S, C]."""
  if num_channels not in _MODES:
    raise ValueError(f'data.num_channels: got {num_channels!r}, expected one of {sorted(_MODES)}')
  paths = list_image_files(folder, split)[:limit]
  # Pillow releases the GIL while decoding and resizing, so threads give a real speed-up.
  with concurrent.futures.ThreadPoolExecutor(min(_MAX_DECODE_THREADS, os.cpu_count() or 1)) as pool:
    images = list(pool.map(lambda p: load_image(p, image_size, num_channels), paths))
  return np.stack(images)
