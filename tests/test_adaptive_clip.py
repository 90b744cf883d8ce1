"""Tests for fedjax_fm.privacy.adaptive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.privacy import adaptive


def _run(clip, rounds, key, num_clients=100, initial=0.01):
  """Clients' norms ~ LogNormal(0, 1) each round; 10% padding clients."""
  weights = jnp.where(jnp.arange(num_clients) < 0.9 * num_clients, 1.0, 0.0)

  def body(state, k):
    k_norms, k_noise = jax.random.split(k)
    norms = jnp.exp(jax.random.normal(k_norms, (num_clients,)))
    bits = clip.clipped_bits(norms, state)
    return clip.update(state, bits, weights, k_noise), state.clip_norm

  state, trace = jax.lax.scan(body, clip.init(initial),
                              jax.random.split(key, rounds))
  return float(state.clip_norm), np.asarray(trace)


@pytest.mark.parametrize('quantile', [0.3, 0.8])
def test_converges_to_target_quantile(quantile):
  clip = adaptive.quantile_adaptive_clip(target_quantile=quantile,
                                         learning_rate=0.2)
  final, trace = _run(clip, 600, jax.random.key(0))
  # Fraction of LogNormal(0, 1) norms below the tracked clip.
  tail = trace[-200:]
  samples = np.exp(np.random.default_rng(0).normal(size=200_000))
  fractions = [np.mean(samples <= c) for c in tail]
  assert abs(np.mean(fractions) - quantile) < 0.03
  assert abs(np.mean(samples <= final) - quantile) < 0.1
  assert trace[0] == pytest.approx(0.01)  # moved a long way geometrically


def test_noisy_count_still_converges():
  clip = adaptive.quantile_adaptive_clip(
      target_quantile=0.5, learning_rate=0.2, clipped_count_stddev=90 / 20,
      expected_clients=90)
  _, trace = _run(clip, 600, jax.random.key(1))
  median = float(np.median(np.log(trace[-200:])))
  assert abs(median - 0.0) < 0.15  # median of LogNormal(0, 1) is 1


def test_update_rule_exact():
  clip = adaptive.quantile_adaptive_clip(target_quantile=0.5,
                                         learning_rate=0.5)
  state = clip.init(2.0)
  # 3 of 4 live clients unclipped; the fifth has zero weight and is ignored.
  bits = jnp.array([True, True, True, False, False])
  w = jnp.array([1.0, 3.0, 1.0, 1.0, 0.0])
  new = clip.update(state, bits, w)
  np.testing.assert_allclose(new.clip_norm, 2.0 * np.exp(-0.5 * 0.25),
                             rtol=1e-6)
  # No participating client: unchanged.
  same = clip.update(state, bits, jnp.zeros(5))
  assert float(same.clip_norm) == 2.0


def test_update_noise_multiplier():
  z = adaptive.update_noise_multiplier(1.0, 5.0)
  assert z > 1.0
  np.testing.assert_allclose(z ** -2 + 10.0 ** -2, 1.0)
  assert adaptive.update_noise_multiplier(1.0, 0.0) == 1.0
  with pytest.raises(ValueError, match='clipped_count_stddev'):
    adaptive.update_noise_multiplier(1.0, 0.4)


def test_invalid_arguments():
  with pytest.raises(ValueError, match='target_quantile'):
    adaptive.quantile_adaptive_clip(target_quantile=1.5)
  with pytest.raises(ValueError, match='learning_rate'):
    adaptive.quantile_adaptive_clip(learning_rate=0.0)
  with pytest.raises(ValueError, match='expected_clients'):
    adaptive.quantile_adaptive_clip(clipped_count_stddev=1.0)
  clip = adaptive.quantile_adaptive_clip(clipped_count_stddev=1.0,
                                         expected_clients=10)
  with pytest.raises(ValueError, match='key'):
    clip.update(clip.init(1.0), jnp.ones(3, bool), jnp.ones(3))
  with pytest.raises(ValueError, match='initial_clip'):
    clip.init(0.0)
