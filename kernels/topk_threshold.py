"""Pallas kernels for top-k selection by threshold.

Sorting (or ``lax.top_k``) millions of entries to keep the largest 1% is the
slow part of top-k sparsification on accelerators. Selecting by threshold needs
only streaming passes:

* :func:`threshold_count`: per row of ``x[R, B]``, how many ``|x| >= tau``;
* :func:`threshold_mask`: the same count plus the bit-packed mask
  ``|x| >= tau`` (1 bit per entry, planar layout of
  :mod:`fedjax_fm.compress.bitpack`, ``B % 32 == 0``);
* :func:`topk_threshold`: the exact ``k``-th largest ``|x|``, found by bisection
  over the bit patterns of non-negative float32 values (monotone as int32), one
  :func:`threshold_count` pass per step, 32 steps. Entries with
  ``|x| >= topk_threshold(x, k)`` are at least ``k`` and exactly ``k`` without ties.

``*_reference`` functions are the plain ``jnp`` definitions compared against in
the tests (counts and masks exactly; the threshold exactly too).

References:
  Shi et al. 2019, "Understanding Top-k Sparsification in Distributed Deep
  Learning", https://arxiv.org/abs/1911.08772 (threshold-based top-k selection).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _pow2_at_most(n, cap):
  p = 1
  while p * 2 <= min(n, cap):
    p *= 2
  return p


def _pad_rows(x, rows):
  r = x.shape[0]
  rp = -(-r // rows) * rows
  return (jnp.pad(x, ((0, rp - r), (0, 0))) if rp != r else x), rp


def _check_2d(x):
  if x.ndim != 2:
    raise ValueError(f'x must be [R, B], got shape {x.shape}')


def _threshold_count_kernel(x_ref, tau_ref, count_ref):
  tau = tau_ref[0]
  count_ref[...] = jnp.sum((jnp.abs(x_ref[...]) >= tau).astype(jnp.int32), axis=1)


@functools.partial(jax.jit, static_argnames=('block_rows', 'interpret'))
def threshold_count(x, tau, *, block_rows=8, interpret=False):
  """Per-row counts of ``|x| >= tau`` (Pallas): ``x[R, B]`` -> int32 ``[R]``."""
  _check_2d(x)
  x = x.astype(jnp.float32)
  r, b = x.shape
  rows = _pow2_at_most(r, block_rows)
  x, rp = _pad_rows(x, rows)
  tau = jnp.reshape(jnp.asarray(tau, jnp.float32), (1,))
  counts = pl.pallas_call(
      _threshold_count_kernel,
      out_shape=jax.ShapeDtypeStruct((rp,), jnp.int32),
      grid=(rp // rows,),
      in_specs=[pl.BlockSpec((rows, b), lambda i: (i, 0)),
                pl.BlockSpec((1,), lambda i: (0,))],
      out_specs=pl.BlockSpec((rows,), lambda i: (i,)),
      interpret=interpret,
  )(x, tau)
  return counts[:r]


def threshold_count_reference(x, tau):
  """Plain ``jnp`` :func:`threshold_count`."""
  _check_2d(x)
  return jnp.sum((jnp.abs(x.astype(jnp.float32)) >= jnp.float32(tau)).astype(jnp.int32),
                 axis=1)


def _threshold_mask_kernel(x_ref, tau_ref, words_ref, count_ref):
  tau = tau_ref[0]
  w = words_ref.shape[1]
  acc = jnp.zeros(words_ref.shape, jnp.uint32)
  count = jnp.zeros(count_ref.shape, jnp.int32)
  for j in range(32):
    m = jnp.abs(x_ref[:, pl.ds(j * w, w)]) >= tau
    acc = acc | (m.astype(jnp.uint32) << jnp.uint32(j))
    count = count + jnp.sum(m.astype(jnp.int32), axis=1)
  words_ref[...] = acc
  count_ref[...] = count


@functools.partial(jax.jit, static_argnames=('block_rows', 'interpret'))
def threshold_mask(x, tau, *, block_rows=8, interpret=False):
  """Bit-packed mask and counts of ``|x| >= tau`` (Pallas).

  Args:
    x: float ``[R, B]`` with ``B % 32 == 0``.
    tau: scalar threshold.
    block_rows: rows per grid step (rounded down to a power of two <= R).
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    ``(words uint32 [R, B // 32], counts int32 [R])``; bit ``j`` of word ``w``
    of a row is entry ``j * (B // 32) + w``.
  """
  _check_2d(x)
  if x.shape[1] % 32:
    raise ValueError(f'the row length B={x.shape[1]} must be a multiple of 32')
  x = x.astype(jnp.float32)
  r, b = x.shape
  rows = _pow2_at_most(r, block_rows)
  x, rp = _pad_rows(x, rows)
  tau = jnp.reshape(jnp.asarray(tau, jnp.float32), (1,))
  words, counts = pl.pallas_call(
      _threshold_mask_kernel,
      out_shape=[jax.ShapeDtypeStruct((rp, b // 32), jnp.uint32),
                 jax.ShapeDtypeStruct((rp,), jnp.int32)],
      grid=(rp // rows,),
      in_specs=[pl.BlockSpec((rows, b), lambda i: (i, 0)),
                pl.BlockSpec((1,), lambda i: (0,))],
      out_specs=[pl.BlockSpec((rows, b // 32), lambda i: (i, 0)),
                 pl.BlockSpec((rows,), lambda i: (i,))],
      interpret=interpret,
  )(x, tau)
  return words[:r], counts[:r]


def threshold_mask_reference(x, tau):
  """Plain ``jnp`` :func:`threshold_mask`."""
  _check_2d(x)
  if x.shape[1] % 32:
    raise ValueError(f'the row length B={x.shape[1]} must be a multiple of 32')
  r, b = x.shape
  m = jnp.abs(x.astype(jnp.float32)) >= jnp.float32(tau)
  bits = m.astype(jnp.uint32).reshape(r, 32, b // 32)
  shifts = jnp.arange(32, dtype=jnp.uint32)[:, None]
  words = jnp.sum(bits << shifts, axis=1, dtype=jnp.uint32)
  return words, jnp.sum(m.astype(jnp.int32), axis=1)


def _bisect(x, k, count_fn):
  """Largest float32 ``tau`` with ``count_fn(tau) >= k``: the k-th largest ``|x|``."""
  hi_val = jnp.max(jnp.abs(x.astype(jnp.float32)))
  lo = jnp.int32(0)                                   # tau = 0.0: every entry counts
  hi = jax.lax.bitcast_convert_type(hi_val, jnp.int32) + 1   # above the maximum: none

  def body(_, carry):
    lo, hi = carry
    mid = lo + (hi - lo) // 2
    tau = jax.lax.bitcast_convert_type(mid, jnp.float32)
    ok = count_fn(tau) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _check_k(x, k):
  _check_2d(x)
  if not 1 <= k <= x.size:
    raise ValueError(f'k must be in [1, {x.size}], got {k!r}')


@functools.partial(jax.jit, static_argnames=('k', 'block_rows', 'interpret'))
def topk_threshold(x, *, k, block_rows=8, interpret=False):
  """The ``k``-th largest ``|x|`` over all of ``x[R, B]``, by bisection on counts (Pallas)."""
  _check_k(x, k)
  count = lambda tau: jnp.sum(threshold_count(x, tau, block_rows=block_rows,
                                              interpret=interpret))
  return _bisect(x, k, count)


def topk_threshold_reference(x, *, k):
  """Plain ``jnp`` :func:`topk_threshold` (same bisection, ``jnp`` counts)."""
  _check_k(x, k)
  return _bisect(x, k, lambda tau: jnp.sum(threshold_count_reference(x, tau)))
