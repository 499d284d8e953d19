"""A directory tree of PNG / JPEG (/ TIFF, BMP, GIF, WebP) files as a dataset, decoded with Pillow.

Files are found recursively and taken in sorted path order, so a folder always means the same
sequence of images. A split name selects the subfolder `<folder>/<split>` when it exists (the usual
train/ and test/ layout); otherwise every split is the whole tree. Each image is centre-cropped to a
square and resized with Pillow's antialiased bicubic filter (the same filter family as the tf.data
path), after conversion to 1 (L) or 3 (RGB) channels of 8 bits.

Conversion to 8 bits, per Pillow mode of the decoded file (`to_channels`; issue #19):
  'L', 'RGB'             as stored.
  '1'                    0 / 255.
  'LA', 'RGBA', 'PA'     alpha dropped: the stored colour of every pixel is kept, transparent ones
                         included (no compositing onto a background).
  'P'                    through its palette; a transparent index or alpha table is dropped too.
  'RGBX', 'CMYK',        Pillow's conversion to RGB (CMYK without colour management:
  'YCbCr', 'LAB', 'HSV'  R = (255 - C)(255 - K) / 255, ...).
  'I;16', 'I;16L',       16-bit grey, scaled to 8 bits: round(v * 255 / 65535) = round(v / 257),
  'I;16B', 'I;16N'       so the 16-bit version of an 8-bit level k (v = 257 k) gives k back.
                         Pillow's own convert() clips them to 255, turning most of an image white.
  'I'                    32-bit integer; older Pillows decode 16-bit grey PNGs so, and no listed
                         format holds wider samples, so it is read as 16-bit as above. Values
                         outside [0, 65535] are refused.
  'F'                    refused: floating-point samples have no agreed range ([0, 1]? [0, 255]?).
  others ('La', ...)     refused, with an error naming the file and these modes.
A colour image asked for 1 channel is converted to RGB first, then to ITU-R 601-2 luma
(L = 0.299 R + 0.587 G + 0.114 B, Pillow's 'L'); a grey one asked for 3 channels is replicated.
Pillow decodes 48- and 64-bit RGB(A) PNGs, and 16-bit grey + alpha ones, to 8-bit RGB(A) itself
(keeping each sample's high byte, within 1 of the rounding above).
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
from PIL import Image, ImageOps

from ddpm_jax.data import preprocess

# TIFF is listed for its 16-bit grey files (scientific and scanned images), read as the table above says.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp', '.gif', '.webp')
_MODES = {1: 'L', 3: 'RGB'}
# Pillow modes by how they reach 8 bits (see the module docstring).
_GREY_8BIT_MODES = ('1', 'L', 'LA')
_COLOUR_8BIT_MODES = ('P', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV')
_GREY_16BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_SUPPORTED_MODES = _GREY_8BIT_MODES + _COLOUR_8BIT_MODES + _GREY_16BIT_MODES
_MAX_DECODE_THREADS = 8


def _split_root(folder: str, split: str | None) -> str:
  split_dir = os.path.join(folder, split) if split else None
  return split_dir if split_dir and os.path.isdir(split_dir) else folder


def list_image_files(folder: str, split: str | None = None) -> list[str]:
  """Sorted paths of the image files under `folder` (or `folder/split` where that is a directory).

  Raises:
    ValueError: the folder does not exist or holds no image file (message names the folder).
  """
  if not os.path.isdir(folder):
    raise ValueError(f'data.image_folder: {folder!r} is not a directory')
  root = _split_root(folder, split)
  paths = sorted(
      os.path.join(dirpath, name)
      for dirpath, _, names in os.walk(root)
      # Dot-files are skipped: macOS '._x.jpg' companions and the like are not images.
      for name in names if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'))
  if not paths:
    raise ValueError(f'data.image_folder: no image files ({", ".join(IMAGE_EXTENSIONS)}) found '
                     f'under {root!r}')
  return paths


def to_channels(image: Image.Image, num_channels: int, path: str = '<image>') -> Image.Image:
  """A decoded image of any supported Pillow mode -> 8-bit 'L' (1 channel) or 'RGB' (3 channels).

  The per-mode rule is in the module docstring: 16-bit grey is scaled (round(v / 257)), not
  clipped; alpha is dropped.

  Raises:
    ValueError: a mode without a defined conversion ('F', 'La', ...), or 'I' samples outside the
      16-bit range; the message names `path`, the mode and the supported modes.
  """
  mode = image.mode
  target = _MODES[num_channels]
  if mode in _GREY_16BIT_MODES:
    # np.asarray honours the byte order of 'I;16B' and gives int32 for 'I'.
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise ValueError(f'data.image_folder: {path!r} has Pillow mode {mode!r} with values in '
                       f'[{values.min()}, {values.max()}]; mode {mode!r} is read as 16-bit grey, '
                       'so values must lie in [0, 65535]')
    # v * 255 / 65535 = v / 257 exactly; + 128 before the floor division rounds to nearest (no
    # ties: v / 257 is never k + 1/2 for an integer v).
    image = Image.fromarray(((values + 128) // 257).astype(np.uint8))
    return image.convert(target)
  if mode in _GREY_8BIT_MODES:
    return image.convert(target)
  if mode in _COLOUR_8BIT_MODES:
    if mode == 'P' and 'transparency' in image.info:
      # Via RGBA, as Pillow asks (it warns on a direct conversion); the alpha is dropped next.
      image = image.convert('RGBA')
    # Through RGB first, so that every colour mode reaches 'L' by the same luma formula.
    image = image.convert('RGB')
    return image if target == 'RGB' else image.convert(target)
  why = ('floating-point samples have no agreed range; save the image with 8- or 16-bit integer '
         'samples' if mode == 'F' else 'no conversion to 8 bits is defined for it')
  raise ValueError(f'data.image_folder: {path!r} has Pillow mode {mode!r}: {why} (supported '
                   f'modes: {", ".join(_SUPPORTED_MODES)})')


def load_image(path: str, image_size: int, num_channels: int) -> np.ndarray:
  """Decodes one file -> uint8 [image_size, image_size, num_channels] (centre crop, bicubic resize).

  Every Pillow mode is first brought to 8-bit L or RGB by `to_channels` (module docstring).

  Raises:
    ValueError: the file cannot be decoded, or its mode has no conversion (message names the file).
  """
  try:
    with Image.open(path) as image:
      # Camera JPEGs store their rotation in EXIF; apply it so the crop sees the upright image.
      # (exif_transpose returns a loaded copy, so it outlives the file and decode errors land here.)
      image = ImageOps.exif_transpose(image)
  # Pillow signals corrupt or truncated data with several exception types (OSError, SyntaxError,
  # ValueError, struct.error...), so any failure here is reported as an undecodable file.
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'data.image_folder: cannot decode image file {path!r} '
                     f'({type(e).__name__}: {e})') from e
  image = to_channels(image, num_channels, path)
  top, left, side = preprocess.centre_square(image.height, image.width)
  if (side, side) != (image.height, image.width):
    # An explicit crop: resize(box=...) would let the filter reach into the discarded margins.
    image = image.crop((left, top, left + side, top + side))
  if side != image_size:
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, num_channels)


def class_labels(folder: str, split: str | None, limit: int | None = None) -> np.ndarray:
  """int32 [N]: the class of each of the first `limit` files (order of `list_image_files`).

  A class is a sub-folder of folder/split (or of folder): the sorted sub-folder names are the
  class ids 0, 1, ... (the ImageNet layout, as torchvision's ImageFolder and iDDPM's class_cond).

  Raises:
    ValueError: an image lies directly in the root, outside every class folder.
  """
  root = _split_root(folder, split)
  paths = list_image_files(folder, split)
  classes = [os.path.relpath(p, root).split(os.sep) for p in paths]
  loose = [p for p, parts in zip(paths, classes) if len(parts) < 2]
  if loose:
    raise ValueError(f'data.image_folder: class labels need one sub-folder per class under '
                     f'{root!r}, but {loose[0]!r} is not in one')
  names = sorted({parts[0] for parts in classes})
  ids = {name: i for i, name in enumerate(names)}
  return np.asarray([ids[parts[0]] for parts in classes], np.int32)[:limit]


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
