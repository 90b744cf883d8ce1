"""Tests for the Pallas kernels (fedjax_fm_kernels), run with interpret=True on CPU,
and for the use_kernel switch of fedjax_fm.compress."""

import pathlib
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import setuptools

import fedjax_fm_kernels as K
from fedjax_fm import compress
from fedjax_fm.compress import bitpack
from fedjax_fm.compress import leafwise

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data(shape, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, shape), jax.random.uniform(k2, shape)


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
@pytest.mark.slow
def test_quantize_pack_matches_reference(bits):
  x, u = _data((11, 64), seed=bits)          # 11 rows: not a multiple of block_rows
  for symmetric in (False, True):
    words, scales = K.quantize_pack(x, u, bits=bits, symmetric=symmetric, interpret=True)
    ref_words, ref_scales = K.quantize_pack_reference(x, u, bits=bits, symmetric=symmetric)
    assert words.dtype == jnp.uint32 and words.shape == (11, 64 * bits // 32)
    assert scales.shape == (11, 1 if symmetric else 2)
    np.testing.assert_array_equal(np.asarray(words), np.asarray(ref_words))
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(ref_scales))
  # The words are the planar packing of the row codes (bitpack layout).
  codes = bitpack.unpack_bits(ref_words, bits, 64)
  np.testing.assert_array_equal(np.asarray(bitpack.pack_bits(codes, bits)), np.asarray(words))


def test_quantize_pack_errors():
  x, u = _data((2, 48))
  with pytest.raises(ValueError, match='bits must be one of'):
    K.quantize_pack(x, u, bits=3, interpret=True)
  with pytest.raises(ValueError, match='multiple of'):
    K.quantize_pack(x[:, :30], u[:, :30], bits=1, interpret=True)


@pytest.mark.slow
def test_threshold_count_and_mask_match_reference():
  x, _ = _data((13, 96), seed=3)
  for tau in (0.0, 1.0, 2.5):
    counts = K.threshold_count(x, tau, interpret=True)
    np.testing.assert_array_equal(np.asarray(counts),
                                  np.asarray(K.threshold_count_reference(x, tau)))
    np.testing.assert_array_equal(np.asarray(counts), (np.abs(np.asarray(x)) >= tau).sum(1))
    words, counts2 = K.threshold_mask(x, tau, interpret=True)
    ref_words, ref_counts = K.threshold_mask_reference(x, tau)
    np.testing.assert_array_equal(np.asarray(words), np.asarray(ref_words))
    np.testing.assert_array_equal(np.asarray(counts2), np.asarray(ref_counts))
    mask = np.asarray(bitpack.unpack_bits(words, 1, 96)).astype(bool)
    np.testing.assert_array_equal(mask, np.abs(np.asarray(x)) >= tau)


@pytest.mark.slow
def test_topk_threshold_is_the_kth_largest():
  x, _ = _data((9, 64), seed=4)
  mags = np.sort(np.abs(np.asarray(x)).ravel())[::-1]
  for k in (1, 17, 576):
    tau = K.topk_threshold(x, k=k, interpret=True)
    assert float(tau) == mags[k - 1] == float(K.topk_threshold_reference(x, k=k))
  ties = jnp.array([[3.0, -3.0, 1.0, 3.0], [0.0, 2.0, -3.0, 0.5]])
  assert float(K.topk_threshold(ties, k=2, interpret=True)) == 3.0
  assert float(K.topk_threshold_reference(ties, k=5)) == 2.0
  with pytest.raises(ValueError, match='k must be in'):
    K.topk_threshold_reference(ties, k=9)


def _payload(c, tree, key=0):
  return jax.jit(c.encode)(jax.random.key(key), tree, c.init(tree))[0]


@pytest.mark.parametrize('bits,symmetric', [(2, False), (4, True), (8, False)])
@pytest.mark.slow
def test_compress_stochastic_uniform_kernel_equals_jnp(bits, symmetric):
  tree = {'w': jax.random.normal(jax.random.key(1), (30, 50))}     # 1500: last block partial
  kw = dict(block_size=128, symmetric=symmetric)
  on = _payload(compress.stochastic_uniform(bits, use_kernel=True, **kw), tree)
  off = _payload(compress.stochastic_uniform(bits, use_kernel=False, **kw), tree)
  for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_compress_threshold_paths_kernel_equals_jnp():
  tree = {'w': jax.random.normal(jax.random.key(2), (40, 70))}
  for make in (lambda uk: compress.top_k(0.03, approximate='threshold', use_kernel=uk),
               lambda uk: compress.threshold(2.0, max_fraction=0.05, use_kernel=uk)):
    on, off = _payload(make(True), tree), _payload(make(False), tree)
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_kernel_under_vmap():
  c = compress.stochastic_uniform(4, block_size=64, use_kernel=True)
  trees = {'w': jax.random.normal(jax.random.key(3), (2, 16, 32))}
  keys = jax.random.split(jax.random.key(0), 2)
  batched = jax.jit(jax.vmap(lambda k, t: c.encode(k, t, ())[0]))(keys, trees)
  ref = compress.stochastic_uniform(4, block_size=64, use_kernel=False)
  for i in range(2):
    single = jax.jit(ref.encode)(keys[i], {'w': trees['w'][i]}, ())[0]
    np.testing.assert_array_equal(np.asarray(batched['w'].words[i]),
                                  np.asarray(single['w'].words))


def test_kernel_mode_switch():
  assert jax.default_backend() == 'cpu'
  assert leafwise.kernel_mode(None) == (False, False)      # no kernel backend: jnp
  assert leafwise.kernel_mode(True) == (True, True)        # forced: interpreted
  assert leafwise.kernel_mode(False) == (False, True)
  with pytest.raises(ValueError, match='use_kernel'):
    leafwise.kernel_mode('auto')


def test_pyproject_lists_every_package():
  """The explicit package list (needed for the kernels/ -> fedjax_fm_kernels mapping)
  covers every package that `find` would discover."""
  config = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
  assert config['package-dir']['fedjax_fm_kernels'] == 'kernels'
  found = setuptools.find_packages(str(ROOT), include=['fedjax_fm*', 'experiments*'])
  missing = sorted(set(found) - set(config['packages']))
  assert not missing, f'add {missing} to [tool.setuptools] packages in pyproject.toml'
  assert 'fedjax_fm_kernels' in config['packages']
