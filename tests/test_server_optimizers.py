"""FedAdam, FedYogi, FedAdagrad as Reddi et al. 2021 Algorithm 2, against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import engine

TAU, B1, B2, LR = 1e-3, 0.9, 0.99, 1.0


def _reference(rule, deltas):
  """Algorithm 2 of Reddi et al. 2021 in float64, on the server's deltas."""
  x, m, v = 0.0, 0.0, TAU ** 2
  out = []
  for d in deltas:
    m = B1 * m + (1 - B1) * d
    if rule == 'adagrad':
      v = v + d * d
    elif rule == 'yogi':
      v = v - (1 - B2) * d * d * np.sign(v - d * d)
    else:
      v = B2 * v + (1 - B2) * d * d
    x = x + LR * m / (np.sqrt(v) + TAU)
    out.append(x)
  return np.asarray(out)


@pytest.mark.parametrize('rule', ['adam', 'yogi', 'adagrad'])
def test_steps_follow_algorithm_2(rule):
  tx = engine.server_optimizer(f'fed{rule}', LR, b1=B1, b2=B2, eps=TAU)
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  deltas = [0.1, -0.05, 0.2, 0.0, 0.3]
  got = []
  for d in deltas:   # the server applies -delta as the gradient
    updates, state = jax.jit(tx.update)({'w': jnp.float32(-d)}, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    got.append(float(params['w']))
  np.testing.assert_allclose(got, _reference(rule, deltas), rtol=1e-5)


def test_first_step_for_a_delta_of_one_tenth():
  """Closed form: m = 0.01, v = tau^2 + 0.01 (adagrad), step = 0.01 / (0.1000050 + tau)."""
  tx = engine.server_optimizer('fedadagrad', 1.0)
  updates, _ = tx.update({'w': jnp.float32(-0.1)}, tx.init({'w': jnp.zeros(())}))
  want = 0.01 / (np.sqrt(1e-6 + 0.01) + 1e-3)
  np.testing.assert_allclose(float(updates['w']), want, rtol=1e-6)
  assert abs(want - 0.099) < 1e-3
  # The optax variant takes a much larger first step (no momentum, eps outside the root).
  opt = engine.server_optimizer('fedadagrad_optax', 1.0)
  step, _ = opt.update({'w': jnp.float32(-0.1)}, opt.init({'w': jnp.zeros(())}))
  assert float(step['w']) > 0.9


def test_unknown_rule():
  with pytest.raises(ValueError, match='rule must be one of'):
    engine.optimizers.reddi('rmsprop', 1.0)
