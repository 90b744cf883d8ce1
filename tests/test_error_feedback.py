"""Tests for fedjax_fm.compress.error_feedback."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import compress
from fedjax_fm.compress import base as compress_base


def _tree():
  rng = np.random.default_rng(0)
  return {'w': rng.normal(size=(16, 8)).astype(np.float32),
          'b': rng.normal(size=(3,)).astype(np.float32)}


@pytest.fixture(scope='module')
def tree():
  return _tree()


class ErrorFeedbackVariantsTest(chex.TestCase):
  """The residual recursion against a by-hand reference, with and without jit.

  Encoding goes through `compress_base.checked`, so the contract (decoded tree
  and new state shaped like their inputs) is asserted as well.
  """

  @chex.variants(with_jit=True, without_jit=True)
  def test_residual_carries_over(self):
    tree = _tree()
    inner = compress.top_k(0.1, min_size=1)
    c = compress_base.checked(compress.error_feedback(inner))
    state = c.init(tree)
    assert isinstance(state, compress.ErrorFeedbackState)
    assert all(np.all(np.asarray(r) == 0) for r in jax.tree.leaves(state.residual))
    encode, decode = self.variant(c.encode), self.variant(c.decode)
    p1, s1 = encode(jax.random.key(0), tree, state)
    d1 = decode(p1)
    for k in tree:
      np.testing.assert_allclose(np.asarray(s1.residual[k]), tree[k] - np.asarray(d1[k]),
                                 atol=1e-6)
    # Round 2: the inner compressor sees x + residual.
    p2, s2 = encode(jax.random.key(1), tree, s1)
    corrected = jax.tree.map(lambda x, e: x + e, tree, s1.residual)
    p_ref, _ = inner.encode(jax.random.key(1), corrected, ())
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p_ref)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(s2, state)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bf16_keeps_dtype_and_f32_residual(self):
    tree = {'w': (jnp.arange(512.0).reshape(32, 16) / 100).astype(jnp.bfloat16)}
    c = compress_base.checked(compress.error_feedback(compress.identity()))
    state = c.init(tree)
    assert state.residual['w'].dtype == jnp.float32
    payload, state = self.variant(c.encode)(jax.random.key(0), tree, state)
    assert self.variant(c.decode)(payload)['w'].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(state.residual['w']), 0.0)   # lossless inner


@pytest.mark.parametrize('name,inner', [
    ('top_k', compress.top_k(0.1, min_size=1)),
    ('sign', compress.sign(min_size=1)),
    ('powersgd', compress.powersgd(1, min_size=1)),
])
def test_running_sums_track_inputs(name, inner):
  del name
  rng = np.random.default_rng(1)
  rounds = 60
  xs = {'w': rng.normal(size=(rounds, 16, 8)).astype(np.float32),
        'b': rng.normal(size=(rounds, 3)).astype(np.float32)}
  c = compress.error_feedback(inner)
  like = jax.tree.map(lambda a: a[0], xs)

  def step(carry, inp):
    state, total = carry
    x, key = inp
    payload, state = c.encode(key, x, state)
    total = jax.tree.map(jnp.add, total, c.decode(payload))
    return (state, total), jax.tree.map(jnp.linalg.norm, state.residual)

  keys = jax.random.split(jax.random.key(0), rounds)
  zeros = jax.tree.map(jnp.zeros_like, like)
  (state, decoded_sum), norms = jax.jit(
      lambda xs, keys: jax.lax.scan(step, (c.init(like), zeros), (xs, keys)))(xs, keys)
  input_sum = jax.tree.map(lambda a: a.sum(0), xs)
  for k in xs:
    # sum(inputs) - sum(decoded) is exactly the current residual...
    np.testing.assert_allclose(np.asarray(input_sum[k] - decoded_sum[k]),
                               np.asarray(state.residual[k]), atol=1e-3)
  # ...and the residual stays bounded: no growth with the number of rounds
  # (sqrt growth would give a ratio of about 1.4 below, linear growth 2).
  w_norms = np.asarray(norms['w'])
  max_input = np.linalg.norm(xs['w'].reshape(rounds, -1), axis=1).max()
  assert w_norms.max() <= 20 * max_input
  assert w_norms[rounds // 2:].mean() <= 1.3 * w_norms[rounds // 4:rounds // 2].mean()


def test_payload_bytes_are_the_inner_ones(tree):
  inner = compress.sign(min_size=1)
  assert (compress.payload_nbytes(compress.error_feedback(inner), tree)
          == compress.payload_nbytes(inner, tree))


def test_errors():
  with pytest.raises(ValueError, match='inner must be a Compressor'):
    compress.error_feedback('top_k')
