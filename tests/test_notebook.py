"""notebooks/ddpm_jax_colab.ipynb runs top to bottom (issue #15), so that it cannot rot.

The notebook is executed in a fresh kernel of this environment with its parameters cell switched to
the tiny config, a few steps, small sample counts, no install (`INSTALL = False`: the checkout is
imported) and no network (`NETWORK = False`: the cells that download skip themselves). Any cell error
fails the test. The committed notebook carries no outputs, so that its diffs stay readable.
"""

import os
import sys
import time

import nbformat
import pytest

from conftest import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, 'notebooks', 'ddpm_jax_colab.ipynb')

# Appended to the parameters cell: later assignments win, and the notebook's own defaults stay visible.
TEST_PARAMETERS = """
CONFIG = 'tiny'
NUM_STEPS = 4
OVERRIDES = {'training.log_every': 2, 'training.checkpoint_every': 2}
USE_DRIVE = False
NETWORK = False
INSTALL = False
RUNTIME = 'cpu'
SAMPLER_STEPS = 5
NUM_SAMPLES = 8
BPD_EXAMPLES = 8
"""


def _read() -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(cells) == 1, 'exactly one cell tagged "parameters"'
  return cells[0]


def test_notebook_is_stored_without_outputs():
  nb = _read()
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert cell.outputs == [], f'cell {i} has outputs'
      assert cell.execution_count is None, f'cell {i} has an execution count'


def test_parameters_cell_has_every_switch():
  source = _parameters_cell(_read()).source
  for name in ('CONFIG', 'NUM_STEPS', 'WORKDIR', 'USE_DRIVE', 'NETWORK', 'INSTALL', 'REPO_URL', 'REF'):
    assert f'\n{name} = ' in '\n' + source, name


def test_every_download_is_guarded_by_network():
  for cell in _read().cells:
    if cell.cell_type == 'code' and ('urlretrieve' in cell.source or 'urlopen' in cell.source):
      assert 'if not NETWORK' in cell.source or 'if NETWORK' in cell.source, cell.source[:200]


@pytest.mark.slow
def test_notebook_runs_on_cpu_without_network(tmp_path):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top

  nb = _read()
  cell = _parameters_cell(nb)
  cell.source += '\n' + TEST_PARAMETERS + f'WORKDIR = {str(tmp_path / "run")!r}\n'
  env_before = dict(os.environ)
  # The kernel is this interpreter (ipykernel's own kernel spec), started in the checkout.
  os.environ['PYTHONPATH'] = REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
  os.environ['JAX_PLATFORMS'] = 'cpu'
  try:
    client = NotebookClient(nb, timeout=600, kernel_name='python3', allow_errors=False,
                            resources={'metadata': {'path': REPO_ROOT}})
    start = time.time()
    client.execute()  # raises CellExecutionError on the first failing cell
  finally:
    os.environ.clear()
    os.environ.update(env_before)
  print(f'notebook executed in {time.time() - start:.1f} s with {sys.executable}')
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  # The loss curve, the training grid, the sampler comparison, two strips and the rate-distortion plot.
  assert len(images) >= 6, f'{len(images)} images shown'
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'NETWORK is False: skipping the official checkpoint.' in text
  assert (tmp_path / 'run' / 'eval' / 'rate_distortion.png').exists()


def test_final_summary_says_where_and_what(tmp_path):
  """The lines after 'Final evaluation:' (the README's first command ends with them): one per artefact
  or number, with the direction that is better and the real-data reference."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from ddpm_jax import jobs  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  (tmp_path / 'samples_2000.png').write_bytes(b'')
  results = {'checkpoint_step': 2000,
             'digits_fid': {'frechet_distance': 0.7685016375536833, 'floor_frechet_distance': 0.645666595805082,
                            'classifier_is': 8.132831238362309, 'test_classifier_is': 9.19479199823901,
                            'num_samples': 1000}}
  lines = jobs.final_summary(config, str(tmp_path), results, 2000)
  assert lines == [
      f'Samples: {tmp_path}/samples_2000.png (100 EMA samples after step 2000)',
      'digits Fréchet distance 0.7685 of 1000 samples (lower is better; the real-data floor is 0.6457)',
      'classifier IS 8.13 (higher is better, at most 10; the held-out digits score 9.19)',
      f'All metrics: {tmp_path}/eval/metrics.json',
  ]


def test_main_starts_without_tensorflow_or_backend_noise(tmp_path):
  """The README's first command shows a newcomer no TF C++ start-up lines (oneDNN notice, absl's
  InitializeLog warning) and no JAX TPU probe; --verbosity=1 shows them (not asserted: they depend on
  the machine). A bad config value stops the run right after the set-up (which imports no TF; the
  training run of tests/test_main.py checks the lines stay hidden when training imports it)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, os.path.join(REPO_ROOT, 'main.py'), '--config=configs/tiny.py',
         f'--workdir={tmp_path}', '--config.diffusion.beta_schedule=linaer']
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600, check=False)
  assert proc.returncode != 0 and "diffusion.beta_schedule='linaer'" in proc.stderr, proc.stderr[-3000:]
  for noise in ('oneDNN', 'absl::InitializeLog', "Unable to initialize backend 'tpu'"):
    assert noise not in proc.stderr + proc.stdout, noise
