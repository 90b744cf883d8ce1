"""Tests for fedjax_fm.compress.lowrank (truncated SVD, PowerSGD)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import compress
from fedjax_fm.compress import base as compress_base


def np_truncated_svd(m, r):
  """NumPy reference: best rank-r approximation."""
  u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r]


def np_powersgd_step(m, q):
  """NumPy reference of one PowerSGD step: returns (P Q^T, new Q)."""
  p, _ = np.linalg.qr(m @ q)
  q = m.T @ p
  return p @ q.T, q


def _tree():
  rng = np.random.default_rng(0)
  return {'w': rng.normal(size=(24, 16)).astype(np.float32),
          'conv': rng.normal(size=(4, 6, 16)).astype(np.float32),
          'b': rng.normal(size=(16,)).astype(np.float32)}


@pytest.fixture(scope='module')
def tree():
  return _tree()


class LowRankVariantsTest(chex.TestCase):
  """Encode/decode against NumPy references, with and without jit.

  Every round trip goes through `compress_base.checked`, so the contract
  (decoded tree and new state shaped like their inputs) is asserted as well.
  """

  def _roundtrip(self, c, tree, state=None, key=0):
    c = compress_base.checked(c)

    def roundtrip(key, tree, state):
      payload, state = c.encode(key, tree, state)
      return payload, c.decode(payload), state

    tree = jax.tree.map(jnp.asarray, tree)
    state = c.init(tree) if state is None else state
    return self.variant(roundtrip)(jax.random.key(key), tree, state)

  @chex.variants(with_jit=True, without_jit=True)
  def test_svd_full_rank_reconstructs(self):
    tree = _tree()
    payload, out, _ = self._roundtrip(compress.svd(16, min_size=1), tree)
    for name in ('w', 'conv'):
      assert out[name].shape == tree[name].shape
      np.testing.assert_allclose(np.asarray(out[name]), tree[name], atol=1e-5)
    assert payload['w'].left.shape == (24, 16) and payload['conv'].right.shape == (16, 16)
    assert payload['b'] is not None and not hasattr(payload['b'], 'left')   # 1-D: raw

  @chex.variants(with_jit=True, without_jit=True)
  def test_svd_truncated_matches_numpy(self):
    tree = _tree()
    payload, out, _ = self._roundtrip(compress.svd(3, min_size=1), tree)
    assert payload['w'].left.shape == (24, 3) and payload['w'].right.shape == (16, 3)
    np.testing.assert_allclose(np.asarray(out['w']), np_truncated_svd(tree['w'], 3),
                               atol=1e-4)
    conv = tree['conv'].reshape(24, 16)
    np.testing.assert_allclose(np.asarray(out['conv']).reshape(24, 16),
                               np_truncated_svd(conv, 3), atol=1e-4)
    assert compress.payload_nbytes(compress.svd(3, min_size=1), tree) == 2 * 4 * 3 * 40 + 64

  @chex.variants(with_jit=True, without_jit=True)
  def test_powersgd_step_matches_numpy(self):
    tree = _tree()
    c = compress.powersgd(2, min_size=1)
    state = c.init(tree)
    assert state['w'].shape == (16, 2) and state['b'] == ()
    payload, out, new_state = self._roundtrip(c, tree, state)
    ref, q = np_powersgd_step(tree['w'].astype(np.float64),
                              np.asarray(state['w'], np.float64))
    np.testing.assert_allclose(np.asarray(out['w']), ref, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.asarray(new_state['w'])), np.abs(q), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out['b']), tree['b'])
    assert payload['w'].left.shape == (24, 2) and payload['w'].right.shape == (16, 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_powersgd_exact_for_low_rank_and_safe_on_zero_state(self):
    rng = np.random.default_rng(1)
    m = (rng.normal(size=(20, 2)) @ rng.normal(size=(2, 12))).astype(np.float32)
    tree = {'w': m}
    c = compress.powersgd(2, min_size=1)
    _, out, _ = self._roundtrip(c, tree)
    np.testing.assert_allclose(np.asarray(out['w']), m, atol=1e-4)
    # A zero state (a padding client's store row) stays finite.
    zero = jax.tree.map(jnp.zeros_like, c.init(tree))
    _, out, state = self._roundtrip(c, tree, zero)
    assert np.all(np.isfinite(np.asarray(out['w']))) and np.all(np.isfinite(state['w']))

  @chex.variants(with_jit=True, without_jit=True)
  def test_rank_clipped_and_dtype(self):
    x = {'w': jnp.ones((4, 300), jnp.bfloat16)}
    for c in (compress.svd(8), compress.powersgd(8)):
      payload, out, _ = self._roundtrip(c, x)
      assert payload['w'].left.shape == (4, 4) and out['w'].dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(out['w'], np.float32), 1.0, atol=1e-2)


def test_powersgd_warm_start_converges_to_svd(tree):
  c = compress.powersgd(3, min_size=1)
  state = c.init(tree)
  encode, decode = jax.jit(c.encode), jax.jit(c.decode)
  for step in range(30):
    payload, state = encode(jax.random.key(step), tree, state)
  best = np.linalg.norm(tree['w'] - np_truncated_svd(tree['w'], 3))
  err = np.linalg.norm(tree['w'] - np.asarray(decode(payload)['w']))
  assert err <= best * 1.01 + 1e-5


@pytest.mark.parametrize('factory,kwargs,match', [
    (compress.svd, dict(rank=0), 'rank'),
    (compress.powersgd, dict(rank=2, num_iters=0), 'num_iters'),
    (compress.powersgd, dict(rank=2, seed=1.5), 'seed'),
])
def test_errors(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)
