"""Bit packing of small unsigned integers into uint32 words.

A ``bits``-bit code really costs ``bits`` bits on the wire: ``32 // bits`` codes
share one uint32 word, so ``N`` codes take ``ceil(N * bits / 32)`` words.

Layout ("planar"): with ``W = ceil(N / per_word)`` output words and
``per_word = 32 // bits``, code ``i`` lives in word ``i % W`` at bit offset
``bits * (i // W)``. In other words the (padded) codes are cut into ``per_word``
contiguous chunks of ``W`` codes and chunk ``j`` fills bits
``[bits*j, bits*(j+1))`` of every word. Contiguous chunks (rather than
interleaved neighbours) make packing a handful of shifted vector ORs, and the
Pallas kernels in ``fedjax_fm_kernels`` use the same layout, so their words are
bit-identical to :func:`pack_bits`.

Both functions act on the last axis, so they work on any leading batch shape
and under ``jax.vmap``; ``bits`` and ``n`` must be static.
"""

from __future__ import annotations

import jax.numpy as jnp

BITS = (1, 2, 4, 8, 16)


def _check_bits(bits: int) -> int:
  if bits not in BITS:
    raise ValueError(f'bits must be one of {BITS}, got {bits!r}')
  return 32 // bits


def num_words(n: int, bits: int) -> int:
  """Number of uint32 words holding ``n`` codes of ``bits`` bits."""
  per_word = _check_bits(bits)
  return -(-int(n) // per_word)


def pack_bits(values, bits: int):
  """Packs unsigned codes ``values[..., N]`` into uint32 words ``[..., ceil(N*bits/32)]``.

  Args:
    values: integer array; every entry must lie in ``[0, 2**bits)`` (higher bits
      are masked off).
    bits: bits per code, one of ``(1, 2, 4, 8, 16)`` (static).

  Returns:
    uint32 array ``[..., num_words(N, bits)]`` in the planar layout of the module
    docstring.
  """
  per_word = _check_bits(bits)
  values = jnp.asarray(values)
  n = values.shape[-1]
  w = num_words(n, bits)
  v = values.astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
  pad = w * per_word - n
  if pad:
    v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
  v = v.reshape(v.shape[:-1] + (per_word, w))
  shifts = (jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits))[:, None]
  # Chunks occupy disjoint bit ranges, so the sum is a bitwise OR.
  return jnp.sum(v << shifts, axis=-2, dtype=jnp.uint32)


def unpack_bits(words, bits: int, n: int):
  """Inverse of :func:`pack_bits`: ``words[..., W]`` -> uint32 codes ``[..., n]``.

  Args:
    words: uint32 array produced by :func:`pack_bits`.
    bits: bits per code, one of ``(1, 2, 4, 8, 16)`` (static).
    n: number of codes to return (static); ``num_words(n, bits)`` must equal
      ``words.shape[-1]``.

  Returns:
    uint32 array ``[..., n]``.
  """
  per_word = _check_bits(bits)
  words = jnp.asarray(words, jnp.uint32)
  w = words.shape[-1]
  if num_words(n, bits) != w:
    raise ValueError(f'n={n} codes of {bits} bits need {num_words(n, bits)} words, '
                     f'got words with last axis {w}')
  shifts = (jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits))[:, None]
  v = (words[..., None, :] >> shifts) & jnp.uint32((1 << bits) - 1)
  v = v.reshape(words.shape[:-1] + (per_word * w,))
  return v[..., :n]
