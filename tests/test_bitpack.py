"""Tests for fedjax_fm.compress.bitpack."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.compress import bitpack


def np_pack(values, bits):
  """NumPy reference of the planar layout: code i -> word i % W, offset bits * (i // W)."""
  per_word = 32 // bits
  w = -(-len(values) // per_word)
  words = np.zeros(w, np.uint64)
  for i, v in enumerate(values):
    words[i % w] |= np.uint64(int(v) << (bits * (i // w)))
  return words.astype(np.uint32)


_pack = jax.jit(bitpack.pack_bits, static_argnums=1)
_unpack = jax.jit(bitpack.unpack_bits, static_argnums=(1, 2))


@pytest.mark.parametrize('bits', [1, 2, 4, 8, 16])
def test_round_trip_matches_numpy_reference(bits):
  rng = np.random.default_rng(bits)
  for n in (1, 7, 33, 1001):
    values = rng.integers(0, 1 << bits, size=n).astype(np.uint32)
    words = _pack(values, bits)
    assert words.dtype == jnp.uint32
    assert words.shape == (-(-n * bits // 32),) == (bitpack.num_words(n, bits),)
    np.testing.assert_array_equal(np.asarray(words), np_pack(values, bits))
    back = _unpack(words, bits, n)
    np.testing.assert_array_equal(np.asarray(back), values)


def test_jit_vmap_and_leading_axes():
  rng = np.random.default_rng(0)
  values = rng.integers(0, 16, size=(3, 5, 37)).astype(np.uint32)
  words = _pack(values, 4)
  assert words.shape == (3, 5, 5)
  np.testing.assert_array_equal(np.asarray(words[1, 2]), np_pack(values[1, 2], 4))
  vmapped = jax.vmap(lambda v: bitpack.pack_bits(v, 4))(values.reshape(15, 37))
  np.testing.assert_array_equal(np.asarray(vmapped).reshape(words.shape), np.asarray(words))
  np.testing.assert_array_equal(np.asarray(_unpack(words, 4, 37)), values)


class BitpackVariantsTest(chex.TestCase):
  """Masking of high bits and bool input, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_high_bits_are_masked_and_bool_input(self):
    pack = self.variant(bitpack.pack_bits, static_argnums=1)
    unpack = self.variant(bitpack.unpack_bits, static_argnums=(1, 2))
    np.testing.assert_array_equal(np.asarray(unpack(pack(np.array([5, 6, 7]), 2), 2, 3)),
                                  [1, 2, 3])
    mask = np.array([True, False, True, True, False] * 10)
    words = pack(mask, 1)
    assert words.shape == (2,)
    np.testing.assert_array_equal(np.asarray(unpack(words, 1, 50)).astype(bool), mask)


def test_errors():
  with pytest.raises(ValueError, match='bits must be one of'):
    bitpack.pack_bits(np.zeros(4, np.uint32), 3)
  with pytest.raises(ValueError, match='need 1 words'):
    bitpack.unpack_bits(np.zeros(3, np.uint32), 8, 4)
