"""The automatic chunk size: the rule, the engine's resolution, the default config."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import config as config_lib
from fedjax_fm import engine
from fedjax_fm.engine import memory
from fedjax_fm.engine import strategies


def _reference_rule(clients, cap, divides):
  """The rule written out by enumeration: no chunk above ``cap``; a divisor of
  ``clients`` when one is at least half of ``cap`` (or must be), else the fewest
  chunks and, among those, the least padding."""
  cap = min(cap, clients)
  divisors = [k for k in range(1, cap + 1) if clients % k == 0]
  if divides or 2 * divisors[-1] > cap:
    return divisors[-1]
  fewest = min(math.ceil(clients / k) for k in range(1, cap + 1))
  candidates = [k for k in range(1, cap + 1) if math.ceil(clients / k) == fewest]
  return min(candidates, key=lambda k: (fewest * k - clients, -k))


@pytest.mark.parametrize('divides', [False, True])
def test_rule_matches_enumeration_and_pads_less_than_one_client_per_chunk(divides):
  spot = memory.sweet_spot('cpu')
  for clients in range(1, 260):
    k = memory.auto_chunk_size(clients, platform='cpu', divides=divides)
    assert k == _reference_rule(clients, spot, divides), clients
    chunks = math.ceil(clients / k)
    assert 1 <= k <= spot and chunks * k - clients < chunks
    if divides:
      assert clients % k == 0


def test_rule_examples():
  assert memory.sweet_spot('cpu') == 16
  assert memory.auto_chunk_size(100) == 10        # a divisor near the sweet spot: no padding
  assert memory.auto_chunk_size(500) == 10
  assert memory.auto_chunk_size(64) == 16
  assert memory.auto_chunk_size(10) == 10
  assert memory.auto_chunk_size(1) == 1
  assert memory.auto_chunk_size(97) == 14         # prime: 7 chunks of 14, one padding client
  assert memory.auto_chunk_size(97, divides=True) == 1
  with pytest.raises(ValueError, match='clients must be >= 1'):
    memory.auto_chunk_size(0)


def test_heavy_clients_lower_the_sweet_spot():
  mib = 2**20
  chunk_bytes = memory.SWEET_SPOT_CHUNK_BYTES['cpu']
  assert memory.sweet_spot('cpu', work_bytes=chunk_bytes / 5.5) == 5
  assert memory.sweet_spot('cpu', work_bytes=mib) == memory.SWEET_SPOT_CLIENTS['cpu']
  assert memory.sweet_spot('cpu', work_bytes=10 * chunk_bytes) == 1
  assert memory.sweet_spot('gpu', work_bytes=chunk_bytes) is None
  assert memory.auto_chunk_size(100, work_bytes=chunk_bytes / 5.5) == 5


def test_memory_budget_bounds_the_chunk():
  mib = 2**20
  # base 0.5 MiB + 1 MiB per client within 4.5 MiB: at most 4 clients per chunk.
  k = memory.auto_chunk_size(100, per_client_bytes=mib, base_bytes=mib // 2,
                             budget_bytes=4.5 * mib)
  assert k == 4
  # No sweet spot on a backend that was not measured: the budget alone bounds it.
  assert memory.auto_chunk_size(100, platform='gpu') == 100
  assert memory.auto_chunk_size(100, platform='gpu', per_client_bytes=mib,
                                budget_bytes=30 * mib) == 25
  assert memory.auto_chunk_size(100, per_client_bytes=mib, budget_bytes=mib // 2) == 1


def test_resolve_chunk_size():
  for auto in (None, 0, 'auto'):
    assert strategies.resolve_chunk_size(auto, 100, 'cpu') == 10
    assert strategies.resolve_chunk_size(auto, 34, 'cpu') == 2   # 34 = 2 x 17: a divisor
  assert strategies.resolve_chunk_size(7, 100, 'cpu') == 7
  for bad in ('big', -1):
    with pytest.raises(ValueError, match='chunk_size'):
      strategies.resolve_chunk_size(bad, 100, 'cpu')


def test_client_bytes_bound_counts_every_intermediate_once():
  def fn(x):
    y = jnp.sin(x) * 2.0                      # two [10] f32 outputs: 80 bytes

    def body(c, _):
      return c + jnp.cos(c), None             # two [10] f32 outputs in the body: 80 bytes
    c, _ = jax.lax.scan(body, y, None, length=50)
    return c
  x = jax.ShapeDtypeStruct((10,), jnp.float32)
  got = memory.client_bytes_bound(fn, x)
  # Outside the loop: sin, mul and the scan's own output (120); inside: once (80).
  assert got == 120 + 80


def _linear_problem(clients, steps=2, batch=3, dim=4, seed=0):
  rng = np.random.default_rng(seed)
  params = {'w': jnp.asarray(rng.normal(size=(dim,)), jnp.float32),
            'b': jnp.zeros((), jnp.float32)}

  def loss_fn(p, frozen, b, key):
    del frozen, key
    return (b['x'] @ p['w'] + p['b'] - b['y']) ** 2

  data = {
      'batch': {'x': rng.normal(size=(clients, steps, batch, dim)).astype(np.float32),
                'y': rng.normal(size=(clients, steps, batch)).astype(np.float32)},
      'example_mask': np.ones((clients, steps, batch), bool),
      'step_mask': np.ones((clients, steps), bool),
      'weight': rng.uniform(1, 3, size=(clients,)).astype(np.float32),
      'client_id': np.arange(clients, dtype=np.int32),
      'client_mask': np.ones((clients,), bool),
  }
  return params, loss_fn, data


@pytest.mark.parametrize('chunk_size', [None, 'auto'])
def test_auto_chunked_round_equals_vmap(chunk_size):
  clients = 34   # automatic chunk: 2 (the largest divisor within the sweet spot)
  params, loss_fn, data = _linear_problem(clients)
  out = {}
  for strategy, chunk in (('vmap', None), ('chunked', chunk_size)):
    fed = engine.build_round(loss_fn, params, client_optimizer=optax.sgd(0.1),
                             server_optimizer=optax.sgd(1.0), num_clients=clients,
                             strategy=strategy, chunk_size=chunk)
    state, metrics = fed.apply(fed.init(params, jax.random.key(0)), {}, data)
    out[strategy] = (state.params, metrics)
  for k in params:
    np.testing.assert_allclose(out['chunked'][0][k], out['vmap'][0][k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['chunked'][1]['client_loss'], out['vmap'][1]['client_loss'],
                             rtol=1e-5)


def test_build_round_rejects_a_bad_chunk_size():
  params, loss_fn, _ = _linear_problem(4)
  with pytest.raises(ValueError, match='chunk_size'):
    engine.build_round(loss_fn, params, client_optimizer=optax.sgd(0.1),
                       server_optimizer=optax.sgd(1.0), num_clients=4, chunk_size='many')


@pytest.mark.slow
def test_default_config_builds_with_an_automatic_chunk(monkeypatch, capsys):
  from experiments.configs import mlp_synthetic  # pylint: disable=g-import-not-at-top
  from fedjax_fm import train  # pylint: disable=g-import-not-at-top
  assert config_lib.base_config().fl.chunk_size == 0
  c = mlp_synthetic.get_config('tiny')
  c.fl.chunk_size = config_lib.base_config().fl.chunk_size
  c.fl.clients_per_round = 7

  def no_compile(*args, **kwargs):
    raise AssertionError('a small model fits the budget: no compilation to size the chunk')
  monkeypatch.setattr(memory, 'memory_coefficients', no_compile)
  exp = train.build_experiment(c)
  assert 'chunk_size=7 (automatic: sweet spot; 7 clients per device)' in capsys.readouterr().out
  data = exp.round_data(0)
  assert data['weight'].shape[0] == 7
  state = exp.fed_round.init(exp.split.trainable, jax.random.key(0))
  _, metrics = exp.fed_round.apply(state, exp.split.frozen, data)
  assert np.isfinite(float(metrics['train_loss']))


@pytest.mark.slow
def test_tight_budget_measures_the_round(monkeypatch, capsys):
  """A budget the bound cannot fit: XLA's analysis of the round sizes the chunk."""
  from experiments.configs import mlp_synthetic  # pylint: disable=g-import-not-at-top
  from fedjax_fm import train  # pylint: disable=g-import-not-at-top
  c = mlp_synthetic.get_config('tiny')
  c.fl.chunk_size = 0
  c.fl.clients_per_round = 8
  c.fl.memory_budget_mb = 1
  calls = []
  real = memory.memory_coefficients

  def measured(*args, **kwargs):
    base, per_client = real(*args, **kwargs)
    calls.append((base, per_client))
    return base, per_client
  monkeypatch.setattr(memory, 'memory_coefficients', measured)
  exp = train.build_experiment(c)
  assert len(calls) == 1
  base, per_client = calls[0]
  expected = memory.auto_chunk_size(8, per_client_bytes=per_client, base_bytes=base,
                                    budget_bytes=2**20)
  assert f'chunk_size={expected} (automatic: 1 MiB of temporaries' in capsys.readouterr().out
  assert exp.round_data(0)['weight'].shape[0] % expected == 0
