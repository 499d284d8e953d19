"""Progressive lossy compression: rate-distortion of DDPM §4.3 (Algorithms 3-4, Table 4, Fig. 5).

A receiver that holds x_t has been sent x_T, x_{T-1}, ..., x_t, which costs (with relative entropy
coding) rate(t) = L_T + L_{T-1} + ... + L_t bits; its best guess of the image is x0_hat(x_t), whose
distortion is the RMSE against x_0 on the [0, 255] scale. Everything comes from the data-set means
of `calc_bpd_loop`'s outputs, so no extra network evaluations are needed.
"""

from __future__ import annotations

import csv

import numpy as np

from ddpm_jax import workdir

# [-1, 1] -> [0, 255] scales differences by 127.5.
PIXEL_SCALE = 127.5
CSV_COLUMNS = ('t', 'reverse_steps', 'rate_bpd', 'distortion_rmse')


def rate_distortion_curve(prior_bpd: float, vb: np.ndarray,
                          xstart_mse: np.ndarray) -> dict[str, np.ndarray]:
  """The curve for paper timesteps t = T, T-1, ..., 1, 0.

  Args:
    prior_bpd: mean L_T in bits/dim.
    vb: float [T], mean bound terms by table index (index 0 = L_0, index i = L_i).
    xstart_mse: float [T], by table index i: mean squared error of x0_hat(x_{i+1}) on the
      [-1, 1] scale.
  Returns:
    dict of float64 arrays [T + 1], row r for paper t = T - r:
      't', 'reverse_steps' (T - t), 'rate_bpd' (L_T + sum_{s >= t} L_s, bits/dim; the t = 0 row adds
      the decoder L_0, i.e. the lossless total), 'distortion_rmse' (RMSE of x0_hat(x_t) in [0, 255]
      units; 0 at t = 0, where x_0 itself has been sent).
  """
  vb, xstart_mse = np.asarray(vb, np.float64), np.asarray(xstart_mse, np.float64)
  if vb.ndim != 1 or vb.shape != xstart_mse.shape:
    raise ValueError('rate_distortion_curve: vb and xstart_mse must be [T] arrays of one length, '
                     f'got {vb.shape} and {xstart_mse.shape}')
  num_timesteps = vb.shape[0]
  t = np.arange(num_timesteps, -1, -1)  # T, ..., 0
  # suffix[s] = sum_{i >= s} vb[i]; suffix[T] = 0 (nothing sent beyond the prior at t = T).
  suffix = np.append(np.cumsum(vb[::-1])[::-1], 0.0)
  rate = prior_bpd + suffix[t]
  # x0_hat(x_t) for paper t >= 1 was computed at table index t - 1.
  rmse = np.append(PIXEL_SCALE * np.sqrt(xstart_mse[t[:-1] - 1]), 0.0)
  return {'t': t.astype(np.float64), 'reverse_steps': (num_timesteps - t).astype(np.float64),
          'rate_bpd': rate, 'distortion_rmse': rmse}


def summary(curve: dict[str, np.ndarray], vb: np.ndarray) -> dict[str, float]:
  """DDPM Table 4's numbers: rate and RMSE at t = 1 (before the decoder); L_0 as distortion_bpd."""
  at_t1 = int(np.nonzero(curve['t'] == 1)[0][0])
  return {'rate_bpd': float(curve['rate_bpd'][at_t1]), 'distortion_bpd': float(np.asarray(vb)[0]),
          'rmse': float(curve['distortion_rmse'][at_t1])}


def write_csv(curve: dict[str, np.ndarray], path: str) -> str:
  """One row per timestep with CSV_COLUMNS."""
  with workdir.atomic_write(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for row in zip(*(curve[name] for name in CSV_COLUMNS)):
      writer.writerow([int(row[0]), int(row[1]), f'{row[2]:.6f}', f'{row[3]:.6f}'])
  return path


def plot(curve: dict[str, np.ndarray], path: str) -> str:
  """DDPM Fig. 5: distortion vs rate, and rate and distortion vs the number of reverse steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  steps, rate, rmse = curve['reverse_steps'], curve['rate_bpd'], curve['distortion_rmse']
  panels = ((rate, rmse, 'Rate (bits/dim)', 'Distortion (RMSE)'),
            (steps, rmse, 'Reverse process steps (T - t)', 'Distortion (RMSE)'),
            (steps, rate, 'Reverse process steps (T - t)', 'Rate (bits/dim)'))
  for ax, (x, y, xlabel, ylabel) in zip(axes, panels):
    ax.plot(x, y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  with workdir.atomic_write(path) as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)
  return path
