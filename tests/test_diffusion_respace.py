"""Tests of respacing (iDDPM §4): the timesteps kept, and the respaced process's coefficients."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import diffusion
from references import DDPM_BETAS, FIELD_TO_REF, assert_close, ref_tables, small_betas


def test_known_spacings():
  # iDDPM's example: 300 steps in three sections of 100, with 10, 15 and 20 steps each. Its
  # accumulated float stride rounds 7 * 99/14 = 49.4999.. to 49 (so 149, not 150).
  expected = ([0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
              + [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199]
              + [200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268, 273, 278,
                 283, 289, 294, 299])
  np.testing.assert_array_equal(diffusion.space_timesteps(300, [10, 15, 20]), expected)
  np.testing.assert_array_equal(diffusion.space_timesteps(300, '10,15,20'), expected)
  np.testing.assert_array_equal(diffusion.space_timesteps(1000, 'ddim50'), np.arange(0, 1000, 20))
  np.testing.assert_array_equal(diffusion.space_timesteps(4000, 'ddim100'), np.arange(0, 4000, 40))
  np.testing.assert_array_equal(diffusion.space_timesteps(1000, '1000'), np.arange(1000))
  np.testing.assert_array_equal(diffusion.space_timesteps(1000, ''), np.arange(1000))
  np.testing.assert_array_equal(diffusion.space_timesteps(1000, '1'), [0])
  np.testing.assert_array_equal(diffusion.space_timesteps(1000, 'ddim1'), [0])
  steps = diffusion.space_timesteps(1000, '250')
  assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(data=st.data(), num_timesteps=st.integers(1, 4000),
                  num_sections=st.integers(1, 5))
def test_sections_are_evenly_spaced(data, num_timesteps, num_sections):
  """Section i of size n keeps its first and last step and count - 2 steps within half a step of
  the even grid start + k (n - 1) / (count - 1)."""
  hypothesis.assume(num_sections <= num_timesteps)
  sizes = [num_timesteps // num_sections + (i < num_timesteps % num_sections)
           for i in range(num_sections)]
  counts = [data.draw(st.integers(1, size)) for size in sizes]
  steps = diffusion.space_timesteps(num_timesteps, counts)
  assert steps.dtype.kind == 'i' and len(steps) == sum(counts)
  assert np.all(np.diff(steps) > 0) and steps[0] == 0 and steps[-1] < num_timesteps
  offset, start = 0, 0
  for size, count in zip(sizes, counts):
    section = steps[offset:offset + count]
    ideal = start + np.arange(count) * ((size - 1) / (count - 1) if count > 1 else 0)
    assert np.all(np.abs(section - ideal) <= 0.5 + 1e-9)
    assert section[0] == start and (count == 1 or section[-1] == start + size - 1)
    offset, start = offset + count, start + size


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(num_timesteps=st.integers(1, 2000), desired=st.integers(1, 200))
def test_ddim_spacing_is_the_smallest_exact_stride(num_timesteps, desired):
  try:
    steps = diffusion.space_timesteps(num_timesteps, f'ddim{desired}')
  except ValueError:
    assert all(len(range(0, num_timesteps, k)) != desired for k in range(1, num_timesteps + 1))
    return
  stride = steps[1] - steps[0] if len(steps) > 1 else num_timesteps
  np.testing.assert_array_equal(steps, np.arange(0, num_timesteps, stride))
  assert len(steps) == desired
  assert all(len(range(0, num_timesteps, k)) != desired for k in range(1, stride))


@pytest.mark.parametrize('spec,match', [
    ('abc', 'section_counts'), ('10,x', 'section_counts'), ('0', 'ints >= 1'), ('-5', 'ints >= 1'),
    ([0], 'ints >= 1'), ([], 'non-empty'), ('ddim', 'ddimN'), ('ddimx', 'ddimN'),
    ('ddim0', 'ddimN'),
    ('11', 'cannot take 11 steps out of a section of 10'), ('ddim7', 'exactly 7 steps'),
])
def test_bad_spacings(spec, match):
  with pytest.raises(ValueError, match=match):
    diffusion.space_timesteps(10, spec)


def test_bad_num_timesteps_for_spacing():
  with pytest.raises(ValueError, match='num_timesteps'):
    diffusion.space_timesteps(0, '1')


@pytest.mark.parametrize('betas', [DDPM_BETAS, small_betas(),
                                   diffusion.get_beta_schedule('cosine', num_timesteps=4000)],
                         ids=['linear1000', 'T20', 'cosine4000'])
def test_all_steps_reproduce_the_original_exactly(betas, dtype):
  kwargs = dict(mean_type='x0', var_type='learned_range', loss_type='hybrid',
                dtype=getattr(jnp, dtype))
  full = diffusion.make_coefficients(betas, **kwargs)
  respaced = diffusion.respaced_coefficients(betas, np.arange(len(betas)), **kwargs)
  for field in list(FIELD_TO_REF) + ['timestep_map']:
    np.testing.assert_array_equal(getattr(respaced, field), getattr(full, field), field)
  assert (respaced.num_timesteps, respaced.var_type) == (len(betas), 'learned_range')


@pytest.mark.parametrize('spec', ['100', '10,15,20', 'ddim50', '1', '500,1', '1,500'])
def test_respaced_coefficients_match_reference(spec, dtype):
  betas = DDPM_BETAS
  kept = diffusion.space_timesteps(1000, spec)
  coefs = diffusion.respaced_coefficients(betas, kept, dtype=getattr(jnp, dtype))
  full = ref_tables(betas)
  abar = full['abar']
  # iDDPM §4: beta_{S_i} = 1 - abar_{S_i} / abar_{S_{i-1}} = (abar_{S_{i-1}} - abar_{S_i}) /
  # abar_{S_{i-1}}, the difference summed as beta_k abar_{k-1} over the gap (no cancellation).
  increments = (betas * full['abar_prev'])[:kept[-1] + 1]
  gap_sums = np.add.reduceat(increments, np.concatenate([[0], kept[:-1] + 1]))
  new_betas = gap_sums / np.concatenate([[1.0], abar[kept][:-1]])
  ref = ref_tables(new_betas)
  assert coefs.num_timesteps == len(kept)
  np.testing.assert_array_equal(coefs.timestep_map, kept)
  for field, expected in FIELD_TO_REF.items():
    assert_close(getattr(coefs, field), expected(ref), dtype,
                 rtol=1e-6 if dtype == 'float32' else 1e-11)
  # The respaced process has the original abar at every kept step.
  assert_close(coefs.alphas_cumprod, abar[kept], dtype, rtol=1e-6 if dtype == 'float32' else 1e-13)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(num_timesteps=st.integers(1, 300), data=st.data())
def test_respaced_abar_equals_original_at_kept_steps(num_timesteps, data):
  betas = diffusion.get_beta_schedule('cosine', num_timesteps=num_timesteps)
  kept = sorted(data.draw(st.sets(st.integers(0, num_timesteps - 1), min_size=1)))
  coefs = diffusion.respaced_coefficients(betas, set(kept))
  np.testing.assert_allclose(coefs.alphas_cumprod, np.cumprod(1 - betas)[kept], rtol=2e-6)
  np.testing.assert_array_equal(coefs.timestep_map, kept)


@pytest.mark.parametrize('use_timesteps,match', [
    ([], 'non-empty'), ([0, 20], r'\[0, 19\]'), ([-1, 3], r'\[0, 19\]'), ([3, 3], 'distinct'),
    ([0.5, 2], 'ints'),
])
def test_respaced_rejects_bad_timesteps(use_timesteps, match):
  with pytest.raises(ValueError, match=match):
    diffusion.respaced_coefficients(small_betas(), use_timesteps)


def test_respaced_rejects_timestep_map_argument():
  with pytest.raises(ValueError, match='timestep_map'):
    diffusion.respaced_coefficients(small_betas(), [0, 5], timestep_map=np.array([0, 5]))
