"""Heterogeneous LoRA ranks through `build_round` against a per-client reference.

The reference (written here) trains, for every client, a genuinely rank-r_i LoRA
(the global factors truncated to ``[in, r_i]`` and ``[r_i, out]``) in a plain
Python loop, then aggregates with NumPy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import hetlora as hetlora_configs
from fedjax_fm import config as config_lib
from fedjax_fm import engine
from fedjax_fm.aggregate import base as aggregate_base
from fedjax_fm.aggregate import mean as mean_lib
from fedjax_fm.peft import hetlora
from fedjax_fm.peft import lora_aggregation
from tests import run_testlib

D_IN, D_OUT, R, K = 6, 5, 4, 3
ALPHA = 8.0
SCALING = ALPHA / R
SEED = 3
RANKS = (1, 2, 4)
FRACTIONS = (0.3, 0.3, 0.4)
TOL = 1e-5


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'layer': {'lora_a': jnp.asarray(rng.normal(size=(D_IN, R)) * 0.5, jnp.float32),
                'lora_b': jnp.asarray(rng.normal(size=(R, D_OUT)) * 0.5, jnp.float32)},
      'head': {'kernel': jnp.asarray(rng.normal(size=(D_OUT, K)) * 0.5, jnp.float32)},
  }


def init_frozen(seed=1):
  rng = np.random.default_rng(seed)
  return {'layer': {'base': {'kernel': jnp.asarray(rng.normal(size=(D_IN, D_OUT)) * 0.5,
                                                   jnp.float32)}}}


def loss_fn(params, frozen, batch, key):
  del key
  w = frozen['layer']['base']['kernel']
  lay = params['layer']
  h = jnp.tanh(batch['x'] @ w + SCALING * (batch['x'] @ lay['lora_a']) @ lay['lora_b'])
  return optax.softmax_cross_entropy_with_integer_labels(h @ params['head']['kernel'],
                                                         batch['y'])


def make_round_data(num_clients=8, steps=3, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, steps, batch, D_IN)).astype(np.float32)
  y = rng.integers(0, K, size=(num_clients, steps, batch)).astype(np.int32)
  sizes = rng.integers(1, steps * batch + 1, size=num_clients)
  example_mask = (np.arange(steps * batch)[None, :] < sizes[:, None]).reshape(
      num_clients, steps, batch)
  x = np.where(example_mask[..., None], x, 0.0)
  return {
      'batch': {'x': x, 'y': y},
      'example_mask': example_mask,
      'step_mask': example_mask.any(-1),
      'weight': example_mask.sum((1, 2)).astype(np.float32),
      'client_id': np.arange(num_clients, dtype=np.int32) * 5 + 2,
      'client_mask': np.ones(num_clients, bool),
  }


def ranks_of(ids):
  return np.asarray(hetlora.client_rank(SEED, np.asarray(ids), RANKS, FRACTIONS))


# ------------------------------------------------------------------ reference

def _ref_norm(x):
  sq = jnp.sum(x * x)
  return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


@functools.lru_cache(maxsize=None)
def _grad_fn(r, g, lam):
  """Gradient of one rank-r client's local objective (jitted once per rank)."""

  def objective(q, frozen, batch, m):
    per = loss_fn(q, frozen, batch, None)
    loss = jnp.sum(per * m) / jnp.maximum(m.sum(), 1.0)
    a, b = q['layer']['lora_a'], q['layer']['lora_b']
    return loss + lam * _ref_norm(a[:, g:r]) * _ref_norm(b[g:r])

  return jax.jit(jax.grad(objective))


def reference_clients(params, frozen, data, client_tx, gamma=0.9, lam=0.0):
  """Each client trains its own rank-r_i LoRA (truncated factors); returns locals."""
  out = []
  ranks = ranks_of(data['client_id'])
  for c in range(data['weight'].shape[0]):
    if not data['client_mask'][c]:
      continue
    r = int(ranks[c])
    g = int(np.floor(gamma * r))
    p = {'layer': {'lora_a': params['layer']['lora_a'][:, :r],
                   'lora_b': params['layer']['lora_b'][:r]},
         'head': params['head']}
    opt = client_tx.init(p)
    for s in range(data['step_mask'].shape[1]):
      if not data['step_mask'][c, s]:
        continue
      batch = jax.tree.map(lambda a: jnp.asarray(a[c, s]), data['batch'])
      m = jnp.asarray(data['example_mask'][c, s], jnp.float32)
      grads = _grad_fn(r, g, lam)(p, frozen, batch, m)
      updates, opt = client_tx.update(grads, opt, p)
      p = optax.apply_updates(p, updates)
    out.append({'rank': r, 'weight': float(data['weight'][c]),
                'a': np.asarray(p['layer']['lora_a'], np.float64),
                'b': np.asarray(p['layer']['lora_b'], np.float64),
                'head': np.asarray(p['head']['kernel'], np.float64)})
  return out


def pad(c):
  a = np.zeros((D_IN, R))
  b = np.zeros((R, D_OUT))
  a[:, :c['rank']] = c['a']
  b[:c['rank']] = c['b']
  return a, b


def reference_round(mode, params, frozen, data, client_tx, **kw):
  """(new trainable params, new frozen base) after one FedAvg (lr 1) round."""
  clients = reference_clients(params, frozen, data, client_tx, **kw)
  w = np.asarray([c['weight'] for c in clients])
  wn = w / w.sum()
  head = sum(x * c['head'] for x, c in zip(wn, clients))
  base = np.asarray(frozen['layer']['base']['kernel'], np.float64)
  if mode in ('fedit', 'hetlora'):
    if mode == 'hetlora':
      s = np.asarray([np.linalg.norm(c['a'] @ c['b']) for c in clients])
      coef = s / s.sum()
    else:
      coef = wn
    a = sum(x * pad(c)[0] for x, c in zip(coef, clients))
    b = sum(x * pad(c)[1] for x, c in zip(coef, clients))
    return {'lora_a': a, 'lora_b': b, 'head': head}, base
  mean_product = sum(x * (c['a'] @ c['b']) for x, c in zip(wn, clients))
  if mode == 'stack':
    return ({'lora_a': np.asarray(params['layer']['lora_a'], np.float64),
             'lora_b': np.zeros((R, D_OUT)), 'head': head},
            base + SCALING * mean_product)
  assert mode == 'product'
  return {'mean_product': mean_product, 'head': head}, base


# ------------------------------------------------------------------- engine

def aggregator_of(mode):
  return {'fedit': None, 'hetlora': hetlora.sparsity_weighted(),
          'stack': lora_aggregation.stack(SCALING),
          'product': lora_aggregation.product()}[mode]


def build(mode, strategy='vmap', chunk=None, client_tx=None, regularizer=None, mesh=None,
          aggregator=None):
  return engine.build_round(
      loss_fn, init_params(), client_optimizer=client_tx or optax.sgd(0.3),
      server_optimizer=optax.sgd(1.0), num_clients=64, strategy=strategy, chunk_size=chunk,
      mesh=mesh, aggregator=aggregator or aggregator_of(mode),
      client_masks=hetlora.client_masks_fn(init_params(), SEED, RANKS, FRACTIONS),
      client_regularizer=regularizer)


def run_round(fed, data, frozen=None):
  state = fed.init(init_params(), jax.random.key(0))
  return fed.apply(state, frozen or init_frozen(), data)


def check(mode, state, ref, ref_base):
  p = jax.tree.map(np.asarray, state.params)
  np.testing.assert_allclose(p['head']['kernel'], ref['head'], atol=TOL)
  if mode == 'product':
    a, b = p['layer']['lora_a'], p['layer']['lora_b']
    m = ref['mean_product']
    u, s, vt = np.linalg.svd(m)
    for r in sorted(set(RANKS) | {R}):   # each tier's truncation: the best rank-r approx
      np.testing.assert_allclose(a[:, :r] @ b[:r], (u[:, :r] * s[:r]) @ vt[:r], atol=TOL)
    return
  np.testing.assert_allclose(p['layer']['lora_a'], ref['lora_a'], atol=TOL)
  np.testing.assert_allclose(p['layer']['lora_b'], ref['lora_b'], atol=TOL)
  if mode == 'stack':
    np.testing.assert_allclose(np.asarray(state.base_delta['layer']) * SCALING,
                               ref_base - np.asarray(init_frozen()['layer']['base']['kernel']),
                               atol=TOL)


def test_data_has_every_tier():
  assert set(ranks_of(make_round_data()['client_id'])) == set(RANKS)


@pytest.mark.parametrize('mode', ['hetlora', *(pytest.param(m, marks=pytest.mark.slow)
                                                for m in ('fedit', 'stack', 'product'))])
def test_modes_match_per_client_reference_vmap(mode):
  data = make_round_data()
  state, metrics = run_round(build(mode), data)
  ref, ref_base = reference_round(mode, init_params(), init_frozen(), data, optax.sgd(0.3))
  check(mode, state, ref, ref_base)
  assert np.isfinite(float(metrics['train_loss']))


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['fedit', 'hetlora'])
def test_modes_match_reference_chunked_adam(mode):
  data = make_round_data(seed=1)
  fed = build(mode, 'chunked', 2, client_tx=optax.adam(0.05))
  state, _ = run_round(fed, data)
  ref, ref_base = reference_round(mode, init_params(), init_frozen(), data, optax.adam(0.05))
  check(mode, state, ref, ref_base)


@pytest.mark.slow
@pytest.mark.parametrize('strategy,chunk', [('chunked', 1), ('chunked', 4), ('sharded', 1),
                                            ('sharded', None)])
@pytest.mark.parametrize('mode', ['fedit', 'hetlora', 'stack', 'product'])
def test_modes_match_reference_every_strategy(mode, strategy, chunk):
  data = make_round_data(seed=2)
  state, _ = run_round(build(mode, strategy, chunk), data)
  ref, ref_base = reference_round(mode, init_params(), init_frozen(), data, optax.sgd(0.3))
  check(mode, state, ref, ref_base)


@pytest.mark.slow
def test_self_pruning_regularizer_matches_reference():
  reg = hetlora.self_pruning_penalty(0.5, 0.2)
  data = make_round_data(seed=3)
  state, _ = run_round(build('hetlora', 'chunked', 4, regularizer=reg), data)
  ref, ref_base = reference_round('hetlora', init_params(), init_frozen(), data,
                                  optax.sgd(0.3), gamma=0.5, lam=0.2)
  check('hetlora', state, ref, ref_base)
  # The penalty changes the result (the test would not see a missing regulariser).
  plain, _ = reference_round('hetlora', init_params(), init_frozen(), data, optax.sgd(0.3))
  assert np.abs(plain['lora_b'] - ref['lora_b']).max() > 1e-3


@pytest.mark.slow
def test_two_rounds_stack_moves_the_base_and_ranks_stay_fixed():
  """Round 2 starts from the merged base; the reference replays it client by client."""
  fed = build('stack', 'chunked', 2)
  state = fed.init(init_params(), jax.random.key(0))
  frozen = init_frozen()
  params = init_params()
  base = np.asarray(frozen['layer']['base']['kernel'], np.float64)
  for r in range(2):
    data = make_round_data(seed=10 + r)
    state, _ = fed.apply(state, frozen, data)
    ref_frozen = {'layer': {'base': {'kernel': jnp.asarray(base, jnp.float32)}}}
    ref, base = reference_round('stack', params, ref_frozen, data, optax.sgd(0.3))
    params = {'layer': {'lora_a': jnp.asarray(ref['lora_a'], jnp.float32),
                        'lora_b': jnp.asarray(ref['lora_b'], jnp.float32)},
              'head': {'kernel': jnp.asarray(ref['head'], jnp.float32)}}
  merged = fed.frozen_view(state, frozen)['layer']['base']['kernel']
  np.testing.assert_allclose(np.asarray(merged), base, atol=TOL)
  np.testing.assert_allclose(np.asarray(state.params['head']['kernel']), ref['head'], atol=TOL)


def _outside_probe():
  """A whole-round mean that also reports the largest |entry| a client holds outside
  its rank (client ids from the round context give each client's rank)."""
  mean = mean_lib.weighted_mean()

  def aggregate(updates, weights, params, context=None):
    delta, info = aggregate_base.reduce(mean, updates, weights, params)
    ranks = hetlora.client_rank(SEED, context.client_id, RANKS, FRACTIONS)
    local_a = params['layer']['lora_a'][None] + updates['layer']['lora_a']
    local_b = params['layer']['lora_b'][None] + updates['layer']['lora_b']
    outside = jnp.arange(R)[None, :] >= ranks[:, None]          # [C, R]
    info = dict(info,
                outside_a=jnp.max(jnp.abs(jnp.where(outside[:, None, :], local_a, 0.0))),
                outside_b=jnp.max(jnp.abs(jnp.where(outside[:, :, None], local_b, 0.0))),
                inside_b=jnp.max(jnp.abs(jnp.where(outside[:, :, None], 0.0, local_b))))
    return delta, info

  return aggregate_base.whole_round(aggregate, name='outside_probe')


def test_masked_components_stay_exactly_zero_on_clients():
  # Adam with weight decay would move every entry it is given: the mask pins them.
  fed = build('fedit', 'chunked', 2, client_tx=optax.adamw(0.1, weight_decay=0.5),
              aggregator=_outside_probe())
  _, metrics = run_round(fed, make_round_data())
  assert float(metrics['outside_a']) == 0.0
  assert float(metrics['outside_b']) == 0.0
  assert float(metrics['inside_b']) > 0.0


def test_uplink_bytes_count_each_client_at_its_rank():
  data = make_round_data()
  data['client_mask'][-1] = False   # a padding client sends nothing
  _, metrics = run_round(build('fedit', 'chunked', 2), data)
  ranks = ranks_of(data['client_id'])[:-1]
  other = D_OUT * K * 4
  expected = sum(int(r) * (D_IN + D_OUT) * 4 + other for r in ranks)
  assert float(metrics['uplink_bytes']) == expected
  dense = len(ranks) * ((D_IN + D_OUT) * R * 4 + other)
  assert float(metrics['uplink_bytes_dense']) == dense
  assert expected < dense
  np.testing.assert_array_equal(np.asarray(metrics['client_uplink_bytes'])[:-1],
                                [hetlora.uplink_nbytes(init_params(), int(r)) for r in ranks])


# -------------------------------------------------------------- pure functions

def test_client_rank_is_a_pure_function_of_seed_and_id():
  ids = np.arange(4000)
  draw = jax.jit(hetlora.client_rank, static_argnums=(0, 2, 3))
  r1 = np.asarray(draw(SEED, ids, RANKS, FRACTIONS))
  np.testing.assert_array_equal(r1[[7, 3]], np.asarray(
      hetlora.client_rank(SEED, np.asarray([7, 3]), RANKS, FRACTIONS)))
  freq = np.asarray([(r1 == r).mean() for r in RANKS])
  np.testing.assert_allclose(freq, FRACTIONS, atol=0.03)   # 4000 draws: ~4 std
  assert not np.array_equal(r1, np.asarray(draw(SEED + 1, ids, RANKS, FRACTIONS)))
  uni = np.asarray(draw(0, ids, (2, 8), None))
  assert abs((uni == 2).mean() - 0.5) < 0.03
  with pytest.raises(ValueError, match='fractions'):
    hetlora.client_rank(0, 1, (2, 4), (0.5, 0.6))


def test_rank_masks_and_zero_pad():
  params = init_params()
  m = hetlora.rank_masks(params, 2)
  assert m['head']['kernel'].all()
  np.testing.assert_array_equal(m['layer']['lora_a'], np.arange(R)[None, :].repeat(D_IN, 0) < 2)
  np.testing.assert_array_equal(m['layer']['lora_b'], np.arange(R)[:, None].repeat(D_OUT, 1) < 2)
  stacked = {'l': {'lora_a': jnp.zeros((3, D_IN, R)), 'lora_b': jnp.zeros((3, R, D_OUT))}}
  ms = hetlora.rank_masks(stacked, 3)
  assert ms['l']['lora_a'][..., :3].all() and not ms['l']['lora_a'][..., 3:].any()
  assert ms['l']['lora_b'][:, :3].all() and not ms['l']['lora_b'][:, 3:].any()
  upd = jax.tree.map(jnp.ones_like, params)
  padded = hetlora.zero_pad(upd, m, params)
  local = jax.tree.map(jnp.add, params, padded)
  np.testing.assert_array_equal(local['layer']['lora_a'][:, 2:], 0.0)
  np.testing.assert_allclose(local['layer']['lora_a'][:, :2], params['layer']['lora_a'][:, :2] + 1)
  with pytest.raises(ValueError, match='exceed'):
    hetlora.client_masks_fn(params, 0, (8,))


def test_sparsity_weighted_matches_numpy_and_is_streaming():
  rng = np.random.default_rng(0)
  params = init_params()
  ranks = np.asarray([1, 2, 4, 3, 2])
  w = np.asarray([1.0, 2.0, 0.0, 3.0, 1.5])   # a weight-0 client never counts
  ups, locs = [], []
  for r in ranks:
    a = rng.normal(size=(D_IN, r))
    b = rng.normal(size=(r, D_OUT))
    la, lb = np.zeros((D_IN, R)), np.zeros((R, D_OUT))
    la[:, :r], lb[:r] = a, b
    locs.append((la, lb, a @ b))
    ups.append({'layer': {'lora_a': la - np.asarray(params['layer']['lora_a']),
                          'lora_b': lb - np.asarray(params['layer']['lora_b'])},
                'head': {'kernel': rng.normal(size=(D_OUT, K))}})
  updates = jax.tree.map(lambda *x: jnp.asarray(np.stack(x), jnp.float32), *ups)
  agg = hetlora.sparsity_weighted()
  delta, _ = jax.jit(lambda u: aggregate_base.reduce(agg, u, w, params))(updates)
  s = np.asarray([np.linalg.norm(p) for _, _, p in locs]) * (w > 0)
  a_ref = sum(si * la for si, (la, _, _) in zip(s, locs)) / s.sum()
  np.testing.assert_allclose(np.asarray(params['layer']['lora_a'] + delta['layer']['lora_a']),
                             a_ref, atol=1e-5)
  # Two chunks give the same aggregate (sum-decomposable).
  acc = agg.zero(params)
  for sl in (slice(0, 2), slice(2, 5)):
    acc = agg.accumulate(acc, jax.tree.map(lambda x: x[sl], updates), w[sl], params)
  delta2, _ = agg.finalize(acc, params)
  for x, y in zip(jax.tree.leaves(delta), jax.tree.leaves(delta2)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_pruned_rank_rule():
  a0 = jnp.ones((D_IN, R))
  b0 = jnp.ones((R, D_OUT))
  shrunk_b = b0.at[2:].multiply(0.5)
  assert int(hetlora.pruned_rank(a0, shrunk_b, a0, b0, 4, 0.5)) == 2
  assert int(hetlora.pruned_rank(a0, b0 * 2, a0, b0, 4, 0.5)) == 4
  reg = hetlora.self_pruning_penalty(0.5, 1.0)
  m = hetlora.rank_masks({'l': {'lora_a': a0, 'lora_b': b0}}, 4)
  # tail = components 2, 3: ||A_tail|| ||B_tail|| = sqrt(2 D_IN) sqrt(2 D_OUT)
  np.testing.assert_allclose(float(reg({'l': {'lora_a': a0, 'lora_b': b0}}, m)),
                             np.sqrt(2 * D_IN) * np.sqrt(2 * D_OUT), rtol=1e-6)


# ---------------------------------------------------------------------- config

def _hetero(mode='hetlora'):
  return hetlora_configs.get_config(mode)


def _set(c, dotted, value):
  node = c
  *parents, leaf = dotted.split('.')
  for part in parents:
    node = node[part]
  node[leaf] = value


def test_experiment_configs_are_valid():
  for mode in hetlora_configs.MODES:
    for variant in ('', ',tiny'):
      config_lib.validate(hetlora_configs.get_config(mode + variant), num_devices=1)
  with pytest.raises(ValueError, match='MODE'):
    hetlora_configs.get_config('nope')


@pytest.mark.parametrize('field,value,message', [
    ('privacy.enabled', True, 'clip does not bound'),
    ('compress.uplink', 'top_k', 'measured on the max-rank'),
    ('compress.downlink', 'top_k', 'measured on the max-rank'),
    ('aggregator.name', 'median', 'outliers'),
    ('attack.kind', 'scale', 'robust aggregators'),
    ('prune.enabled', True, 'pruning masks and rank masks'),
    ('peft.ranks', (2, 16), 'peft.rank=8'),
    ('peft.ranks', (), 'non-empty'),
    ('peft.rank_fractions', (0.5, 0.5), 'summing to 1'),
    ('peft.rank_distribution', 'normal', 'allowed values'),
    ('peft.hetlora_gamma', 1.0, 'must be < 1'),
    ('peft.lora_aggregation', 'ffa', 'FFA freezes lora_a'),
])
def test_config_rejects_unsupported_combinations(field, value, message):
  c = _hetero('zeropad')
  if field == 'attack.kind':
    c.attack.fraction = 0.1
  _set(c, field, value)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(c, num_devices=1)
  assert field.split('.')[0] in str(e.value) or 'peft' in str(e.value)


def test_config_rejects_more():
  c = _hetero('zeropad')
  c.peft.method = 'adapter'
  with pytest.raises(config_lib.ConfigError, match='peft.method'):
    config_lib.validate(c, num_devices=1)
  c = _hetero('zeropad')
  c.peft.rank_distribution = 'uniform'
  with pytest.raises(config_lib.ConfigError, match='rank_fractions'):
    config_lib.validate(c, num_devices=1)
  c = _hetero('homo_max')
  c.peft.ranks = (2,)
  with pytest.raises(config_lib.ConfigError, match='peft.ranks'):
    config_lib.validate(c, num_devices=1)
  c = _hetero('homo_max')
  c.peft.hetlora_lambda = 0.1
  with pytest.raises(config_lib.ConfigError, match='hetlora_lambda'):
    config_lib.validate(c, num_devices=1)
  c = _hetero('homo_max')    # the HetLoRA aggregator with DP or a robust rule, any ranks
  c.peft.lora_aggregation = 'hetlora'
  c.privacy.enabled = True
  with pytest.raises(config_lib.ConfigError, match='uniform weights'):
    config_lib.validate(c, num_devices=1)
  c.privacy.enabled = False
  c.aggregator.name = 'median'
  with pytest.raises(config_lib.ConfigError, match='itself the aggregator'):
    config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize('algorithm', ['fednova', 'scaffold', 'fedkseed'])
def test_config_rejects_other_fl_algorithms(algorithm):
  c = _hetero('zeropad')
  c.fl.algorithm = algorithm
  with pytest.raises(config_lib.ConfigError, match='rank_distribution|fl.algorithm'):
    config_lib.validate(c, num_devices=1)
  c = _hetero('homo_max')
  c.peft.lora_aggregation = 'hetlora'
  c.fl.algorithm = algorithm
  with pytest.raises(config_lib.ConfigError, match='lora_aggregation|fl.algorithm'):
    config_lib.validate(c, num_devices=1)


@pytest.mark.slow
def test_resume_from_a_host_copy_of_the_state_in_a_new_round():
  """Ranks are a pure function of (seed, id): a rebuilt round resumes exactly."""
  frozen = init_frozen()
  fed = build('hetlora', 'chunked', 2)
  state = fed.init(init_params(), jax.random.key(0))
  state, _ = fed.apply(state, frozen, make_round_data(seed=20))
  saved = jax.device_get(state)
  cont, m1 = fed.apply(state, frozen, make_round_data(seed=21))
  fresh = build('hetlora', 'chunked', 2)
  resumed, m2 = fresh.apply(jax.tree.map(jnp.asarray, saved), frozen, make_round_data(seed=21))
  for x, y in zip(jax.tree.leaves(cont.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert float(m1['uplink_bytes']) == float(m2['uplink_bytes'])


def test_engine_rejects_privacy_and_compressors():
  masks = hetlora.client_masks_fn(init_params(), SEED, RANKS, FRACTIONS)
  from fedjax_fm import compress, privacy  # pylint: disable=g-import-not-at-top
  kw = dict(client_optimizer=optax.sgd(0.1), server_optimizer=optax.sgd(1.0), num_clients=8,
            client_masks=masks)
  with pytest.raises(ValueError, match='client_masks'):
    engine.build_round(loss_fn, init_params(), privacy=privacy.gaussian_dp(1.0, 0.0), **kw)
  with pytest.raises(ValueError, match='client_masks'):
    engine.build_round(loss_fn, init_params(), compressor=compress.get_compressor('top_k', fraction_or_k=0.1),
                       **kw)
  with pytest.raises(ValueError, match='needs client_masks'):
    engine.build_round(loss_fn, init_params(), client_optimizer=optax.sgd(0.1),
                       server_optimizer=optax.sgd(1.0), num_clients=8,
                       client_regularizer=hetlora.self_pruning_penalty(0.5, 0.1))


@pytest.mark.slow
def test_build_experiment_wires_the_ranks(minilm_dir, tmp_path):
  """The config route (train.build_experiment): masks from (seed, id), bytes per rank."""
  del minilm_dir
  from fedjax_fm import train  # pylint: disable=g-import-not-at-top
  c = hetlora_configs.get_config('hetlora,tiny')
  c.progress, c.tensorboard = False, False
  exp = train.build_experiment(c, str(tmp_path))
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(c.seed))
  data = exp.round_data(0)
  state, m = exp.fed_round.apply(state, exp.split.frozen, data)
  ranks = np.asarray(hetlora.client_rank(c.seed, data['client_id'], tuple(c.peft.ranks),
                                         tuple(c.peft.rank_fractions)))
  sent = [hetlora.uplink_nbytes(exp.split.trainable, int(r))
          for r, ok in zip(ranks, data['client_mask']) if ok]
  assert float(m['uplink_bytes']) == sum(sent)
  assert float(m['uplink_bytes']) < float(m['uplink_bytes_dense'])
  assert np.isfinite(float(m['train_loss']))
  # Every leaf of the server model is finite.
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


# ------------------------------------------------- rank self-pruning (rank store)

PRUNE_GAMMA, PRUNE_LAM = 0.5, 0.05


def _np_tail(a, b, r, gamma):
  g = int(np.floor(gamma * r))
  return np.linalg.norm(np.asarray(a, np.float64)[:, g:r]) * np.linalg.norm(
      np.asarray(b, np.float64)[g:r])


def reference_pruning_round(params, frozen, data, client_tx, store, gamma=PRUNE_GAMMA,
                            lam=PRUNE_LAM):
  """One HetLoRA round with rank self-pruning, client by client (NumPy rule).

  ``store``: {client id: rank}. Each sampled client trains its rank-r LoRA
  (truncated factors, penalty on the tail g:r), prunes to max(floor(gamma r), 1)
  when its tail norm ended below where it started, and sends its factors at the
  new rank; the server zero-pads and takes the sparsity-weighted mean.
  Returns (params, store, sent ranks by id, [(relative margin, pruned)] of the
  clients that could prune).
  """
  store = dict(store)
  clients, sent, margins = [], {}, []
  for c in range(data['weight'].shape[0]):
    if not data['client_mask'][c]:
      continue
    cid = int(data['client_id'][c])
    r = store[cid]
    g = int(np.floor(gamma * r))
    p = {'layer': {'lora_a': params['layer']['lora_a'][:, :r],
                   'lora_b': params['layer']['lora_b'][:r]},
         'head': params['head']}
    before = _np_tail(p['layer']['lora_a'], p['layer']['lora_b'], r, gamma)
    opt = client_tx.init(p)
    for s in range(data['step_mask'].shape[1]):
      if not data['step_mask'][c, s]:
        continue
      batch = jax.tree.map(lambda a: jnp.asarray(a[c, s]), data['batch'])
      m = jnp.asarray(data['example_mask'][c, s], jnp.float32)
      grads = _grad_fn(r, g, lam)(p, frozen, batch, m)
      updates, opt = client_tx.update(grads, opt, p)
      p = optax.apply_updates(p, updates)
    after = _np_tail(p['layer']['lora_a'], p['layer']['lora_b'], r, gamma)
    new_r = max(g, 1) if after < before and max(g, 1) < r else r
    if max(g, 1) < r and before > 0:   # (a tail that is exactly 0 stays 0: a true tie)
      margins.append((abs(after - before) / before, new_r < r))
    store[cid] = sent[cid] = new_r
    clients.append({'rank': new_r, 'weight': float(data['weight'][c]),
                    'a': np.asarray(p['layer']['lora_a'], np.float64)[:, :new_r],
                    'b': np.asarray(p['layer']['lora_b'], np.float64)[:new_r],
                    'head': np.asarray(p['head']['kernel'], np.float64)})
  w = np.asarray([c['weight'] for c in clients])
  s = np.asarray([np.linalg.norm(c['a'] @ c['b']) for c in clients])
  new = {'layer': {'lora_a': sum(x * pad(c)[0] for x, c in zip(s / s.sum(), clients)),
                   'lora_b': sum(x * pad(c)[1] for x, c in zip(s / s.sum(), clients))},
         'head': {'kernel': sum(x * c['head'] for x, c in zip(w / w.sum(), clients))}}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), new), store, sent, margins


def pruning_rounds(num_rounds=3):
  """Rounds with two clients left out of round 2 (masked) and new ids in round 3."""
  out = []
  for r in range(num_rounds):
    data = make_round_data(seed=30 + r)
    if r == 1:
      data['client_mask'][[0, 3]] = False
    if r == 2:
      data['client_id'] = data['client_id'].copy()
      data['client_id'][[1, 6]] = [40, 51]
    out.append(data)
  return out


def build_pruning(strategy='vmap', chunk=None):
  return engine.build_round(
      loss_fn, init_params(), client_optimizer=optax.sgd(0.3),
      server_optimizer=optax.sgd(1.0), num_clients=64, strategy=strategy, chunk_size=chunk,
      aggregator=hetlora.sparsity_weighted(),
      client_masks=hetlora.rank_store(init_params(), SEED, RANKS, FRACTIONS,
                                      prune_gamma=PRUNE_GAMMA),
      client_regularizer=hetlora.self_pruning_penalty(PRUNE_GAMMA, PRUNE_LAM))


def check_pruning_rounds(strategy, chunk=None, num_rounds=3):
  fed = build_pruning(strategy, chunk)
  state = fed.init(init_params(), jax.random.key(0))
  store0 = np.asarray(state.client_store[hetlora.STORE_KEY])
  np.testing.assert_array_equal(store0, ranks_of(np.arange(64)))   # from the tiers
  ref_store = {i: int(r) for i, r in enumerate(store0)}
  params, frozen = init_params(), init_frozen()
  margins = []
  for data in pruning_rounds(num_rounds):
    state, metrics = fed.apply(state, frozen, data)
    params, ref_store, sent, m = reference_pruning_round(params, frozen, data,
                                                         optax.sgd(0.3), ref_store)
    margins += m
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=TOL)
    # The whole store: sampled clients moved as the reference, the others kept theirs.
    np.testing.assert_array_equal(np.asarray(state.client_store[hetlora.STORE_KEY]),
                                  [ref_store[i] for i in range(64)])
    on = data['client_mask']
    np.testing.assert_array_equal(np.asarray(metrics['client_rank'])[on],
                                  [sent[int(i)] for i in data['client_id'][on]])
    # Uplink at the rank each client sent (its rank after pruning).
    assert float(metrics['uplink_bytes']) == sum(
        hetlora.uplink_nbytes(init_params(), r) for r in sent.values())
  pruned = sum(p for _, p in margins)
  kept = len(margins) - pruned   # could prune, but the tail grew
  assert pruned >= 2 and kept >= 2, (pruned, kept)   # both branches of the rule ran
  assert min(x for x, _ in margins) > 1e-3   # no decision sits near a float tie
  return state


def test_rank_self_pruning_matches_reference_over_rounds_vmap():
  state = check_pruning_rounds('vmap', num_rounds=2)
  store = np.asarray(state.client_store[hetlora.STORE_KEY])
  untouched = np.setdiff1d(np.arange(64), np.concatenate(
      [d['client_id'] for d in pruning_rounds(2)]))
  np.testing.assert_array_equal(store[untouched], ranks_of(untouched))


@pytest.mark.slow
@pytest.mark.parametrize('strategy,chunk', [('vmap', None), ('chunked', 2), ('chunked', 8),
                                            ('sharded', 1), ('sharded', None)])
def test_rank_self_pruning_matches_reference_every_strategy(strategy, chunk):
  check_pruning_rounds(strategy, chunk)


def test_rank_store_without_pruning_equals_fixed_ranks():
  data = make_round_data(seed=5)
  fixed, _ = run_round(build('hetlora'), data)
  fed = engine.build_round(
      loss_fn, init_params(), client_optimizer=optax.sgd(0.3),
      server_optimizer=optax.sgd(1.0), num_clients=64, strategy='vmap',
      aggregator=hetlora.sparsity_weighted(),
      client_masks=hetlora.rank_store(init_params(), SEED, RANKS, FRACTIONS))
  stored, m = run_round(fed, data)
  for x, y in zip(jax.tree.leaves(fixed.params), jax.tree.leaves(stored.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(stored.client_store[hetlora.STORE_KEY]),
                                ranks_of(np.arange(64)))
  np.testing.assert_array_equal(np.asarray(m['client_rank']), ranks_of(data['client_id']))


def test_a_client_whose_update_does_not_arrive_keeps_its_rank():
  data = make_round_data(seed=31)
  fed = build_pruning()
  state = fed.init(init_params(), jax.random.key(0))
  state, _ = fed.apply(state, init_frozen(), data)   # B is nonzero from round 2 on
  data = make_round_data(seed=32)
  data['batch']['x'][2] = np.nan                       # a client that diverges
  before = np.asarray(state.client_store[hetlora.STORE_KEY])
  state, m = fed.apply(state, init_frozen(), data)
  after = np.asarray(state.client_store[hetlora.STORE_KEY])
  assert float(m['nonfinite_clients']) == 1.0
  cid = int(data['client_id'][2])
  assert after[cid] == before[cid]
  assert (after[data['client_id']] < before[data['client_id']]).any()   # others pruned


def test_prune_client_rank_rule():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(D_IN, R)).astype(np.float32)
  b = rng.normal(size=(R, D_OUT)).astype(np.float32)
  start = {'l': {'lora_a': jnp.asarray(a), 'lora_b': jnp.asarray(b)}, 'h': jnp.ones(3)}
  shrunk = {'l': {'lora_a': jnp.asarray(a), 'lora_b': jnp.asarray(b).at[2:].multiply(0.9)},
            'h': jnp.ones(3)}
  grown = {'l': {'lora_a': jnp.asarray(a) * 1.1, 'lora_b': jnp.asarray(b)}, 'h': jnp.ones(3)}
  np.testing.assert_allclose(float(hetlora.tail_norm(start, 4, 0.5)),
                             _np_tail(a, b, 4, 0.5), rtol=1e-6)
  assert int(hetlora.prune_client_rank(shrunk, start, 4, 0.5)) == 2
  assert int(hetlora.prune_client_rank(grown, start, 4, 0.5)) == 4
  # floor(0.9 * 3) = 2; the tail of rank 3 is component 2 only.
  assert int(hetlora.prune_client_rank(shrunk, start, 3, 0.9)) == 2
  # Rank 1 never drops to 0 (floor(0.5) = 0 is raised to min_rank = 1).
  tiny = {'l': {'lora_a': jnp.asarray(a) * 0.5, 'lora_b': jnp.asarray(b)}, 'h': jnp.ones(3)}
  assert int(hetlora.prune_client_rank(tiny, start, 1, 0.5)) == 1
  assert int(hetlora.prune_client_rank(tiny, start, 4, 0.5, min_rank=3)) == 3
  # floor(gamma r) exactly as on the host (0.7 * 10 is 6.999... in float64, 7 in float32).
  big = {'l': {'lora_a': jnp.ones((2, 10)), 'lora_b': jnp.ones((10, 2))}}
  small = jax.tree.map(lambda x: x * 0.5, big)
  assert int(hetlora.prune_client_rank(small, big, 10, 0.7)) == int(np.floor(0.7 * 10))
  with pytest.raises(ValueError, match='prune_gamma'):
    hetlora.rank_store(init_params(), 0, RANKS, FRACTIONS, prune_gamma=1.0)


@pytest.mark.parametrize('field,value,message', [
    ('peft.lora_aggregation', 'fedit', 'peft.lora_aggregation="hetlora"'),
    ('peft.rank_distribution', 'none', 'peft.rank_distribution in'),
    ('peft.hetlora_prune', None, 'must be a bool'),
])
def test_config_rejects_pruning_outside_hetlora(field, value, message):
  c = _hetero('hetlora')
  assert c.peft.hetlora_prune
  _set(c, field, value)
  if field == 'peft.rank_distribution':
    c.peft.ranks, c.peft.rank_fractions, c.peft.hetlora_lambda = (), (), 0.0
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(c, num_devices=1)
  assert 'peft.hetlora_prune' in str(e.value)


@pytest.mark.slow
def test_run_with_pruning_resumes_bit_identically(minilm_dir, tmp_path):
  """Through `train.run` (hetlora,tiny: ranks in the store, self-pruned): 3 rounds
  straight == 2 rounds, checkpoint, resume to 3; the store was saved and moved."""
  del minilm_dir
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from fedjax_fm import checkpoint  # pylint: disable=g-import-not-at-top
  from fedjax_fm import train  # pylint: disable=g-import-not-at-top

  def config(rounds):
    c = hetlora_configs.get_config('hetlora,tiny')
    c.progress, c.tensorboard, c.checkpoint.every = False, False, 1
    c.num_rounds = rounds
    # SGD and a strong penalty: tails shrink within the tiny run (one Adam step of
    # lr-sized sign moves on B ~ 0 grows the tail instead).
    c.peft.hetlora_lambda = 1.0
    c.client_optimizer.name, c.client_optimizer.learning_rate = 'sgd', 0.05
    return c

  def run(c, workdir):
    with contextlib.redirect_stdout(io.StringIO()):
      train.run(c, str(workdir))

  run(config(3), tmp_path / 'straight')
  run(config(2), tmp_path / 'resumed')
  run(config(3), tmp_path / 'resumed')
  c = config(3)
  exp = train.build_experiment(c, str(tmp_path / 'like'))
  like = exp.fed_round.init(exp.split.trainable, jax.random.key(c.seed))
  states = run_testlib.saved_states(tmp_path, ('straight', 'resumed'), like, step=3)
  assert checkpoint.tree_equal(states[0], states[1])
  initial = np.asarray(like.client_store[hetlora.STORE_KEY])
  stored = np.asarray(states[0].client_store[hetlora.STORE_KEY])
  assert stored.dtype == np.int32
  assert (stored <= initial).all() and (stored < initial).any()   # clients pruned
