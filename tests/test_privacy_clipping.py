"""Tests for fedjax_fm.privacy.clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.privacy import clipping


def _tree(rng, scale=1.0):
  return {'a': jnp.asarray(rng.normal(size=(3, 4)) * scale, jnp.float32),
          'b': {'c': jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32)}}


def _np_flat(tree):
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize('scale', [0.01, 10.0])
def test_clip_flat_matches_numpy(scale):
  rng = np.random.default_rng(0)
  tree = _tree(rng, scale)
  clipped, norm = jax.jit(clipping.clip_flat, static_argnums=1)(tree, 1.5)
  flat = _np_flat(tree).astype(np.float64)
  ref_norm = np.linalg.norm(flat)
  ref = flat * min(1.0, 1.5 / ref_norm)
  np.testing.assert_allclose(norm, ref_norm, rtol=1e-6)
  np.testing.assert_allclose(_np_flat(clipped), ref, rtol=1e-5, atol=1e-7)
  assert np.linalg.norm(_np_flat(clipped)) <= 1.5 * (1 + 1e-6)
  if scale < 1:  # inside the ball: unchanged, bit for bit
    for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(clipped)):
      np.testing.assert_array_equal(x, y)


def test_clip_flat_zero_and_dtype_and_traced_bound():
  tree = {'w': jnp.zeros((4,), jnp.bfloat16)}
  clipped, norm = clipping.clip_flat(tree, 1.0)
  assert clipped['w'].dtype == jnp.bfloat16
  assert float(norm) == 0.0
  np.testing.assert_array_equal(clipped['w'], 0)
  # Traced clip norm (what adaptive clipping passes).
  x = {'w': jnp.array([3.0, 4.0])}
  out, _ = jax.jit(clipping.clip_flat)(x, jnp.float32(2.5))
  np.testing.assert_allclose(out['w'], [1.5, 2.0], rtol=1e-6)


def test_clip_per_layer_total_bound_split():
  rng = np.random.default_rng(1)
  tree = _tree(rng, 10.0)
  clipped, norms = clipping.clip_per_layer(tree, 2.0)
  per_leaf = 2.0 / np.sqrt(2)
  for x, y, n in zip(jax.tree.leaves(tree), jax.tree.leaves(clipped),
                     jax.tree.leaves(norms)):
    x = np.asarray(x, np.float64)
    np.testing.assert_allclose(n, np.linalg.norm(x), rtol=1e-6)
    ref = x * min(1.0, per_leaf / np.linalg.norm(x))
    np.testing.assert_allclose(y, ref, rtol=1e-5)
  assert np.linalg.norm(_np_flat(clipped)) <= 2.0 * (1 + 1e-6)


def test_clip_per_layer_tree_of_bounds():
  tree = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([0.1, 0.0])}
  clipped, norms = clipping.clip_per_layer(tree, {'a': 1.0, 'b': 1.0})
  np.testing.assert_allclose(clipped['a'], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_array_equal(clipped['b'], tree['b'])
  np.testing.assert_allclose(norms['a'], 5.0)
  with pytest.raises(ValueError, match='clip_norms'):
    clipping.clip_per_layer(tree, {'a': 1.0})


def test_invalid_clip_norm():
  with pytest.raises(ValueError, match='clip_norm'):
    clipping.clip_flat({'a': jnp.ones(2)}, 0.0)
  with pytest.raises(ValueError, match='clip_norms'):
    clipping.clip_per_layer({'a': jnp.ones(2)}, -1.0)
