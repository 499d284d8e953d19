"""A writer of PyTorch's zip checkpoint format, for tests, with no PyTorch: the pickle opcodes of
`torch.save(state_dict)` (protocol 2) written one by one, and the storages as raw records.

What torch.save writes for a state dict: a `collections.OrderedDict` whose values are
`torch._utils._rebuild_tensor_v2(<persistent id ('storage', torch.<T>Storage, key, 'cpu', numel)>,
offset, size, stride, requires_grad, OrderedDict())`, in `<folder>/data.pkl`, and each storage's
bytes (little-endian) in `<folder>/data/<key>`, with `<folder>/version` and `<folder>/byteorder`.
"""

import dataclasses
import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_NAMES = {
    np.dtype('float64'): 'DoubleStorage', np.dtype('float32'): 'FloatStorage',
    np.dtype('float16'): 'HalfStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
    np.dtype('int64'): 'LongStorage', np.dtype('int32'): 'IntStorage',
    np.dtype('uint8'): 'ByteStorage', np.dtype('bool'): 'BoolStorage',
}


@dataclasses.dataclass
class View:
  """A tensor that is a strided view (in elements) of a 1-D storage, possibly shared by name."""
  storage: np.ndarray
  offset: int
  size: tuple
  stride: tuple
  storage_name: str | None = None  # views with the same name share one storage record


@dataclasses.dataclass
class GlobalCall:
  """A value that is a call of an arbitrary pickled global, e.g. ('os', 'system', ('echo',))."""
  module: str
  name: str
  args: tuple = ()


@dataclasses.dataclass
class Parameter:
  """An nn.Parameter: torch._utils._rebuild_parameter(tensor, requires_grad, OrderedDict())."""
  data: np.ndarray


class _Opcodes:

  def __init__(self):
    self.out = bytearray(b'\x80\x02')  # PROTO 2

  def glob(self, module: str, name: str):
    self.out += b'c' + module.encode() + b'\n' + name.encode() + b'\n'

  def mark(self):
    self.out += b'('

  def tuple(self):
    self.out += b't'

  def reduce(self):
    self.out += b'R'

  def string(self, s: str):
    data = s.encode()
    self.out += b'X' + struct.pack('<I', len(data)) + data

  def int(self, n: int):
    if -2**31 <= n < 2**31:
      self.out += b'J' + struct.pack('<i', n)
    else:
      data = n.to_bytes(9, 'little', signed=True)
      self.out += b'\x8a' + bytes([len(data)]) + data

  def bool(self, b: bool):
    self.out += b'\x88' if b else b'\x89'

  def ints(self, values):
    self.mark()
    for v in values:
      self.int(int(v))
    self.tuple()

  def empty_ordered_dict(self):
    self.glob('collections', 'OrderedDict')
    self.out += b')'  # EMPTY_TUPLE
    self.reduce()

  def value(self, v):
    if isinstance(v, str):
      self.string(v)
    elif isinstance(v, bool):
      self.bool(v)
    elif isinstance(v, int):
      self.int(v)
    elif isinstance(v, tuple):
      self.mark()
      for x in v:
        self.value(x)
      self.tuple()
    else:
      raise TypeError(type(v))


def write_torch_zip(path: str, state_dict: dict, *, folder: str = 'archive',
                    byteorder: str = 'little') -> None:
  """Writes {name: np.ndarray | View | Parameter | GlobalCall} as torch.save would."""
  ops, records, shared = _Opcodes(), {}, {}

  def storage_key(array: np.ndarray, name: str | None) -> str:
    if name is not None and name in shared:
      return shared[name]
    key = str(len(records))
    dtype = array.dtype
    stored = array.astype(dtype.newbyteorder('>' if byteorder == 'big' else '<'))
    records[key] = (stored.tobytes(), _STORAGE_NAMES[dtype], array.size)
    if name is not None:
      shared[name] = key
    return key

  def tensor(storage, offset, size, stride, name=None):
    key = storage_key(storage, name)
    ops.glob('torch._utils', '_rebuild_tensor_v2')
    ops.mark()
    ops.mark()
    ops.string('storage')
    ops.glob('torch', records[key][1])
    ops.string(key)
    ops.string('cpu')
    ops.int(records[key][2])
    ops.tuple()
    ops.out += b'Q'  # BINPERSID
    ops.int(offset)
    ops.ints(size)
    ops.ints(stride)
    ops.bool(False)
    ops.empty_ordered_dict()
    ops.tuple()
    ops.reduce()

  def contiguous(array):
    array = np.asarray(array)
    strides = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]
    tensor(array.reshape(-1), 0, array.shape, strides)

  ops.glob('collections', 'OrderedDict')
  ops.out += b')'
  ops.reduce()
  ops.mark()
  for name, value in state_dict.items():
    ops.string(name)
    if isinstance(value, View):
      tensor(value.storage, value.offset, value.size, value.stride, value.storage_name)
    elif isinstance(value, Parameter):
      ops.glob('torch._utils', '_rebuild_parameter')
      ops.mark()
      contiguous(value.data)
      ops.bool(True)
      ops.empty_ordered_dict()
      ops.tuple()
      ops.reduce()
    elif isinstance(value, GlobalCall):
      ops.glob(value.module, value.name)
      ops.value(tuple(value.args))
      ops.reduce()
    else:
      contiguous(value)
  ops.out += b'u'  # SETITEMS
  # state_dict() carries `_metadata` (module versions), restored by BUILD after the items.
  ops.out += b'}'  # EMPTY_DICT
  ops.string('_metadata')
  ops.empty_ordered_dict()
  ops.string('')
  ops.out += b'}'
  ops.string('version')
  ops.int(1)
  ops.out += b'sss'  # SETITEM x3: {'version': 1} into the OrderedDict, it into {'_metadata': ...}
  ops.out += b'b.'  # BUILD, STOP

  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{folder}/data.pkl', bytes(ops.out))
    zf.writestr(f'{folder}/byteorder', byteorder)
    for key, (data, _, _) in records.items():
      zf.writestr(f'{folder}/data/{key}', data)
    zf.writestr(f'{folder}/version', '3\n')
