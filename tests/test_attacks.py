"""Tests for fedjax_fm.aggregate.attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import aggregate
from fedjax_fm.aggregate import attacks


def _updates():
  rng = np.random.default_rng(0)
  return {'a': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(5, 2, 2)), jnp.bfloat16)}


BAD = jnp.array([True, False, True, False, False])


@pytest.mark.parametrize('kind', ['sign_flip', 'scale', 'noise', 'nan'])
def test_attacks(kind):
  u = _updates()
  fn = jax.jit(lambda u, b, k: attacks.apply_attack(u, b, kind, scale=3.0,
                                                    key=k))
  out = fn(u, BAD, jax.random.key(0))
  for name in ('a', 'b'):
    x, y = np.asarray(u[name], np.float32), np.asarray(out[name], np.float32)
    assert out[name].dtype == u[name].dtype
    np.testing.assert_array_equal(y[~np.asarray(BAD)], x[~np.asarray(BAD)])
    bad = np.asarray(BAD)
    if kind == 'sign_flip':
      np.testing.assert_array_equal(y[bad], -x[bad])
    elif kind == 'scale':
      np.testing.assert_allclose(y[bad], 3.0 * x[bad], rtol=1e-2)
    elif kind == 'noise':
      assert np.all(np.isfinite(y[bad])) and not np.allclose(y[bad], x[bad])
      assert not np.allclose(y[0], y[2])  # independent per client
    else:
      assert np.all(np.isnan(y[bad]))
  if kind == 'nan':
    np.testing.assert_array_equal(aggregate.finite_mask(out), ~np.asarray(BAD))


def test_noise_statistics():
  u = {'w': jnp.zeros((4, 5000))}
  out = attacks.apply_attack(u, jnp.array([True, True, False, False]),
                             'noise', scale=2.0, key=jax.random.key(1))
  assert abs(np.std(np.asarray(out['w'][:2])) - 2.0) < 0.05
  np.testing.assert_array_equal(out['w'][2:], 0)


def test_choose_attackers():
  a = attacks.choose_attackers(50, 0.2, seed=3)
  assert a.dtype == bool and a.shape == (50,) and a.sum() == 10
  np.testing.assert_array_equal(a, attacks.choose_attackers(50, 0.2, seed=3))
  assert not np.array_equal(a, attacks.choose_attackers(50, 0.2, seed=4))
  assert attacks.choose_attackers(7, 0.0, seed=0).sum() == 0
  assert attacks.choose_attackers(7, 1.0, seed=0).all()
  # Engine use: gather by client id inside the round.
  ids = jnp.array([3, 10, 49])
  np.testing.assert_array_equal(jnp.asarray(a)[ids], a[[3, 10, 49]])


def test_median_survives_attack_mean_does_not():
  rng = np.random.default_rng(1)
  u = {'w': jnp.asarray(rng.normal(size=(10, 8)) * 0.1 + 1.0, jnp.float32)}
  bad = jnp.asarray(attacks.choose_attackers(10, 0.3, seed=0))
  attacked = attacks.apply_attack(u, bad, 'scale', scale=-100.0)
  w = jnp.ones(10)
  med = aggregate.coordinate_median().aggregate(attacked, w)[0]['w']
  assert np.all(np.abs(np.asarray(med) - 1.0) < 0.3)
  assert np.all(np.asarray(attacked['w']).mean(0) < -10)


def test_invalid_arguments():
  with pytest.raises(ValueError, match='kind must be one of'):
    attacks.apply_attack(_updates(), BAD, 'lie')
  with pytest.raises(ValueError, match='key'):
    attacks.apply_attack(_updates(), BAD, 'noise')
  with pytest.raises(ValueError, match='fraction'):
    attacks.choose_attackers(10, 1.5, 0)
  with pytest.raises(ValueError, match='num_clients_total'):
    attacks.choose_attackers(0, 0.1, 0)
