"""A vectorised sweep: each member equals a separate run of its setting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import engine
from tests.test_engine import FROZEN, init_params, loss_fn, make_round_data

pytestmark = pytest.mark.slow


def _build(strategy='chunked'):
  return engine.build_round(
      loss_fn, init_params(),
      client_optimizer=lambda h: optax.sgd(h['client_lr'], momentum=0.5),
      server_optimizer=lambda h: optax.adam(h['server_lr']),
      num_clients=64, strategy=strategy, chunk_size=2)


@pytest.mark.parametrize('strategy', ['vmap', 'chunked'])
def test_each_member_equals_its_separate_run(strategy):
  fed = _build(strategy)
  hp = {'client_lr': jnp.array([0.05, 0.2, 0.2]), 'server_lr': jnp.array([0.1, 0.1, 0.01])}
  keys = jax.random.split(jax.random.key(0), 3)
  sweep = engine.build_sweep(fed)
  states = sweep.init(init_params(), keys, hp)
  for r in range(2):
    states, metrics = sweep.apply(states, FROZEN, make_round_data(seed=r))
  assert metrics['train_loss'].shape == (3,)
  for i in range(3):
    member = {k: v[i] for k, v in hp.items()}
    state = fed.init(init_params(), keys[i], hparams=member)
    for r in range(2):
      state, m = fed.apply(state, FROZEN, make_round_data(seed=r))
    for k in state.params:
      np.testing.assert_allclose(states.params[k][i], state.params[k], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics['train_loss'][i], m['train_loss'], rtol=1e-5)
  # The settings really differ.
  assert not np.allclose(states.params['w1'][0], states.params['w1'][2])


def test_hparams_are_required_and_do_not_recompile():
  fed = _build()
  with pytest.raises(ValueError, match='hparams'):
    fed.init(init_params(), jax.random.key(0))
  s1 = fed.init(init_params(), jax.random.key(0), hparams={'client_lr': 0.1, 'server_lr': 0.1})
  s2 = fed.init(init_params(), jax.random.key(0), hparams={'client_lr': 0.3, 'server_lr': 0.01})
  fed.apply(s1, FROZEN, make_round_data())
  fed.apply(s2, FROZEN, make_round_data())
  assert fed.apply._cache_size() == 1
