"""Tests for fedjax_fm.prune (global magnitude pruning)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import prune


@pytest.fixture(scope='module')
def params():
  rng = np.random.default_rng(0)
  return {'dense': {'kernel': rng.normal(size=(32, 16)).astype(np.float32),
                    'bias': rng.normal(size=(16,)).astype(np.float32)},
          'proj': rng.normal(size=(24, 24)).astype(np.float32) * 0.5,
          'norm': rng.normal(size=(64,)).astype(np.float32),
          'tiny': rng.normal(size=(4, 4)).astype(np.float32)}


def np_global_masks(params, sparsity, min_size):
  """NumPy reference: one threshold over the eligible leaves (ndim >= 2, size >= min_size)."""
  leaves = jax.tree.leaves(params)
  eligible = [x.ndim >= 2 and x.size >= min_size for x in leaves]
  mags = np.concatenate([np.abs(x).ravel() for x, e in zip(leaves, eligible) if e])
  num = int(np.floor(sparsity * mags.size))
  thresh = np.sort(mags)[num - 1] if num else -np.inf
  masks = [np.abs(x) > thresh if e else np.ones(x.shape, bool) for x, e in zip(leaves, eligible)]
  return jax.tree.unflatten(jax.tree.structure(params), masks)


@pytest.mark.parametrize('sparsity', [0.0, 0.3, 0.9])
def test_global_masks_match_numpy_and_target(params, sparsity):
  masks = jax.jit(prune.global_magnitude_masks, static_argnames='min_size')(
      params, sparsity, min_size=64)
  ref = np_global_masks(params, sparsity, 64)
  for m, r, p in zip(jax.tree.leaves(masks), jax.tree.leaves(ref), jax.tree.leaves(params)):
    assert m.shape == p.shape and m.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(m), r)
  eligible = 32 * 16 + 24 * 24
  pruned = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(masks))
  assert pruned == int(np.floor(sparsity * eligible))
  assert abs(float(prune.sparsity_of(masks, params, min_size=64)) - sparsity) <= 1 / eligible
  # Small leaves (biases, norms, the 4x4) are never pruned.
  for m in (masks['dense']['bias'], masks['norm'], masks['tiny']):
    assert bool(np.all(np.asarray(m)))


@pytest.mark.slow
def test_pruned_weights_stay_zero_under_masked_updates(params):
  masks = prune.global_magnitude_masks(params, 0.5, min_size=64)
  p = prune.apply_masks(params, masks)
  rng = np.random.default_rng(1)
  for _ in range(3):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    p = jax.tree.map(lambda w, g: w - 0.1 * g, p, prune.mask_updates(grads, masks))
  for w, m in zip(jax.tree.leaves(p), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(np.asarray(w)[~np.asarray(m)], 0.0)


def test_traced_sparsity(params):
  schedule = prune.polynomial_schedule(0.0, 0.8, 0, 10)
  fn = jax.jit(lambda p, r: prune.global_magnitude_masks(p, schedule(r), min_size=64))
  for r in (0, 5, 10):
    masks = fn(params, r)
    eligible = 32 * 16 + 24 * 24
    pruned = sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(masks))
    assert pruned == int(np.floor(np.float32(schedule(r)) * eligible))


def test_polynomial_schedule_formula():
  s = prune.polynomial_schedule(0.1, 0.9, begin_round=10, end_round=30, power=3)
  expected = lambda t: 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 20) ** 3
  np.testing.assert_allclose(float(s(0)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(s(20)), expected(20), rtol=1e-6)
  np.testing.assert_allclose(float(s(25)), expected(25), rtol=1e-6)
  np.testing.assert_allclose(float(s(30)), 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(s(100)), 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(s)(jnp.int32(20))), expected(20), rtol=1e-6)
  with pytest.raises(ValueError, match='begin_round < end_round'):
    prune.polynomial_schedule(0.0, 0.5, 10, 10)
  with pytest.raises(ValueError, match='final must be in'):
    prune.polynomial_schedule(0.0, 1.0, 0, 10)


@pytest.mark.slow
def test_prune_and_regrow_keeps_count(params):
  masks = prune.global_magnitude_masks(params, 0.6, min_size=64)
  p = prune.apply_masks(params, masks)
  rng = np.random.default_rng(2)
  scores = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
  new_p, new_masks = jax.jit(prune.prune_and_regrow, static_argnums=3)(p, masks, scores, 0.25)
  for name in ('proj',):
    m, nm = np.asarray(masks[name]), np.asarray(new_masks[name])
    assert nm.sum() == m.sum()                                   # sparsity kept
    n = int(np.floor(0.25 * m.sum()))
    dropped, grown = m & ~nm, nm & ~m
    assert dropped.sum() == grown.sum() == n
    w, sc = np.abs(p[name]), np.abs(scores[name])
    # Dropped: the n smallest active magnitudes; grown: the n largest inactive scores.
    assert w[dropped].max() <= w[m & nm].min()
    assert sc[grown].min() >= sc[~m & ~nm].max()
    np.testing.assert_array_equal(np.asarray(new_p[name])[grown], 0.0)   # regrown at zero
    np.testing.assert_array_equal(np.asarray(new_p[name])[~nm], 0.0)
    np.testing.assert_array_equal(np.asarray(new_p[name])[m & nm], p[name][m & nm])
  for k in ('norm', 'tiny'):                                     # all-True masks: untouched
    np.testing.assert_array_equal(np.asarray(new_masks[k]), True)
    np.testing.assert_array_equal(np.asarray(new_p[k]), p[k])
  assert bool(prune.masks_changed(masks, new_masks))
  assert not bool(prune.masks_changed(masks, masks))


def test_mask_bytes(params):
  masks = prune.global_magnitude_masks(params, 0.5, min_size=64)
  expected = sum(4 * -(-m.size // 32) for m in jax.tree.leaves(masks))
  assert prune.mask_nbytes(masks) == expected
  packed = prune.pack_masks(masks)
  assert sum(x.nbytes for x in jax.tree.leaves(packed)) == expected
  assert all(x.dtype == jnp.uint32 for x in jax.tree.leaves(packed))


def test_errors(params):
  with pytest.raises(ValueError, match='sparsity must be in'):
    prune.global_magnitude_masks(params, 1.0)
  with pytest.raises(ValueError, match='min_size'):
    prune.global_magnitude_masks(params, 0.5, min_size=0)
  with pytest.raises(ValueError, match='regrow_fraction'):
    prune.prune_and_regrow(params, params, params, 1.5)
