"""FedNova and SCAFFOLD in the compiled round against a sequential per-client reference.

The reference is a Python loop over clients and local steps (JAX only for each
step's gradient; the optimizer, the coefficients and the server update in
NumPy), run on the same heterogeneous round data (unequal step budgets, a
dropped client, padding clients) the engine gets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import engine
from fedjax_fm.engine import fednova as fednova_lib
from fedjax_fm.engine import heterogeneity as het_lib
from fedjax_fm.engine import scaffold as scaffold_lib

D_IN, D_H, D_OUT = 4, 5, 3
POPULATION = 40
C, S, B = 8, 5, 3          # clients per round (2 of them padding), local steps, batch
LR = 0.2
HET = het_lib.SystemHeterogeneity(step_budget='uniform', step_budget_min=1, dropout=0.2)


def init_params():
  rng = np.random.default_rng(0)
  return {'w1': jnp.asarray(rng.normal(size=(D_IN, D_H)) * 0.5, jnp.float32),
          'b1': jnp.zeros((D_H,), jnp.float32),
          'w2': jnp.asarray(rng.normal(size=(D_H, D_OUT)) * 0.5, jnp.float32)}


FROZEN = {'scale': jnp.asarray(1.3, jnp.float32)}


def loss_fn(params, frozen, batch, key):
  del key
  h = jnp.tanh(batch['x'] @ params['w1'] + params['b1']) * frozen['scale']
  return optax.softmax_cross_entropy_with_integer_labels(h @ params['w2'], batch['y'])


def round_data(round_idx, seed=3):
  """A padded round: ragged clients, 2 padding clients, heterogeneity applied."""
  rng = np.random.default_rng(100 + round_idx)
  x = rng.normal(size=(C, S, B, D_IN)).astype(np.float32)
  y = rng.integers(0, D_OUT, size=(C, S, B)).astype(np.int32)
  sizes = rng.integers(2, S * B + 1, size=C)
  example_mask = (np.arange(S * B)[None] < sizes[:, None]).reshape(C, S, B)
  client_mask = np.arange(C) < C - 2
  example_mask &= client_mask[:, None, None]
  ids = rng.choice(POPULATION, size=C, replace=False).astype(np.int32)
  ids[~client_mask] = 0
  data = {
      'batch': {'x': np.where(example_mask[..., None], x, 0.0), 'y': y},
      'example_mask': example_mask,
      'step_mask': example_mask.any(-1),
      'weight': example_mask.sum((1, 2)).astype(np.float32),
      'client_id': ids,
      'client_mask': client_mask,
  }
  return het_lib.apply_to_round(data, HET, S, seed=seed, round_idx=round_idx)


@jax.jit
def _jax_grad(params, batch, mask):
  def f(q):
    per = loss_fn(q, FROZEN, batch, None)
    return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1.0)
  return jax.grad(f)(params)


def _grad(params, batch, mask):
  return {k: np.asarray(v, np.float64) for k, v in _jax_grad(params, batch, mask).items()}


def _local(params, data, c, *, momentum=0.0, prox_mu=0.0, corr=None):
  """One client's SGD (heavy-ball momentum, FedProx, SCAFFOLD correction); its steps."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x0 = dict(p)
  v = {k: np.zeros_like(a) for k, a in p.items()}
  steps = 0
  for s in range(S):
    if not data['step_mask'][c, s]:
      continue
    batch = jax.tree.map(lambda a: jnp.asarray(a[c, s]), data['batch'])
    g = _grad({k: jnp.asarray(a, jnp.float32) for k, a in p.items()}, batch,
              jnp.asarray(data['example_mask'][c, s], jnp.float32))
    for k in p:
      gk = g[k] + prox_mu * (p[k] - x0[k])
      if corr is not None:
        gk = gk + corr[k]
      v[k] = momentum * v[k] + gk
      p[k] = p[k] - LR * v[k]
    steps += 1
  return {k: p[k] - x0[k] for k in p}, steps


def _coef_norm(steps, momentum=0.0, prox_mu=0.0):
  """||a||_1 by summing the coefficient each step's gradient gets in the final update."""
  total = 0.0
  for k in range(steps):
    if momentum:
      total += sum(momentum ** j for j in range(steps - k))
    elif prox_mu:
      total += (1.0 - LR * prox_mu) ** (steps - 1 - k)
    else:
      total += 1.0
  return total


def fednova_reference(params, data, momentum=0.0, prox_mu=0.0, server_lr=1.0):
  deltas, weights, norms = [], [], []
  for c in range(C):
    if not data['client_mask'][c]:
      continue
    delta, steps = _local(params, data, c, momentum=momentum, prox_mu=prox_mu)
    deltas.append(delta)
    weights.append(float(data['weight'][c]))
    norms.append(_coef_norm(steps, momentum, prox_mu))
  p = np.asarray(weights) / np.sum(weights)
  tau_eff = float(np.sum(p * np.asarray(norms)))
  return {k: np.asarray(params[k], np.float64) + server_lr * tau_eff * sum(
      pi * d[k] / a for pi, d, a in zip(p, deltas, norms)) for k in params}, tau_eff


def scaffold_reference(params, c_server, c_store, data, server_lr=1.0):
  """Algorithm 1, option II; returns new params, c and the client variates (dict by id)."""
  c_store = dict(c_store)
  dys, dcs = [], []
  for c in range(C):
    if not data['client_mask'][c]:
      continue
    cid = int(data['client_id'][c])
    ci = c_store.get(cid, {k: np.zeros(np.shape(v)) for k, v in params.items()})
    corr = {k: c_server[k] - ci[k] for k in params}
    dy, steps = _local(params, data, c, corr=corr)
    ci_new = {k: ci[k] - c_server[k] - dy[k] / (steps * LR) for k in params}
    dys.append(dy)
    dcs.append({k: ci_new[k] - ci[k] for k in params})
    c_store[cid] = ci_new
  new_x = {k: np.asarray(params[k], np.float64) + server_lr * np.mean([d[k] for d in dys], 0)
           for k in params}
  new_c = {k: c_server[k] + np.sum([d[k] for d in dcs], 0) / POPULATION for k in params}
  return new_x, new_c, c_store


def build(strategy, chunk_size=None, *, fednova=None, scaffold=None, client_tx=None,
          prox_mu=0.0, server_lr=1.0):
  return engine.build_round(
      loss_fn, init_params(), client_optimizer=client_tx or optax.sgd(LR),
      server_optimizer=optax.sgd(server_lr), num_clients=POPULATION, strategy=strategy,
      chunk_size=chunk_size, prox_mu=prox_mu, fednova=fednova, scaffold=scaffold)


def _close(a, b, tol=1e-5):
  for k in b:
    np.testing.assert_allclose(np.asarray(a[k]), b[k], rtol=tol, atol=tol)


def test_round_data_is_heterogeneous():
  data = round_data(0)
  steps = data['step_mask'].sum(1)[data['client_mask']]
  assert len(set(steps.tolist())) > 1          # unequal budgets among reporting clients
  assert int(data['dropped'].sum()) >= 1       # and a dropped client (seed chosen so)
  assert not data['dropped'][~np.asarray(np.arange(C) < C - 2)].any()


FEDNOVA_CASES = [('sgd', 0.0, 0.0), ('momentum', 0.9, 0.0), ('prox', 0.0, 0.5)]


@pytest.mark.parametrize('strategy,chunk', [('vmap', None), ('chunked', 2)])
@pytest.mark.parametrize('name,momentum,prox_mu', [
    FEDNOVA_CASES[0], *(pytest.param(*case, marks=pytest.mark.slow)
                        for case in FEDNOVA_CASES[1:])])
def test_fednova_equals_sequential_reference(strategy, chunk, name, momentum, prox_mu):
  del name
  params = init_params()
  data = round_data(0)
  ref, tau_eff = fednova_reference(params, data, momentum=momentum, prox_mu=prox_mu,
                                   server_lr=0.7)
  tx = optax.sgd(LR, momentum=momentum or None)
  fed = build(strategy, chunk, client_tx=tx, prox_mu=prox_mu, server_lr=0.7,
              fednova=fednova_lib.FedNova(momentum=momentum, prox_alpha=LR * prox_mu))
  state, m = fed.apply(fed.init(params, jax.random.key(0)), FROZEN, data)
  _close(state.params, ref)
  np.testing.assert_allclose(float(m['fednova_tau_eff']), tau_eff, rtol=1e-6)
  assert fed.uplink_bytes_per_client == sum(x.nbytes for x in jax.tree.leaves(params)) + 4
  assert float(m['dropped_clients']) == float(data['dropped'].sum())
  np.testing.assert_allclose(float(m['mean_steps']),
                             data['step_mask'][data['client_mask']].sum(1).mean())


def test_fednova_differs_from_fedavg_and_equals_it_with_equal_steps():
  params = init_params()
  data = round_data(0)
  nova = build('vmap', fednova=fednova_lib.FedNova())
  avg = build('vmap')
  s_nova, _ = nova.apply(nova.init(params, jax.random.key(0)), FROZEN, data)
  s_avg, _ = avg.apply(avg.init(params, jax.random.key(0)), FROZEN, data)
  assert not np.allclose(s_nova.params['w1'], s_avg.params['w1'], atol=1e-6)
  equal = dict(data)   # every reporting client runs all S steps and uses every example
  equal['step_mask'] = np.broadcast_to(data['client_mask'][:, None], (C, S)).copy()
  equal['example_mask'] = np.broadcast_to(equal['step_mask'][..., None], (C, S, B)).copy()
  s_nova, _ = nova.apply(nova.init(params, jax.random.key(0)), FROZEN, equal)
  s_avg, _ = avg.apply(avg.init(params, jax.random.key(0)), FROZEN, equal)
  _close(s_nova.params, {k: np.asarray(v) for k, v in s_avg.params.items()})


def test_coefficient_norms_closed_form():
  for tau in (1, 2, 5):
    assert float(fednova_lib.coefficient_norm(tau)) == tau
    np.testing.assert_allclose(float(fednova_lib.coefficient_norm(tau, momentum=0.9)),
                               _coef_norm(tau, momentum=0.9), rtol=1e-6)
    np.testing.assert_allclose(float(fednova_lib.coefficient_norm(tau, prox_alpha=LR * 0.5)),
                               _coef_norm(tau, prox_mu=0.5), rtol=1e-6)
  with pytest.raises(ValueError, match='not both'):
    fednova_lib.coefficient_norm(3, momentum=0.9, prox_alpha=0.1)


def test_fednova_aggregate_pure_function():
  rng = np.random.default_rng(1)
  deltas = {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  w = np.asarray([1.0, 2.0, 0.0])
  taus = np.asarray([1.0, 4.0, 2.0])
  out, tau_eff = fednova_lib.fednova_aggregate(deltas, w, taus)
  p = w / w.sum()
  np.testing.assert_allclose(float(tau_eff), np.sum(p * taus), rtol=1e-6)
  want = np.sum(p * taus) * sum(p[i] * np.asarray(deltas['w'][i]) / taus[i] for i in range(3))
  np.testing.assert_allclose(np.asarray(out['w']), want, rtol=1e-5)


def _scaffold_rounds(strategy, chunk, num_rounds=3):
  fed = build(strategy, chunk, scaffold=scaffold_lib.Scaffold(LR), server_lr=0.8)
  state = fed.init(init_params(), jax.random.key(0))
  out = []
  for r in range(num_rounds):
    state, m = fed.apply(state, FROZEN, round_data(r))
    out.append((state, m))
  return fed, out


@functools.lru_cache(maxsize=None)
def _scaffold_reference(num_rounds=3):
  params = {k: np.asarray(v, np.float64) for k, v in init_params().items()}
  c = {k: np.zeros_like(v) for k, v in params.items()}
  store, out = {}, []
  for r in range(num_rounds):
    params, c, store = scaffold_reference(params, c, store, round_data(r), server_lr=0.8)
    out.append((params, c, dict(store)))
  return out


def _check_scaffold(out):
  ref = _scaffold_reference()
  for (state, _), (params, c, store) in zip(out, ref):
    _close(state.params, params)
    _close(state.control, c)
    variates = state.client_store[scaffold_lib.STORE_KEY]
    for cid in range(POPULATION):
      want = store.get(cid, {k: np.zeros(np.shape(v)) for k, v in params.items()})
      _close({k: v[cid] for k, v in variates.items()}, want)


@pytest.mark.parametrize('strategy,chunk', [('vmap', None), ('chunked', 2)])
def test_scaffold_three_rounds_equal_sequential_reference(strategy, chunk):
  fed, out = _scaffold_rounds(strategy, chunk)
  _check_scaffold(out)
  dense = sum(x.nbytes for x in jax.tree.leaves(init_params()))
  assert fed.uplink_bytes_per_client == 2 * dense      # Delta y and Delta c
  assert fed.downlink_bytes_per_client == 2 * dense    # x and c
  assert any(float(m['dropped_clients']) for _, m in out)


@pytest.mark.slow
def test_sharded_equals_reference():
  assert jax.device_count() >= 2
  _, out = _scaffold_rounds('sharded', None)
  _check_scaffold(out)
  params = init_params()
  data = round_data(0)
  ref, _ = fednova_reference(params, data, momentum=0.9)
  fed = build('sharded', client_tx=optax.sgd(LR, momentum=0.9),
              fednova=fednova_lib.FedNova(momentum=0.9))
  state, _ = fed.apply(fed.init(params, jax.random.key(0)), FROZEN, data)
  _close(state.params, ref)


def test_scaffold_pure_functions():
  c_i = {'w': jnp.asarray([1.0, -2.0])}
  c = {'w': jnp.asarray([0.5, 0.5])}
  dy = {'w': jnp.asarray([-0.4, 0.2])}
  new, dc = scaffold_lib.control_update(c_i, c, dy, 2, 0.1)
  np.testing.assert_allclose(np.asarray(new['w']), [1.0 - 0.5 + 0.4 / 0.2, -2.5 - 0.2 / 0.2],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dc['w']), np.asarray(new['w']) - [1.0, -2.0], rtol=1e-6)
  kept, zero = scaffold_lib.control_update(c_i, c, dy, 0, 0.1)
  np.testing.assert_array_equal(np.asarray(kept['w']), [1.0, -2.0])
  np.testing.assert_array_equal(np.asarray(zero['w']), [0.0, 0.0])
  x, c2 = scaffold_lib.server_update({'w': jnp.zeros(2)}, c, dy, {'w': jnp.asarray([4.0, 8.0])},
                                     num_clients=4, server_learning_rate=0.5)
  np.testing.assert_allclose(np.asarray(x['w']), [-0.2, 0.1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(c2['w']), [1.5, 2.5], rtol=1e-6)


def test_build_round_rejects_unsupported_combinations():
  with pytest.raises(ValueError, match='two algorithms'):
    build('vmap', fednova=fednova_lib.FedNova(), scaffold=scaffold_lib.Scaffold(LR))
  from fedjax_fm import aggregate, compress, privacy  # pylint: disable=g-import-not-at-top
  for kwargs, what in ((dict(compressor=compress.top_k(0.5)), 'compressor'),
                       (dict(privacy=privacy.gaussian_dp(1.0, 0.0)), 'privacy'),
                       (dict(aggregator=aggregate.coordinate_median()), 'streaming')):
    with pytest.raises(ValueError, match=what):
      engine.build_round(loss_fn, init_params(), client_optimizer=optax.sgd(LR),
                         server_optimizer=optax.sgd(1.0), num_clients=POPULATION,
                         scaffold=scaffold_lib.Scaffold(LR), **kwargs)


def _lora_loss(params, frozen, batch, key):
  del key
  layer = params['layer']
  a = layer['lora_a'] if 'lora_a' in layer else frozen['layer']['lora_a']
  h = jnp.tanh(batch['x'] @ (frozen['w'] + a @ layer['lora_b']))
  return optax.softmax_cross_entropy_with_integer_labels(h @ params['head'], batch['y'])


@pytest.mark.parametrize('algo,mode', [
    *(pytest.param(a, m, marks=pytest.mark.slow) for a, m in
      (('scaffold', 'fedit'), ('scaffold', 'ffa'), ('fednova', 'fedit'), ('fednova', 'ffa')))])
def test_lora_modes_equal_the_plain_mean(mode, algo):
  """FedIT / FFA are weighted means of the factors: the round equals the default mean's."""
  from fedjax_fm.peft import lora_aggregation  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(D_IN, 2)) * 0.3, jnp.float32)
  params = {'layer': {'lora_a': a, 'lora_b': jnp.asarray(rng.normal(size=(2, D_H)) * 0.3,
                                                         jnp.float32)},
            'head': jnp.asarray(rng.normal(size=(D_H, D_OUT)), jnp.float32)}
  frozen = {'w': jnp.asarray(rng.normal(size=(D_IN, D_H)) * 0.3, jnp.float32)}
  if mode == 'ffa':
    frozen['layer'] = {'lora_a': a}
    params['layer'] = {'lora_b': params['layer']['lora_b']}
  kw = ({'fednova': fednova_lib.FedNova()} if algo == 'fednova'
        else {'scaffold': scaffold_lib.Scaffold(LR)})
  states = []
  for agg in (None, getattr(lora_aggregation, mode)()):
    fed = engine.build_round(_lora_loss, params, client_optimizer=optax.sgd(LR),
                             server_optimizer=optax.sgd(1.0), num_clients=POPULATION,
                             strategy='chunked', chunk_size=2, aggregator=agg, **kw)
    state = fed.init(params, jax.random.key(0))
    for r in range(2):
      state, _ = fed.apply(state, frozen, round_data(r))
    states.append(state)
  for x, y in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert not np.allclose(states[1].params['head'], params['head'])
