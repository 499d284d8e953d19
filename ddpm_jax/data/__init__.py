"""Data: tfds, embedded digits, image folders -> one iterator of [-1, 1] NHWC batches per process.

Importing this package changes nothing in TensorFlow (nor imports it). TF, used here only to read
data, must never take accelerator memory from JAX: `tf_cpu_only()` (tf_cpu.py) is the package's one
way into it, hiding every GPU / TPU first; every function here that uses TF calls it (it is
idempotent), and so does every other module that needs TF or a library importing it.
"""

from ddpm_jax.data.digits import load_digits_split
from ddpm_jax.data.image_folder import IMAGE_EXTENSIONS, list_image_files, load_image_folder
from ddpm_jax.data.pipeline import (
    InMemoryIterator,
    StreamingIterator,
    TrainIterator,
    create_train_iterator,
    load_eval_images,
    load_eval_labels,
)
from ddpm_jax.data.preprocess import to_model_range, to_uint8
from ddpm_jax.data.sources import Source, resolve_source
from ddpm_jax.data.tf_cpu import tf_cpu_only
from ddpm_jax.data.tfds_source import DatasetUnavailableError

__all__ = [
    'DatasetUnavailableError', 'IMAGE_EXTENSIONS', 'InMemoryIterator', 'Source',
    'StreamingIterator', 'TrainIterator', 'create_train_iterator', 'list_image_files',
    'load_digits_split', 'load_eval_images', 'load_eval_labels', 'load_image_folder', 'resolve_source', 'tf_cpu_only',
    'to_model_range', 'to_uint8',
]
