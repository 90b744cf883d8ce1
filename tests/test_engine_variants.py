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


class TreeStatsTest(parameterized.TestCase):
  """`uplink.tree_stats` (one fused reduction) against NumPy, leaf by leaf."""

  def _tree(self, rng, dtype=jnp.float32):
    return {'w': jnp.asarray(rng.normal(size=(6, 5)), dtype),
            'b': jnp.asarray(rng.normal(size=(5,)), dtype),
            'h': [jnp.asarray(rng.normal(size=(2, 3, 4)), dtype)]}

  @staticmethod
  def _np_stats(tree):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    sq = sum(float(np.sum(x * x)) for x in leaves)
    finite = all(bool(np.all(np.isfinite(x))) for x in leaves)
    return sq, finite

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_norm_and_finite_match_numpy(self, dtype):
    tree = self._tree(np.random.default_rng(0), dtype)
    sq, _ = self._np_stats(tree)
    rtol = 1e-6 if dtype == jnp.float32 else 1e-2
    for fn in (uplink.tree_norm, jax.jit(uplink.tree_norm)):
      np.testing.assert_allclose(float(fn(tree)), np.sqrt(sq), rtol=rtol)
    np.testing.assert_allclose(
        [float(v) for v in uplink.tree_norms(tree, jax.tree.map(lambda x: 2 * x, tree))],
        [np.sqrt(sq), 2 * np.sqrt(sq)], rtol=rtol)
    self.assertTrue(bool(jax.jit(uplink.tree_all_finite)(tree)))

  @parameterized.parameters(np.nan, np.inf, -np.inf)
  def test_one_nonfinite_entry_is_found(self, bad):
    tree = self._tree(np.random.default_rng(1))
    tree['h'][0] = tree['h'][0].at[1, 2, 3].set(bad)
    self.assertFalse(bool(jax.jit(uplink.tree_all_finite)(tree)))

  def test_huge_finite_values_are_finite(self):
    """Their squares overflow float32; the check does not (it is not a sum of squares)."""
    tree = {'w': jnp.full((4,), 3e38, jnp.float32), 'b': jnp.full((2,), -3e38, jnp.float32)}
    self.assertTrue(bool(jax.jit(uplink.tree_all_finite)(tree)))

  def test_under_vmap_with_mapped_and_broadcast_leaves(self):
    rng = np.random.default_rng(2)
    mapped = jnp.asarray(rng.normal(size=(7, 3, 4)), jnp.float32)   # 7 clients
    shared = jnp.asarray(rng.normal(size=(5,)), jnp.float32)        # the same for all
    mapped = mapped.at[4, 0, 1].set(jnp.inf)

    def stats(m):
      tree = {'m': m, 's': shared}
      return uplink.tree_norm(tree), uplink.tree_all_finite(tree)
    norms, finite = jax.jit(jax.vmap(stats))(mapped)
    for c in range(7):
      sq, ok = self._np_stats({'m': mapped[c], 's': shared})
      self.assertEqual(bool(finite[c]), ok)
      if ok:
        np.testing.assert_allclose(float(norms[c]), np.sqrt(sq), rtol=1e-6)
    # Nested: a vmap over settings of a vmap over clients.
    nested_norms, nested_finite = jax.jit(jax.vmap(jax.vmap(stats)))(
        jnp.stack([mapped, 2 * mapped]))
    for c in range(7):
      sq, ok = self._np_stats({'m': 2 * mapped[c], 's': shared})
      self.assertEqual(bool(nested_finite[1, c]), ok)
      if ok:
        np.testing.assert_allclose(float(nested_norms[1, c]), np.sqrt(sq), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(nested_finite[0]), np.asarray(finite))

  def test_empty_tree(self):
    self.assertEqual(float(uplink.tree_norm({})), 0.0)
    self.assertTrue(bool(uplink.tree_all_finite({'a': jnp.zeros((0,))})))
