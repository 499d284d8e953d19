"""--mode=eval: the metrics of config.eval.metrics for one set of weights.

  bpd              NLL bound in bits/dim on config.eval.num_examples of data.eval_split and
                   config.eval.num_train_examples of data.train_split (DDPM Table 2, the
                   train-test gap); per-t terms, prior and x0 MSE as eval/bpd_<split>.json, .csv.
                   A class-conditional model: the bound on -log p(x | y), y the image's label.
  rate_distortion  DDPM §4.3 / Table 4 / Fig. 5 from the same bound terms:
                   eval/rate_distortion.csv and .png.
  fid              FID / IS and precision / recall of config.eval.fid_num_samples samples of the
                   sample directory (the missing ones sampled first, with the weights at hand)
                   against the training set and the test set, with their provenance.
  digits_fid       the digits classifier metrics on those samples (data.dataset = 'digits').

The weights are the latest checkpoint's (EMA when config.sampling.use_ema), or those passed in (the
final evaluation of a training run uses the weights it holds in memory). Results are merged into
<workdir>/eval/metrics.json, saved after every metric; a rerun on the same checkpoint skips the
metrics already there (and reuses the cached bound terms), so a preempted eval continues where it
stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from ddpm_jax import checkpoints, data, diffusion, models, parallel, sampling
from ddpm_jax import workdir as workdir_lib
from ddpm_jax.evaluation import METRIC_NAMES
from ddpm_jax.evaluation import bpd as bpd_lib
from ddpm_jax.evaluation import rate_distortion as rd_lib
from ddpm_jax.sampling.generate import generate_shard
from ddpm_jax.streams import BPD_STREAM, SAMPLE_STREAM, stream_key

# The bound is evaluated with x0_hat clipped to [-1, 1], as the reference evaluation scripts do.
BPD_CLIP_DENOISED = True


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What every metric needs: the config, where to write, and the network's weights."""
  config: ml_collections.ConfigDict
  workdir: str
  eval_dir: str
  mesh: Mesh
  params: Any
  step: int


# --- the bound terms of one split, cached on disk -------------------------------------------------

def split_terms(ctx: EvalContext, split: str, num_examples: int) -> dict[str, Any]:
  """`dataset_bpd` means of the first num_examples images of `split`, cached on disk.

  A class-conditional model's bound is that of p(x | y), each image with its own label from the
  split (`data.load_eval_labels`), as improved-diffusion's image_nll.py with class_cond.
  """
  path = os.path.join(ctx.eval_dir, f'terms_{split}.npz')
  # A damaged cache is recomputed, like a stale one (process 0 sets it aside).
  cached = workdir_lib.read_cached_npz(path, f'bound terms of split {split!r}',
                                       set_aside_damaged=parallel.is_writer())
  if cached is not None and _cache_fits(cached, num_examples, ctx.step):
      logging.info('Reusing the bound terms of split %r from %s.', split, path)
      return _terms_from_npz(cached)
  config = ctx.config
  images = data.load_eval_images(config, split, num_examples)
  coefs = diffusion.coefficients_from_config(config.diffusion)
  bpd_fn = bpd_lib.make_bpd_fn(coefs, models.create_model(config), ctx.mesh,
                               clip_denoised=BPD_CLIP_DENOISED)
  key = stream_key(config, BPD_STREAM)
  labels = (data.load_eval_labels(config, split, num_examples)
            if models.num_classes(config) else None)
  terms = bpd_lib.dataset_bpd(bpd_fn, ctx.params, key, images, config.eval.batch_size, ctx.mesh,
                              labels=labels)
  if parallel.is_writer():
    workdir_lib.savez(path, requested=num_examples, checkpoint_step=ctx.step, **terms)
  return terms


def _cache_fits(cached: dict[str, np.ndarray], num_examples: int, step: int) -> bool:
  keys = {'requested', 'checkpoint_step', 'num_examples', *bpd_lib.SCALAR_TERMS, *bpd_lib.PER_T_TERMS}
  return (keys <= set(cached) and int(cached['requested']) == num_examples
          and int(cached['checkpoint_step']) == step)


def _terms_from_npz(cached: dict[str, np.ndarray]) -> dict[str, Any]:
  terms = {'num_examples': int(cached['num_examples'])}
  terms.update({k: float(cached[k]) for k in bpd_lib.SCALAR_TERMS})
  terms.update({k: np.asarray(cached[k], np.float64) for k in bpd_lib.PER_T_TERMS})
  return terms


def _write_split_report(ctx: EvalContext, split: str, terms: dict[str, Any]) -> None:
  """eval/bpd_<split>.json (everything) and eval/bpd_<split>.csv (one row per paper timestep t)."""
  if not parallel.is_writer():
    return
  base = os.path.join(ctx.eval_dir, f'bpd_{split}')
  workdir_lib.write_json(base + '.json', _jsonable(terms))
  with workdir_lib.atomic_write(base + '.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(('t', 'vb_bpd', 'xstart_mse', 'eps_mse'))
    for i, row in enumerate(zip(terms['vb'], terms['xstart_mse'], terms['mse'])):
      writer.writerow([i + 1] + [f'{v:.8g}' for v in row])


# --- the metrics ----------------------------------------------------------------------------------

def bpd_metric(ctx: EvalContext) -> dict[str, Any]:
  """NLL bound on the eval split and (if config.eval.num_train_examples > 0) the train split."""
  c = ctx.config
  splits = [(c.data.eval_split, c.eval.num_examples)]
  if c.eval.num_train_examples > 0:
    splits.append((c.data.train_split, c.eval.num_train_examples))
  result = {}
  for split, num in splits:
    terms = split_terms(ctx, split, num)
    _write_split_report(ctx, split, terms)
    result.update({f'{split}_bpd': terms['total_bpd'], f'{split}_prior_bpd': terms['prior_bpd'],
                   f'{split}_num_examples': terms['num_examples']})
  if len(splits) == 2:
    (test, _), (train, _) = splits
    result['generalization_gap_bpd'] = result[f'{test}_bpd'] - result[f'{train}_bpd']
  return result


def rate_distortion_metric(ctx: EvalContext) -> dict[str, Any]:
  """DDPM Table 4 / Fig. 5 on the eval split (reusing the bound terms of `bpd`)."""
  c = ctx.config
  terms = split_terms(ctx, c.data.eval_split, c.eval.num_examples)
  curve = rd_lib.rate_distortion_curve(terms['prior_bpd'], terms['vb'], terms['xstart_mse'])
  csv_path = os.path.join(ctx.eval_dir, 'rate_distortion.csv')
  png_path = os.path.join(ctx.eval_dir, 'rate_distortion.png')
  if parallel.is_writer():
    rd_lib.write_csv(curve, csv_path)
    rd_lib.plot(curve, png_path)
  return dict(rd_lib.summary(curve, terms['vb']), csv=csv_path, png=png_path)


def eval_samples(ctx: EvalContext, num_samples: int) -> np.ndarray:
  """uint8 [num_samples, H, W, C] from the sample directory; the missing ones are sampled first with
  the weights at hand (the same shards, keys and settings as --mode=sample, and the same shard
  content: `generate_shard`, with a class-conditional model's labels)."""
  c = ctx.config
  directory = workdir_lib.sample_dir(ctx.workdir, c.eval.sample_dir)
  try:
    return workdir_lib.load_samples(directory, num_samples)
  except ValueError:
    logging.info('Fewer than %d samples in %s: sampling them first (%s sampler, timestep_respacing=%r, '
                 '%d per shard; each shard is logged when written).', num_samples, directory,
                 c.sampling.method, c.sampling.timestep_respacing, c.sampling.samples_per_shard)
  sample_fn = sampling.make_sample_fn(c, models.create_model(c), ctx.mesh)
  key = stream_key(c, SAMPLE_STREAM)
  workdir_lib.fill_sample_shards(
      directory, workdir_lib.sample_meta(c, ctx.step), max(num_samples, c.sampling.num_samples),
      lambda start, stop: generate_shard(sample_fn, ctx.params, key, start, stop,
                                         c.sampling.batch_size, models.num_classes(c)),
      is_writer=parallel.is_writer(), broadcast=parallel.broadcast_from_writer, log=logging.info)
  return workdir_lib.load_samples(directory, num_samples)


def fid_metric(ctx: EvalContext) -> dict[str, Any]:
  """FID / IS (DDPM Table 1) and improved precision / recall (iDDPM, k = 5) of
  config.eval.fid_num_samples samples, against the training set and the test set.

  The Inception is config.eval.inception_backend's ('flax': the port, self-checked against the TF
  graph once per weights file unless config.eval.inception_self_check=False; 'tf_graph': the graph
  itself on the CPU). Each reference (the first fid_num_samples images of data.train_split, as DDPM's
  50k CIFAR10 training images, then of data.eval_split) is computed once and cached in
  eval/fid_reference_<dataset>_<split>_<n>_<backend>_<weights sha256[:12]>.npz. The result's
  'provenance' names, for every number, the backend, the weights' sha256, the number of samples,
  the reference statistics file and the checkpoint step.
  """
  from ddpm_jax.evaluation import fid  # pylint: disable=g-import-not-at-top  (Inception: slow import)
  c = ctx.config
  num = c.eval.fid_num_samples
  samples = eval_samples(ctx, num)
  inception_fn, provenance = fid.make_inception(c.eval.inception_backend, c.eval.inception_weights,
                                                self_check=c.eval.inception_self_check)
  dataset = ''.join(ch if ch.isalnum() else '_' for ch in c.data.dataset)
  tag = f'{c.eval.inception_backend}_{provenance["weights_sha256"][:12]}'
  references = [
      fid.Reference(split, os.path.join(ctx.eval_dir, f'fid_reference_{dataset}_{split}_{num}_{tag}.npz'),
                    lambda split=split: data.load_eval_images(c, split, num))
      for split in dict.fromkeys((c.data.train_split, c.data.eval_split))]
  # The Inception Score's 10 splits (improved-GAN), fewer only when there are fewer samples.
  result = fid.fid_report(samples, references, inception_fn, provenance, c.eval.batch_size,
                          num_splits=min(10, num), k=c.eval.precision_recall_k or None)
  for record in result['provenance']['numbers'].values():
    record['checkpoint_step'] = ctx.step
  return result


def digits_fid_metric(ctx: EvalContext) -> dict[str, Any]:
  """The digits classifier metrics (Fréchet distance, IS, ...) of the samples."""
  from ddpm_jax.evaluation import digits_metric  # pylint: disable=g-import-not-at-top
  samples = eval_samples(ctx, ctx.config.eval.fid_num_samples)
  return digits_metric.digits_metrics(samples, os.path.join(ctx.eval_dir, 'digits_cache'))


METRICS: dict[str, Callable[[EvalContext], dict[str, Any]]] = {
    'bpd': bpd_metric,
    'rate_distortion': rate_distortion_metric,
    'fid': fid_metric,
    'digits_fid': digits_fid_metric,
}
assert tuple(METRICS) == METRIC_NAMES, 'every name config.eval.metrics allows has a runner here'


def _load_metrics(path: str, step: int) -> dict[str, Any]:
  """The saved metrics of this checkpoint step; those of another step are stale and dropped."""
  if not os.path.exists(path):
    return {}
  try:
    saved = workdir_lib.read_json(path)
  except workdir_lib.DamagedFileError as e:
    if parallel.is_writer():
      logging.warning('%s. Moved it to %s; recomputing the metrics.', e, workdir_lib.set_aside(path))
    return {}
  if saved.get('checkpoint_step') != step:
    logging.info('%s belongs to checkpoint step %s, not %d: recomputing.', path,
                 saved.get('checkpoint_step'), step)
    return {}
  return saved


def _jsonable(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (np.ndarray, np.generic)):
    return tree.tolist()
  return tree


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Fails now, not after hours of sampling, on a file config.eval.metrics will need and is missing.

  Raises:
    FileNotFoundError: naming the config field, the path and what to do.
  """
  weights = config.eval.inception_weights
  if 'fid' in config.eval.metrics and weights and not os.path.isfile(weights):
    raise FileNotFoundError(
        f'config.eval.inception_weights={weights!r} does not exist (needed by the fid metric of '
        'config.eval.metrics); point it at classify_image_graph_def.pb, inception-2015-12-05.tgz or '
        'a converted .npz, leave it unset to download the public file, or drop fid from the metrics')


def evaluate(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, *, params: Any = None,
             step: int | None = None) -> dict[str, Any]:
  """Runs config.eval.metrics; returns the merged metrics (also <workdir>/eval/metrics.json).

  params / step: the weights to evaluate and their training step; by default the latest checkpoint's
  (EMA weights when config.sampling.use_ema). The dict maps each metric name to its results, plus
  'checkpoint_step'.
  """
  check_inputs(config)
  if params is None:
    params, step = checkpoints.restore_sampling_params(workdir, config, mesh)
  ctx = EvalContext(config=config, workdir=workdir, eval_dir=workdir_lib.eval_dir(workdir), mesh=mesh,
                    params=params, step=step)
  path = os.path.join(ctx.eval_dir, workdir_lib.METRICS_FILE)
  metrics = _load_metrics(path, step)
  metrics['checkpoint_step'] = step
  for i, name in enumerate(config.eval.metrics, 1):
    if name in metrics:
      logging.info('Metric %r is already in %s: skipped.', name, path)
      continue
    logging.info('Evaluating metric %d/%d: %s (checkpoint step %d) ...', i, len(config.eval.metrics), name,
                 step)
    metrics[name] = _jsonable(METRICS[name](ctx))
    logging.info('%s: %s', name, metrics[name])
    if parallel.is_writer():
      workdir_lib.write_json(path, metrics)
  return metrics
