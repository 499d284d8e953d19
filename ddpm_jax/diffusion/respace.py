"""Sampling with fewer steps: a subsequence S of the T timesteps (iDDPM §4), in numpy on the betas.

The respaced process keeps abar at the kept steps, beta_{S_i} = 1 - abar_{S_i} / abar_{S_{i-1}}, and
remembers the original index of each step in `timestep_map`, which is what the network is shown.
`coefficients.respaced_coefficients` builds the tables from this module's output.
"""

from collections.abc import Sequence

import numpy as np

from ddpm_jax.diffusion._checks import _check_betas, _check_positive_int
from ddpm_jax.diffusion.schedules import one_minus_alphas_cumprod


def _ddim_stride_steps(num_timesteps: int, desired: int) -> np.ndarray:
  """range(0, T, k) for the smallest integer stride k that gives exactly `desired` steps."""
  for stride in range(1, num_timesteps + 1):
    steps = np.arange(0, num_timesteps, stride)
    if len(steps) == desired:
      return steps
  raise ValueError(f'cannot take exactly {desired} steps out of num_timesteps={num_timesteps} with '
                   'an integer stride (ddimN).')


def _parse_section_counts(section_counts: str | Sequence[int]) -> list[int]:
  if isinstance(section_counts, str):
    try:
      counts = [int(part) for part in section_counts.split(',')]
    except ValueError as e:
      raise ValueError(f"section_counts={section_counts!r} must be '', 'N', 'N1,N2,...' or "
                       "'ddimN' with integers N.") from e
  else:
    counts = list(section_counts)
  if not counts or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
                       for c in counts):
    raise ValueError(f'section_counts={section_counts!r} must be a non-empty list of ints >= 1.')
  return [int(c) for c in counts]


def _section_steps(start: int, size: int, count: int) -> list[int]:
  """`count` indices spread evenly over [start, start + size), both ends included when count > 1."""
  if size < count:
    raise ValueError(f'cannot take {count} steps out of a section of {size} steps.')
  stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
  # Accumulated (not multiplied) and rounded half-to-even, as iDDPM does, so S matches its sections.
  steps, position = [], 0.0
  for _ in range(count):
    steps.append(start + round(position))
    position += stride
  return steps


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> np.ndarray:
  """The timesteps to keep when sampling with fewer steps (iDDPM §4).

  The T steps are cut into len(section_counts) equal sections (the first T % n one step longer) and
  section i keeps section_counts[i] evenly spaced steps, its first and last included.

  Args:
    num_timesteps: T of the original process.
    section_counts: a list of counts, or a string: '250' (one section: 250 steps), '10,15,20' (three
      sections) or 'ddim50' (range(0, T, k) with the smallest integer stride k giving exactly 50
      steps, as DDIM does); '' keeps all T steps.
  Returns:
    sorted int64 array of the kept 0-based indices, without duplicates.
  Raises:
    ValueError: for an unparsable spec, a count < 1, or a section with fewer steps than asked for.
  """
  _check_positive_int('num_timesteps', num_timesteps)
  if isinstance(section_counts, str) and section_counts.startswith('ddim'):
    desired = section_counts[len('ddim'):]
    if not desired.isdigit() or int(desired) < 1:
      raise ValueError(f"section_counts={section_counts!r}: 'ddimN' needs an integer N >= 1.")
    return _ddim_stride_steps(num_timesteps, int(desired))
  if isinstance(section_counts, str) and not section_counts:
    return np.arange(num_timesteps)
  counts = _parse_section_counts(section_counts)
  size, extra = divmod(num_timesteps, len(counts))
  steps, start = [], 0
  for i, count in enumerate(counts):
    section = size + (1 if i < extra else 0)
    steps += _section_steps(start, section, count)
    start += section
  return np.unique(np.asarray(steps, dtype=np.int64))


def _check_use_timesteps(use_timesteps, num_timesteps: int) -> np.ndarray:
  steps = np.asarray(sorted(use_timesteps))
  if steps.ndim != 1 or steps.size == 0 or not np.issubdtype(steps.dtype, np.integer):
    raise ValueError(f'use_timesteps must be a non-empty collection of ints, got '
                     f'{use_timesteps!r}.')
  if steps[0] < 0 or steps[-1] >= num_timesteps or np.any(np.diff(steps) == 0):
    raise ValueError(f'use_timesteps must be distinct indices in [0, {num_timesteps - 1}], got '
                     f'values in [{steps[0]}, {steps[-1]}] ({steps.size} of them).')
  return steps


def _respaced_betas(betas: np.ndarray, steps: np.ndarray) -> np.ndarray:
  """beta_{S_i} = 1 - abar_{S_i} / abar_{S_{i-1}} = 1 - prod_{S_{i-1} < k <= S_i} (1 - beta_k).

  Computed per gap without cancellation (`one_minus_alphas_cumprod`); a one-step gap returns its
  beta bit for bit, so keeping every step reproduces the original schedule exactly.
  """
  starts = np.concatenate([[0], steps[:-1] + 1])
  return np.array([one_minus_alphas_cumprod(betas[start:stop + 1])[-1]
                   for start, stop in zip(starts, steps)], dtype=np.float64)


def respace_betas(betas: np.ndarray,
                  use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The schedule of the process restricted to the steps S = use_timesteps (iDDPM §4).

  beta_{S_i} = 1 - abar_{S_i} / abar_{S_{i-1}} (abar before the first step is 1), so abar of the new
  process equals the original abar at every kept step.

  Args:
    betas: the original float [T] schedule, in (0, 1].
    use_timesteps: the 0-based indices to keep (e.g. from `space_timesteps`), any order.
  Returns:
    (betas float64 [K], timestep_map int [K]): the respaced schedule and S sorted, the original
    timestep the network must see at each of the K new indices.
  Raises:
    ValueError: for bad betas, or use_timesteps that are not distinct indices in [0, T).
  """
  betas = _check_betas(betas)
  steps = _check_use_timesteps(use_timesteps, betas.shape[0])
  return _respaced_betas(betas, steps), steps
