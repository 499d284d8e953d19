r"""Two or more variants of the train step timed against each other in one process, windows alternating.

  python bench/train_ab.py --config=configs/digits.py --batch_size=64 --rounds=16 --steps_per_window=40 \
      --variant=per_weight:runtime.gradient_all_reduce=per_weight --variant=flat:runtime.gradient_all_reduce=flat

Each `--variant=NAME:FIELD=VALUE[;FIELD=VALUE...]` is the config with those overrides (VALUE read as a Python
literal, else as a string; no override: the config as given). Every variant is built and compiled exactly as
`bench/train_throughput.py` builds it (`jit_train_step`, same batch, same state), then `--rounds` rounds each
run one window of `--steps_per_window` steps of every variant, the order reversed every other round. On a
shared machine whose speed drifts by 10-20% within minutes, the per-round ratio to the first variant is the
figure to read: both sides of a ratio ran within seconds of each other. XLA_FLAGS apply to the whole process,
so levers set by flags need separate processes (`bench/train_throughput.py`, alternating by hand).

A change to the step's code rather than to the config is timed the same way: `--step_module=NAME=PATH`
builds variant NAME with the `jit_train_step` of the Python file PATH, e.g. the step as it was at another
revision, beside the working tree's:

  git show REV:ddpm_jax/train/step.py > /tmp/step_before.py
  python bench/train_ab.py --config=configs/cifar10.py --batch_size=128 --dtype=bfloat16 \
      --variant=before: --variant=now: --step_module=before=/tmp/step_before.py
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import

# train_throughput defines the flags both scripts share (--config, --batch_size, --warmup_steps, ...).
from bench import common, train_throughput  # pylint: disable=g-import-not-at-top
from ddpm_jax import parallel  # pylint: disable=g-import-not-at-top
from ddpm_jax.config import validate_config  # pylint: disable=g-import-not-at-top

flags.DEFINE_multi_string('variant', None, 'NAME:FIELD=VALUE[;FIELD=VALUE...] (at least two).')
flags.DEFINE_integer('rounds', 10, 'Rounds; each runs one window of every variant.')
flags.DEFINE_multi_string('step_module', None,
                          'NAME=PATH: variant NAME compiles its step with the jit_train_step of the Python file '
                          'PATH instead of ddpm_jax.train.step (e.g. git show REV:ddpm_jax/train/step.py > PATH).')
FLAGS = flags.FLAGS


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
  """'flat:runtime.gradient_all_reduce=flat' -> ('flat', {'runtime.gradient_all_reduce': 'flat'})."""
  name, _, overrides = spec.partition(':')
  if not name:
    raise app.UsageError(f'--variant={spec!r}: expected NAME:FIELD=VALUE[;FIELD=VALUE...]')
  fields = {}
  for item in filter(None, overrides.split(';')):
    field, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--variant={spec!r}: {item!r} is not FIELD=VALUE')
    try:
      fields[field.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      fields[field.strip()] = value
  return name, fields


def variant_config(config: ml_collections.ConfigDict, fields: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with `fields` set (an unknown field is an error, as on the command line)."""
  out = copy.deepcopy(config)
  for field, value in fields.items():
    section, _, key = field.rpartition('.')
    node = out
    for part in filter(None, section.split('.')):
      node = node[part]
    if key not in node:
      raise app.UsageError(f'--variant: config has no field {field!r}')
    node[key] = value
  return out


def load_step_module(spec: str, variant_names: list[str]) -> tuple[str, str, Callable[..., Any]]:
  """'before=/tmp/step.py' -> ('before', '/tmp/step.py', that file's `jit_train_step`), the file run as a
  fresh module."""
  name, sep, path = spec.partition('=')
  if not sep or name not in variant_names:
    raise app.UsageError(f'--step_module={spec!r}: expected NAME=PATH with NAME one of the variants '
                         f'{variant_names}')
  if not os.path.isfile(path):
    raise app.UsageError(f'--step_module={spec!r}: no such file {path!r}')
  module_spec = importlib.util.spec_from_file_location(f'train_ab_step_{name}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, 'jit_train_step', None)):
    raise app.UsageError(f'--step_module={spec!r}: {path} defines no jit_train_step')
  return name, path, module.jit_train_step


def ratios(rates: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
  """Per variant: steps/s over the rounds, and its per-round ratio to the first variant."""
  base = rates[next(iter(rates))]
  return {name: {'steps_per_s': common.summary(r),
                 'ratio_to_first': common.summary([a / b for a, b in zip(r, base)])}
          for name, r in rates.items()}


def main(argv: list[str]) -> None:
  config, record = common.start_run(FLAGS, argv, 'train_ab')
  variants = [parse_variant(spec) for spec in FLAGS.variant or []]
  names = [name for name, _ in variants]
  if len(names) < 2 or len(set(names)) != len(names):
    raise app.UsageError('give at least two --variant, with distinct names')
  loaded = [load_step_module(spec, names) for spec in FLAGS.step_module or []]
  step_modules = {name: path for name, path, _ in loaded}
  jit_steps = {name: jit_step for name, _, jit_step in loaded}
  mesh = parallel.create_mesh(jax.local_devices())
  setups = {}
  for name, fields in variants:
    cfg = variant_config(config, fields)
    validate_config(cfg, num_devices=mesh.devices.size, num_processes=jax.process_count())
    setups[name] = train_throughput.setup(cfg, mesh, jit_steps.get(name, train_throughput.jit_train_step))
    train_throughput.run_steps(setups[name], FLAGS.warmup_steps)  # compiles, then warms up
  rates: dict[str, list[float]] = {name: [] for name in setups}
  for r in range(FLAGS.rounds):
    for name in (list(setups) if r % 2 == 0 else list(setups)[::-1]):
      start = time.perf_counter()
      train_throughput.run_steps(setups[name], FLAGS.steps_per_window)
      rates[name].append(FLAGS.steps_per_window / (time.perf_counter() - start))
  record.update({'variants': dict(variants), 'step_modules': step_modules, 'rounds': FLAGS.rounds,
                 'steps_per_window': FLAGS.steps_per_window, 'results': ratios(rates)})
  common.write_json(record, FLAGS.out)
  first = variants[0][0]
  rows = [[name, common.fmt_range(res['steps_per_s']), common.fmt_range(res['ratio_to_first'])]
          for name, res in record['results'].items()]
  print(common.markdown_table(['variant', 'steps/s (median [min–max])', f'per-round ratio to {first}'], rows))


if __name__ == '__main__':
  app.run(main)
