"""Tests for fedjax_fm.compress.chain, the size formulas, the registry, and
every operator under jit and vmap over a clients axis."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import compress
from fedjax_fm.compress import base as compress_base

KEY = jax.random.key(0)


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {'w': rng.normal(size=(40, 24)).astype(np.float32),
          'conv': rng.normal(size=(3, 5, 24)).astype(np.float32),
          'b': rng.normal(size=(24,)).astype(np.float32)}


class ChainVariantsTest(chex.TestCase):
  """The chain against stage-by-stage references, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_chain_top_k_then_quantize(self):
    tree = _tree()
    c = compress_base.checked(compress.chain(compress.top_k(0.05, min_size=100),
                                             compress.stochastic_uniform(4, min_size=8)))

    def roundtrip(key, tree, state):
      payload, state = c.encode(key, tree, state)
      return payload, state, c.decode(payload)

    payload, state, out = self.variant(roundtrip)(KEY, tree, c.init(tree))
    assert isinstance(payload, compress.ChainPayload) and state == ((), ())
    # On the wire: the top-k indices (uint16) and the 4-bit values + scales.
    kept_dtypes = sorted(str(x.dtype) for x in payload.kept)
    assert kept_dtypes == ['uint16', 'uint16']                      # w and conv indices
    quantized = [p for p in payload.inner if isinstance(p, compress.QuantizedPayload)]
    assert len(quantized) == 3                                      # w, conv values and b
    # Reference: the same two stages by hand, with the chain's key split.
    top = compress.top_k(0.05, min_size=100)
    su = compress.stochastic_uniform(4, min_size=8)

    @jax.jit
    def by_hand(key, tree):
      k1, k2 = jax.random.split(key)
      p1, _ = top.encode(k1, tree, ())
      leaves, treedef = jax.tree.flatten(p1)
      floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
      decoded = iter(su.decode(su.encode(k2, floats, ())[0]))
      leaves = [next(decoded) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
      return top.decode(treedef.unflatten(leaves)), p1

    ref, p1 = by_hand(KEY, tree)
    for k in tree:
      np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), atol=1e-6)
    # Nonzeros only at top-k positions, each within one 4-bit step of the value.
    w = np.asarray(out['w'])
    support = np.asarray(p1['w'].indices)
    assert set(np.flatnonzero(w)) <= set(support.tolist())
    vals = tree['w'].reshape(-1)[support]
    step = (vals.max() - vals.min()) / 15
    assert np.abs(w.reshape(-1)[support] - vals).max() <= step + 1e-6
    # Bytes: indices + packed 4-bit values + 2 scales, per leaf.
    assert compress.payload_nbytes(c, tree) == compress.nbytes_formula(
        tree, ('top_k', {'fraction_or_k': 0.05, 'min_size': 100}),
        ('stochastic_uniform', {'bits': 4, 'min_size': 8}))


def test_chain_three_stages_and_error_feedback():
  tree = _tree(1)
  c = compress.error_feedback(compress.chain(
      compress.svd(4, min_size=1), compress.top_k(0.5, min_size=1),
      compress.deterministic(8, min_size=1)))
  payload, state = jax.jit(c.encode)(KEY, tree, c.init(tree))
  out = jax.jit(c.decode)(payload)
  for k in tree:
    assert out[k].shape == tree[k].shape
    np.testing.assert_allclose(np.asarray(state.residual[k]), tree[k] - np.asarray(out[k]),
                               atol=1e-5)
  assert compress.chain(compress.sign()) is not None
  with pytest.raises(ValueError, match='at least one'):
    compress.chain()
  with pytest.raises(ValueError, match=r'compressors\[1\] must be a Compressor'):
    compress.chain(compress.sign(), 'sign')


# Arguments for every registered factory (the others need none).
REGISTERED_KWARGS = {
    'top_k': {'fraction_or_k': 0.1},
    'random_k': {'fraction_or_k': 0.1},
    'threshold': {'tau': 1.0},
    'stochastic_uniform': {'bits': 4, 'block_size': 64},
    'qsgd': {'bits': 4},
    'deterministic': {'bits': 8},
    'svd': {'rank': 2},
    'powersgd': {'rank': 2},
}


def _registered(name):
  return compress.get_compressor(name, **REGISTERED_KWARGS.get(name, {}))


def _contract_tree():
  rng = np.random.default_rng(4)
  return {'w': jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
          'h': jnp.asarray(rng.normal(size=(8, 4, 6)), jnp.bfloat16),
          'b': jnp.asarray(rng.normal(size=(12,)), jnp.float32),
          'step': jnp.asarray(3, jnp.int32)}


@pytest.mark.parametrize('name', sorted(compress.COMPRESSORS))
def test_registered_compressor_contract_on_shapes(name):
  """decode(encode(x)) has x's structure, shapes and dtypes; the state keeps its own.

  Checked abstractly (nothing runs) for the compressor alone, under error
  feedback, and inside a chain, on a tree with f32, bf16, int and > 65536 leaves.
  """
  shapes = {'w': jax.ShapeDtypeStruct((40, 24), jnp.float32),
            'big': jax.ShapeDtypeStruct((300, 257), jnp.float32),
            'odd': jax.ShapeDtypeStruct((7, 11, 13), jnp.bfloat16),
            'b': jax.ShapeDtypeStruct((24,), jnp.float32),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}
  c = _registered(name)
  for wrapped in (c, compress.error_feedback(c), compress.chain(c, compress.sign())):
    payload, out, state = compress_base.check_roundtrip(wrapped, shapes)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, shapes)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, jax.eval_shape(wrapped.init, shapes))
    assert jax.tree.leaves(payload)


class ContractViolationsTest(chex.TestCase):
  """`compress_base.checked` rejects a broken compressor, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_contract_violations_raise(self):
    tree = _contract_tree()
    shrinks = compress.Compressor(
        lambda p: (),
        lambda k, t, s: (jax.tree.map(lambda x: x.reshape(-1)[:1], t), s),
        lambda p: p)
    casts = compress.Compressor(
        lambda p: (), lambda k, t, s: (t, s),
        lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p))
    grows = compress.Compressor(
        lambda p: {'n': jnp.zeros(())}, lambda k, t, s: (t, {'n': jnp.zeros((2,))}),
        lambda p: p)
    for bad, match in ((shrinks, 'shapes'), (casts, 'dtypes'), (grows, 'state')):
      with self.assertRaisesRegex(AssertionError, match):
        self.variant(compress_base.checked(bad).encode)(KEY, tree, bad.init(tree))
    # The unchecked compressor runs; only the wrapper asserts.
    self.variant(shrinks.encode)(KEY, tree, ())
    with self.assertRaisesRegex(AssertionError, 'decode'):
      compress_base.check_roundtrip(shrinks, tree)


STAGES = [
    (),
    (('top_k', {'fraction_or_k': 0.1}),),
    (('top_k', {'fraction_or_k': 7, 'min_size': 1}),),
    (('random_k', {'fraction_or_k': 0.1}),),
    (('random_k', {'fraction_or_k': 0.1, 'send_indices': True}),),
    (('threshold', {'tau': 1.0, 'max_fraction': 0.3}),),
    (('stochastic_uniform', {'bits': 1, 'block_size': 100}),),
    (('stochastic_uniform', {'bits': 2, 'symmetric': True, 'min_size': 1}),),
    (('deterministic', {'bits': 8}),),
    (('qsgd', {'bits': 4, 'block_size': 64}),),
    (('qsgd', {'bits': 8, 'levels': 5}),),
    ('sign',),
    (('ternary', {'block_size': 33, 'min_size': 1}),),
    (('svd', {'rank': 3}),),
    (('powersgd', {'rank': 2, 'min_size': 1}),),
    (('top_k', {'fraction_or_k': 0.05}), ('stochastic_uniform', {'bits': 4, 'min_size': 1})),
    (('svd', {'rank': 4}), ('qsgd', {'bits': 2, 'min_size': 1}), 'sign'),
]


def _build(stages):
  cs = []
  for stage in stages or ('identity',):
    name, kwargs = (stage, {}) if isinstance(stage, str) else stage
    cs.append(compress.get_compressor(name, **kwargs))
  return compress.chain(*cs)


@pytest.mark.parametrize('stages', STAGES, ids=lambda s: '+'.join(
    x if isinstance(x, str) else x[0] for x in s) or 'identity')
def test_nbytes_formula_equals_payload_nbytes(stages):
  shapes = {'w': jax.ShapeDtypeStruct((40, 24), jnp.float32),
            'big': jax.ShapeDtypeStruct((300, 257), jnp.float32),     # > 65536: uint32 indices
            'odd': jax.ShapeDtypeStruct((7, 11, 13), jnp.bfloat16),
            'b': jax.ShapeDtypeStruct((24,), jnp.float32),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}
  c = _build(stages)
  assert compress.payload_nbytes(c, shapes) == compress.nbytes_formula(shapes, *stages)
  if not stages:
    assert compress.nbytes_formula(shapes) == 40 * 24 * 4 + 300 * 257 * 4 + 1001 * 2 + 96 + 4


def test_nbytes_formula_errors():
  with pytest.raises(ValueError, match='unknown compressor'):
    compress.nbytes_formula({'w': jnp.zeros(3)}, 'gzip')
  with pytest.raises(ValueError, match='a stage must be'):
    compress.nbytes_formula({'w': jnp.zeros(3)}, ('top_k', 0.1))


VMAP_OPS = {
    'identity': lambda: compress.identity(),
    'top_k': lambda: compress.top_k(0.1, min_size=16),
    'top_k_threshold': lambda: compress.top_k(0.1, approximate='threshold', min_size=16),
    'random_k': lambda: compress.random_k(0.1, min_size=16),
    'threshold': lambda: compress.threshold(1.0, min_size=16),
    'stochastic_uniform': lambda: compress.stochastic_uniform(4, block_size=64, min_size=16),
    'qsgd': lambda: compress.qsgd(4, min_size=16),
    'deterministic': lambda: compress.deterministic(8, min_size=16),
    'sign': lambda: compress.sign(min_size=16),
    'ternary': lambda: compress.ternary(min_size=16),
    'svd': lambda: compress.svd(2, min_size=16),
    'powersgd': lambda: compress.powersgd(2, min_size=16),
    'ef_chain': lambda: compress.error_feedback(compress.chain(
        compress.top_k(0.2, min_size=16), compress.stochastic_uniform(8, min_size=1))),
}


@pytest.mark.parametrize('name', list(VMAP_OPS))
@pytest.mark.slow
def test_jit_and_vmap_over_clients(name):
  """vmap over 3 clients (per-client keys, stacked state) equals a loop of jitted calls."""
  c = VMAP_OPS[name]()
  num = 3
  rng = np.random.default_rng(3)
  trees = {'w': rng.normal(size=(num, 16, 12)).astype(np.float32),
           'b': rng.normal(size=(num, 12)).astype(np.float32)}
  like = jax.tree.map(lambda a: a[0], trees)
  state = jax.tree.map(lambda s: jnp.broadcast_to(s, (num,) + s.shape), c.init(like))
  keys = jax.random.split(KEY, num)

  def roundtrip(key, tree, state):
    payload, state = c.encode(key, tree, state)
    return c.decode(payload), state, payload

  out, new_state, payload = jax.jit(jax.vmap(roundtrip))(keys, trees, state)
  assert sum(x.nbytes for x in jax.tree.leaves(payload)) == num * compress.payload_nbytes(c, like)
  single = jax.jit(roundtrip)
  for i in range(num):
    take = lambda t: jax.tree.map(lambda a: a[i], t)
    ref_out, ref_state, _ = single(keys[i], take(trees), take(state))
    for a, b in zip(jax.tree.leaves((out, new_state)), jax.tree.leaves((ref_out, ref_state))):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-5, atol=1e-5)
  for k in trees:
    assert out[k].shape == trees[k].shape and out[k].dtype == trees[k].dtype


def test_registry():
  assert set(compress.COMPRESSORS) == {
      'identity', 'top_k', 'random_k', 'threshold', 'stochastic_uniform', 'qsgd',
      'deterministic', 'sign', 'ternary', 'svd', 'powersgd'}
  assert isinstance(compress.get_compressor('top_k', fraction_or_k=0.1), compress.Compressor)
  with pytest.raises(ValueError, match="unknown compressor 'gzip'.*'identity'.*'top_k'"):
    compress.get_compressor('gzip')
  with pytest.raises(ValueError, match="bad arguments for compressor 'sign'"):
    compress.get_compressor('sign', bits=4)
  with pytest.raises(ValueError, match='bits must be one of'):
    compress.get_compressor('stochastic_uniform', bits=5)
