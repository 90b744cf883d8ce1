"""Compression, error feedback in the per-client store, downlink and pruning in the round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import compress
from fedjax_fm import engine
from fedjax_fm import prune
from fedjax_fm import tree_util

D_IN, D_OUT, C, S, B, POP = 64, 32, 6, 2, 4, 10


def loss_fn(params, frozen, batch, key):
  del frozen, key
  return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2, axis=-1)


def params0():
  return {'w': jnp.asarray(np.random.default_rng(1).normal(size=(D_IN, D_OUT)) * 0.1,
                           jnp.float32)}


def round_data(ids, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(len(ids), S, B, D_IN)).astype(np.float32)
  y = x @ rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  return {'batch': {'x': x, 'y': y}, 'example_mask': np.ones((len(ids), S, B), bool),
          'step_mask': np.ones((len(ids), S), bool), 'weight': np.ones(len(ids), np.float32),
          'client_id': np.asarray(ids, np.int32)}


def build(**kw):
  return engine.build_round(loss_fn, params0(), client_optimizer=optax.sgd(0.01),
                            server_optimizer=optax.sgd(1.0), num_clients=POP,
                            strategy='chunked', chunk_size=2, **kw)


@pytest.mark.slow
def test_error_feedback_residuals_live_in_the_client_store():
  ids = [7, 2, 5, 0, 9, 3]
  data = round_data(ids)
  inner = compress.top_k(0.05)
  fed = build(compressor=compress.error_feedback(inner))
  plain = build()
  s_plain, _ = plain.apply(plain.init(params0(), jax.random.key(0)), {}, data)
  state, m = fed.apply(fed.init(params0(), jax.random.key(0)), {}, data)
  dense = fed.uplink_bytes_per_client
  assert dense < 0.2 * tree_util.tree_nbytes(params0())
  assert float(m['uplink_bytes']) == C * dense
  store = state.client_store['compress'].residual['w']
  untouched = [i for i in range(POP) if i not in ids]
  np.testing.assert_array_equal(np.asarray(store)[untouched], 0.0)
  for i in ids:
    r = np.asarray(store[i])
    assert np.count_nonzero(r) > 0.9 * r.size          # most of the delta is held back
  # decoded mean + mean residual = mean delta (nothing lost, only delayed)
  mean_delta = np.asarray(s_plain.params['w'] - params0()['w'])
  sent = np.asarray(state.params['w'] - params0()['w'])
  held = np.asarray(store)[ids].mean(0)
  np.testing.assert_allclose(sent + held, mean_delta, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_identity_downlink_matches_plain_and_topk_downlink_saves_bytes():
  data = round_data([0, 1, 2, 3, 4, 5])
  plain = build()
  down = build(downlink_compressor=compress.identity())
  s1, _ = plain.apply(plain.init(params0(), jax.random.key(0)), {}, data)
  s2, _ = down.apply(down.init(params0(), jax.random.key(0)), {}, data)
  np.testing.assert_allclose(s2.params['w'], s1.params['w'], rtol=1e-6, atol=1e-7)
  topk = build(downlink_compressor=compress.top_k(0.1))
  assert topk.downlink_bytes_per_client < 0.2 * plain.downlink_bytes_per_client
  state = topk.init(params0(), jax.random.key(0))
  state, m = topk.apply(state, {}, data)
  view = np.asarray(state.downlink.view['w'])
  assert np.count_nonzero(view) <= int(np.ceil(0.1 * view.size))   # clients saw 10%
  assert float(m['downlink_bytes']) == 6 * topk.downlink_bytes_per_client


def test_pruned_weights_stay_exactly_zero():
  fed = build(pruning=engine.Pruning())
  state = fed.init(params0(), jax.random.key(0))
  masks = prune.global_magnitude_masks(state.params, 0.75, min_size=1)
  params = prune.apply_masks(state.params, masks)
  state = state._replace(params=params, prune=state.prune._replace(masks=masks))
  for r in range(3):
    state, _ = fed.apply(state, {}, round_data([0, 1, 2, 3, 4, 5], seed=r))
  w, m = np.asarray(state.params['w']), np.asarray(masks['w'])
  assert np.all(w[~m] == 0.0)
  assert np.count_nonzero(w[m]) == m.sum()                     # the rest keep training
  np.testing.assert_allclose(1 - m.mean(), 0.75, atol=1 / m.size)


@pytest.mark.slow
def test_prune_scores_are_the_mean_dense_gradient_and_drive_regrowth():
  fed = build(pruning=engine.Pruning(scores=True))
  assert fed.uplink_bytes_per_client == 2 * tree_util.tree_nbytes(params0())
  state = fed.init(params0(), jax.random.key(0))
  masks = prune.global_magnitude_masks(state.params, 0.5, min_size=1)
  state = state._replace(params=prune.apply_masks(state.params, masks),
                         prune=state.prune._replace(masks=masks))
  data = round_data([0, 1, 2, 3, 4, 5])
  start = state.params
  state, _ = fed.apply(state, {}, data)
  grads = [jax.grad(lambda p: jnp.mean(loss_fn(p, None, {'x': data['batch']['x'][c, 0],
                                                          'y': data['batch']['y'][c, 0]},
                                                 None)))(start)['w'] for c in range(C)]
  np.testing.assert_allclose(state.prune.scores['w'], np.mean(grads, 0), rtol=1e-4,
                             atol=1e-6)
  assert np.count_nonzero(np.asarray(state.prune.scores['w'])[~np.asarray(masks['w'])])
  params, new_masks = prune.prune_and_regrow(state.params, masks, state.prune.scores,
                                             0.2)
  assert int(np.sum(new_masks['w'])) == int(np.sum(masks['w']))
  assert bool(np.any(np.asarray(new_masks['w']) & ~np.asarray(masks['w'])))
