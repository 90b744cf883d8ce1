"""The round engine against a plain sequential reference written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import engine

D_IN, D_H, D_OUT = 5, 7, 3


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'w1': jnp.asarray(rng.normal(size=(D_IN, D_H)) * 0.5, jnp.float32),
      'b1': jnp.zeros((D_H,), jnp.float32),
      'w2': jnp.asarray(rng.normal(size=(D_H, D_OUT)) * 0.5, jnp.float32),
  }


FROZEN = {'scale': jnp.asarray(1.5, jnp.float32)}


def loss_fn(params, frozen, batch, key):
  del key
  h = jnp.tanh(batch['x'] @ params['w1'] + params['b1']) * frozen['scale']
  logits = h @ params['w2']
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])


def make_round_data(num_clients=8, steps=3, batch=4, seed=0, ragged=True):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, steps, batch, D_IN)).astype(np.float32)
  y = rng.integers(0, D_OUT, size=(num_clients, steps, batch)).astype(np.int32)
  example_mask = np.ones((num_clients, steps, batch), bool)
  if ragged:
    sizes = rng.integers(1, steps * batch + 1, size=num_clients)
    flat = np.arange(steps * batch)[None, :] < sizes[:, None]
    example_mask = flat.reshape(num_clients, steps, batch)
  x = np.where(example_mask[..., None], x, 0.0)
  step_mask = example_mask.any(-1)
  return {
      'batch': {'x': x, 'y': y},
      'example_mask': example_mask,
      'step_mask': step_mask,
      'weight': example_mask.sum((1, 2)).astype(np.float32),
      'client_id': np.arange(num_clients, dtype=np.int32) * 3 + 1,
      'client_mask': np.ones(num_clients, bool),
  }


def sequential_reference(params, frozen, data, client_tx, server_tx, server_opt_state,
                         key, round_idx, prox_mu=0.0):
  """One FedAvg-family round: a Python loop over clients and steps, NumPy means."""
  deltas, weights, losses = [], [], []
  for c in range(data['weight'].shape[0]):
    if not data['client_mask'][c]:
      continue
    p = jax.tree.map(jnp.asarray, params)
    opt_state = client_tx.init(p)
    step_losses = []
    for s in range(data['step_mask'].shape[1]):
      if not data['step_mask'][c, s]:
        continue
      batch = jax.tree.map(lambda a: a[c, s], data['batch'])
      m = jnp.asarray(data['example_mask'][c, s], jnp.float32)

      def objective(q):
        per = loss_fn(q, frozen, batch, None)
        loss = jnp.sum(per * m) / jnp.maximum(m.sum(), 1.0)
        prox = sum(jnp.sum((q[k] - params[k]) ** 2) for k in q)
        return loss + 0.5 * prox_mu * prox, loss

      (_, loss), g = jax.value_and_grad(objective, has_aux=True)(p)
      updates, opt_state = client_tx.update(g, opt_state, p)
      p = optax.apply_updates(p, updates)
      step_losses.append(float(loss))
    deltas.append({k: np.asarray(p[k]) - np.asarray(params[k]) for k in p})
    weights.append(float(data['weight'][c]))
    losses.append(np.mean(step_losses))
  w = np.asarray(weights)
  mean_delta = {k: sum(wi * d[k] for wi, d in zip(w, deltas)) / w.sum() for k in params}
  grad = jax.tree.map(lambda d: -jnp.asarray(d), mean_delta)
  updates, server_opt_state = server_tx.update(grad, server_opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return new_params, server_opt_state, float(np.mean(losses))


def build(strategy, chunk_size=None, client_tx=None, server_tx=None, prox_mu=0.0, mesh=None):
  client_tx = client_tx or optax.sgd(0.3)
  server_tx = server_tx or optax.sgd(1.0)
  return engine.build_round(loss_fn, init_params(), client_optimizer=client_tx,
                            server_optimizer=server_tx, num_clients=64, strategy=strategy,
                            chunk_size=chunk_size, prox_mu=prox_mu, mesh=mesh)


STRATEGY_CASES = [('vmap', None), ('chunked', 1), ('chunked', 2), ('chunked', 4),
                  ('sharded', 1), ('sharded', None)]


OPT_CASES = [('sgd', 'fedavg'), ('momentum', 'fedavgm'), ('adam', 'fedadam'),
             ('sgd', 'fedyogi'), ('sgd', 'fedadagrad')]


def _optimizers(client_name, server_name):
  client_tx = engine.client_optimizer(client_name, 0.1)
  server_lr = 1.0 if server_name.startswith('fedavg') else 0.05
  return client_tx, engine.server_optimizer(server_name, server_lr)


@functools.lru_cache(maxsize=None)
def _reference_rounds(client_name, server_name, num_rounds=2):
  client_tx, server_tx = _optimizers(client_name, server_name)
  params, opt = init_params(), server_tx.init(init_params())
  out = []
  for r in range(num_rounds):
    params, opt, loss = sequential_reference(params, FROZEN, make_round_data(seed=r),
                                             client_tx, server_tx, opt, None, r)
    out.append((params, loss))
  return out


@pytest.mark.parametrize('strategy,chunk', STRATEGY_CASES)
@pytest.mark.parametrize('client_name,server_name', OPT_CASES)
@pytest.mark.slow
def test_strategies_match_sequential_reference(strategy, chunk, client_name, server_name):
  assert jax.device_count() == 8
  client_tx, server_tx = _optimizers(client_name, server_name)
  fed = build(strategy, chunk, client_tx, server_tx)
  state = fed.init(init_params(), jax.random.key(0))
  for r, (ref_params, ref_loss) in enumerate(_reference_rounds(client_name, server_name)):
    state, metrics = fed.apply(state, FROZEN, make_round_data(seed=r))
    for k in ref_params:
      np.testing.assert_allclose(state.params[k], ref_params[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics['train_loss'], ref_loss, rtol=1e-5)
  assert int(state.round) == 2


@pytest.mark.slow
def test_fedprox_matches_reference_and_shrinks_updates():
  client_tx = optax.sgd(0.3)
  fed = build('chunked', 2, client_tx, prox_mu=2.0)
  data = make_round_data()
  state, m_prox = fed.apply(fed.init(init_params(), jax.random.key(0)), FROZEN, data)
  ref, _, _ = sequential_reference(init_params(), FROZEN, data, client_tx, optax.sgd(1.0),
                                   optax.sgd(1.0).init(init_params()), None, 0, prox_mu=2.0)
  for k in ref:
    np.testing.assert_allclose(state.params[k], ref[k], rtol=1e-5, atol=1e-6)
  plain = build('chunked', 2, client_tx)
  _, m_plain = plain.apply(plain.init(init_params(), jax.random.key(0)), FROZEN, data)
  assert float(m_prox['update_norm']) < float(m_plain['update_norm'])


def _pad(data, extra_clients, extra_steps):
  """Adds padding clients (mask False, weight 0) and padding steps."""
  out = {}
  c, s, b = data['example_mask'].shape
  def pad(a, axis_pads):
    widths = [(0, p) for p in axis_pads] + [(0, 0)] * (a.ndim - len(axis_pads))
    return np.pad(a, widths)
  out['batch'] = jax.tree.map(lambda a: pad(a, (extra_clients, extra_steps)), data['batch'])
  # Garbage in padded data must not matter: fill padded x with large values.
  out['batch']['x'][c:] = 1e3
  out['batch']['x'][:, s:] = -1e3
  out['example_mask'] = pad(data['example_mask'], (extra_clients, extra_steps))
  out['step_mask'] = pad(data['step_mask'], (extra_clients, extra_steps))
  out['weight'] = pad(data['weight'], (extra_clients,))
  out['weight'][c:] = 5.0   # ignored because client_mask is False
  out['client_id'] = pad(data['client_id'], (extra_clients,))
  out['client_mask'] = pad(data['client_mask'], (extra_clients,))
  return out


@pytest.mark.parametrize('strategy,chunk', [('vmap', None), ('chunked', 4), ('sharded', 2)])
@pytest.mark.slow
def test_padding_never_changes_result(strategy, chunk):
  data = make_round_data(num_clients=6, ragged=True)
  padded = _pad(data, extra_clients=10, extra_steps=2)
  ref_fed = build('vmap', client_tx=optax.adam(0.05))
  fed = build(strategy, chunk, client_tx=optax.adam(0.05))
  s_ref, m_ref = ref_fed.apply(ref_fed.init(init_params(), jax.random.key(1)), FROZEN, data)
  s_pad, m_pad = fed.apply(fed.init(init_params(), jax.random.key(1)), FROZEN, padded)
  for k in s_ref.params:
    np.testing.assert_allclose(s_pad.params[k], s_ref.params[k], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(m_pad['train_loss'], m_ref['train_loss'], rtol=1e-6)
  assert float(m_pad['num_clients']) == 6
  assert float(m_pad['examples']) == float(data['example_mask'].sum())


@pytest.fixture
def no_persistent_cache():
  """Compilations counted here must not be served from the tests' shared cache."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  yield
  jax.config.update('jax_enable_compilation_cache', before)


@pytest.mark.slow
@pytest.mark.usefixtures('no_persistent_cache')
def test_rounds_do_not_recompile():
  traces = []

  def counting_loss(params, frozen, batch, key):
    traces.append(1)
    return loss_fn(params, frozen, batch, key)

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, *a, **k: compiles.append(name)
      if name == '/jax/core/compile/backend_compile_duration' else None)
  fed = engine.build_round(counting_loss, init_params(), client_optimizer=optax.sgd(0.1),
                           server_optimizer=optax.sgd(1.0), num_clients=64,
                           strategy='chunked', chunk_size=2)
  state = fed.init(init_params(), jax.random.key(0))
  state, _ = fed.apply(state, FROZEN, make_round_data(seed=0))
  traces_after_first, compiles_after_first = len(traces), len(compiles)
  assert compiles_after_first >= 1
  for r in range(1, 4):
    state, metrics = fed.apply(state, FROZEN, make_round_data(seed=r))
  jax.block_until_ready(metrics)
  assert len(traces) == traces_after_first
  assert len(compiles) == compiles_after_first
  assert fed.apply._cache_size() == 1


def test_same_seed_same_result_and_bytes():
  fed = build('chunked', 4)
  data = make_round_data()
  s1, m1 = fed.apply(fed.init(init_params(), jax.random.key(3)), FROZEN, data)
  s2, m2 = fed.apply(fed.init(init_params(), jax.random.key(3)), FROZEN, data)
  for k in s1.params:
    np.testing.assert_array_equal(s1.params[k], s2.params[k])
  nbytes = sum(np.asarray(v).nbytes for v in init_params().values())
  assert fed.uplink_bytes_per_client == nbytes == fed.downlink_bytes_per_client
  assert float(m1['uplink_bytes']) == 8 * nbytes
  assert m1['client_loss'].shape == (8,)
  norms = [np.sqrt(sum(np.sum(d ** 2) for d in jax.tree.leaves(jax.tree.map(
      lambda a, b: np.asarray(a) - np.asarray(b), s1.params, init_params()))))]
  np.testing.assert_allclose(float(m1['update_norm']), norms[0], rtol=1e-5)


def test_client_keys_follow_client_id_not_position():
  """Per-client randomness is fold_in(fold_in(key, round), client_id)."""

  def noisy_loss(params, frozen, batch, key):
    # A loss whose gradient depends on the key.
    noise = jax.random.normal(key, params['b1'].shape)
    return loss_fn(params, frozen, batch, key) + jnp.sum(noise * params['b1'])

  fed = engine.build_round(noisy_loss, init_params(), client_optimizer=optax.sgd(0.1),
                           server_optimizer=optax.sgd(1.0), num_clients=64, strategy='vmap')
  data = make_round_data(num_clients=4, ragged=False)
  perm = np.array([2, 0, 3, 1])
  permuted = jax.tree.map(lambda a: a[perm], data)
  s1, m1 = fed.apply(fed.init(init_params(), jax.random.key(0)), FROZEN, data)
  s2, m2 = fed.apply(fed.init(init_params(), jax.random.key(0)), FROZEN, permuted)
  np.testing.assert_allclose(s1.params['b1'], s2.params['b1'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(m1['client_loss'])[perm], m2['client_loss'], rtol=1e-5)


def test_bad_strategy_and_chunk():
  with pytest.raises(ValueError, match='strategy'):
    build('pmap')
  fed = build('chunked', 3)
  with pytest.raises(ValueError, match='chunk_size=3'):
    fed.apply(fed.init(init_params(), jax.random.key(0)), FROZEN, make_round_data())


@pytest.mark.parametrize('strategy,chunk', [('chunked', 2), ('sharded', 1)])
@pytest.mark.slow
def test_nonfinite_updates_are_dropped(strategy, chunk):
  data = make_round_data(num_clients=8, ragged=False)
  poisoned = jax.tree.map(np.copy, data)
  poisoned['batch']['x'][2, 0, 0, 0] = np.nan
  poisoned['batch']['x'][5, 1, 0, 0] = np.inf
  without = jax.tree.map(lambda a: np.delete(a, [2, 5], axis=0), data)
  fed = build(strategy, chunk)
  ref = build('vmap')
  s_p, m_p = fed.apply(fed.init(init_params(), jax.random.key(0)), FROZEN, poisoned)
  s_r, _ = ref.apply(ref.init(init_params(), jax.random.key(0)), FROZEN, without)
  assert float(m_p['nonfinite_clients']) == 2
  assert np.isfinite(float(m_p['train_loss']))
  for k in s_r.params:
    assert np.all(np.isfinite(s_p.params[k]))
    np.testing.assert_allclose(s_p.params[k], s_r.params[k], rtol=1e-5, atol=1e-6)
