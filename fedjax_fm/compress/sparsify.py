"""Sparsification: top-k, random-k and threshold.

Each compressed leaf (a float tensor with at least ``min_size`` elements;
smaller leaves are sent raw) is flattened to ``n`` elements and sent as a
:class:`SparsePayload`:

* ``values``: float32 ``[k]``;
* ``indices``: ``[k]`` flat positions, uint16 when ``n <= 65536`` else uint32.

Decoding scatter-adds the values into zeros, so unused slots (value 0) are
harmless. ``k`` is fixed per leaf at trace time (``fraction * n`` rounded up, or
a count), so the payload has a fixed shape and its ``nbytes`` are the wire bytes.

``random_k`` by default sends no indices: its positions are a function of a
32-bit seed drawn from the client's key, sent in a :class:`SeededSparsePayload`
(``values [k]`` + ``seed`` uint32 scalar), and the server regenerates them.
``send_indices=True`` sends them explicitly instead.

References:
  Aji & Heafield 2017, "Sparse Communication for Distributed Gradient
  Descent", https://arxiv.org/abs/1704.05021 (threshold / top-k).
  Lin et al. 2018, "Deep Gradient Compression",
  https://arxiv.org/abs/1712.01887 (top-k with local accumulation).
  Stich et al. 2018, "Sparsified SGD with Memory",
  https://arxiv.org/abs/1809.07599 (top-k and random-k with error feedback).
  Wangni et al. 2018, "Gradient Sparsification for Communication-Efficient
  Distributed Optimization", https://arxiv.org/abs/1710.09854 (unbiased
  rescaled random sparsification).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.compress import bitpack
from fedjax_fm.compress import leafwise
from fedjax_fm.compress.base import Compressor
from fedjax_fm.compress.leafwise import Payload

APPROXIMATE = (False, True, 'approx_max_k', 'threshold')
THRESHOLD_BLOCK = 1024   # row length of the [R, B] view used by the threshold kernels


@leafwise.payload_node
class SparsePayload(Payload):
  """``values[k]`` float32 at flat ``indices[k]`` of a tensor of ``shape``."""
  values: Any
  indices: Any
  shape: tuple = leafwise.static_field()
  dtype: Any = leafwise.static_field()


@leafwise.payload_node
class SeededSparsePayload(Payload):
  """``values[k]`` float32 at the ``k`` positions drawn from ``seed`` (uint32)."""
  values: Any
  seed: Any
  shape: tuple = leafwise.static_field()
  dtype: Any = leafwise.static_field()


def _flat_f32(x):
  return x.reshape(-1).astype(jnp.float32)


def _scatter(values, indices, shape, dtype):
  n = leafwise.size_of(shape)
  flat = jnp.zeros((n,), jnp.float32).at[indices].add(values)
  return flat.reshape(shape).astype(dtype)


def _decode(p):
  if isinstance(p, SeededSparsePayload):
    n = leafwise.size_of(p.shape)
    idx = _random_subset(jax.random.key(p.seed), n, p.values.shape[0])
    return _scatter(p.values, idx, p.shape, p.dtype)
  return _scatter(p.values, p.indices, p.shape, p.dtype)


def _sparse(flat, idx, valid, shape, dtype):
  n = flat.shape[0]
  values = flat[idx]
  if valid is not None:
    values = jnp.where(valid, values, 0.0)
  return SparsePayload(values, idx.astype(leafwise.index_dtype(n)), tuple(shape),
                       np.dtype(dtype))


def _select_at_least(flat, mask, k):
  """First ``k`` positions of ``mask`` (index order); slots beyond its count hold 0."""
  idx = jnp.nonzero(mask, size=k, fill_value=0)[0]
  valid = jnp.arange(k) < jnp.sum(mask)
  return idx, valid


def _as_rows(a, fill=0.0):
  """Flat ``a[n]`` -> ``[R, B]`` (B = THRESHOLD_BLOCK, or n rounded up to 32)."""
  n = a.shape[0]
  b = THRESHOLD_BLOCK if n >= THRESHOLD_BLOCK else -(-n // 32) * 32
  r = -(-n // b)
  return jnp.pad(a, (0, r * b - n), constant_values=fill).reshape(r, b)


def _spec_sparse(shape, dtype, k):
  n = leafwise.size_of(shape)
  return [((k,), np.dtype(np.float32)), ((k,), leafwise.index_dtype(n))]


# --------------------------------------------------------------------------- top-k


def top_k(fraction_or_k, *, approximate=False, recall_target: float = 0.95,
          min_size: int = leafwise.DEFAULT_MIN_SIZE, use_kernel=None) -> Compressor:
  """Keeps the ``k`` entries of largest magnitude of each tensor (biased; use with EF).

  Args:
    fraction_or_k: a float in (0, 1] keeps ``ceil(fraction * n)`` entries of a
      leaf of ``n``; an int keeps ``min(k, n)``.
    approximate: how the ``k`` entries are found.
      ``False``: exact, ``lax.top_k`` on ``|x|``.
      ``True`` or ``'approx_max_k'``: ``lax.approx_max_k`` (TPU's approximate
      top-k, at least ``recall_target`` of the true top-k in expectation; on
      CPU and GPU XLA lowers it to an exact top-k).
      ``'threshold'``: the exact ``k``-th largest ``|x|`` by bisection on counts
      (32 streaming passes, no sort; the Pallas kernel
      ``fedjax_fm_kernels.topk_threshold`` where ``use_kernel`` says so), then
      the first ``k`` positions at or above it: a valid top-k set, ties broken
      by position.
    recall_target: for ``approx_max_k``.
    min_size: leaves with fewer elements are sent raw.
    use_kernel: ``'threshold'`` only; see ``leafwise.kernel_mode``.

  Returns:
    A :class:`Compressor` with a :class:`SparsePayload` per compressed leaf.
  """
  fraction_or_k = leafwise.check_fraction_or_k(fraction_or_k)
  if approximate not in APPROXIMATE:
    raise ValueError(f'approximate must be one of {APPROXIMATE}, got {approximate!r}')
  if not 0.0 < recall_target <= 1.0:
    raise ValueError(f'recall_target must be in (0, 1], got {recall_target!r}')
  min_size = leafwise.check_min_size(min_size)
  leafwise.check_use_kernel(use_kernel)

  def encode(key, x, state):
    del key
    flat = _flat_f32(x)
    n = flat.shape[0]
    k = leafwise.resolve_k(fraction_or_k, n)
    mag = jnp.abs(flat)
    valid = None
    if approximate is False:
      _, idx = jax.lax.top_k(mag, k)
    elif approximate in (True, 'approx_max_k'):
      _, idx = jax.lax.approx_max_k(mag, k, recall_target=recall_target)
    else:
      tau = kth_largest_magnitude(flat, k, use_kernel=use_kernel)
      idx, valid = _select_at_least(flat, mag >= tau, k)
    return _sparse(flat, idx, valid, x.shape, x.dtype), state

  codec = leafwise.LeafCodec(leafwise.takes_float(min_size), None, encode, _decode)
  return leafwise.leafwise(codec)


def kth_largest_magnitude(flat, k: int, *, use_kernel=None):
  """The exact ``k``-th largest ``|flat|`` by count bisection (Pallas or ``jnp``)."""
  import fedjax_fm_kernels  # pylint: disable=g-import-not-at-top
  rows = _as_rows(flat)
  use, interpret = leafwise.kernel_mode(use_kernel)
  if use:
    return fedjax_fm_kernels.topk_threshold(rows, k=k, interpret=interpret)
  return fedjax_fm_kernels.topk_threshold_reference(rows, k=k)


def top_k_spec(shape, dtype, fraction_or_k, *, min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays ``[(shape, dtype)]`` of one leaf under :func:`top_k`."""
  del unused
  if not leafwise.takes_float(min_size)(tuple(shape), dtype):
    return leafwise.raw_spec(shape, dtype)
  k = leafwise.resolve_k(leafwise.check_fraction_or_k(fraction_or_k), leafwise.size_of(shape))
  return _spec_sparse(shape, dtype, k)


# ------------------------------------------------------------------------ random-k


def _random_subset(key, n: int, k: int):
  """``k`` distinct positions of ``[0, n)``: the top-k of ``n`` random 30-bit keys.

  The keys are 30 random bits placed in the bit pattern of a normal positive
  float32 (order-preserving), because XLA's float top-k is far faster than its
  integer one on CPU. Every k-subset is equally likely up to ties among the
  keys (broken by position), whose chance at the selection boundary is about
  ``n / 2**30`` per draw. This is O(n) plus a top-k, where
  ``jax.random.choice(replace=False)`` sorts (25x slower at 16M on CPU).
  """
  if k == n:
    return jnp.arange(n, dtype=jnp.int32)
  bits = (jax.random.bits(key, (n,), jnp.uint32) >> 2) + jnp.uint32(1 << 23)
  return jax.lax.top_k(jax.lax.bitcast_convert_type(bits, jnp.float32), k)[1]


def random_k(fraction_or_k, *, send_indices: bool = False,
             min_size: int = leafwise.DEFAULT_MIN_SIZE) -> Compressor:
  """Keeps ``k`` uniformly random entries, rescaled by ``n / k`` (unbiased).

  ``E[decode(encode(x))] = x`` and the per-element variance is
  ``(n / k - 1) x_i^2``.

  Args:
    fraction_or_k: as in :func:`top_k`.
    send_indices: ``False`` (default) sends a uint32 seed (4 bytes) from which
      the server regenerates the positions (clients and server share the
      generator); ``True`` sends the ``k`` indices.
    min_size: leaves with fewer elements are sent raw.

  Returns:
    A :class:`Compressor`; payload :class:`SeededSparsePayload` per compressed
    leaf, or :class:`SparsePayload` with ``send_indices``.
  """
  fraction_or_k = leafwise.check_fraction_or_k(fraction_or_k)
  if not isinstance(send_indices, bool):
    raise ValueError(f'send_indices must be a bool, got {send_indices!r}')
  min_size = leafwise.check_min_size(min_size)

  def encode(key, x, state):
    flat = _flat_f32(x)
    n = flat.shape[0]
    k = leafwise.resolve_k(fraction_or_k, n)
    seed = jax.random.bits(key, (), jnp.uint32)
    idx = _random_subset(jax.random.key(seed), n, k)
    values = flat[idx] * jnp.float32(n / k)
    if send_indices:
      payload = SparsePayload(values, idx.astype(leafwise.index_dtype(n)), tuple(x.shape),
                              np.dtype(x.dtype))
    else:
      payload = SeededSparsePayload(values, seed, tuple(x.shape), np.dtype(x.dtype))
    return payload, state

  codec = leafwise.LeafCodec(leafwise.takes_float(min_size), None, encode, _decode)
  return leafwise.leafwise(codec)


def random_k_spec(shape, dtype, fraction_or_k, *, send_indices=False,
                  min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`random_k`."""
  del unused
  if not leafwise.takes_float(min_size)(tuple(shape), dtype):
    return leafwise.raw_spec(shape, dtype)
  k = leafwise.resolve_k(leafwise.check_fraction_or_k(fraction_or_k), leafwise.size_of(shape))
  if send_indices:
    return _spec_sparse(shape, dtype, k)
  return [((k,), np.dtype(np.float32)), ((), np.dtype(np.uint32))]


# ----------------------------------------------------------------------- threshold


def threshold(tau: float, *, max_fraction=0.1, min_size: int = leafwise.DEFAULT_MIN_SIZE,
              use_kernel=None) -> Compressor:
  """Keeps the entries with ``|x| >= tau``, at most ``max_fraction`` of each leaf.

  The payload has a fixed capacity ``cap = ceil(max_fraction * n)`` (or a count
  when ``max_fraction`` is an int): all ``cap`` slots are sent. When fewer
  entries pass, the spare slots carry value 0; when more pass, the first ``cap``
  in position order are kept and the rest dropped (error feedback recovers
  them).

  Args:
    tau: magnitude threshold, > 0.
    max_fraction: capacity as a fraction in (0, 1] or a count.
    min_size: leaves with fewer elements are sent raw.
    use_kernel: compute the mask with the Pallas kernel
      ``fedjax_fm_kernels.threshold_mask``; see ``leafwise.kernel_mode``.

  Returns:
    A :class:`Compressor` with a :class:`SparsePayload` per compressed leaf.
  """
  if isinstance(tau, bool) or not isinstance(tau, (int, float, np.floating)) or not tau > 0:
    raise ValueError(f'tau must be a number > 0, got {tau!r}')
  max_fraction = leafwise.check_fraction_or_k(max_fraction, 'max_fraction')
  min_size = leafwise.check_min_size(min_size)
  leafwise.check_use_kernel(use_kernel)

  def encode(key, x, state):
    del key
    flat = _flat_f32(x)
    n = flat.shape[0]
    cap = leafwise.resolve_k(max_fraction, n)
    use, interpret = leafwise.kernel_mode(use_kernel)
    if use:
      import fedjax_fm_kernels  # pylint: disable=g-import-not-at-top
      rows = _as_rows(flat)
      words, _ = fedjax_fm_kernels.threshold_mask(rows, tau, interpret=interpret)
      mask = bitpack.unpack_bits(words, 1, rows.shape[1]).reshape(-1)[:n].astype(bool)
    else:
      mask = jnp.abs(flat) >= jnp.float32(tau)
    idx, valid = _select_at_least(flat, mask, cap)
    return _sparse(flat, idx, valid, x.shape, x.dtype), state

  codec = leafwise.LeafCodec(leafwise.takes_float(min_size), None, encode, _decode)
  return leafwise.leafwise(codec)


def threshold_spec(shape, dtype, tau=None, *, max_fraction=0.1,
                   min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`threshold`."""
  del tau, unused
  if not leafwise.takes_float(min_size)(tuple(shape), dtype):
    return leafwise.raw_spec(shape, dtype)
  cap = leafwise.resolve_k(leafwise.check_fraction_or_k(max_fraction, 'max_fraction'),
                           leafwise.size_of(shape))
  return _spec_sparse(shape, dtype, cap)
