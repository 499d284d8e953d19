"""Every Pillow mode reaches the same 8-bit L / RGB values (ddpm_jax.data.image_folder; issue #19).

The same pictures -- a horizontal grey ramp over all 256 levels and an RGB gradient -- are written
in each mode Pillow can store (PNG 8- and 16-bit, 48-bit RGB PNG, palette, alpha, 1-bit, JPEG,
TIFF) and loaded for 1 and 3 channels; the modes no listed file format yields are built in memory
and passed to `to_channels`.
"""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.data import image_folder

SIZE = 256
# Horizontal ramp: column x holds level x, so every level appears and the mean is exactly 127.5.
GREY = np.tile(np.arange(SIZE, dtype=np.uint8), (SIZE, 1))
# R: left to right, G: top to bottom, B: right to left.
COLOUR = np.stack([GREY, GREY.T, GREY[:, ::-1]], axis=-1)


def write_png16(path, samples: np.ndarray) -> None:
  """A 16-bit PNG, written byte by byte (Pillow cannot write 16-bit colour): [H, W] or [H, W, C]."""
  height, width = samples.shape[:2]
  channels = 1 if samples.ndim == 2 else samples.shape[2]
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # grey, grey + alpha, RGB, RGBA
  rows = b''.join(b'\x00' + samples[y].astype('>u2').tobytes() for y in range(height))

  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' +
            chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 16, colour_type, 0, 0, 0)) +
            chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def grey16_image(samples: np.ndarray, mode: str) -> Image.Image:
  """uint16 samples as a 16-bit grey image of `mode` ('I;16B' big-endian, 'I;16L' / 'I;16N' little).

  Built from bytes: Pillow's convert() between the 16-bit modes clips to 255 on the way.
  """
  order = '>u2' if mode == 'I;16B' else '<u2'
  return Image.frombytes(mode, samples.shape[::-1], samples.astype(order).tobytes())


def grey_palette_image(levels: np.ndarray) -> Image.Image:
  """Mode 'P' with palette entry k = (k, k, k), indices = levels."""
  image = Image.fromarray(levels)
  image.putpalette([k for k in range(256) for _ in range(3)])
  return image


def grey_files(folder) -> dict[str, tuple[str, str, int]]:
  """The grey ramp in every storable form: {name: (path, mode Pillow opens it in, tolerance)}."""
  ramp16 = GREY.astype(np.uint16) * 257  # level k as 16-bit: k * 65535 / 255
  files = {}

  def save(name, image, tolerance=0, **kwargs):
    path = str(folder / name)
    image.save(path, **kwargs)
    with Image.open(path) as reopened:
      files[name] = (path, reopened.mode, tolerance)
  save('l8.png', Image.fromarray(GREY))
  save('i16.png', Image.fromarray(ramp16))  # Pillow writes 'I;16' as a 16-bit greyscale PNG
  save('i16.tif', Image.fromarray(ramp16))
  save('i16b.tif', grey16_image(ramp16, 'I;16B'))
  save('i32.tif', Image.fromarray(ramp16.astype(np.int32)))
  save('la.png', Image.merge('LA', [Image.fromarray(GREY), Image.fromarray(GREY[::-1])]))
  save('p.png', grey_palette_image(GREY))
  save('p_transparent.png', grey_palette_image(GREY), transparency=0)
  save('rgb.png', Image.fromarray(np.repeat(GREY[..., None], 3, axis=-1)))
  alpha = np.full(GREY.shape + (1,), 255, np.uint8)
  alpha[:, :SIZE // 2] = 0  # half transparent: the stored colour is kept all the same
  save('rgba.png', Image.fromarray(np.concatenate([np.repeat(GREY[..., None], 3, -1), alpha], -1)))
  save('l.jpg', Image.fromarray(GREY), tolerance=4, quality=95)
  path = str(folder / 'g16_by_hand.png')
  write_png16(path, ramp16)
  with Image.open(path) as reopened:
    files['g16_by_hand.png'] = (path, reopened.mode, 0)
  return files


@pytest.fixture(scope='module')
def grey_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('grey')
  return folder, grey_files(folder)


def test_pillow_opens_the_files_in_the_modes_covered(grey_folder):
  """Guards the test itself: a Pillow that opened these differently would test other paths."""
  _, files = grey_folder
  modes = {name: mode for name, (_, mode, _) in files.items()}
  assert modes['i16.png'] == modes['g16_by_hand.png'] == 'I;16'  # 'I' in older Pillows
  assert modes['i16b.tif'] == 'I;16B' and modes['i32.tif'] == 'I'
  assert modes['la.png'] == 'LA' and modes['p.png'] == modes['p_transparent.png'] == 'P'
  assert modes['rgba.png'] == 'RGBA' and modes['l.jpg'] == 'L'


def test_16bit_greyscale_png_is_scaled_not_clipped(grey_folder):
  """The issue as reported: the 'I;16' PNG had mean 254 (Pillow clips to 255) against 127.5."""
  _, files = grey_folder
  path = files['i16.png'][0]
  with Image.open(path) as image:
    assert image.mode == 'I;16'
    assert np.asarray(image.convert('L')).mean() > 250  # what plain Pillow convert() gives
  for channels in (1, 3):
    loaded = image_folder.load_image(path, SIZE, channels)
    assert loaded.mean() == pytest.approx(127.5)
    np.testing.assert_array_equal(loaded, np.repeat(GREY[..., None], channels, axis=-1))


@pytest.mark.parametrize('channels', [1, 3])
def test_every_grey_file_gives_the_8bit_values(grey_folder, channels):
  _, files = grey_folder
  want = np.repeat(GREY[..., None], channels, axis=-1).astype(int)
  for name, (path, mode, tolerance) in files.items():
    got = image_folder.load_image(path, SIZE, channels)
    assert got.shape == (SIZE, SIZE, channels) and got.dtype == np.uint8
    err = np.abs(got.astype(int) - want).max()
    assert err <= tolerance, f'{name} (mode {mode}): max error {err} > {tolerance}'


@pytest.mark.parametrize('channels', [1, 3])
def test_folder_of_mixed_modes_loads_alike(grey_folder, channels):
  """load_image_folder over the listed formats (.png, .jpg, .tif: 16-bit and 32-bit TIFFs included),
  resized to 32."""
  folder, files = grey_folder
  listed = [name for name in files if name.endswith(image_folder.IMAGE_EXTENSIONS)]
  assert len(listed) == len(files) and any(name.endswith('.tif') for name in listed)
  images = image_folder.load_image_folder(str(folder), None, 32, channels)
  assert images.shape == (len(listed), 32, 32, channels) and images.dtype == np.uint8
  by_name = dict(zip(sorted(files[name][0] for name in listed), images))
  reference = by_name[files['l8.png'][0]].astype(int)
  for name in listed:
    got = by_name[files[name][0]].astype(int)
    # Lossless files are decoded to the same 8-bit values before the resize: identical results.
    assert np.abs(got - reference).max() <= files[name][2], name
    assert abs(got.mean() - 127.5) < 1.0, name


def test_16bit_values_round_to_nearest_level(tmp_path):
  """round(v * 255 / 65535) for every 16-bit value, from a PNG and from a big-endian TIFF."""
  values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  want = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  for name, image in [('all.png', Image.fromarray(values)),
                      ('all.tif', grey16_image(values, 'I;16B'))]:
    image.save(tmp_path / name)
    np.testing.assert_array_equal(image_folder.load_image(str(tmp_path / name), 256, 1)[..., 0],
                                  want)
  # The rounding boundaries: v / 257 < 1/2 up to 128.
  image = Image.fromarray(np.array([[0, 128, 129, 385, 386, 65535]], np.uint16))
  assert np.asarray(image_folder.to_channels(image, 1)).tolist() == [[0, 0, 1, 1, 2, 255]]


def test_16bit_colour_png_is_decoded_to_8_bits_by_pillow(tmp_path):
  """48-bit RGB and 64-bit RGBA PNGs: Pillow keeps each sample's high byte, exact for k * 257."""
  colour16 = COLOUR.astype(np.uint16) * 257
  write_png16(tmp_path / 'rgb48.png', colour16)
  alpha = np.full(GREY.shape + (1,), 65535, np.uint16)
  write_png16(tmp_path / 'rgba64.png', np.concatenate([colour16, alpha], axis=-1))
  Image.fromarray(COLOUR).save(tmp_path / 'rgb8.png')
  for channels in (1, 3):
    want = image_folder.load_image(str(tmp_path / 'rgb8.png'), SIZE, channels)
    for name in ('rgb48.png', 'rgba64.png'):
      np.testing.assert_array_equal(image_folder.load_image(str(tmp_path / name), SIZE, channels),
                                    want, err_msg=name)


def test_colour_files_give_the_8bit_values(tmp_path):
  """RGB, RGBA, CMYK (TIFF, lossless round trip), YCbCr and JPEG versions of the gradient."""
  Image.fromarray(COLOUR).save(tmp_path / 'rgb.png')
  rgba = np.concatenate([COLOUR, np.full(GREY.shape + (1,), 7, np.uint8)], axis=-1)
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  Image.fromarray(COLOUR).convert('CMYK').save(tmp_path / 'cmyk.tif')
  Image.fromarray(COLOUR).convert('YCbCr').save(tmp_path / 'ycbcr.tif')
  Image.fromarray(COLOUR).save(tmp_path / 'rgb.jpg', quality=95)
  with Image.open(tmp_path / 'cmyk.tif') as a, Image.open(tmp_path / 'ycbcr.tif') as b:
    assert (a.mode, b.mode) == ('CMYK', 'YCbCr')
  for channels in (1, 3):
    want = image_folder.load_image(str(tmp_path / 'rgb.png'), SIZE, channels).astype(int)
    if channels == 3:
      np.testing.assert_array_equal(want, COLOUR)
    # (max, mean) error: YCbCr -> RGB in 8 bits is itself lossy (~1.3 on average), JPEG more so.
    for name, max_err, mean_err in [('rgba.png', 0, 0), ('cmyk.tif', 0, 0), ('ycbcr.tif', 3, 1.5),
                                    ('rgb.jpg', 8, 1.5)]:
      err = np.abs(image_folder.load_image(str(tmp_path / name), SIZE, channels).astype(int) - want)
      assert err.max() <= max_err and err.mean() <= mean_err, (name, err.max(), err.mean())


IN_MEMORY = [
    ('L', lambda: Image.fromarray(GREY), 0),
    ('I;16L', lambda: grey16_image(GREY.astype(np.uint16) * 257, 'I;16L'), 0),
    ('I;16N', lambda: grey16_image(GREY.astype(np.uint16) * 257, 'I;16N'), 0),
    ('I;16B', lambda: grey16_image(GREY.astype(np.uint16) * 257, 'I;16B'), 0),
    ('I', lambda: Image.fromarray(GREY.astype(np.int32) * 257), 0),
    ('PA', lambda: Image.merge('PA', [grey_palette_image(GREY), Image.fromarray(GREY)]), 0),
    ('RGBX', lambda: Image.fromarray(np.repeat(GREY[..., None], 3, -1)).convert('RGBX'), 0),
    ('HSV', lambda: Image.fromarray(np.repeat(GREY[..., None], 3, -1)).convert('HSV'), 0),
    ('LAB', lambda: Image.fromarray(np.repeat(GREY[..., None], 3, -1)).convert('LAB'), 3),
]


@pytest.mark.parametrize('mode,make,tolerance', IN_MEMORY, ids=[m for m, _, _ in IN_MEMORY])
@pytest.mark.parametrize('channels', [1, 3])
def test_modes_without_a_listed_file_format(mode, make, tolerance, channels):
  image = make()
  assert image.mode == mode
  got = np.asarray(image_folder.to_channels(image, channels)).reshape(SIZE, SIZE, channels)
  want = np.repeat(GREY[..., None], channels, axis=-1).astype(int)
  assert np.abs(got.astype(int) - want).max() <= tolerance


def test_one_bit_image_is_black_and_white(tmp_path):
  levels = np.where(GREY >= 128, 255, 0).astype(np.uint8)
  Image.fromarray(levels).convert('1', dither=Image.Dither.NONE).save(tmp_path / 'bw.png')
  with Image.open(tmp_path / 'bw.png') as image:
    assert image.mode == '1'
  for channels in (1, 3):
    np.testing.assert_array_equal(image_folder.load_image(str(tmp_path / 'bw.png'), SIZE, channels),
                                  np.repeat(levels[..., None], channels, axis=-1))


def test_alpha_is_dropped_not_composited(tmp_path):
  """Fully transparent pixels keep their stored colour (the documented rule)."""
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., :3] = (200, 100, 50)
  Image.fromarray(rgba).save(tmp_path / 'clear.png')
  assert np.all(image_folder.load_image(str(tmp_path / 'clear.png'), 4, 3) == (200, 100, 50))


def test_float_and_unknown_modes_are_refused_by_name(tmp_path):
  path = tmp_path / 'float.tif'
  Image.fromarray(GREY.astype(np.float32) / 255).save(path)
  with pytest.raises(ValueError, match=r"float\.tif.*mode 'F'.*supported modes: 1, L"):
    image_folder.load_image(str(path), 8, 1)
  with pytest.raises(ValueError, match=r"x\.png.*mode 'La'.*supported modes"):
    image_folder.to_channels(Image.new('La', (2, 2)), 3, 'x.png')


def test_32bit_integer_outside_16_bits_is_refused(tmp_path):
  path = tmp_path / 'wide.tif'
  Image.fromarray(np.array([[0, 70000]], np.int32)).save(path)
  with pytest.raises(ValueError, match=r"wide\.tif.*mode 'I'.*\[0, 70000\]"):
    image_folder.load_image(str(path), 1, 1)
