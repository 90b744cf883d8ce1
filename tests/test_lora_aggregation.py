"""Tests for the LoRA aggregation modes (fedit, ffa, product, stack)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_fm import aggregate
from fedjax_fm import engine
from fedjax_fm import peft
from fedjax_fm.models import tasks
from fedjax_fm.models.mlp import MLPClassifier
from fedjax_fm.peft import lora_aggregation as la

C = 5
WEIGHTS = np.asarray([1.0, 2.0, 0.0, 3.0, 0.5], np.float32)
SHAPES = {  # pair path -> (in, r, out); two pairs share a shape (batched SVD)
    ('layers', 0, 'query'): (6, 2, 5),
    ('layers', 1, 'query'): (6, 2, 5),
    ('layers', 1, 'value'): (7, 3, 4),
}


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _problem(seed=0, nan_client=True, fixed_a=False):
  rng = np.random.default_rng(seed)
  params, updates = {}, {}
  for path, (din, r, dout) in SHAPES.items():
    a = rng.normal(size=(din, r)).astype(np.float32)
    b = rng.normal(size=(r, dout)).astype(np.float32)
    da = rng.normal(size=(C, din, r)).astype(np.float32) * 0.5
    if fixed_a:
      da[:] = 0.0
    db = rng.normal(size=(C, r, dout)).astype(np.float32) * 0.5
    _set(params, path, {'lora_a': a, 'lora_b': b})
    _set(updates, path, {'lora_a': da, 'lora_b': db})
  params['classifier'] = {'kernel': rng.normal(size=(5, 3)).astype(np.float32),
                          'bias': np.zeros(3, np.float32)}
  updates['classifier'] = {
      'kernel': rng.normal(size=(C, 5, 3)).astype(np.float32),
      'bias': rng.normal(size=(C, 3)).astype(np.float32)}
  if nan_client:  # client 2 has weight 0: its content must never matter
    jax.tree.map(lambda u: u.__setitem__(2, np.nan), updates)
  return params, updates


def _np_mean_product(params, updates, path, mask=None):
  p, u = _get(params, path), _get(updates, path)
  w = WEIGHTS / WEIGHTS.sum()
  total = 0.0
  for i in range(C):
    if WEIGHTS[i] <= 0:
      continue
    a_i = p['lora_a'] + u['lora_a'][i]
    if mask is not None:
      a_i = a_i * mask[i]
    total = total + w[i] * (a_i @ (p['lora_b'] + u['lora_b'][i]))
  return total


def _np_mean(x):
  valid = WEIGHTS > 0
  return np.tensordot(WEIGHTS[valid] / WEIGHTS.sum(), x[valid], axes=1)


def _truncate(m, r):
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.slow
def test_fedit_is_streaming_mean_and_aggregation_error_matches_numpy():
  params, updates = _problem(nan_client=False)
  agg = la.lora_aggregator('fedit', error='exact')
  mean, info = _streamed(agg, params)(updates, jnp.asarray(WEIGHTS))
  assert float(info['total_weight']) == pytest.approx(WEIGHTS.sum())
  jax.tree.map(lambda m, u: np.testing.assert_allclose(
      m, _np_mean(u), rtol=1e-5, atol=1e-6), mean, updates)
  want = 0.0
  for path in SHAPES:
    p, u = _get(params, path), _get(updates, path)
    a_bar = p['lora_a'] + _np_mean(u['lora_a'])
    b_bar = p['lora_b'] + _np_mean(u['lora_b'])
    want += np.linalg.norm(_np_mean_product(params, updates, path)
                           - a_bar @ b_bar)
  error = jax.jit(la.aggregation_error)
  got = error(updates, jnp.asarray(WEIGHTS), params)
  assert want > 1.0
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # The same with the FedIT aggregate passed explicitly.
  got2 = error(updates, WEIGHTS, params, aggregate=mean)
  np.testing.assert_allclose(float(got2), want, rtol=1e-4)
  # A NaN client with weight 0 is ignored.
  _, bad = _problem(nan_client=True)
  jax.tree.map(lambda b, u: b.__setitem__(slice(None), np.where(
      np.isnan(b), b, u)), bad, updates)
  got3 = error(bad, WEIGHTS, params)
  np.testing.assert_allclose(float(got3), want, rtol=1e-4)
  # The streamed exact error equals the stacked one.
  np.testing.assert_allclose(float(info['lora_aggregation_error']), want, rtol=1e-4)


def _streamed(agg, params):
  @jax.jit
  def run(updates, weights):
    acc = agg.zero(params)
    # Two chunks, as the chunked strategy would feed them.
    for lo, hi in ((0, 2), (2, C)):
      chunk = jax.tree.map(lambda u: u[lo:hi], updates)
      acc = agg.accumulate(acc, chunk, weights[lo:hi], params)
    return agg.finalize(acc, params)
  return run


@pytest.mark.parametrize('probes', [16, 64])
@pytest.mark.slow
def test_fedit_probe_error_is_within_its_error_bars(probes):
  params, updates = _problem(nan_client=True)
  want = float(la.aggregation_error(updates, jnp.asarray(WEIGHTS), params))
  _, info = _streamed(la.fedit(error='probe', probes=probes), params)(
      updates, jnp.asarray(WEIGHTS))
  got, se = float(info['lora_aggregation_error']), float(info['lora_aggregation_error_se'])
  assert np.isfinite(got) and se > 0
  assert abs(got - want) <= 4 * se + 1e-6, (got, want, se)
  assert se < 0.5 * want   # the bars are informative
  _, none = _streamed(la.fedit(error='none'), params)(updates, jnp.asarray(WEIGHTS))
  assert 'lora_aggregation_error' not in none


def _lora_mlp():
  model = MLPClassifier(4, [6], 3, rngs=nnx.Rngs(0))
  peft.apply_lora(model, rank=2, alpha=4.0,
                  target_modules=('layers.0', 'classifier'), rngs=nnx.Rngs(1))
  return model


@pytest.mark.slow
def test_freeze_lora_a_and_ffa_is_exact():
  model = _lora_mlp()
  split = peft.split_model(model, 'lora')
  ffa_split = peft.freeze_lora_a(split)
  assert 'lora_a' in split.trainable['classifier']          # input untouched
  assert set(ffa_split.trainable['classifier']) == {'lora_b'}
  assert ffa_split.frozen['classifier']['lora_a'].shape == (6, 2)
  x = jnp.ones((2, 4))
  forward = jax.jit(lambda t, f: peft.merge(ffa_split.graphdef, t, f)(x))
  np.testing.assert_array_equal(
      np.asarray(forward(ffa_split.trainable, ffa_split.frozen)),
      np.asarray(forward(split.trainable, split.frozen)))
  with pytest.raises(ValueError, match='freeze_lora_a'):
    la.lora_aggregator('ffa').zero(split.trainable)
  with pytest.raises(ValueError, match='no LoRA pair'):
    peft.freeze_lora_a(ffa_split)
  # Only B moves: averaging B is the exact average of the products.
  rng = np.random.default_rng(0)
  updates = jax.tree.map(
      lambda p: rng.normal(size=(C,) + p.shape).astype(np.float32),
      ffa_split.trainable)
  error = jax.jit(la.aggregation_error)
  err = error(updates, WEIGHTS, ffa_split.trainable, frozen=ffa_split.frozen)
  assert float(err) < 1e-4
  # For contrast, FedIT with trained A is inexact.
  full_updates = jax.tree.map(
      lambda p: rng.normal(size=(C,) + p.shape).astype(np.float32),
      split.trainable)
  assert float(error(full_updates, WEIGHTS, split.trainable)) > 0.1


@pytest.mark.slow
def test_ffa_in_the_round_engine():
  model = _lora_mlp()
  split = peft.freeze_lora_a(peft.split_model(model, 'lora'))
  loss_fn = tasks.make_loss_fn(split.graphdef,
                               tasks.features_classification_task())
  rng = np.random.default_rng(0)
  nc, s, b = 3, 2, 4
  data = {
      'batch': {'x': rng.normal(size=(nc, s, b, 4)).astype(np.float32),
                'label': rng.integers(0, 3, (nc, s, b)).astype(np.int32)},
      'example_mask': np.ones((nc, s, b), bool),
      'step_mask': np.ones((nc, s), bool),
      'weight': np.full(nc, float(s * b), np.float32),
      'client_id': np.arange(nc, dtype=np.int32),
  }
  fed = engine.build_round(
      loss_fn, split.trainable, client_optimizer=optax.sgd(0.5),
      server_optimizer=optax.sgd(1.0), num_clients=nc, strategy='vmap',
      aggregator=la.lora_aggregator('ffa'))
  state = fed.init(split.trainable, jax.random.key(0))
  state, metrics = fed.apply(state, split.frozen, data)
  assert np.isfinite(float(metrics['train_loss']))
  moved = jax.tree.map(lambda n, o: float(jnp.abs(n - o).max()),
                       state.params, split.trainable)
  assert all(v > 0 for v in jax.tree.leaves(moved))
  assert fed.uplink_bytes_per_client == peft.tree_bytes(split.trainable)


@pytest.mark.slow
def test_product_refactorises_the_mean_product():
  params, updates = _problem()
  agg = la.lora_aggregator('product')
  assert agg.is_streaming and agg.base is None
  delta, info = _streamed(agg, params)(updates, jnp.asarray(WEIGHTS))
  tail = sum(np.linalg.norm(_np_mean_product(params, updates, p)
                            - _truncate(_np_mean_product(params, updates, p), r))
             for p, (_, r, _) in SHAPES.items())
  np.testing.assert_allclose(float(info['lora_aggregation_error']), tail, rtol=1e-3)
  new = jax.tree.map(lambda p, d: p + np.asarray(d), params, delta)
  # Non-LoRA leaves: weighted mean, the NaN client ignored.
  np.testing.assert_allclose(delta['classifier']['kernel'],
                             _np_mean(updates['classifier']['kernel']),
                             rtol=1e-5, atol=1e-6)
  for path, (_, r, _) in SHAPES.items():
    node = _get(new, path)
    m = _np_mean_product(params, updates, path)
    assert np.linalg.matrix_rank(m) > r
    np.testing.assert_allclose(node['lora_a'] @ node['lora_b'],
                               _truncate(m, r), rtol=1e-4, atol=1e-4)
    # Balanced factors: A^T A = B B^T = S_r.
    np.testing.assert_allclose(node['lora_a'].T @ node['lora_a'],
                               node['lora_b'] @ node['lora_b'].T, atol=1e-3)


def test_product_is_exact_when_the_mean_has_rank_r():
  params, updates = _problem(fixed_a=True)   # M = A mean(B_i): rank <= r
  w = jnp.asarray(WEIGHTS)
  agg = la.lora_aggregator('product')
  error = jax.jit(la.aggregation_error)
  delta, info = _streamed(agg, params)(updates, w)
  assert float(info['lora_aggregation_error']) < 1e-4
  err = error(updates, w, params, aggregate=delta)
  assert float(err) < 1e-4
  fedit_err = error(updates, w, params)
  assert float(fedit_err) < 1e-4        # A fixed: FedIT is exact too (FFA)
  # With moving A the product mode only loses the truncated tail.
  params, updates = _problem()
  delta, _ = _streamed(agg, params)(updates, w)
  err = error(updates, w, params, aggregate=delta)
  tail = sum(np.linalg.norm(_np_mean_product(params, updates, p)
                            - _truncate(_np_mean_product(params, updates, p),
                                        r))
             for p, (_, r, _) in SHAPES.items())
  np.testing.assert_allclose(float(err), tail, rtol=1e-3)
  assert float(err) < float(error(updates, w, params))


@pytest.mark.slow
def test_no_valid_client_changes_nothing():
  params, updates = _problem()
  zero_w = jnp.zeros(C)
  for agg in (la.product(), la.stack(scaling=2.0), la.fedit(), la.fedit(error='exact')):
    delta, info = _streamed(agg, params)(updates, zero_w)
    assert all(float(jnp.abs(d).max()) == 0 for d in jax.tree.leaves(delta))
    assert all(float(jnp.abs(d).max()) == 0 for d in jax.tree.leaves(info))
  dw = jax.jit(la.stack_products)(updates, zero_w, params)
  assert all(float(jnp.abs(d).max()) == 0 for d in jax.tree.leaves(dw))


def test_stack_products_exact_and_rank_mask():
  params, updates = _problem()
  w = jnp.asarray(WEIGHTS)
  factors = la.stack_factors(updates, w, params)
  node = _get(factors, ('layers', 1, 'value'))
  assert node['lora_a'].shape == (7, C * 3) and node['lora_b'].shape == (
      C * 3, 4)
  dw = jax.jit(la.stack_products)(updates, w, params)
  for path in SHAPES:
    np.testing.assert_allclose(_get(dw, path),
                               _np_mean_product(params, updates, path),
                               rtol=1e-4, atol=1e-4)
  ranks = np.asarray([2, 1, 0, 2, 1])
  mask = la.rank_mask(ranks, 2)
  np.testing.assert_array_equal(mask, [[1, 1], [1, 0], [0, 0], [1, 1],
                                       [1, 0]])
  with pytest.raises(ValueError, match=r'layers\.1\.value needs'):
    la.stack_products(updates, w, params, rank_mask=mask)
  del params['layers'][1]['value'], updates['layers'][1]['value']
  dw = la.stack_products(updates, w, params, rank_mask=mask)
  path = ('layers', 0, 'query')
  np.testing.assert_allclose(
      _get(dw, path),
      _np_mean_product(params, updates, path, mask=np.asarray(mask)),
      rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_stack_merge_equals_mean_of_client_models():
  model = MLPClassifier(4, [], 3, rngs=nnx.Rngs(0))   # linear: y = x W + b
  peft.apply_lora(model, rank=2, alpha=4.0, target_modules=('classifier',),
                  rngs=nnx.Rngs(1))
  split = peft.split_model(model, 'lora')
  rng = np.random.default_rng(0)
  updates = jax.tree.map(
      lambda p: rng.normal(size=(C,) + p.shape).astype(np.float32),
      split.trainable)
  jax.tree.map(lambda u: u.__setitem__(2, np.nan), updates)
  w = jnp.asarray(WEIGHTS)
  x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  want = sum(
      WEIGHTS[i] / WEIGHTS.sum() * np.asarray(peft.merge(
          split.graphdef,
          jax.tree.map(lambda p, u: p + u[i], split.trainable, updates),
          split.frozen)(x))
      for i in range(C) if WEIGHTS[i] > 0)
  agg = la.lora_aggregator('stack', scaling=model.classifier.scaling)
  delta, info = aggregate.reduce(agg, updates, w, split.trainable)
  trainable = jax.tree.map(lambda p, d: p + d, split.trainable, delta)
  np.testing.assert_array_equal(trainable['classifier']['lora_b'], 0.0)
  np.testing.assert_array_equal(trainable['classifier']['lora_a'],
                                split.trainable['classifier']['lora_a'])
  frozen = agg.base.apply(split.frozen, info['base_delta'])
  got = peft.merge(split.graphdef, trainable, frozen)(x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  # The input frozen dict is untouched.
  np.testing.assert_array_equal(
      split.frozen['classifier']['base']['kernel'],
      model.classifier.base.kernel[...])
  with pytest.raises(ValueError, match='no base kernel'):
    la.merge_into_base(split.frozen, {'nope': jnp.zeros((4, 3))})


def test_registry_and_errors():
  with pytest.raises(ValueError, match="'fedit', 'ffa', 'product', 'stack'"):
    la.lora_aggregator('mean')
  with pytest.raises(ValueError, match=r"unknown options \['method'\]"):
    la.lora_aggregator('product', method='qr')
  with pytest.raises(ValueError, match='error must be one of'):
    la.lora_aggregator('fedit', error='approx')
  with pytest.raises(ValueError, match='rank'):
    la.low_rank_factors(jnp.ones((3, 2)), jnp.ones((2, 3)), 0)
  assert la.MODES == ('fedit', 'ffa', 'product', 'stack')


_PROGRAM = r'''
import hashlib, jax, optax
from flax import nnx
from fedjax_fm import engine, peft
from fedjax_fm.models import tasks
from fedjax_fm.models.mlp import MLPClassifier
from fedjax_fm.peft import lora_aggregation as la
model = MLPClassifier(4, [6], 3, rngs=nnx.Rngs(0))
peft.apply_lora(model, rank=2, alpha=4.0, target_modules=('layers.0', 'classifier'),
                rngs=nnx.Rngs(1))
split = peft.split_model(model, 'lora')
loss_fn = tasks.make_loss_fn(split.graphdef, tasks.features_classification_task())
fed = engine.build_round(loss_fn, split.trainable, client_optimizer=optax.sgd(0.5),
                         server_optimizer=optax.sgd(1.0), num_clients=3, strategy='vmap',
                         aggregator=la.fedit())
state = fed.init(split.trainable, jax.random.key(0))
data = {'batch': {'x': jax.ShapeDtypeStruct((3, 2, 4, 4), 'float32'),
                  'label': jax.ShapeDtypeStruct((3, 2, 4), 'int32')},
        'example_mask': jax.ShapeDtypeStruct((3, 2, 4), 'bool'),
        'step_mask': jax.ShapeDtypeStruct((3, 2), 'bool'),
        'weight': jax.ShapeDtypeStruct((3,), 'float32'),
        'client_id': jax.ShapeDtypeStruct((3,), 'int32')}
text = fed.apply.lower(state, split.frozen, data).as_text()
print(hashlib.sha256(text.encode()).hexdigest())
'''


@pytest.mark.slow
def test_probe_round_is_the_same_program_in_every_process():
  """The fedit probes depend on nothing process-specific (e.g. Python's string hash
  seed), so the compiled round is reproducible and the compilation cache hits."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  digests = set()
  for seed in ('1', '2'):
    env = {**os.environ, 'PYTHONHASHSEED': seed, 'JAX_PLATFORMS': 'cpu'}
    out = subprocess.run([sys.executable, '-c', _PROGRAM], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    digests.add(out.stdout.strip().splitlines()[-1])
  assert len(digests) == 1, digests
