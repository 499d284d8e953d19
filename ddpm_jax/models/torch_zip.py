"""Reads PyTorch's zip checkpoints (`torch.save`, PyTorch >= 1.6) without PyTorch and without
running any pickled code.

The format: a zip archive with one top-level folder `<name>/` (the file's stem in older PyTorch,
`archive` in newer), holding
  <name>/data.pkl       a pickle (protocol 2) of the saved object, here a state dict;
  <name>/data/<key>     the raw bytes of each storage (little-endian unless <name>/byteorder says
                        'big'), one file per storage;
  <name>/version, <name>/byteorder, <name>/.data/...   bookkeeping.
Inside data.pkl a tensor is the call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks[, metadata])` (or the same wrapped in `torch._utils._rebuild_parameter`
for an nn.Parameter), where `storage` is a persistent id ('storage', torch.<T>Storage, key,
location, numel) resolved by the loader, and a state dict is a `collections.OrderedDict`.

`load_state_dict` unpickles with `RestrictedUnpickler`: a pickle can call only the globals it names,
so only those above are resolved, each to a numpy stand-in defined here (nothing is imported from
the pickle); any other global stops the load with an error naming it. Storages become numpy arrays
and tensors strided views of them, copied into contiguous arrays.
"""

import collections
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch.<T>Storage class name -> numpy element type (little-endian; byte order applied on read).
STORAGE_DTYPES = {
    'DoubleStorage': np.dtype('float64'), 'FloatStorage': np.dtype('float32'),
    'HalfStorage': np.dtype('float16'), 'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype('int64'), 'IntStorage': np.dtype('int32'),
    'ShortStorage': np.dtype('int16'), 'CharStorage': np.dtype('int8'),
    'ByteStorage': np.dtype('uint8'), 'BoolStorage': np.dtype('bool'),
}


class RefusedGlobalError(pickle.UnpicklingError):
  """The pickle names a global outside the allowed set; loading it would run arbitrary code."""


class _StorageType:
  """Stand-in for a `torch.<T>Storage` class: only its element type is needed."""

  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]

  def __repr__(self) -> str:
    return f'torch.{self.name}'


def _rebuild_tensor_v2(storage: np.ndarray, storage_offset: int, size: tuple, stride: tuple,
                       requires_grad: bool = False, backward_hooks: Any = None,
                       metadata: Any = None) -> np.ndarray:
  """The numpy counterpart of torch._utils._rebuild_tensor_v2: storage[offset:] viewed with
  (size, stride) in elements, copied. Refuses a view that reaches outside its storage."""
  del requires_grad, backward_hooks, metadata  # training-time attributes; no values
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or storage_offset < 0:
    raise pickle.UnpicklingError(f'invalid tensor view: offset {storage_offset}, size {size}, '
                                 f'stride {stride}')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f'tensor view (offset {storage_offset}, size {size}, stride '
                                 f'{stride}) reaches element {last} of a storage of {storage.size}')
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                         strides=tuple(s * storage.itemsize for s in stride),
                                         writeable=False)
  return np.array(view)  # contiguous, owning its memory


def _rebuild_parameter(data: np.ndarray, requires_grad: bool = False,
                       backward_hooks: Any = None) -> np.ndarray:
  """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
  del requires_grad, backward_hooks
  return data


# (module, name) -> what it resolves to. Nothing else can be named by the pickle.
ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    **{('torch', name): _StorageType(name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles data.pkl resolving only ALLOWED_GLOBALS, storages read from the archive."""

  def __init__(self, file, read_storage):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise RefusedGlobalError(
          f'refusing the pickled global {module}.{name}: a checkpoint may only name '
          f'{sorted(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)}') from None

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}; expected '
                                   "('storage', torch.<T>Storage, key, location, numel)")
    _, storage_type, key, _location, numel = pid
    return self._read_storage(storage_type.dtype, str(key), int(numel))


def _archive_prefix(zf: zipfile.ZipFile, path: str) -> str:
  """The top-level folder holding data.pkl (PyTorch names it after the file, or `archive`)."""
  prefixes = [n[:-len('data.pkl')] for n in zf.namelist()
              if n.endswith('/data.pkl') and n.count('/') == 1]
  if len(prefixes) != 1:
    raise ValueError(f'{path}: expected one <folder>/data.pkl in the zip, found {len(prefixes)}; '
                     'not a torch.save checkpoint of PyTorch >= 1.6')
  return prefixes[0]


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `torch.save(state_dict, path)` file as {name: numpy array}; runs no pickled code.

  Raises:
    RefusedGlobalError naming the first global outside ALLOWED_GLOBALS.
    ValueError for a file that is not the zip format (e.g. PyTorch's pre-1.6 legacy format), or
      whose object is not a mapping of names to tensors.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path} is not a zip file: only the zip format of torch.save (PyTorch >= 1.6, '
                     'its default) is read; re-save it with a recent PyTorch')
  with zipfile.ZipFile(path) as zf:
    prefix = _archive_prefix(zf, path)
    names = set(zf.namelist())
    order = 'little'
    if prefix + 'byteorder' in names:
      order = zf.read(prefix + 'byteorder').decode().strip()
      if order not in ('little', 'big'):
        raise ValueError(f'{path}: unknown byteorder record {order!r}')

    def read_storage(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
      record = f'{prefix}data/{key}'
      if record not in names:
        raise ValueError(f'{path}: storage {key!r} has no record {record}')
      raw = zf.read(record)
      if len(raw) != numel * dtype.itemsize:
        raise ValueError(f'{path}: storage {key!r} holds {len(raw)} bytes, not {numel} x '
                         f'{dtype.itemsize}')
      stored = dtype.newbyteorder('>' if order == 'big' else '<') if dtype.itemsize > 1 else dtype
      return np.frombuffer(raw, stored).astype(dtype)  # native order, a copy

    cache: dict[str, np.ndarray] = {}

    def read_once(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
      # Tensors sharing a storage share one array (views of it are copied in _rebuild_tensor_v2).
      if key not in cache:
        cache[key] = read_storage(dtype, key, numel)
      return cache[key]

    with zf.open(prefix + 'data.pkl') as f:
      obj = RestrictedUnpickler(f, read_once).load()
  if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                          for k, v in obj.items()):
    raise ValueError(f'{path}: expected a state dict (names -> tensors), got {type(obj).__name__}')
  return dict(obj)
