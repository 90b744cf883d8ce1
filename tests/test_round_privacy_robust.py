"""The round with client-level DP, adaptive clipping, robust aggregators and attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import aggregate
from fedjax_fm import engine
from fedjax_fm import privacy

D_IN, D_OUT, C, S, B = 64, 32, 8, 2, 4


def loss_fn(params, frozen, batch, key):
  del frozen, key
  pred = batch['x'] @ params['w']
  return jnp.mean((pred - batch['y']) ** 2, axis=-1)


def params0():
  return {'w': jnp.zeros((D_IN, D_OUT), jnp.float32)}


def round_data(seed=0):
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  x = rng.normal(size=(C, S, B, D_IN)).astype(np.float32)
  scale = (1.0 + np.arange(C, dtype=np.float32))[:, None, None, None]  # varied norms
  return {'batch': {'x': x * scale, 'y': (x * scale) @ w_true},
          'example_mask': np.ones((C, S, B), bool), 'step_mask': np.ones((C, S), bool),
          'weight': np.arange(1, C + 1, dtype=np.float32),
          'client_id': np.arange(C, dtype=np.int32)}


def client_deltas(data, lr=1e-3):
  """Per-client deltas by a plain loop (the sequential reference)."""
  out = []
  for c in range(C):
    p = params0()
    for s in range(S):
      g = jax.grad(lambda q: jnp.mean(loss_fn(q, None, {'x': data['batch']['x'][c, s],
                                                         'y': data['batch']['y'][c, s]},
                                              None)))(p)
      p = {'w': p['w'] - lr * g['w']}
    out.append(np.asarray(p['w']))
  return np.stack(out)


def build(**kw):
  return engine.build_round(loss_fn, params0(), client_optimizer=optax.sgd(1e-3),
                            server_optimizer=optax.sgd(1.0), num_clients=C,
                            strategy='chunked', chunk_size=4, **kw)


def run(fed, data, seed=0):
  return fed.apply(fed.init(params0(), jax.random.key(seed)), {}, data)


def test_dp_clips_and_averages_uniformly():
  data = round_data()
  deltas = client_deltas(data)
  norms = np.sqrt((deltas ** 2).sum((1, 2)))
  clip = float(np.median(norms))
  state, m = run(build(privacy=privacy.gaussian_dp(clip, 0.0)), data)
  clipped = deltas * np.minimum(1.0, clip / norms)[:, None, None]
  np.testing.assert_allclose(state.params['w'], clipped.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m['unclipped_fraction'], np.mean(norms <= clip))


@pytest.mark.slow
def test_dp_noise_has_the_calibrated_std():
  data = round_data()
  clip, z = 0.05, 2.0
  clean, _ = run(build(privacy=privacy.gaussian_dp(clip, 0.0)), data)
  noisy, _ = run(build(privacy=privacy.gaussian_dp(clip, z)), data)
  noise = np.asarray(noisy.params['w'] - clean.params['w'])
  expected = z * clip / C
  assert abs(noise.std() / expected - 1) < 0.06          # 2048 samples: ~1.6% std error
  assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size)


@pytest.mark.slow
def test_adaptive_clip_moves_towards_the_target_quantile():
  data = round_data()
  norms = np.sqrt((client_deltas(data) ** 2).sum((1, 2)))
  fed = build(privacy=privacy.gaussian_dp(float(norms.max()) * 4, 0.0),
              adaptive_clip=privacy.quantile_adaptive_clip(0.5, learning_rate=0.5))
  state = fed.init(params0(), jax.random.key(0))
  clips = []
  for _ in range(12):
    state = state._replace(params=params0())   # same deltas every round
    state, m = fed.apply(state, {}, data)
    clips.append(float(m['clip_norm']))
  assert clips[0] > clips[-1]
  assert norms.min() <= clips[-1] <= norms.max()


def test_stacked_median_equals_numpy_median():
  data = round_data()
  deltas = client_deltas(data)
  state, _ = run(build(aggregator=aggregate.coordinate_median()), data)
  np.testing.assert_allclose(state.params['w'], np.median(deltas, axis=0), rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize('kind', ['scale', 'sign_flip'])
@pytest.mark.slow
def test_attackers_hurt_the_mean_not_the_median(kind):
  data = round_data()
  data['attacker'] = np.zeros(C, bool)
  data['attacker'][[0, 1]] = True       # 25% attackers
  clean = np.median(client_deltas(data)[2:], axis=0)
  mean_state, _ = run(build(attack=(kind, 100.0)), data)
  med_state, _ = run(build(attack=(kind, 100.0), aggregator=aggregate.coordinate_median()),
                     data)
  err_mean = np.linalg.norm(mean_state.params['w'] - clean)
  err_med = np.linalg.norm(med_state.params['w'] - clean)
  assert err_med < err_mean


def test_nan_attack_is_dropped_by_the_guard():
  data = round_data()
  data['attacker'] = np.zeros(C, bool)
  data['attacker'][3] = True
  state, m = run(build(attack=('nan', 1.0)), data)
  deltas = np.delete(client_deltas(data), 3, axis=0)
  w = np.delete(data['weight'], 3)
  np.testing.assert_allclose(state.params['w'], np.tensordot(w / w.sum(), deltas, 1),
                             rtol=1e-4, atol=1e-6)
  assert float(m['nonfinite_clients']) == 1


def test_adaptive_clip_requires_privacy():
  with pytest.raises(ValueError, match='adaptive_clip needs privacy'):
    build(adaptive_clip=privacy.quantile_adaptive_clip(0.5))


@pytest.mark.slow
def test_secure_mean_round_equals_plain_uniform_mean():
  data = round_data()
  data['client_mask'] = np.ones(C, bool)
  data['client_mask'][6] = False          # a dropped client: its masks are recovered
  deltas = np.delete(client_deltas(data), 6, axis=0)
  state, _ = run(build(aggregator=privacy.secure_agg.secure_mean(clip_range=1.0)), data)
  # Within the fixed-point step of the encoding (about C / scale per coordinate).
  np.testing.assert_allclose(state.params['w'], deltas.mean(0), atol=1e-5)
