"""Tests for fedjax_fm.evaluation.federated against plain Python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_fm import models
from fedjax_fm import peft
from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.evaluation import federated

D, K = 5, 3
SIZES = [7, 0, 1, 12, 3, 5, 9]


def _dataset(sizes=SIZES, seed=0):
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  arrays = {'x': rng.normal(size=(n, D)).astype(np.float32),
            'label': rng.integers(0, K, size=n).astype(np.int32)}
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return FederatedDataset(arrays, offsets)


@pytest.fixture(scope='module')
def mlp():
  model = models.MLPClassifier(D, [8], K, rngs=nnx.Rngs(0))
  split = peft.split_model(model, 'full')
  eval_fn = models.make_eval_fn(split.graphdef,
                                models.features_classification_task())
  return split, eval_fn


def _loop_eval(eval_fn, trainables, frozen, ds, limit=None):
  """Reference: each client alone, all its examples in one batch."""
  out = {'loss': [], 'correct': [], 'num_examples': []}
  eval_fn = jax.jit(eval_fn)
  for c in range(ds.num_clients):
    arrays = ds.client_arrays(c)
    n = ds.client_sizes[c] if limit is None else min(ds.client_sizes[c], limit)
    out['num_examples'].append(n)
    if n == 0:
      out['loss'].append(np.nan)
      out['correct'].append(np.nan)
      continue
    batch = {k: v[:n] for k, v in arrays.items()}
    m = jax.device_get(eval_fn(trainables[c], frozen, batch))
    out['loss'].append(float(np.mean(m['loss'])))
    out['correct'].append(float(np.mean(m['correct'])))
  return {k: np.asarray(v) for k, v in out.items()}


def _assert_matches(got, ref):
  np.testing.assert_array_equal(got['num_examples'], ref['num_examples'])
  for name in ('loss', 'correct'):
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got['accuracy'], got['correct'])


@pytest.mark.parametrize('chunk_size, batch_size, max_batches',
                         [(3, 4, None), (100, 5, 2)])
@pytest.mark.slow
def test_per_client_eval_matches_loop(mlp, chunk_size, batch_size, max_batches):
  split, eval_fn = mlp
  ds = _dataset()
  got = federated.per_client_eval(eval_fn, split.trainable, split.frozen, ds,
                                  batch_size=batch_size,
                                  max_batches=max_batches,
                                  chunk_size=chunk_size)
  limit = None if max_batches is None else max_batches * batch_size
  ref = _loop_eval(eval_fn, [split.trainable] * ds.num_clients, split.frozen,
                   ds, limit)
  _assert_matches(got, ref)
  assert np.isnan(got['loss'][1]) and got['num_examples'][1] == 0


def test_per_client_eval_client_axis(mlp):
  split, eval_fn = mlp
  ds = _dataset(seed=1)
  c = ds.num_clients
  noise = jax.random.normal(jax.random.key(3), (c,))
  stacked = jax.tree.map(
      lambda x: x[None] * (1.0 + noise.reshape((c,) + (1,) * x.ndim)),
      split.trainable)
  got = federated.per_client_eval(eval_fn, stacked, split.frozen, ds,
                                  batch_size=4, chunk_size=2, client_axis=True)
  per = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(c)]
  _assert_matches(got, _loop_eval(eval_fn, per, split.frozen, ds))
  with pytest.raises(ValueError, match='leading axis'):
    federated.per_client_eval(eval_fn, split.trainable, split.frozen, ds,
                              batch_size=4, client_axis=True)


def test_per_client_eval_lm_sums_give_token_weighted_perplexity():
  # A fake LM eval_fn: per-example NLL sums and token counts.
  def eval_fn(trainable, frozen, batch):
    del frozen
    return {'nll_sum': batch['x'].sum(-1) ** 2 * trainable['w'],
            'num_tokens': batch['n'].astype(jnp.float32)}

  rng = np.random.default_rng(2)
  sizes = [3, 6, 2]
  n = sum(sizes)
  ds = FederatedDataset({'x': rng.normal(size=(n, 4)).astype(np.float32),
                         'n': rng.integers(1, 9, size=n)},
                        np.concatenate([[0], np.cumsum(sizes)]))
  got = federated.per_client_eval(eval_fn, {'w': jnp.float32(0.5)}, None, ds,
                                  batch_size=4)
  for c in range(3):
    a = ds.client_arrays(c)
    nll = 0.5 * a['x'].sum(-1) ** 2
    np.testing.assert_allclose(got['perplexity'][c],
                               np.exp(nll.sum() / a['n'].sum()), rtol=1e-5)
    np.testing.assert_allclose(got['nll_sum'][c], nll.mean(), rtol=1e-5)


def test_per_client_eval_rejects_non_per_example_metrics():
  def eval_fn(trainable, frozen, batch):
    del trainable, frozen
    return {'bad': batch['x']}   # [B, D], not [B]

  ds = _dataset([2, 3])
  with pytest.raises(ValueError, match='per-example'):
    federated.per_client_eval(eval_fn, {}, None, ds, batch_size=2)
  with pytest.raises(ValueError, match='batch_size'):
    federated.per_client_eval(eval_fn, {}, None, ds, batch_size=0)


def test_client_eval_batches_layout():
  ds = _dataset([3, 0, 5])
  batch, mask = federated.client_eval_batches(ds, [2, 0], 2, 2, pad_clients_to=3)
  assert batch['x'].shape == (3, 2, 2, D) and mask.shape == (3, 2, 2)
  np.testing.assert_array_equal(mask.reshape(3, -1).sum(-1), [4, 3, 0])
  np.testing.assert_array_equal(batch['x'][0].reshape(4, D),
                                ds.client_arrays(2)['x'][:4])
  np.testing.assert_array_equal(batch['x'][1].reshape(4, D)[:3],
                                ds.client_arrays(0)['x'])
  assert not batch['x'][2].any() and not batch['x'][1, 1, 1].any()


# ------------------------------------------------------------ distribution


def test_distribution_matches_numpy():
  rng = np.random.default_rng(4)
  v = rng.uniform(size=13)
  w = rng.integers(1, 20, size=13).astype(float)
  d = federated.distribution(v, w)
  assert d['mean'] == pytest.approx(v.mean())
  assert d['weighted_mean'] == pytest.approx(np.sum(v * w) / w.sum())
  assert d['p10'] == pytest.approx(np.percentile(v, 10))
  assert d['median'] == pytest.approx(np.median(v))
  assert d['worst'] == v.min() and d['best'] == v.max()
  assert d['std'] == pytest.approx(v.std())
  assert d['num_clients'] == 13
  loss = federated.distribution(v, higher_is_better=False)
  assert loss['worst'] == v.max() and loss['best'] == v.min()
  assert loss['weighted_mean'] == pytest.approx(v.mean())


def test_distribution_skips_empty_clients_and_validates():
  d = federated.distribution([0.5, np.nan, 1.0, 0.2], [2, 0, 1, 0])
  assert d['num_clients'] == 2
  assert d['weighted_mean'] == pytest.approx(2 / 3)
  assert d['worst'] == 0.5
  empty = federated.distribution([np.nan])
  assert empty['num_clients'] == 0 and np.isnan(empty['mean'])
  with pytest.raises(ValueError, match='1-D'):
    federated.distribution(np.zeros((2, 2)))
  with pytest.raises(ValueError, match='shape'):
    federated.distribution([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match='non-negative'):
    federated.distribution([1.0, 2.0], [1.0, -1.0])


def test_summarize_directions():
  per_client = {'loss': np.array([1.0, 3.0]), 'accuracy': np.array([0.9, 0.4]),
                'num_examples': np.array([1, 3])}
  s = federated.summarize(per_client)
  assert set(s) == {'loss', 'accuracy'}
  assert s['loss']['worst'] == 3.0 and s['accuracy']['worst'] == 0.4
  assert s['loss']['weighted_mean'] == pytest.approx(2.5)


# ------------------------------------------------------------ split_clients


def test_split_clients():
  sizes = [0, 1, 2, 3, 10, 41]
  ds = _dataset(sizes)
  train, test = federated.split_clients(ds, 0.2, seed=5)
  assert train.num_clients == test.num_clients == ds.num_clients
  np.testing.assert_array_equal(test.client_sizes, [0, 0, 1, 1, 2, 8])
  np.testing.assert_array_equal(train.client_sizes + test.client_sizes, sizes)
  for c in range(ds.num_clients):
    orig = ds.client_arrays(c)['x']
    both = np.concatenate([train.client_arrays(c)['x'],
                           test.client_arrays(c)['x']])
    # The two parts partition the client's examples.
    np.testing.assert_array_equal(np.sort(both, axis=0), np.sort(orig, axis=0))
  # Deterministic in the seed, different across seeds.
  _, again = federated.split_clients(ds, 0.2, seed=5)
  np.testing.assert_array_equal(again.arrays['x'], test.arrays['x'])
  _, other = federated.split_clients(ds, 0.2, seed=6)
  assert not np.array_equal(other.arrays['x'], test.arrays['x'])
  # A large fraction still leaves every client with >= 2 examples some
  # training data.
  tr, te = federated.split_clients(ds, 0.99, seed=0)
  assert np.all(tr.client_sizes[np.asarray(sizes) >= 2] >= 1)


@pytest.mark.parametrize('fraction', [0.0, 1.0, -0.1, 'a', True])
def test_split_clients_rejects_bad_fraction(fraction):
  with pytest.raises(ValueError, match='test_fraction'):
    federated.split_clients(_dataset([2, 3]), fraction, seed=0)
