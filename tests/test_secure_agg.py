"""Tests for fedjax_fm.privacy.secure_agg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.privacy import secure_agg as sa


def _int_updates(rng, num):
  return {'a': jnp.asarray(rng.integers(0, 2 ** 32, size=(num, 7, 3),
                                        dtype=np.uint64).astype(np.uint32)),
          'b': jnp.asarray(rng.integers(0, 2 ** 32, size=(num, 5),
                                        dtype=np.uint64).astype(np.uint32))}


@jax.jit
def _mask_and_unmask(key, updates, client_ids, dropped):
  seeds = sa.pairwise_seeds(key, client_ids)
  masked = sa.mask(updates, client_ids, seeds)
  return masked, sa.unmask_sum(masked, dropped, client_ids, seeds)


@pytest.mark.parametrize('dropped', [
    [False] * 6,
    [False, True, False, False, True, False],
    [True, True, True, True, True, False],
])
@pytest.mark.slow
def test_unmasked_sum_is_exact(dropped):
  rng = np.random.default_rng(0)
  updates = _int_updates(rng, 6)
  ids = jnp.array([17, 3, 42, 8, 3, 100])  # repeated id: still exact
  dropped = jnp.array(dropped)
  masked, total = _mask_and_unmask(jax.random.key(1), updates, ids, dropped)
  alive = ~np.asarray(dropped)
  for name in ('a', 'b'):
    ref = np.sum(np.asarray(updates[name], np.uint64)[alive], axis=0) % 2 ** 32
    np.testing.assert_array_equal(np.asarray(total[name]),
                                  ref.astype(np.uint32))
    assert total[name].dtype == jnp.uint32
    # The masked vectors differ from the plain ones.
    assert np.mean(np.asarray(masked[name]) != np.asarray(updates[name])) > 0.99
  if alive.all():  # no dropout: the masks cancel in the plain sum
    plain = np.sum(np.asarray(masked['a'], np.uint64), axis=0) % 2 ** 32
    ref = np.sum(np.asarray(updates['a'], np.uint64), axis=0) % 2 ** 32
    np.testing.assert_array_equal(plain, ref)


def test_seeds_symmetric():
  seeds = sa.pairwise_seeds(jax.random.key(0), jnp.array([5, 2, 9]))
  data = jax.random.key_data(seeds)
  np.testing.assert_array_equal(data, np.swapaxes(np.asarray(data), 0, 1))


@pytest.mark.slow
def test_masked_update_is_uniform():
  num, dim = 3, 40_000
  updates = {'w': jnp.zeros((num, dim), jnp.uint32)}  # worst case: all zero
  masked, _ = _mask_and_unmask(jax.random.key(7), updates, jnp.arange(num),
                               jnp.zeros(num, bool))
  top = np.asarray(masked['w'][0]) >> 28  # top 4 bits
  counts = np.bincount(top, minlength=16)
  expected = dim / 16
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert chi2 < 37.7  # chi-square(15) at p = 0.001
  low = np.asarray(masked['w'][1]) & 0xF  # low bits too
  counts = np.bincount(low, minlength=16)
  assert np.sum((counts - expected) ** 2 / expected) < 37.7


@pytest.mark.slow
def test_quantize_roundtrip_and_float_sum():
  rng = np.random.default_rng(3)
  num = 8
  x = {'w': jnp.asarray(rng.uniform(-1.5, 1.5, size=(num, 50)), jnp.float32)}
  dropped = jnp.array([False, False, True, False, False, False, True, False])
  scale = sa.fixed_point_scale(1.0, num)
  out = jax.jit(lambda k, u, d: sa.secure_sum(k, u, d, clip_range=1.0))(
      jax.random.key(0), x, dropped)
  alive = ~np.asarray(dropped)
  ref = np.clip(np.asarray(x['w'], np.float64), -1, 1)[alive].sum(0)
  step = 1.0 / scale
  np.testing.assert_allclose(out['w'], ref, atol=alive.sum() * step + 1e-5)
  # Deterministic rounding round trip, negative values included.
  q = sa.quantize(x, 1.0, scale)
  back = sa.dequantize(q, scale)
  np.testing.assert_allclose(back['w'], np.clip(x['w'], -1, 1),
                             atol=0.5 * step + 1e-7)
  assert q['w'].dtype == jnp.uint32


def test_stochastic_rounding_unbiased():
  scale = 4.0
  x = {'w': jnp.full((20_000,), 0.3 / scale)}  # 0.3 of a step
  q = sa.quantize(x, 1.0, scale, jax.random.key(0))
  vals = np.asarray(sa.dequantize(q, scale)['w']) * scale
  assert set(np.unique(vals)) <= {0.0, 1.0}
  assert abs(vals.mean() - 0.3) < 0.02


def test_fixed_point_scale_no_overflow():
  num = 1000
  scale = sa.fixed_point_scale(2.0, num)
  x = {'w': jnp.full((num, 3), 5.0)}  # clipped to the extreme value 2.0
  q = sa.quantize(x, 2.0, scale)
  total = jnp.sum(q['w'], axis=0, dtype=jnp.uint32)
  np.testing.assert_allclose(sa.dequantize({'w': total}, scale)['w'],
                             2.0 * num, rtol=1e-6)
  with pytest.raises(ValueError, match='clip_range'):
    sa.fixed_point_scale(0.0, 3)
  with pytest.raises(ValueError, match='num_clients'):
    sa.fixed_point_scale(1.0, 0)
  with pytest.raises(ValueError, match='scale'):
    sa.quantize(x, 1.0, 2.0 ** 32)


@pytest.mark.parametrize('bits', [pytest.param(1, marks=pytest.mark.slow), 31])
def test_masks_mod_2_to_the_b(bits):
  """With modulus 2^b every masked value is in [0, 2^b), the unmasked sum of the
  survivors is exact mod 2^b, and the masked values' top bit is uniform."""
  rng = np.random.default_rng(bits)
  num, dim = 5, 2000
  updates = {'v': jnp.asarray(rng.integers(0, 2 ** bits, size=(num, dim)), jnp.uint32)}
  ids = jnp.array([4, 9, 1, 30, 2])
  dropped = np.array([False, False, True, False, False])
  seeds = sa.pairwise_seeds(jax.random.key(3), ids)
  masked = sa.mask(updates, ids, seeds, modulus_bits=bits)
  total = sa.unmask_sum(masked, jnp.asarray(dropped), ids, seeds, modulus_bits=bits)
  ref = np.asarray(updates['v'], np.int64)[~dropped].sum(0) % 2 ** bits
  np.testing.assert_array_equal(np.asarray(total['v']), ref)
  m = np.asarray(masked['v']).astype(np.int64)
  assert m.max() < 2 ** bits
  top = (m[0] >> (bits - 1)) & 1
  assert abs(top.mean() - 0.5) < 5 * 0.5 / np.sqrt(dim)
  with pytest.raises(ValueError, match='modulus_bits'):
    sa.mask(updates, ids, seeds, modulus_bits=33)
