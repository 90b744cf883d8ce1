"""Tests for fedjax_fm.privacy.dp_fedavg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.privacy import dp_fedavg


def test_noise_std_matches_theory():
  dp = dp_fedavg.gaussian_dp(clip_norm=2.0, noise_multiplier=1.5)
  mean = {'w': jnp.full((64,), 0.25), 'b': jnp.zeros((3, 2))}
  num_clients = 8
  keys = jax.random.split(jax.random.key(0), 400)
  noisy = jax.jit(jax.vmap(lambda k: dp.noise(k, mean, num_clients)))(keys)
  samples = np.concatenate([
      (np.asarray(noisy['w']) - 0.25).ravel(), np.asarray(noisy['b']).ravel()])
  n = samples.size
  sigma = 1.5 * 2.0 / num_clients
  assert dp.noise_stddev(num_clients) == pytest.approx(sigma)
  # sum(x^2) / sigma^2 ~ chi2(n): mean n, std sqrt(2n); 5-sigma band.
  stat = np.sum(samples ** 2) / sigma ** 2
  assert abs(stat - n) < 5 * np.sqrt(2 * n)
  assert abs(np.mean(samples)) < 5 * sigma / np.sqrt(n)
  # Independent across leaves and keys.
  assert abs(np.corrcoef(np.asarray(noisy['w'])[:, 0],
                         np.asarray(noisy['w'])[:, 1])[0, 1]) < 0.2


def test_noise_zero_multiplier_and_sum_mode():
  dp = dp_fedavg.gaussian_dp(1.0, 0.0)
  tree = {'w': jnp.arange(4.0)}
  out = dp.noise(jax.random.key(1), tree, 10)
  np.testing.assert_array_equal(out['w'], tree['w'])
  dp = dp_fedavg.gaussian_dp(1.0, 2.0)
  assert dp.noise_stddev(1) == 2.0  # a sum gets z * C
  assert dp.noise_stddev(4, clip_norm=0.5) == 0.25


def test_clip_flat_and_per_layer_vs_numpy():
  rng = np.random.default_rng(0)
  updates = {'a': rng.normal(size=(6, 5)).astype(np.float32) * 3,
             'b': rng.normal(size=(6, 2)).astype(np.float32)}
  for per_layer in (False, True):
    dp = dp_fedavg.gaussian_dp(1.0, 1.0, per_layer=per_layer)
    clipped, norms = jax.vmap(dp.clip)(updates)
    flat = np.concatenate([updates['a'], updates['b']], 1).astype(np.float64)
    np.testing.assert_allclose(norms, np.linalg.norm(flat, axis=1), rtol=1e-5)
    for i in range(6):
      if per_layer:
        for name in ('a', 'b'):
          x = updates[name][i].astype(np.float64)
          ref = x * min(1, (1 / np.sqrt(2)) / np.linalg.norm(x))
          np.testing.assert_allclose(clipped[name][i], ref, rtol=1e-5)
      else:
        ref = flat[i] * min(1, 1.0 / np.linalg.norm(flat[i]))
        got = np.concatenate([clipped['a'][i], clipped['b'][i]])
        np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_fixed_denominator_mean_uniform_and_ignores_padding():
  agg = dp_fedavg.fixed_denominator_mean(expected_clients=4)
  u = {'w': jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, 1e9]])}
  weights = jnp.array([10.0, 1.0, 0.0])  # example counts must not matter
  acc = agg.zero({'w': jnp.zeros(2)})
  acc = agg.accumulate(acc, jax.tree.map(lambda x: x[:2], u), weights[:2])
  acc = agg.accumulate(acc, jax.tree.map(lambda x: x[2:], u), weights[2:])
  mean, info = agg.finalize(acc)
  np.testing.assert_allclose(mean['w'], [1.0, 1.5])
  assert float(info['num_clients']) == 2
  dp = dp_fedavg.gaussian_dp(1.0, 1.0)
  np.testing.assert_array_equal(dp.uniform_weights(weights), [1, 1, 0])


def test_end_to_end_in_jit():
  dp = dp_fedavg.gaussian_dp(1.0, 0.5)
  agg = dp_fedavg.fixed_denominator_mean(3)

  @jax.jit
  def round_(key, updates, weights):
    clipped, norms = jax.vmap(dp.clip)(updates)
    acc = agg.accumulate(agg.zero(jax.tree.map(lambda x: x[0], updates)),
                         clipped, dp.uniform_weights(weights))
    mean, _ = agg.finalize(acc)
    return dp.noise(key, mean, 3), norms

  out, norms = round_(jax.random.key(0), {'w': jnp.ones((3, 4)) * 5},
                      jnp.ones(3))
  assert out['w'].shape == (4,)
  np.testing.assert_allclose(norms, 10.0)


def test_invalid_arguments():
  with pytest.raises(ValueError, match='clip_norm'):
    dp_fedavg.gaussian_dp(0.0, 1.0)
  with pytest.raises(ValueError, match='noise_multiplier'):
    dp_fedavg.gaussian_dp(1.0, -1.0)
  with pytest.raises(ValueError, match='num_clients'):
    dp_fedavg.gaussian_dp(1.0, 1.0).noise(jax.random.key(0), {}, 0)
  with pytest.raises(ValueError, match='expected_clients'):
    dp_fedavg.fixed_denominator_mean(0)
