"""Tests for fedjax_fm.aggregate.robust."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import aggregate
from fedjax_fm.aggregate import robust


def _stack(rng, num, pad=0):
  """Updates [num + pad, ...]; padding rows hold garbage (NaN, huge)."""
  u = {'a': rng.normal(size=(num, 3, 2)).astype(np.float32),
       'b': rng.normal(size=(num, 5)).astype(np.float32)}
  w = rng.uniform(1, 5, size=num).astype(np.float32)
  if pad:
    u = {'a': np.concatenate([u['a'], np.full((pad, 3, 2), np.nan, np.float32)]),
         'b': np.concatenate([u['b'], np.full((pad, 5), 1e30, np.float32)])}
    w = np.concatenate([w, np.zeros(pad, np.float32)])
  return u, w


def _flat(u):
  return np.concatenate([u['a'].reshape(u['a'].shape[0], -1), u['b']], axis=1)


def _trim_mean_ref(x, beta):
  n = x.shape[0]
  k = int(np.floor(beta * n))
  s = np.sort(x, axis=0)
  return s[k:n - k].mean(axis=0)


@pytest.mark.parametrize('num,pad', [(7, 0), (6, 0), (6, 3), (1, 2)])
@pytest.mark.slow
def test_median_and_trimmed_mean_vs_numpy(num, pad):
  rng = np.random.default_rng(num + pad)
  u, w = _stack(rng, num, pad)
  med = jax.jit(robust.coordinate_median().aggregate)(u, w)[0]
  tm = jax.jit(robust.trimmed_mean(0.2).aggregate)(u, w)[0]
  real = jax.tree.map(lambda x: x[:num], u)
  for name in ('a', 'b'):
    np.testing.assert_allclose(med[name], np.median(real[name], axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(tm[name], _trim_mean_ref(real[name], 0.2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_all_clients_padding_gives_zero():
  u, w = _stack(np.random.default_rng(0), 0, 3)
  for agg in (robust.coordinate_median(), robust.trimmed_mean(0.1),
              robust.krum(1), robust.multi_krum(1, 2),
              robust.geometric_median()):
    out = agg.aggregate(u, w)[0]
    for x in jax.tree.leaves(out):
      np.testing.assert_array_equal(x, 0)


def _attacked(num=10, frac=0.2, seed=0):
  rng = np.random.default_rng(seed)
  honest = rng.normal(size=(num, 20)).astype(np.float32) * 0.1 + 1.0
  n_bad = int(frac * num)
  honest[:n_bad] = rng.normal(size=(n_bad, 20)).astype(np.float32) * 100.0
  return honest, n_bad


@pytest.mark.parametrize('pad', [0, 2])
@pytest.mark.slow
def test_krum_picks_honest_cluster(pad):
  x, n_bad = _attacked()
  num = x.shape[0]
  # Krum with the padding clients placed at the honest centre would be fooled
  # if padding were merely down-weighted: they must be ignored.
  u = {'w': np.concatenate([x, np.ones((pad, 20), np.float32)])}
  w = np.concatenate([np.ones(num), np.zeros(pad)]).astype(np.float32)
  out = jax.jit(robust.krum(n_bad).aggregate)(u, w)[0]['w']
  idx = [i for i in range(num) if np.array_equal(x[i], np.asarray(out))]
  assert len(idx) == 1 and idx[0] >= n_bad
  # Reference Krum in NumPy.
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  scores = [np.sort(np.delete(d[i], i))[:num - n_bad - 2].sum()
            for i in range(num)]
  assert idx[0] == int(np.argmin(scores))
  mk = jax.jit(robust.multi_krum(n_bad, m=5).aggregate)(u, w)[0]['w']
  chosen = np.argsort(scores, kind='stable')[:5]
  assert all(c >= n_bad for c in chosen)
  np.testing.assert_allclose(mk, x[chosen].mean(0), rtol=1e-5)
  mk_default = robust.multi_krum(n_bad).aggregate(u, w)[0]['w']
  np.testing.assert_allclose(mk_default, x[n_bad:].mean(0), rtol=1e-5)


def test_krum_distances_span_the_whole_pytree():
  # Clients 0..3 agree on leaf 'a' but client 3 is far away on leaf 'b'.
  a = np.zeros((4, 2), np.float32)
  b = np.zeros((4, 3), np.float32)
  b[3] = 50.0
  out = robust.krum(0).aggregate({'a': a, 'b': b}, np.ones(4))[0]
  np.testing.assert_array_equal(out['b'], 0.0)


def test_geometric_median_robust_and_symmetric():
  x, n_bad = _attacked(num=20, frac=0.3, seed=1)
  u = {'w': np.concatenate([x, np.full((2, 20), np.nan, np.float32)])}
  w = np.concatenate([np.ones(20), np.zeros(2)]).astype(np.float32)
  gm = jax.jit(robust.geometric_median(num_iters=100).aggregate)(u, w)[0]['w']
  assert np.all(np.isfinite(gm))
  assert np.linalg.norm(gm - 1.0) < 0.5  # honest centre is 1.0
  assert np.linalg.norm(x.mean(0) - 1.0) > 5.0  # the mean is dragged away
  # Symmetric data: the geometric median is the centre (= the mean).
  rng = np.random.default_rng(2)
  half = rng.normal(size=(5, 2, 3)).astype(np.float32)
  centre = np.float32(3.0)
  sym = {'a': np.concatenate([centre + half, centre - half]),
         'b': np.concatenate([half[:, 0], -half[:, 0]])}
  gm = robust.geometric_median().aggregate(sym, np.ones(10, np.float32))[0]
  np.testing.assert_allclose(gm['a'], 3.0, atol=1e-4)
  np.testing.assert_allclose(gm['b'], 0.0, atol=1e-4)


def test_geometric_median_vs_numpy_weiszfeld():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(6, 4)).astype(np.float64)
  w = rng.uniform(1, 3, size=6)
  z = (w[:, None] * x).sum(0) / w.sum()
  for _ in range(500):
    beta = w / np.maximum(np.linalg.norm(x - z, axis=1), 1e-8)
    z = (beta[:, None] * x).sum(0) / beta.sum()
  gm = robust.geometric_median(num_iters=200, eps=1e-8).aggregate(
      {'w': x.astype(np.float32)}, w.astype(np.float32))[0]
  np.testing.assert_allclose(gm['w'], z, atol=1e-4)


def test_norm_bounded_mean_streaming():
  rng = np.random.default_rng(5)
  u, w = _stack(rng, 6, pad=2)
  agg = robust.norm_bounded_mean(2.0)
  acc = agg.zero(jax.tree.map(lambda x: x[0], u))
  for lo, hi in ((0, 3), (3, 8)):  # two chunks, padding in the second
    acc = jax.jit(agg.accumulate)(acc, jax.tree.map(lambda x: x[lo:hi], u),
                                  w[lo:hi])
  mean, info = agg.finalize(acc)
  flat = _flat(jax.tree.map(lambda x: x[:6].astype(np.float64), u))
  norms = np.linalg.norm(flat, axis=1)
  clipped = flat * np.minimum(1, 2.0 / norms)[:, None]
  ref = (w[:6, None] * clipped).sum(0) / w[:6].sum()
  np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[None], mean))[0],
                             ref, rtol=1e-5)
  np.testing.assert_allclose(info['clipped_fraction'], np.mean(norms > 2.0))


def test_finite_mask():
  u = {'a': jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [1.0, 1.0], [0.0, 0.0]]),
       'b': jnp.array([[1.0], [1.0], [jnp.inf], [0.0]]),
       'i': jnp.zeros((4, 2), jnp.int32)}
  np.testing.assert_array_equal(jax.jit(aggregate.finite_mask)(u),
                                [True, False, False, True])


def test_invalid_arguments():
  with pytest.raises(ValueError, match='trim_fraction'):
    robust.trimmed_mean(0.5)
  with pytest.raises(ValueError, match='num_byzantine'):
    robust.krum(-1)
  with pytest.raises(ValueError, match='m must be'):
    robust.multi_krum(1, 0)
  with pytest.raises(ValueError, match='num_iters'):
    robust.geometric_median(num_iters=-1)
  with pytest.raises(ValueError, match='max_norm'):
    robust.norm_bounded_mean(0.0)


class ReduceVariantsTest(chex.TestCase):
  """Aggregators through `aggregate.reduce` against NumPy, with and without jit."""

  def _reduce(self, agg, u, w, params=None):
    return self.variant(lambda u, w, p: aggregate.reduce(agg, u, w, p))(u, w, params)

  @chex.variants(with_jit=True, without_jit=True)
  def test_robust_aggregators_vs_numpy(self):
    num = 6
    u, w = _stack(np.random.default_rng(11), num, pad=2)   # padding: NaN and 1e30
    real = jax.tree.map(lambda x: x[:num], u)
    med, info = self._reduce(robust.coordinate_median(), u, w)
    np.testing.assert_allclose(info['total_weight'], w[:num].sum(), rtol=1e-6)
    tm, _ = self._reduce(robust.trimmed_mean(0.2), u, w)
    for name in ('a', 'b'):
      np.testing.assert_allclose(med[name], np.median(real[name], axis=0), rtol=1e-6)
      np.testing.assert_allclose(tm[name], _trim_mean_ref(real[name], 0.2),
                                 rtol=1e-5, atol=1e-6)
    # Streaming kinds, in one chunk: norm-bounded and plain weighted mean.
    flat = _flat(jax.tree.map(lambda x: x.astype(np.float64), real))
    norms = np.linalg.norm(flat, axis=1)
    clipped = flat * np.minimum(1, 2.0 / norms)[:, None]
    params = jax.tree.map(lambda x: np.zeros(x.shape[1:], np.float32), u)
    nbm, info = self._reduce(robust.norm_bounded_mean(2.0), u, w, params)
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[None], nbm))[0],
                               (w[:num, None] * clipped).sum(0) / w[:num].sum(), rtol=1e-5)
    np.testing.assert_allclose(info['clipped_fraction'], np.mean(norms > 2.0))
    mean, info = self._reduce(aggregate.weighted_mean(), u, w, params)
    np.testing.assert_allclose(_flat(jax.tree.map(lambda x: x[None], mean))[0],
                               (w[:num, None] * flat).sum(0) / w[:num].sum(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info['total_weight'], w[:num].sum(), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_reduce_asserts_shapes(self):
    u, w = _stack(np.random.default_rng(12), 4)
    agg = robust.coordinate_median()
    with self.assertRaisesRegex(AssertionError, 'rank'):
      self._reduce(agg, u, w[None])                             # weights not [C]
    with self.assertRaisesRegex(AssertionError, 'shape prefix'):
      self._reduce(agg, u, w[:3])                               # updates not [C, ...]
    bad_params = {'a': np.zeros((2, 3), np.float32), 'b': np.zeros(5, np.float32)}
    with self.assertRaisesRegex(AssertionError, 'shapes'):
      self._reduce(agg, u, w, bad_params)                       # delta not like params
    # bf16 params and f32 updates: only shapes must agree.
    params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], jnp.bfloat16), u)
    delta, _ = self._reduce(aggregate.weighted_mean(), u, w, params)
    chex.assert_trees_all_equal_shapes(delta, params)
