"""Tests for fedjax_fm.compress.quantize."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import compress
from fedjax_fm.compress import base as compress_base
from fedjax_fm.compress import quantize

NUM_KEYS = 2000


def _roundtrip(c, x, key=0):
  tree = {'w': x}
  payload, _ = jax.jit(c.encode)(jax.random.key(key), tree, c.init(tree))
  return payload['w'], np.asarray(jax.jit(c.decode)(payload)['w'])


def _samples(c, x, num=NUM_KEYS):
  """decode(encode(x)) for `num` keys, vmapped: [num, *x.shape]."""
  tree = {'w': x}

  def one(key):
    payload, _ = c.encode(key, tree, ())
    return c.decode(payload)['w']

  return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), num)))


def _assert_unbiased(samples, x, var):
  """|mean - x| within 5 sigma of the mean of len(samples) draws of variance `var`."""
  err = np.abs(samples.astype(np.float64).mean(0) - x)
  np.testing.assert_array_less(err, 5 * np.sqrt(var / len(samples)) + 1e-6)


def np_grid(x, bits, symmetric):
  """NumPy reference grid of one block: (offset, step)."""
  levels = 2 ** bits
  if symmetric:
    s = np.abs(x).max()
    return -s, 2 * s / (levels - 1)
  return x.min(), (x.max() - x.min()) / (levels - 1)


def _x():
  return np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)


@pytest.fixture(scope='module')
def x():
  return _x()


@pytest.mark.parametrize('bits,symmetric,block_size', [(2, False, None), (4, True, None),
                                                       (1, False, 16), (8, False, 32)])
@pytest.mark.slow
def test_stochastic_uniform_unbiased_on_grid_and_variance(x, bits, symmetric, block_size):
  c = compress.stochastic_uniform(bits, block_size=block_size, symmetric=symmetric, min_size=1)
  samples = _samples(c, x)
  flat = x.reshape(-1)
  b = block_size or flat.size
  step = np.zeros_like(flat)
  for start in range(0, flat.size, b):
    block = flat[start:start + b]
    offset, delta = np_grid(block, bits, symmetric)
    step[start:start + b] = delta
    # Every sample is one of the two grid neighbours of x.
    t = (block - offset) / delta
    lo, hi = offset + np.floor(t) * delta, offset + np.ceil(t) * delta
    s = samples.reshape(len(samples), -1)[:, start:start + b]
    near = np.minimum(np.abs(s - lo), np.abs(s - hi))
    assert near.max() <= 1e-5 * max(1.0, np.abs(block).max())
  step = step.reshape(x.shape)
  bound = step ** 2 / 4                                  # per-element variance bound
  _assert_unbiased(samples, x, bound)
  np.testing.assert_array_less(samples.var(0), 1.25 * bound + 1e-10)


@pytest.mark.parametrize('bits,block_size', [(4, None), (2, 16)])
@pytest.mark.slow
def test_qsgd_unbiased_and_variance_bound(x, bits, block_size):
  s_levels = 2 ** (bits - 1) - 1
  c = compress.qsgd(bits, block_size=block_size, min_size=1)
  samples = _samples(c, x)
  flat = x.reshape(-1)
  d = block_size or flat.size
  var = np.zeros_like(flat)
  total_bound = 0.0
  for start in range(0, flat.size, d):
    block = flat[start:start + d]
    norm = np.linalg.norm(block)
    t = np.abs(block) / norm * s_levels
    frac = t - np.floor(t)
    var[start:start + d] = (norm / s_levels) ** 2 * frac * (1 - frac)   # exact
    n = len(block)
    total_bound += min(n / s_levels ** 2, np.sqrt(n) / s_levels) * norm ** 2
  _assert_unbiased(samples, x, var.reshape(x.shape))
  total_var = samples.reshape(len(samples), -1).var(0).sum()
  assert total_var <= 1.1 * var.sum() + 1e-8 and var.sum() <= total_bound


def test_ternary_unbiased_and_variance(x):
  samples = _samples(compress.ternary(min_size=1), x)
  s = np.abs(x).max()
  assert set(np.unique(np.round(samples / s, 5))) <= {-1.0, 0.0, 1.0}
  var = s * np.abs(x) - x ** 2
  _assert_unbiased(samples, x, var)
  # Per-element sample variances are noisy for small |x| / s; their sum is not.
  np.testing.assert_allclose(samples.astype(np.float64).var(0).sum(), var.sum(), rtol=0.1)


class QuantizeVariantsTest(chex.TestCase):
  """Encode/decode against NumPy references, with and without jit.

  Every round trip goes through `compress_base.checked`, so the contract
  (decoded tree and new state shaped like their inputs) is asserted as well.
  """

  def _roundtrip(self, c, x, key=0):
    c = compress_base.checked(c)

    def roundtrip(key, tree, state):
      payload, _ = c.encode(key, tree, state)
      return payload, c.decode(payload)

    tree = {'w': jnp.asarray(x)}
    payload, out = self.variant(roundtrip)(jax.random.key(key), tree, c.init(tree))
    return payload['w'], np.asarray(out['w'])

  @chex.variants(with_jit=True, without_jit=True)
  def test_stochastic_uniform_rounds_to_a_grid_neighbour(self):
    x = _x()
    _, out = self._roundtrip(compress.stochastic_uniform(2, min_size=1), x, key=3)
    offset, delta = np_grid(x, 2, symmetric=False)
    t = (x - offset) / delta
    lo, hi = offset + np.floor(t) * delta, offset + np.ceil(t) * delta
    assert np.minimum(np.abs(out - lo), np.abs(out - hi)).max() <= 1e-5 * np.abs(x).max()

  @chex.variants(with_jit=True, without_jit=True)
  def test_qsgd_levels_argument(self):
    x = _x()
    payload, out = self._roundtrip(compress.qsgd(4, levels=3, min_size=1), x)
    norm = np.linalg.norm(x)
    assert payload.levels == 3
    np.testing.assert_allclose(np.unique(np.abs(out)), norm * np.unique(
        np.round(np.abs(out) / norm * 3)) / 3, rtol=1e-5)
    assert set(np.round(np.abs(out).reshape(-1) / norm * 3).astype(int)) <= {0, 1, 2, 3}

  @chex.variants(with_jit=True, without_jit=True)
  def test_sign_matches_numpy(self):
    x = _x()
    x[0, 0] = 0.0
    payload, out = self._roundtrip(compress.sign(min_size=1), x)
    np.testing.assert_allclose(out, np.abs(x).mean() * np.where(x >= 0, 1, -1), rtol=1e-6)
    assert payload.words.shape == (1, 2) and payload.scales.shape == (1, 1)
    # Per block: the mean of |x| over the real entries of each block (last one partial).
    _, out = self._roundtrip(compress.sign(block_size=32, min_size=1), x)
    flat = x.reshape(-1)
    means = np.repeat([np.abs(flat[:32]).mean(), np.abs(flat[32:]).mean()], [32, 28])
    np.testing.assert_allclose(out.reshape(-1), means * np.where(flat >= 0, 1, -1),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('2bit', 2, False), ('4bit_symmetric', 4, True),
                                  ('8bit', 8, False))
  def test_deterministic_matches_numpy(self, bits, symmetric):
    x = _x()
    _, out = self._roundtrip(compress.deterministic(bits, symmetric=symmetric, min_size=1), x)
    offset, step = np_grid(x, bits, symmetric)
    q = np.clip(np.round((x - offset) / step), 0, 2 ** bits - 1)
    np.testing.assert_allclose(out, offset + q * step, rtol=1e-6, atol=1e-6)
    assert np.abs(out - x).max() <= step / 2 + 1e-6


def test_deterministic_8_bit_exact_on_grid():
  values = ((np.arange(256) - 128) / 64).astype(np.float32)   # exact grid, step 1/64
  x = np.random.default_rng(1).permutation(values).reshape(16, 16)
  payload, out = _roundtrip(compress.deterministic(8, min_size=1), x)
  np.testing.assert_array_equal(out, x)
  assert payload.words.shape == (1, 64)      # 256 bytes of codes, packed
  # Per block: every block of 64 spans the same [-2, 127/64], so the same grid.
  blocks = np.random.default_rng(2).choice(values, size=(4, 64))
  blocks[:, 0], blocks[:, 1] = values[0], values[-1]
  _, out = _roundtrip(compress.deterministic(8, block_size=64, min_size=1), blocks)
  np.testing.assert_array_equal(out, blocks)


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
def test_payload_layout_and_bytes(bits):
  x = jax.ShapeDtypeStruct((37, 11), jnp.bfloat16)                 # n = 407, odd
  c = compress.stochastic_uniform(bits, block_size=64)
  payload, _ = jax.eval_shape(c.encode, jax.random.key(0), {'w': x}, ())
  w = payload['w']
  assert w.words.dtype == jnp.uint32 and w.scales.dtype == jnp.float32
  assert w.words.shape == (7, 64 * bits // 32) and w.scales.shape == (7, 2)
  assert compress.payload_nbytes(c, {'w': x}) == 4 * 7 * (64 * bits // 32 + 2)
  per_tensor = compress.stochastic_uniform(bits, symmetric=True)
  assert compress.payload_nbytes(per_tensor, {'w': x}) == 4 * (-(-407 * bits // 32) + 1)


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
@pytest.mark.slow
def test_tensor_shorter_than_a_block_is_one_block_of_its_own_length(bits, x):
  # n = 60 values, block_size 256: one block of 60 rounded up to a whole word, so
  # the wire bytes are those of a per-tensor scale, never of a padded 256 block.
  c = compress.stochastic_uniform(bits, block_size=256, min_size=16)
  words = -(-60 * bits // 32)
  assert compress.payload_nbytes(c, {'w': x}) == 4 * (words + 2)
  payload, out = _roundtrip(c, jnp.asarray(x))
  assert payload.words.shape == (1, words)
  lo, step = np_grid(x, bits, symmetric=False)
  q = np.round((out - lo) / step)          # every decoded value lies on the tensor's grid
  np.testing.assert_allclose(out, lo + q * step, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_dtype_preserved_and_small_leaves_raw():
  tree = {'w': jnp.ones((32, 16), jnp.bfloat16) * 0.5, 'b': jnp.arange(5.0)}
  c = compress.stochastic_uniform(4)
  payload, _ = c.encode(jax.random.key(0), tree, ())
  out = c.decode(payload)
  assert out['w'].dtype == jnp.bfloat16 and out['w'].shape == (32, 16)
  np.testing.assert_array_equal(np.asarray(out['w'], np.float32), 0.5)   # constant block
  assert payload['b'] is tree['b']


@pytest.mark.parametrize('factory,kwargs,match', [
    (compress.stochastic_uniform, dict(bits=3), 'bits must be one of'),
    (compress.stochastic_uniform, dict(bits=4, block_size=0), 'block_size'),
    (compress.deterministic, dict(bits=16), 'bits must be one of'),
    (compress.qsgd, dict(bits=1), 'bits must be one of'),
    (compress.qsgd, dict(bits=2, levels=2), 'levels=2 needs'),
    (compress.sign, dict(block_size=1.5), 'block_size'),
    (compress.ternary, dict(min_size=-1), 'min_size'),
])
def test_errors(factory, kwargs, match):
  with pytest.raises(ValueError, match=match):
    factory(**kwargs)


def test_schemes_cover_scale_table():
  assert set(quantize.SCHEMES) == set(quantize._NUM_SCALES)
