"""The Flax FID InceptionV3: architecture, TF-equivalent ops, and the GraphDef / .npz converters.

No test uses the real weights: the converter, the TF-graph backend and the self-check run on a
synthetic GraphDef in the published format (tests/inception_graph.py), runnable by TensorFlow.
"""

import copy
import os
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import inception_graph
from ddpm_jax.evaluation import inception as inc
from ddpm_jax.evaluation import inception_tf


def _names(prefix, suffixes):
  return {f'{prefix}/{s}' for s in suffixes}


# Conv scopes of the published graph, written out from its node listing (not from the module).
_A = ['conv', 'tower/conv', 'tower/conv_1', 'tower_1/conv', 'tower_1/conv_1', 'tower_1/conv_2',
      'tower_2/conv']
_B = ['conv', 'tower/conv', 'tower/conv_1', 'tower/conv_2']
_C = ['conv', 'tower/conv', 'tower/conv_1', 'tower/conv_2', 'tower_1/conv', 'tower_1/conv_1',
      'tower_1/conv_2', 'tower_1/conv_3', 'tower_1/conv_4', 'tower_2/conv']
_D = ['tower/conv', 'tower/conv_1', 'tower_1/conv', 'tower_1/conv_1', 'tower_1/conv_2',
      'tower_1/conv_3']
_E = ['conv', 'tower/conv', 'tower/mixed/conv', 'tower/mixed/conv_1', 'tower_1/conv',
      'tower_1/conv_1', 'tower_1/mixed/conv', 'tower_1/mixed/conv_1', 'tower_2/conv']
PUBLISHED_CONV_SCOPES = (
    {'conv', 'conv_1', 'conv_2', 'conv_3', 'conv_4'} | _names('mixed', _A) | _names('mixed_1', _A)
    | _names('mixed_2', _A) | _names('mixed_3', _B) | set().union(
        *(_names(f'mixed_{i}', _C) for i in range(4, 8))) | _names('mixed_8', _D)
    | _names('mixed_9', _E) | _names('mixed_10', _E))
PUBLISHED_POOLS = {  # name -> op, the FID graph's max pool in mixed_10 included
    'pool': 'MaxPool', 'pool_1': 'MaxPool', 'mixed_3/pool': 'MaxPool', 'mixed_8/pool': 'MaxPool',
    **{f'{m}/tower_2/pool': 'AvgPool' for m in ('mixed', 'mixed_1', 'mixed_2', 'mixed_4',
                                                'mixed_5', 'mixed_6', 'mixed_7', 'mixed_9')},
    'mixed_10/tower_2/pool': 'MaxPool'}


# ----------------------------------------------------------------------------- architecture

def test_graph_scopes_match_the_published_node_names():
  layers = inc.graph_layers()
  assert {s for s, layer in layers.items() if layer.kind == 'conv'} == PUBLISHED_CONV_SCOPES
  pools = {s: {'max': 'MaxPool', 'avg': 'AvgPool'}[layer.pool_kind]
           for s, layer in layers.items() if layer.kind == 'pool'}
  assert pools == PUBLISHED_POOLS
  names = {inc.tf_const_name(p) for p in inc.variable_shapes()}
  for published in ('mixed_10/tower_1/mixed/conv_1/conv2d_params', 'softmax/weights',
                    'softmax/biases', 'mixed_10/tower_2/conv/batchnorm/moving_variance',
                    'conv/batchnorm/gamma', 'mixed_9/tower/mixed/conv/batchnorm/beta'):
    assert published in names


def test_parameter_count_matches_torchvision_inception_v3():
  # torchvision's inception_v3 has 27,161,264 parameters; without its aux head (3,326,696) and its
  # 1000-way fc (2,049,000) that leaves 21,785,568 in the conv kernels and batch-norm scale/bias.
  shapes = inc.variable_shapes()
  backbone = sum(int(np.prod(s)) for p, s in shapes.items()
                 if p.startswith('params/') and not p.startswith('params/softmax/'))
  assert backbone == 27_161_264 - 3_326_696 - 2_049_000
  assert shapes['params/softmax/kernel'] == (inc.NUM_FEATURES, inc.NUM_LOGITS)
  assert shapes['params/mixed_4/tower/conv_1/conv2d/kernel'] == (1, 7, 128, 128)
  assert shapes['params/mixed_9/tower/mixed/conv_1/conv2d/kernel'] == (3, 1, 384, 384)


@pytest.fixture(scope='module')
def random_fn():
  return inc.make_inception_fn(inc.init_inception_variables(seed=0))


def test_forward_shapes_and_determinism_at_299(random_fn):
  images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  pool, logits = random_fn(images)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.all(np.isfinite(pool)) and np.all(np.asarray(pool) >= 0)  # mean of ReLU outputs
  assert np.std(np.asarray(pool)) > 1e-3  # random He weights keep activations alive
  pool2, logits2 = random_fn(images)
  np.testing.assert_array_equal(pool, pool2)
  np.testing.assert_array_equal(logits, logits2)
  assert not np.allclose(pool[0], pool[1])  # different images, different features


def test_small_grey_input_is_resized_and_tiled(random_fn):
  grey = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
  pool, logits = random_fn(grey)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  pool_rgb, logits_rgb = random_fn(np.tile(grey, (1, 1, 1, 3)))
  np.testing.assert_allclose(pool, pool_rgb, rtol=1e-6)
  np.testing.assert_allclose(logits, logits_rgb, rtol=1e-6, atol=1e-6)


def test_logits_bias_option():
  rng = np.random.default_rng(8)
  params = {'params': {'kernel': rng.normal(size=(2048, 1008)).astype(np.float32),
                       'bias': rng.normal(size=1008).astype(np.float32)}}
  features = rng.uniform(size=(3, 2048)).astype(np.float32)
  without = np.asarray(inc.Logits(include_bias=False).apply(params, features))
  with_bias = np.asarray(inc.Logits(include_bias=True).apply(params, features))
  np.testing.assert_allclose(without, features @ params['params']['kernel'], rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(with_bias - without, np.broadcast_to(params['params']['bias'],
                                                                  (3, 1008)), atol=1e-3)


# ----------------------------------------------------------------------------- ops vs TensorFlow

@pytest.mark.parametrize('height,width', [(32, 32), (8, 8), (7, 5), (299, 299), (400, 350)])
def test_resize_matches_tf1_resize_bilinear(height, width):
  images = np.random.default_rng(2).uniform(0, 255, (2, height, width, 3)).astype(np.float32)
  expected = tf.raw_ops.ResizeBilinear(images=images, size=[299, 299], align_corners=False,
                                       half_pixel_centers=False).numpy()
  np.testing.assert_allclose(np.asarray(inc.resize_bilinear_tf1(images)), expected, atol=2e-3)


def test_preprocess_range_and_bad_shape():
  images = np.array([0, 128, 255], np.uint8).reshape(1, 1, 3, 1)
  x = np.asarray(inc.preprocess(images))
  assert x.shape == (1, 299, 299, 3)
  assert x.min() == -1.0 and np.isclose(x.max(), 127 / 128)
  with pytest.raises(ValueError, match='C = 1'):
    inc.preprocess(np.zeros((1, 8, 8, 2), np.uint8))


@pytest.mark.parametrize('kind,padding,strides', [('avg', 'SAME', 1), ('max', 'SAME', 1),
                                                  ('max', 'VALID', 2)])
def test_pool_matches_tf(kind, padding, strides):
  x = np.random.default_rng(3).normal(size=(2, 9, 9, 4)).astype(np.float32)
  tf_pool = tf.nn.avg_pool2d if kind == 'avg' else tf.nn.max_pool2d
  expected = tf_pool(x, 3, strides, padding).numpy()  # TF's AvgPool ignores the padding
  got = inc.Pool(kind, 3, strides, padding).apply({}, x)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('spec', [inc.ConvSpec(5, (1, 7)), inc.ConvSpec(5, (3, 3), 2, 'VALID')])
def test_conv_bn_matches_tf(spec):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 11, 11, 3)).astype(np.float32)
  kernel = rng.normal(size=(*spec.kernel, 3, 5)).astype(np.float32)
  beta, gamma, mean = (rng.normal(size=5).astype(np.float32) for _ in range(3))
  var = rng.uniform(0.5, 2.0, 5).astype(np.float32)
  conv = tf.nn.conv2d(x, kernel, spec.strides, spec.padding)
  expected = tf.nn.relu(tf.nn.batch_normalization(conv, mean, var, beta, gamma, 1e-3)).numpy()
  variables = {'params': {'conv2d': {'kernel': kernel},
                          'batchnorm': {'scale': gamma, 'bias': beta}},
               'batch_stats': {'batchnorm': {'mean': mean, 'var': var}}}
  got = inc.ConvBN(spec).apply(variables, x)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- converters

def _distinct_random_tree(seed):
  """Every leaf random (stats too), so a leaf read from the wrong node cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  return {p: rng.uniform(0.5, 1.5, s).astype(np.float32) for p, s in inc.variable_shapes().items()}


def _synthetic_graph_def(flat, scale_after_normalization=False):
  """A GraphDef with the published graph's node names, ops and attributes holding `flat`."""
  return inception_graph.build_graph_def(flat, scale_after_normalization)


def _write(graph_def, path):
  with open(path, 'wb') as f:
    f.write(graph_def.SerializeToString())
  return str(path)


@pytest.fixture(scope='module')
def synthetic():
  flat = _distinct_random_tree(seed=5)
  return flat, _synthetic_graph_def(flat)


def _assert_tree_equals(variables, flat, gamma_is_one):
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  got = traverse_util.flatten_dict(variables, sep='/')
  assert set(got) == set(flat)
  for path, value in flat.items():
    expected = np.ones_like(value) if gamma_is_one and path.endswith('batchnorm/scale') else value
    np.testing.assert_array_equal(got[path], expected, err_msg=path)


def test_convert_graph_def_reads_every_node(synthetic, tmp_path):
  flat, graph_def = synthetic
  variables = inc.convert_graph_def(_write(graph_def, tmp_path / 'graph.pb'))
  # scale_after_normalization=False: the op ignores gamma, so must the converted network.
  _assert_tree_equals(variables, flat, gamma_is_one=True)


def test_convert_graph_def_keeps_gamma_when_the_op_scales(tmp_path):
  flat = _distinct_random_tree(seed=6)
  graph_def = _synthetic_graph_def(flat, scale_after_normalization=True)
  _assert_tree_equals(inc.convert_graph_def(_write(graph_def, tmp_path / 'g.pb')), flat, False)


def _set_attr(name, key, value):
  def mutate(graph_def):
    node = next(n for n in graph_def.node if n.name == name)
    if isinstance(value, bool):
      node.attr[key].b = value
    elif isinstance(value, float):
      node.attr[key].f = value
    else:
      node.attr[key].s = value
  return mutate


def _transpose_const(name):
  def mutate(graph_def):
    node = next(n for n in graph_def.node if n.name == name)
    value = tf.make_ndarray(node.attr['value'].tensor)
    node.attr['value'].tensor.CopyFrom(tf.make_tensor_proto(np.swapaxes(value, 0, 1).copy()))
  return mutate


def _rename(name):
  def mutate(graph_def):
    next(n for n in graph_def.node if n.name == name).name = name + '_renamed'
  return mutate


def _set_op(name, op):
  def mutate(graph_def):
    next(n for n in graph_def.node if n.name == name).op = op
  return mutate


@pytest.mark.parametrize('mutate,message', [
    (_transpose_const('mixed_4/tower/conv_1/conv2d_params'),
     r'mixed_4/tower/conv_1/conv2d_params has shape \(7, 1, 128, 128\)'),
    (_rename('mixed_10/tower_1/mixed/conv_1/batchnorm/beta'),
     'no Const node .mixed_10/tower_1/mixed/conv_1/batchnorm/beta'),
    (_set_attr('mixed_3/conv/Conv2D', 'padding', b'SAME'), 'mixed_3/conv padding SAME'),
    (_set_op('mixed_10/tower_2/pool', 'AvgPool'), 'mixed_10/tower_2/pool is a AvgPool'),
    (_set_attr('conv_2/batchnorm', 'variance_epsilon', 1e-5), 'conv_2/batchnorm epsilon'),
    (_set_attr('ResizeBilinear', 'align_corners', True), 'align_corners'),
])
def test_convert_graph_def_rejects_a_different_graph(synthetic, tmp_path, mutate, message):
  _, graph_def = synthetic
  graph_def = copy.deepcopy(graph_def)
  mutate(graph_def)
  path = _write(graph_def, tmp_path / 'bad.pb')
  with pytest.raises(ValueError, match=message) as error:
    inc.convert_graph_def(path)
  assert 'bad.pb' in str(error.value)


def test_npz_round_trip_and_errors(tmp_path):
  variables = inc.init_inception_variables(seed=7)
  path = str(tmp_path / 'inception.npz')
  inc.save_inception_variables(variables, path)
  loaded = inc.load_inception_variables(path)
  np.testing.assert_array_equal(loaded['params']['mixed_9']['tower']['mixed']['conv']['conv2d']
                                ['kernel'],
                                variables['params']['mixed_9']['tower']['mixed']['conv']['conv2d']
                                ['kernel'])
  bad = dict(np.load(path))
  bad['params/softmax/kernel'] = np.zeros((2048, 1000), np.float32)
  np.savez(tmp_path / 'bad.npz', **bad)
  with pytest.raises(ValueError, match=r'bad.npz.*params/softmax/kernel has shape \(2048, 1000\)'):
    inc.load_inception_variables(str(tmp_path / 'bad.npz'))
  with pytest.raises(FileNotFoundError, match='config.eval.inception_weights.*missing.pb'):
    inc.load_inception_variables(str(tmp_path / 'missing.pb'))
  (tmp_path / 'weights.h5').write_bytes(b'')
  with pytest.raises(ValueError, match='unknown extension'):
    inc.load_inception_variables(str(tmp_path / 'weights.h5'))


def test_archive_download_and_conversion_cache(synthetic, tmp_path, monkeypatch):
  flat, graph_def = synthetic
  pb = _write(graph_def, tmp_path / inc.GRAPH_DEF_NAME)
  archive = tmp_path / 'inception-2015-12-05.tgz'
  with tarfile.open(archive, 'w:gz', compresslevel=1) as tar:
    tar.add(pb, arcname=inc.GRAPH_DEF_NAME)
  cache = tmp_path / 'cache'
  # No weights given: "download" the archive (a file:// URL here), extract, convert, cache.
  variables = inc.load_inception_variables(None, str(cache), url=archive.as_uri())
  _assert_tree_equals(variables, flat, gamma_is_one=True)
  cached = sorted(os.listdir(cache))
  assert inc.GRAPH_DEF_NAME in cached and archive.name in cached
  assert sum(name.startswith('inception_fid_') for name in cached) == 1

  def no_conversion(path):
    raise AssertionError(f'converted {path} again')

  monkeypatch.setattr(inc, 'convert_graph_def', no_conversion)
  again = inc.load_inception_variables(None, str(cache), url='http://unreachable.invalid/x.tgz')
  _assert_tree_equals(again, flat, gamma_is_one=True)
  from_archive = inc.load_inception_variables(str(archive), str(cache))  # same .pb -> same cache
  _assert_tree_equals(from_archive, flat, gamma_is_one=True)


def test_truncated_weights_npz_is_named_and_a_damaged_cache_is_converted_again(synthetic, tmp_path):
  """#19 item 6: a truncated converted-weights .npz failed with a raw zipfile error."""
  path = str(tmp_path / 'inception.npz')
  inc.save_inception_variables(inc.init_inception_variables(seed=7), path)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=r'inception\.npz cannot be read.*convert the Inception weights again'):
    inc.load_inception_variables(path)
  # The conversion cache of a .pb: damaged -> set aside (kept) and converted again.
  flat, graph_def = synthetic
  pb = _write(graph_def, tmp_path / inc.GRAPH_DEF_NAME)
  cache = tmp_path / 'cache'
  inc.load_inception_variables(pb, str(cache))
  (cached,) = [name for name in os.listdir(cache) if name.endswith('.npz')]
  (cache / cached).write_bytes(b'PK\x03\x04 truncated')
  _assert_tree_equals(inc.load_inception_variables(pb, str(cache)), flat, gamma_is_one=True)
  assert any(name.startswith(cached + '.damaged-') for name in os.listdir(cache))


def test_failed_download_says_what_to_do(tmp_path):
  with pytest.raises(RuntimeError, match='config.eval.inception_weights'):
    inc.load_inception_variables(None, str(tmp_path), url=(tmp_path / 'nothing.tgz').as_uri())


# ----------------------------------------------------------------------------- TF graph vs the port

@pytest.fixture(scope='module')
def runnable(tmp_path_factory):
  """(graph .pb path, converted variables) of a runnable synthetic graph with O(1) activations."""
  path = inception_graph.write_graph_def(
      inception_graph.build_graph_def(inception_graph.random_flat(seed=11)),
      tmp_path_factory.mktemp('graph') / inc.GRAPH_DEF_NAME)
  return path, inc.convert_graph_def(path)


def test_tf_graph_backend_reads_pool_3_and_logits_for_any_batch(runnable):
  path, _ = runnable
  images = inc.self_check_images()[0][:3]
  graph = inception_tf.TFGraphInception(path)
  pool, logits = graph(images)
  assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
  assert np.std(pool) > 1e-3
  single_pool, single_logits = graph(images[1:2])  # the graph's own reshape allows batch 1 only
  np.testing.assert_allclose(single_pool, pool[1:2], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(single_logits, logits[1:2], rtol=1e-5, atol=1e-5)
  grey_pool, _ = graph(images[:, :, :, :1])
  rgb_pool, _ = graph(np.repeat(images[:, :, :, :1], 3, axis=-1))
  np.testing.assert_array_equal(grey_pool, rgb_pool)
  graph.close()


def test_port_matches_the_graph_on_the_self_check_images(runnable):
  path, variables = runnable
  report = inc.compare_with_graph(variables, path)
  assert report['passed'] and report['num_images'] == 16
  assert report['image_sizes'] == [[32, 32], [256, 256]]
  for name in ('pool_3', 'logits'):
    assert report[name]['max_rel_diff'] < inc.SELF_CHECK_TOLERANCE / 10


# Port errors that keep every shape (and so pass the converter's checks): the self-check must see
# each of them. They are injected through the port's switches, after the conversion.
PORT_FAULTS = {
    'swapped_branches': ('join', lambda branches: jnp.concatenate(
        [branches[1], branches[0], *branches[2:]], axis=-1)),
    'max_pool_where_the_graph_averages': ('E_BLOCK_POOLS', ('max', 'max')),
    'average_pool_counting_padding': ('AVG_POOL_COUNTS_PADDING', True),
    'half_pixel_resize': ('TF1_LEGACY_RESIZE', False),
}


@pytest.mark.parametrize('fault', sorted(PORT_FAULTS))
def test_self_check_catches_a_wrong_port(runnable, tmp_path, monkeypatch, fault):
  path, variables = runnable
  name, value = PORT_FAULTS[fault]
  monkeypatch.setattr(inc, name, value)
  record = tmp_path / 'record.json'
  with pytest.raises(inc.PortMismatchError, match="largest difference.*inception_backend='tf_graph'"):
    inc.check_port(variables, path, str(record))
  assert not record.exists()


def test_checked_variables_are_verified_once_per_file(runnable, tmp_path, monkeypatch):
  path, variables = runnable
  cache = str(tmp_path / 'cache')
  got, provenance = inc.load_checked_variables(path, cache)
  assert provenance['weights_sha256'] == inc.sha256_of(path)
  assert provenance['self_check']['passed']
  records = [f for f in os.listdir(cache) if f.endswith('.selfcheck.json')]
  assert records == [f'inception_fid_{provenance["weights_sha256"][:16]}.selfcheck.json']

  def must_not_run(*args, **kwargs):
    raise AssertionError('self-check run again for a file already checked')

  monkeypatch.setattr(inc, 'compare_with_graph', must_not_run)
  _, again = inc.load_checked_variables(path, cache)
  assert again['self_check'] == provenance['self_check']
  _, skipped = inc.load_checked_variables(path, str(tmp_path / 'other'), self_check=False)
  assert skipped['self_check'] == 'skipped'
  npz = str(tmp_path / 'port.npz')
  inc.save_inception_variables(got, npz)
  with pytest.raises(ValueError, match='inception_self_check=False'):
    inc.load_checked_variables(npz, cache)
  assert inc.load_checked_variables(npz, cache, self_check=False)[1]['self_check'] == 'skipped'
