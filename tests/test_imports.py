"""The import graph of ddpm_jax and main.py, read with `ast` (nothing is imported): no cycles between
modules or between sub-packages, no upward imports across the layers below, jobs independent of one
another, config.py imported by no library, and ml_collections confined to diffusion/factory.py.

Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import collections
import pathlib

from conftest import REPO_ROOT

# Bottom to top: a module may import modules of its own layer and of the layers listed before it, never
# of a layer listed after it. A module belongs to the longest prefix that names it or its package.
LAYERS = {
    # Pure maths and plumbing; `ddpm_jax` itself (the root __init__) sits here and imports nothing.
    'core': ['ddpm_jax', 'ddpm_jax.diffusion', 'ddpm_jax.parallel', 'ddpm_jax.streams'],
    # images.py writes PNGs through workdir.atomic_write, so it is a library, not core.
    'libraries': ['ddpm_jax.data', 'ddpm_jax.models', 'ddpm_jax.sampling', 'ddpm_jax.evaluation',
                  'ddpm_jax.train', 'ddpm_jax.checkpoints', 'ddpm_jax.workdir', 'ddpm_jax.images',
                  'ddpm_jax.config', 'ddpm_jax.runtime'],
    'jobs': ['ddpm_jax.jobs'],
    # Command lines: `python main.py`, `python -m ddpm_jax.convert_tf_checkpoint` (and _torch_).
    'entry': ['main', 'ddpm_jax.convert_tf_checkpoint', 'ddpm_jax.convert_torch_checkpoint'],
}
JOBS_PACKAGE = 'ddpm_jax.jobs'  # its __init__ is the dispatch table: it alone may import the job modules
CONFIG_MODULE = 'ddpm_jax.config'  # validates the whole tree: it may import libraries, not the reverse
CONFIG_AWARE_DIFFUSION = {'ddpm_jax.diffusion.factory'}  # the one ml_collections user below libraries
# TensorFlow must never see an accelerator, and only the jobs that need it may pay for its import:
# `tensorflow` is imported by the gate (tf_cpu_only, which hides every GPU / TPU first) alone, and a
# module that imports a library importing TF imports the gate as well (to call it first).
TF_GATE, TF_GATE_PACKAGE = 'ddpm_jax.data.tf_cpu', 'ddpm_jax.data'  # the package re-exports tf_cpu_only
TF_TYPE_HINTS_ONLY = {'ddpm_jax.data.tfds_source'}  # `import tensorflow` under TYPE_CHECKING only
TF_IMPORTING_LIBRARIES = {'clu', 'tensorflow_datasets'}

Graph = dict[str, set[str]]


# ------------------------------------------------------------------------------------------- reading


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = path.relative_to(root).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imported_names(tree: ast.AST, name: str, is_package: bool) -> list[list[str]]:
  """For each imported name, the dotted modules it may denote, most specific first (`from a import b`
  is module a.b if that exists, else a name in a)."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [[alias.name] for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: `from . import x` in package p (or a module of p) means p.x
        package = name.split('.') if is_package else name.split('.')[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = '.'.join(package + ([base] if base else []))
      found += [[f'{base}.{alias.name}', base] for alias in node.names]
  return found


def read_package(root: pathlib.Path) -> tuple[Graph, dict[str, set[str]], list[str]]:
  """(first-party import graph, top-level third-party modules imported by each module, unresolved
  first-party imports) of ddpm_jax/ and main.py under `root`."""
  paths = sorted((root / 'ddpm_jax').rglob('*.py')) + [root / 'main.py']
  names = {module_name(p, root): p for p in paths}
  graph: Graph = {}
  external: dict[str, set[str]] = {}
  unresolved = []
  for name, path in names.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    graph[name], external[name] = set(), set()
    for candidates in _imported_names(tree, name, path.name == '__init__.py'):
      top = candidates[-1].split('.')[0]
      if top not in ('ddpm_jax', 'main'):
        external[name].add(top)
        continue
      target = next((c for c in candidates if c in names), None)
      if target is None:
        unresolved.append(f'{name} imports {candidates[0]}, which is not a module here')
      elif target != name:
        graph[name].add(target)
  return graph, external, unresolved


# ------------------------------------------------------------------------------------------- checks


def find_cycles(graph: Graph) -> list[list[str]]:
  """One concrete cycle (a -> b -> ... -> a) per strongly connected component of more than one node
  (Tarjan's algorithm; the graphs here are small enough for recursion)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in sorted(graph.get(node, ())):
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.add(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(component)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return [_cycle_through(graph, min(component), component) for component in components]


def _cycle_through(graph: Graph, start: str, component: set[str]) -> list[str]:
  """The shortest path start -> ... -> start inside `component` (breadth first)."""
  parents = {start: None}
  queue = collections.deque([start])
  while queue:
    node = queue.popleft()
    for succ in sorted(graph[node] & component):
      if succ == start:
        path = [node]  # node, its parent, ..., start
        while parents[path[-1]] is not None:
          path.append(parents[path[-1]])
        return path[::-1] + [start]
      if succ not in parents:
        parents[succ] = node
        queue.append(succ)
  raise AssertionError(f'no cycle through {start} in {sorted(component)}')


def subpackage(module: str) -> str:
  """ddpm_jax.train.step -> ddpm_jax.train; top-level modules (ddpm_jax.checkpoints, main) are their own."""
  return '.'.join(module.split('.')[:2])


def subpackage_graph(graph: Graph) -> Graph:
  units: Graph = collections.defaultdict(set)
  for module, targets in graph.items():
    units[subpackage(module)] |= {subpackage(t) for t in targets} - {subpackage(module)}
  return dict(units)


def layer_of(module: str, layers: dict[str, list[str]]) -> str | None:
  matches = [(len(prefix), layer) for layer, prefixes in layers.items() for prefix in prefixes
             if module == prefix or module.startswith(prefix + '.')]
  return max(matches)[1] if matches else None


def layer_violations(graph: Graph, layers: dict[str, list[str]]) -> list[str]:
  order = list(layers)
  problems = [f'{m} is in no layer of LAYERS' for m in sorted(graph) if layer_of(m, layers) is None]
  for module in sorted(graph):
    for target in sorted(graph[module]):
      low, high = layer_of(module, layers), layer_of(target, layers)
      if low and high and order.index(high) > order.index(low):
        problems.append(f'{module} ({low}) imports {target} ({high})')
  return problems


def job_to_job_imports(graph: Graph) -> list[str]:
  def is_job(m: str) -> bool:
    return m.startswith(JOBS_PACKAGE + '.')
  return [f'{m} imports {t}' for m in sorted(graph) if is_job(m) for t in sorted(graph[m]) if is_job(t)]


def config_imports_by_libraries(graph: Graph, layers: dict[str, list[str]]) -> list[str]:
  return [f'{m} imports {CONFIG_MODULE}' for m in sorted(graph)
          if m != CONFIG_MODULE and layer_of(m, layers) in ('core', 'libraries') and CONFIG_MODULE in graph[m]]


def ml_collections_in_diffusion(external: dict[str, set[str]]) -> list[str]:
  return [m for m in sorted(external) if (m == 'ddpm_jax.diffusion' or m.startswith('ddpm_jax.diffusion.'))
          and m not in CONFIG_AWARE_DIFFUSION and 'ml_collections' in external[m]]


def ungated_tensorflow(graph: Graph, external: dict[str, set[str]]) -> list[str]:
  problems = [f'{m} imports tensorflow' for m in sorted(external)
              if 'tensorflow' in external[m] and m not in {TF_GATE} | TF_TYPE_HINTS_ONLY]
  return problems + [f'{m} imports {", ".join(sorted(external[m] & TF_IMPORTING_LIBRARIES))} without {TF_GATE}'
                     for m in sorted(external) if external[m] & TF_IMPORTING_LIBRARIES
                     and not graph[m] & {TF_GATE, TF_GATE_PACKAGE}]


# ------------------------------------------------------------------------------------------- tests


def _package() -> tuple[Graph, dict[str, set[str]], list[str]]:
  return read_package(pathlib.Path(REPO_ROOT))


def _fmt(cycles: list[list[str]]) -> str:
  return '\n'.join(' -> '.join(cycle) for cycle in cycles)


def test_the_checker_finds_what_it_looks_for(tmp_path):
  """On a synthetic package, so that the checks below cannot pass by finding nothing."""
  files = {
      'main.py': 'from ddpm_jax.jobs import train\n',
      'ddpm_jax/__init__.py': '',
      'ddpm_jax/parallel.py': 'def f():\n  from ddpm_jax.jobs import train  # upward, inside a function\n',
      'ddpm_jax/diffusion/__init__.py': 'from ddpm_jax.diffusion.a import x\n',
      'ddpm_jax/diffusion/a.py': 'import ml_collections\nfrom . import b\n',
      'ddpm_jax/diffusion/b.py': 'from .a import x\n',  # a <-> b
      'ddpm_jax/train/__init__.py': '',
      'ddpm_jax/train/loop.py': 'from ddpm_jax import checkpoints, config\n',
      'ddpm_jax/checkpoints.py': 'from ddpm_jax.train import loop\nfrom ddpm_jax.nowhere import y\n',
      'ddpm_jax/config.py': 'from ddpm_jax.train.loop import LOSSES\n',
      'ddpm_jax/jobs/__init__.py': 'from ddpm_jax.jobs import sample, train\n',
      'ddpm_jax/jobs/sample.py': 'from ddpm_jax import parallel\nimport tensorflow\n',
      'ddpm_jax/data/__init__.py': '',
      'ddpm_jax/data/tf_cpu.py': 'def tf_cpu_only():\n  import tensorflow\n',
      'ddpm_jax/data/tfds.py': 'from ddpm_jax.data.tf_cpu import tf_cpu_only\nimport tensorflow_datasets\n',
      'ddpm_jax/evaluation.py': 'from clu import metric_writers\n',
      'ddpm_jax/jobs/train.py': 'from ddpm_jax.jobs.sample import run\n',
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  graph, external, unresolved = read_package(tmp_path)
  assert graph['ddpm_jax.diffusion.a'] == {'ddpm_jax.diffusion.b'}  # relative imports resolved
  assert graph['ddpm_jax.train.loop'] == {'ddpm_jax.checkpoints', 'ddpm_jax.config'}
  assert unresolved == ['ddpm_jax.checkpoints imports ddpm_jax.nowhere.y, which is not a module here']
  cycles = find_cycles(graph)
  assert ['ddpm_jax.diffusion.a', 'ddpm_jax.diffusion.b', 'ddpm_jax.diffusion.a'] in cycles, cycles
  assert len(cycles) == 3, cycles  # diffusion a <-> b, train.loop <-> checkpoints <-> config
  assert ['ddpm_jax.checkpoints', 'ddpm_jax.train', 'ddpm_jax.checkpoints'] in find_cycles(
      subpackage_graph(graph))
  assert layer_violations(graph, LAYERS) == ['ddpm_jax.parallel (core) imports ddpm_jax.jobs.train (jobs)']
  assert layer_violations({'ddpm_jax.extra': set()}, {'core': ['ddpm_jax.diffusion']}) == [
      'ddpm_jax.extra is in no layer of LAYERS']
  assert job_to_job_imports(graph) == ['ddpm_jax.jobs.train imports ddpm_jax.jobs.sample']
  assert config_imports_by_libraries(graph, LAYERS) == ['ddpm_jax.train.loop imports ddpm_jax.config']
  assert ml_collections_in_diffusion(external) == ['ddpm_jax.diffusion.a']
  assert ungated_tensorflow(graph, external) == [
      'ddpm_jax.jobs.sample imports tensorflow', f'ddpm_jax.evaluation imports clu without {TF_GATE}']
  assert find_cycles({'x': {'y'}, 'y': set()}) == []


def test_the_package_graph_is_read_whole():
  graph, _, unresolved = _package()
  assert len(graph) >= 30, sorted(graph)
  assert 'main' in graph and 'ddpm_jax.diffusion.schedules' in graph
  assert sum(map(len, graph.values())) >= len(graph), 'implausibly few imports'
  assert not unresolved, '\n'.join(unresolved)


def test_no_import_cycle_between_modules():
  cycles = find_cycles(_package()[0])
  assert not cycles, 'import cycles:\n' + _fmt(cycles)


def test_no_import_cycle_between_subpackages():
  cycles = find_cycles(subpackage_graph(_package()[0]))
  assert not cycles, 'import cycles between sub-packages:\n' + _fmt(cycles)


def test_nothing_imports_upward():
  problems = layer_violations(_package()[0], LAYERS)
  assert not problems, 'upward imports (core -> libraries -> jobs -> entry):\n' + '\n'.join(problems)


def test_no_job_imports_another():
  problems = job_to_job_imports(_package()[0])
  assert not problems, '\n'.join(problems)


def test_no_library_imports_config():
  problems = config_imports_by_libraries(_package()[0], LAYERS)
  assert not problems, 'config.py validates the libraries, so they may not import it:\n' + '\n'.join(problems)


def test_ml_collections_only_in_the_diffusion_factory():
  modules = ml_collections_in_diffusion(_package()[1])
  assert not modules, f'ml_collections imported below diffusion/factory.py by {modules}'


def test_tensorflow_only_through_its_gate():
  """The static half of data/tf_cpu.py's rule; tests/test_main.py checks that sampling never imports TF."""
  problems = ungated_tensorflow(*_package()[:2])
  assert not problems, '\n'.join(problems)
