"""Pallas kernel: stochastic uniform quantization fused with bit packing.

Input: ``x[R, B]`` float32, one quantization block per row, and uniform noise
``u[R, B]`` in ``[0, 1)``. Per row the kernel computes the grid of
``L = 2**bits`` levels (``[min, max]`` of the row, or ``[-s, s]`` with
``s = max |x|`` when ``symmetric``), rounds every value stochastically to one
of its two neighbouring levels (up with probability equal to the fractional
position, so the rounding is unbiased) and packs the ``bits``-bit codes into
uint32 words in the planar layout of :mod:`fedjax_fm.compress.bitpack`.

Outputs: ``words[R, B * bits // 32]`` uint32 and ``scales[R, c]`` float32 with
``c = 2`` (``offset, step``) for min/max grids, ``c = 1`` (``s``) when
symmetric. A value decodes as ``offset + code * step`` (``offset = -s``,
``step = 2 s / (L - 1)`` when symmetric).

One grid step handles ``block_rows`` rows; the packing loop reads the ``32 // bits``
contiguous column chunks of the block from the refs (no in-register slicing or
reshapes), which keeps the body within what the Triton and Mosaic lowerings
accept. :func:`quantize_pack_reference` is the plain ``jnp`` definition that the
tests compare against, bit for bit.

References:
  Alistarh et al. 2017, "QSGD: Communication-Efficient SGD via Gradient
  Quantization and Encoding", https://arxiv.org/abs/1610.02132 (stochastic
  rounding between levels).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BITS = (1, 2, 4, 8)


def _codes(x, u, offset, step, levels):
  """Unbiased stochastic rounding of ``(x - offset) / step`` to ``[0, levels)``."""
  positive = step > 0
  t = jnp.where(positive, (x - offset) / jnp.where(positive, step, 1.0), 0.0)
  fl = jnp.floor(t)
  code = fl + (u < (t - fl)).astype(jnp.float32)
  return jnp.clip(code, 0.0, levels - 1.0).astype(jnp.uint32)


def _row_grid(x, levels, symmetric):
  """Per-row (offset, step, scales) of the quantization grid; ``x`` is [R, B]."""
  if symmetric:
    s = jnp.max(jnp.abs(x), axis=1)
    return -s, (2.0 * s) / (levels - 1), (s,)
  lo = jnp.min(x, axis=1)
  hi = jnp.max(x, axis=1)
  step = (hi - lo) / (levels - 1)
  return lo, step, (lo, step)


def _quantize_pack_kernel(x_ref, u_ref, words_ref, *scale_refs, bits, symmetric):
  levels = 1 << bits
  per_word = 32 // bits
  w = words_ref.shape[1]
  offset, step, scales = _row_grid(x_ref[...], levels, symmetric)
  for ref, value in zip(scale_refs, scales):
    ref[...] = value
  offset = offset[:, None]
  step = step[:, None]
  acc = jnp.zeros(words_ref.shape, jnp.uint32)
  for j in range(per_word):
    xj = x_ref[:, pl.ds(j * w, w)]
    uj = u_ref[:, pl.ds(j * w, w)]
    acc = acc | (_codes(xj, uj, offset, step, levels) << jnp.uint32(bits * j))
  words_ref[...] = acc


def _check(x, noise, bits):
  if bits not in BITS:
    raise ValueError(f'bits must be one of {BITS}, got {bits!r}')
  if x.ndim != 2 or noise.shape != x.shape:
    raise ValueError(f'x and noise must both be [R, B]; got {x.shape} and {noise.shape}')
  if x.shape[1] % (32 // bits):
    raise ValueError(f'the block length B={x.shape[1]} must be a multiple of '
                     f'32 // bits = {32 // bits}')


def _pow2_at_most(n, cap):
  p = 1
  while p * 2 <= min(n, cap):
    p *= 2
  return p


@functools.partial(jax.jit, static_argnames=('bits', 'symmetric', 'block_rows', 'interpret'))
def quantize_pack(x, noise, *, bits, symmetric=False, block_rows=8, interpret=False):
  """Stochastically quantizes the rows of ``x`` and packs the codes (Pallas).

  Args:
    x: float32 ``[R, B]``; each row is one block with its own scale. ``B`` must
      be a multiple of ``32 // bits`` (a power of two on GPU).
    noise: float32 ``[R, B]`` uniform in ``[0, 1)``.
    bits: bits per code, one of ``(1, 2, 4, 8)``.
    symmetric: grid ``[-max|x|, max|x|]`` instead of ``[min x, max x]``.
    block_rows: rows per grid step (rounded down to a power of two <= R).
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    ``(words uint32 [R, B*bits//32], scales float32 [R, c])``.
  """
  _check(x, noise, bits)
  x = x.astype(jnp.float32)
  noise = noise.astype(jnp.float32)
  r, b = x.shape
  w = b * bits // 32
  c = 1 if symmetric else 2
  rows = _pow2_at_most(r, block_rows)
  rp = -(-r // rows) * rows
  if rp != r:
    x = jnp.pad(x, ((0, rp - r), (0, 0)))
    noise = jnp.pad(noise, ((0, rp - r), (0, 0)))
  kernel = functools.partial(_quantize_pack_kernel, bits=bits, symmetric=symmetric)
  outs = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((rp, w), jnp.uint32)]
      + [jax.ShapeDtypeStruct((rp,), jnp.float32)] * c,
      grid=(rp // rows,),
      in_specs=[pl.BlockSpec((rows, b), lambda i: (i, 0)),
                pl.BlockSpec((rows, b), lambda i: (i, 0))],
      out_specs=[pl.BlockSpec((rows, w), lambda i: (i, 0))]
      + [pl.BlockSpec((rows,), lambda i: (i,))] * c,
      interpret=interpret,
  )(x, noise)
  words = outs[0][:r]
  scales = jnp.stack([o[:r] for o in outs[1:]], axis=1)
  return words, scales


def quantize_pack_reference(x, noise, *, bits, symmetric=False):
  """Plain ``jnp`` definition of :func:`quantize_pack` (same outputs, bit for bit)."""
  _check(x, noise, bits)
  x = x.astype(jnp.float32)
  levels = 1 << bits
  per_word = 32 // bits
  r, b = x.shape
  offset, step, scales = _row_grid(x, levels, symmetric)
  codes = _codes(x, noise.astype(jnp.float32), offset[:, None], step[:, None], levels)
  codes = codes.reshape(r, per_word, b // per_word)
  shifts = (jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits))[:, None]
  words = jnp.sum(codes << shifts, axis=1, dtype=jnp.uint32)
  return words, jnp.stack(scales, axis=1)
