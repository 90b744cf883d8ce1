"""Tests for fedjax_fm.compress.sparsify (top-k, random-k, threshold)."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import compress
from fedjax_fm.compress import base as compress_base
from fedjax_fm.compress import sparsify


def _roundtrip(c, tree, key=0):
  state = c.init(tree)
  payload, _ = jax.jit(c.encode)(jax.random.key(key), tree, state)
  return payload, jax.jit(c.decode)(payload)


def np_top_k(x, k):
  """NumPy reference: keep the k largest |x| (distinct magnitudes), zero the rest."""
  flat = x.reshape(-1)
  keep = np.argsort(-np.abs(flat), kind='stable')[:k]
  out = np.zeros_like(flat)
  out[keep] = flat[keep]
  return out.reshape(x.shape)


def _tree():
  rng = np.random.default_rng(0)
  return {'w': rng.normal(size=(40, 30)).astype(np.float32),
          'b': rng.normal(size=(7,)).astype(np.float32)}


class SparsifyVariantsTest(chex.TestCase):
  """Encode/decode against NumPy references, with and without jit.

  Every round trip goes through `compress_base.checked`, so the contract
  (decoded tree and new state shaped like their inputs) is asserted as well.
  """

  def _roundtrip(self, c, tree, key=0):
    c = compress_base.checked(c)

    def roundtrip(key, tree, state):
      payload, _ = c.encode(key, tree, state)
      return payload, c.decode(payload)

    tree = jax.tree.map(jnp.asarray, tree)
    return self.variant(roundtrip)(jax.random.key(key), tree, c.init(tree))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('exact', False), ('approx_max_k', 'approx_max_k'),
                                  ('threshold', 'threshold'))
  def test_top_k_matches_numpy(self, approximate):
    tree = _tree()
    c = compress.top_k(0.1, approximate=approximate, min_size=16)
    payload, out = self._roundtrip(c, tree)
    k = 120   # ceil(0.1 * 1200)
    assert payload['w'].values.shape == (k,) and payload['w'].indices.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(out['w']), np_top_k(tree['w'], k))
    np.testing.assert_array_equal(np.asarray(out['b']), tree['b'])   # below min_size: raw
    assert isinstance(payload['b'], jax.Array)

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_k_seed_and_indices_agree(self):
    rng = np.random.default_rng(2)
    tree = {'w': rng.normal(size=(300,)).astype(np.float32)}
    p_seed, out_seed = self._roundtrip(compress.random_k(0.1), tree, key=5)
    p_idx, out_idx = self._roundtrip(compress.random_k(0.1, send_indices=True), tree, key=5)
    assert isinstance(p_seed['w'], sparsify.SeededSparsePayload)
    assert p_seed['w'].seed.dtype == jnp.uint32 and p_seed['w'].seed.shape == ()
    np.testing.assert_array_equal(np.asarray(out_seed['w']), np.asarray(out_idx['w']))
    assert compress.payload_nbytes(compress.random_k(0.1), tree) == 30 * 4 + 4
    assert compress.payload_nbytes(compress.random_k(0.1, send_indices=True), tree) == 30 * 6
    kept = np.nonzero(np.asarray(out_idx['w']))[0]
    np.testing.assert_array_equal(np.sort(np.asarray(p_idx['w'].indices)), kept)
    np.testing.assert_allclose(np.asarray(out_idx['w'])[kept], tree['w'][kept] * 10,
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_threshold_numpy_reference_and_cap(self):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 20)).astype(np.float32)
    tree = {'w': x}
    payload, out = self._roundtrip(compress.threshold(1.5, max_fraction=0.5), tree)
    np.testing.assert_array_equal(np.asarray(out['w']), np.where(np.abs(x) >= 1.5, x, 0))
    assert payload['w'].values.shape == (500,)
    # Capacity below the count: the first `cap` passing positions are kept.
    _, out = self._roundtrip(compress.threshold(0.5, max_fraction=10), tree)
    flat = x.reshape(-1)
    first = np.nonzero(np.abs(flat) >= 0.5)[0][:10]
    expected = np.zeros_like(flat)
    expected[first] = flat[first]
    np.testing.assert_array_equal(np.asarray(out['w']).reshape(-1), expected)


@pytest.fixture(scope='module')
def tree():
  return _tree()


def test_top_k_count_and_identity_when_k_is_everything(tree):
  for c in (compress.top_k(1.0, min_size=1), compress.top_k(10_000, min_size=1)):
    _, out = _roundtrip(c, tree)
    for name in tree:
      np.testing.assert_array_equal(np.asarray(out[name]), tree[name])
  payload, out = _roundtrip(compress.top_k(5, min_size=1), tree)
  assert payload['w'].values.shape == (5,) and payload['b'].values.shape == (5,)
  np.testing.assert_array_equal(np.asarray(out['w']), np_top_k(tree['w'], 5))


def test_threshold_ties_keep_exactly_k():
  x = {'w': np.array([[3., -3., 3., 1.], [0., -3., 2., 3.]], np.float32)}
  _, out = _roundtrip(compress.top_k(3, approximate='threshold', min_size=1), x)
  out = np.asarray(out['w'])
  assert np.count_nonzero(out) == 3 and set(np.abs(out[out != 0])) == {3.0}


def test_index_dtype_switches_at_65536():
  small = {'w': jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  large = {'w': jax.ShapeDtypeStruct((257, 256), jnp.float32)}
  c = compress.top_k(0.01)
  key = jax.random.key(0)
  assert jax.eval_shape(c.encode, key, small, ())[0]['w'].indices.dtype == jnp.uint16
  assert jax.eval_shape(c.encode, key, large, ())[0]['w'].indices.dtype == jnp.uint32


def test_random_k_unbiased_and_variance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 8)).astype(np.float32)
  n, k, num = 64, 16, 2000
  c = compress.random_k(k, min_size=1)
  tree = {'w': x}

  def one(key):
    payload, _ = c.encode(key, tree, ())
    return c.decode(payload)['w']

  samples = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), num)))
  assert np.all(np.count_nonzero(samples.reshape(num, -1), axis=1) <= k)
  var = (n / k - 1) * x ** 2                       # exact per-element variance
  np.testing.assert_array_less(np.abs(samples.astype(np.float64).mean(0) - x),
                               5 * np.sqrt(var / num) + 1e-6)
  np.testing.assert_allclose(samples.astype(np.float64).var(0).sum(), var.sum(), rtol=0.1)


@pytest.mark.slow
def test_dtype_and_shape_preserved():
  x = jax.random.normal(jax.random.key(0), (4, 8, 16)).astype(jnp.bfloat16)
  for c in (compress.top_k(0.2), compress.random_k(0.2), compress.threshold(1.0)):
    _, out = _roundtrip(c, {'w': x})
    assert out['w'].shape == x.shape and out['w'].dtype == jnp.bfloat16


@pytest.mark.parametrize('factory,kwargs,match', [
    (compress.top_k, dict(fraction_or_k=0.0), 'fraction_or_k'),
    (compress.top_k, dict(fraction_or_k=1.5), 'fraction_or_k'),
    (compress.top_k, dict(fraction_or_k=0), 'fraction_or_k'),
    (compress.top_k, dict(fraction_or_k=0.1, approximate='sort'), 'approximate'),
    (compress.top_k, dict(fraction_or_k=0.1, min_size=0), 'min_size'),
    (compress.top_k, dict(fraction_or_k=0.1, use_kernel='yes'), 'use_kernel'),
    (compress.random_k, dict(fraction_or_k=True), 'fraction_or_k'),
    (compress.threshold, dict(tau=0.0), 'tau'),
    (compress.threshold, dict(tau=1.0, max_fraction=2.0), 'max_fraction'),
])
def test_errors(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)
