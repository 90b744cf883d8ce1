"""System heterogeneity: the seeded schedule, its effect on the round, config and resume."""

from __future__ import annotations

import contextlib
import io
import json
import math

import jax
import numpy as np
import optax
import pytest

from experiments.configs import heterogeneity as het_config
from fedjax_fm import config as config_lib
from fedjax_fm import engine
from fedjax_fm import train
from fedjax_fm.engine import heterogeneity as het_lib
from tests import run_testlib
from tests import test_scaffold_fednova as ref

IDS = np.arange(0, 400, 7)


def test_schedule_is_a_pure_function_of_seed_round_and_client():
  het = het_lib.SystemHeterogeneity(step_budget='lognormal', step_budget_sigma=0.8,
                                    dropout=0.3, deadline=6.0, speed_sigma=0.7)
  steps, reports = het_lib.client_schedule(het, 10, 5, 3, IDS)
  # Any subset, in any order, gets the same values (strategies, chunks, devices, resume).
  perm = np.random.default_rng(0).permutation(len(IDS))[:20]
  s2, r2 = het_lib.client_schedule(het, 10, 5, 3, IDS[perm])
  np.testing.assert_array_equal(s2, steps[perm])
  np.testing.assert_array_equal(r2, reports[perm])
  s3, _ = het_lib.client_schedule(het, 10, 5, 4, IDS)
  s4, _ = het_lib.client_schedule(het, 10, 6, 3, IDS)
  assert not np.array_equal(s3, steps) and not np.array_equal(s4, steps)
  assert np.all(steps[~reports] == 0) and np.all((steps[reports] >= 1) & (steps[reports] <= 10))


def test_budget_distributions():
  lo, local = 2, 8
  many = np.arange(4000)
  uni, rep = het_lib.client_schedule(het_lib.SystemHeterogeneity('uniform', lo), local, 0, 0,
                                     many)
  assert rep.all() and set(uni.tolist()) == set(range(lo, local + 1))
  np.testing.assert_allclose(uni.mean(), (lo + local) / 2, atol=0.15)
  sigma = 0.6
  logn, _ = het_lib.client_schedule(
      het_lib.SystemHeterogeneity('lognormal', 1, step_budget_sigma=sigma), local, 0, 0, many)
  # P(budget = local_steps) = P(round(L exp(sigma z - sigma^2/2)) >= L)
  z = (math.log((local - 0.5) / local) + sigma ** 2 / 2) / sigma
  p_full = 0.5 * math.erfc(z / math.sqrt(2))
  np.testing.assert_allclose(np.mean(logn == local), p_full, atol=0.03)
  tiers = (1.0, 0.5, 0.25)
  het = het_lib.SystemHeterogeneity('tiers', 1, step_budget_tiers=tiers)
  t0, _ = het_lib.client_schedule(het, local, 0, 0, many)
  t1, _ = het_lib.client_schedule(het, local, 0, 1, many)
  np.testing.assert_array_equal(t0, t1)   # a client's tier is fixed for the run
  assert set(t0.tolist()) == {8, 4, 2}
  np.testing.assert_allclose([np.mean(t0 == v) for v in (8, 4, 2)], 1 / 3, atol=0.03)


def test_dropout_and_deadline():
  many = np.arange(4000)
  _, rep = het_lib.client_schedule(het_lib.SystemHeterogeneity(dropout=0.25), 5, 0, 0, many)
  np.testing.assert_allclose(np.mean(~rep), 0.25, atol=0.02)
  het = het_lib.SystemHeterogeneity(deadline=3.0, speed_sigma=0.5)
  steps, rep = het_lib.client_schedule(het, 5, 1, 0, many)
  speeds = het_lib.client_speeds(het, 1, many)
  want = np.minimum(5, np.floor(3.0 * speeds + 1e-9)).astype(int)
  np.testing.assert_array_equal(steps, np.where(want >= 1, want, 0))
  np.testing.assert_array_equal(rep, want >= 1)
  assert (~rep).any() and (steps == 5).any()   # the deadline cuts some clients off entirely


def test_apply_to_round_masks_steps_and_clients():
  data = ref.round_data(0)   # already heterogeneous; re-derive from a plain round
  plain = dict(data)
  plain['step_mask'] = data['example_mask'].any(-1) | True
  plain['example_mask'] = np.ones_like(data['example_mask'])
  plain['client_mask'] = np.arange(ref.C) < ref.C - 2
  plain.pop('dropped')
  het = het_lib.SystemHeterogeneity('uniform', 1, dropout=0.3)
  out = het_lib.apply_to_round(plain, het, ref.S, seed=1, round_idx=2)
  steps, reports = het_lib.client_schedule(het, ref.S, 1, 2, plain['client_id'])
  real = plain['client_mask']
  np.testing.assert_array_equal(out['client_mask'], real & reports)
  np.testing.assert_array_equal(out['dropped'], real & ~reports)
  np.testing.assert_array_equal(out['step_mask'].sum(1), steps)
  assert not out['example_mask'][~out['step_mask']].any()
  assert het_lib.apply_to_round(plain, het_lib.SystemHeterogeneity(), ref.S, seed=1,
                                round_idx=2) is plain


@pytest.mark.parametrize('strategy,chunk', [
    ('vmap', None), pytest.param('chunked', 2, marks=pytest.mark.slow)])
def test_fedavg_and_fedprox_under_heterogeneity_equal_reference(strategy, chunk):
  params = ref.init_params()
  data = ref.round_data(0)
  for prox_mu in (0.0, 0.5):
    deltas, weights = [], []
    for c in range(ref.C):
      if data['client_mask'][c]:
        d, _ = ref._local(params, data, c, prox_mu=prox_mu)  # pylint: disable=protected-access
        deltas.append(d)
        weights.append(float(data['weight'][c]))
    w = np.asarray(weights) / np.sum(weights)
    want = {k: np.asarray(params[k]) + sum(wi * d[k] for wi, d in zip(w, deltas))
            for k in params}
    fed = ref.build(strategy, chunk, prox_mu=prox_mu)
    state, m = fed.apply(fed.init(params, jax.random.key(0)), ref.FROZEN, data)
    ref._close(state.params, want)  # pylint: disable=protected-access
    assert float(m['dropped_clients']) == data['dropped'].sum() >= 1
    assert float(m['num_clients']) == data['client_mask'].sum()


def test_config_fields_and_rejections():
  c = het_config.get_config('fedavg,tiny')
  config_lib.validate(c, num_devices=1)
  cases = [
      ('fl.step_budget', 'gamma', 'allowed values'),
      ('fl.step_budget_min', 0, '>= 1'),
      ('fl.step_budget_tiers', (1.0, 0.0), 'fractions'),
      ('fl.dropout', 1.0, '< 1.0'),
      ('fl.deadline', -1.0, '>= 0'),
      ('fl.algorithm', 'fedopt', 'allowed values'),
  ]
  for field, value, match in cases:
    bad = het_config.get_config('fedavg,tiny')
    section, key = field.split('.')
    bad[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(bad, num_devices=1)


REJECTIONS = [
    # (algorithm, field, value, what the message names)
    ('fednova', 'privacy.enabled', True, 'privacy.enabled'),
    ('scaffold', 'privacy.enabled', True, 'privacy.enabled'),
    ('fednova', 'compress.uplink', 'top_k', 'compress.uplink'),
    ('scaffold', 'compress.downlink', 'stochastic_uniform', 'compress.downlink'),
    ('fednova', 'aggregator.name', 'median', 'aggregator.name'),
    ('scaffold', 'aggregator.name', 'krum', 'aggregator.name'),
    ('scaffold', 'attack.kind', 'sign_flip', 'attack.kind'),
    ('fednova', 'prune.enabled', True, 'prune.enabled'),
    ('scaffold', 'server_optimizer.name', 'fedadam', 'server_optimizer.name'),
    ('fednova', 'client_optimizer.name', 'adam', 'client_optimizer.name'),
    ('scaffold', 'client_optimizer.name', 'momentum', 'client_optimizer.name'),
    ('scaffold', 'fl.prox_mu', 0.1, 'fl.prox_mu'),
    ('fednova', 'client_optimizer.weight_decay', 0.01, 'client_optimizer.weight_decay'),
]


@pytest.mark.parametrize('algo,field,value,match', REJECTIONS)
def test_validate_rejects_combinations(algo, field, value, match):
  c = het_config.get_config(algo + ',tiny')
  section, key = field.split('.')
  c[section][key] = value
  if field == 'attack.kind':
    c.attack.fraction = 0.1
  with pytest.raises(config_lib.ConfigError, match=match.replace('.', r'\.')):
    config_lib.validate(c, num_devices=1)


def test_validate_rejects_lora_modes_and_momentum_prox():
  for algo in ('fednova', 'scaffold'):
    for mode in ('product', 'stack'):
      c = het_config.get_config(algo + ',tiny')
      c.peft.method, c.peft.lora_aggregation = 'lora', mode
      with pytest.raises(config_lib.ConfigError, match='lora_aggregation'):
        config_lib.validate(c, num_devices=1)
  c = het_config.get_config('fednova,tiny')
  c.client_optimizer.name, c.fl.prox_mu = 'momentum', 0.1
  with pytest.raises(config_lib.ConfigError, match='prox_mu'):
    config_lib.validate(c, num_devices=1)
  c = het_config.get_config('fedavg,tiny')
  c.privacy.enabled, c.privacy.mechanism, c.fl.dropout = True, 'skellam', 0.1
  c.privacy.bits = 20
  with pytest.raises(config_lib.ConfigError, match='fl.dropout'):
    config_lib.validate(c, num_devices=1)


def _run(config, workdir):
  with contextlib.redirect_stdout(io.StringIO()):
    return train.run(config, workdir)


@pytest.mark.slow
@pytest.mark.parametrize('algo', ['fednova', 'scaffold'])
def test_run_resumes_bit_identically(tmp_path, algo):
  """Through `train.run`: 3 rounds straight == 2 rounds, checkpoint, resume to 3."""
  c = het_config.get_config(algo + ',tiny')
  c.progress, c.tensorboard = False, False
  c.checkpoint.every = 1
  _run(c, str(tmp_path / 'straight'))
  c2 = het_config.get_config(algo + ',tiny')
  c2.progress, c2.tensorboard, c2.checkpoint.every = False, False, 1
  c2.num_rounds = 2
  _run(c2, str(tmp_path / 'resumed'))
  _run(c, str(tmp_path / 'resumed'))
  from fedjax_fm import checkpoint  # pylint: disable=g-import-not-at-top
  exp = train.build_experiment(c, str(tmp_path))
  like = exp.fed_round.init(exp.split.trainable, jax.random.key(c.seed))
  states = run_testlib.saved_states(tmp_path, ('straight', 'resumed'), like, step=3)
  assert checkpoint.tree_equal(states[0], states[1])
  if algo == 'scaffold':   # the server and client variates were saved and moved
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(states[0].control))
  lines = [json.loads(x) for x in open(tmp_path / 'resumed' / 'metrics.jsonl')]
  rounds = [m for m in lines if 'round' in m]
  assert [m['round'] for m in rounds] == [1, 2, 3]
  # the second process started at round 3 (it compiled there): it resumed, not restarted
  assert [m['round'] for m in rounds if 'compile_time_s' in m] == [1, 3]
  assert all('dropped_clients' in m and 'mean_steps' in m for m in rounds)


@pytest.mark.slow
def test_strategies_agree_through_build(tmp_path):
  """The built experiment: vmap, chunked and sharded give the same SCAFFOLD round."""
  out = {}
  for strategy, chunk in (('vmap', 0), ('chunked', 2), ('sharded', 1)):
    c = het_config.get_config('scaffold,tiny')
    c.fl.strategy, c.fl.chunk_size = strategy, chunk
    exp = train.build_experiment(c, str(tmp_path))
    state = exp.fed_round.init(exp.split.trainable, jax.random.key(c.seed))
    for r in range(2):
      state, _ = exp.fed_round.apply(state, exp.split.frozen, exp.round_data(r))
    out[strategy] = state
  for strategy in ('chunked', 'sharded'):
    for a, b in zip(jax.tree.leaves((out['vmap'].params, out['vmap'].control)),
                    jax.tree.leaves((out[strategy].params, out[strategy].control))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_engine_without_heterogeneity_unchanged():
  """No ``dropped`` in the round data: no heterogeneity metrics, plain FedAvg round."""
  data = ref.round_data(0)
  data = {k: v for k, v in data.items() if k != 'dropped'}
  fed = engine.build_round(ref.loss_fn, ref.init_params(), client_optimizer=optax.sgd(ref.LR),
                           server_optimizer=optax.sgd(1.0), num_clients=ref.POPULATION,
                           strategy='vmap')
  _, m = fed.apply(fed.init(ref.init_params(), jax.random.key(0)), ref.FROZEN, data)
  assert 'dropped_clients' not in m and 'fednova_tau_eff' not in m
