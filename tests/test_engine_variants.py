"""One client's local training and the uplink chain, with and without jit."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_fm import compress
from fedjax_fm.engine import client as client_lib
from fedjax_fm.engine import uplink

LR = 0.1
STEPS, BATCH, DIM = 4, 3, 5


def _linear_loss(params, frozen, batch, key):
  """Per-example squared error of a linear model ``x . w + b``."""
  del frozen, key
  pred = batch['x'] @ params['w'] + params['b']
  return (pred - batch['y']) ** 2


def _data(seed=0):
  """Four local steps of three examples; step 2 has two padded examples, step 3
  is padding (garbage values that must not matter)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(STEPS, BATCH, DIM)).astype(np.float32)
  y = rng.normal(size=(STEPS, BATCH)).astype(np.float32)
  example_mask = np.ones((STEPS, BATCH), bool)
  example_mask[2, 1:] = False
  example_mask[3] = False
  x[3], y[3] = 1e6, -1e6
  step_mask = np.array([True, True, True, False])
  return {'batch': {'x': x, 'y': y}, 'example_mask': example_mask, 'step_mask': step_mask}


def np_client_update(params, data, lr, prox_mu):
  """Plain NumPy SGD on the masked mean squared error (float64)."""
  w0 = params['w'].astype(np.float64)
  b0 = np.float64(params['b'])
  w, b = w0.copy(), b0
  losses = []
  for s in range(STEPS):
    if not data['step_mask'][s]:
      continue
    x = data['batch']['x'][s].astype(np.float64)
    y = data['batch']['y'][s].astype(np.float64)
    m = data['example_mask'][s].astype(np.float64)
    count = max(m.sum(), 1.0)
    r = x @ w + b - y
    losses.append((m * r ** 2).sum() / count)
    gw = 2 * (m * r) @ x / count + prox_mu * (w - w0)
    gb = 2 * (m * r).sum() / count + prox_mu * (b - b0)
    w, b = w - lr * gw, b - lr * gb
  metrics = {'loss': np.mean(losses), 'steps': float(len(losses)),
             'examples': float(data['example_mask'].sum())}
  return {'w': w - w0, 'b': b - b0}, metrics


class ClientUpdateVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fedavg', 0.0), ('fedprox', 0.5))
  def test_matches_numpy_sgd(self, prox_mu):
    rng = np.random.default_rng(1)
    params = {'w': rng.normal(size=(DIM,)).astype(np.float32),
              'b': np.float32(0.3)}
    data = _data()
    client_update = client_lib.make_client_update(_linear_loss, optax.sgd(LR),
                                                  prox_mu=prox_mu)
    delta, metrics = self.variant(client_update)(params, {}, data, jax.random.key(0))
    want, want_metrics = np_client_update(params, data, LR, prox_mu)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        delta, jax.tree.map(jnp.asarray, params))
    for name in ('w', 'b'):
      np.testing.assert_allclose(np.asarray(delta[name]), want[name], rtol=1e-6, atol=1e-6)
    for name in ('loss', 'steps', 'examples'):
      np.testing.assert_allclose(float(metrics[name]), want_metrics[name], rtol=1e-6,
                                 atol=1e-6)


class UplinkChainVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_chain_keeps_shapes_and_rejects_a_step_that_changes_them(self):
    rng = np.random.default_rng(2)
    update = {'w': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
              'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    update['b'] = update['b'].at[0].set(jnp.nan)
    steps = (uplink.compress(compress.top_k(0.25, min_size=1)), uplink.guard_nonfinite())
    chain = uplink.chain(*steps)
    state = chain.init(update)
    out, weight, _, metrics = self.variant(chain.apply)(
        jax.random.key(0), update, jnp.float32(2.0), state, {})
    chex.assert_trees_all_equal_shapes_and_dtypes(out, update)
    assert not bool(metrics['finite']) and float(weight) == 0.0
    for leaf in jax.tree.leaves(out):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)

    def flatten(key, update, weight, state, inputs):
      del key, inputs
      return jax.tree.map(jnp.ravel, update), weight, state, {}

    bad = uplink.chain(uplink.guard_nonfinite(), uplink.UplinkStep(
        lambda p: (), flatten, 'flatten'))
    with self.assertRaisesRegex(AssertionError, "uplink step 'flatten'"):
      self.variant(bad.apply)(jax.random.key(0), update, jnp.float32(1.0),
                              bad.init(update), {})
