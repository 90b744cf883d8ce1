"""Low-rank compression of matrix leaves: truncated SVD and PowerSGD.

A leaf with ``ndim >= 2`` and at least ``min_size`` elements is viewed as the
matrix ``M[m, n]`` with ``n = shape[-1]`` and ``m`` the product of the other
dimensions; other leaves (biases, norms, scalars) are sent raw. The rank is
``r = min(rank, m, n)`` and the payload is a :class:`LowRankPayload`:

* ``left``: float32 ``[m, r]`` (``U * S`` for SVD, ``P`` for PowerSGD);
* ``right``: float32 ``[n, r]`` (``V``, resp. ``Q``);

decoded as ``left @ right.T``: ``4 r (m + n)`` bytes instead of ``4 m n``.
Every eligible leaf is factorised, even where ``r (m + n) >= m n`` (no saving).

PowerSGD here is the per-client form: each client runs its own power
iteration(s) on its update and sends ``P`` and ``Q`` (there is no all-reduce
between the two half-steps as in data-parallel training, since clients only
talk to the server). ``Q`` is warm-started from the client's previous round
(the compressor state), initially drawn from ``seed``. Biased; pair with
:func:`~fedjax_fm.compress.error_feedback.error_feedback` as in the paper.

References:
  Vogels et al. 2019, "PowerSGD: Practical Low-Rank Gradient Compression for
  Distributed Optimization", https://arxiv.org/abs/1905.13727.
  Wang et al. 2018, "ATOMO: Communication-efficient Learning via Atomic
  Sparsification", https://arxiv.org/abs/1806.04090 (SVD of gradients).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.compress import leafwise
from fedjax_fm.compress.base import Compressor
from fedjax_fm.compress.leafwise import Payload

_HIGHEST = jax.lax.Precision.HIGHEST


@leafwise.payload_node
class LowRankPayload(Payload):
  """``left[m, r] @ right[n, r].T`` reshaped to ``shape``."""
  left: Any
  right: Any
  shape: tuple = leafwise.static_field()
  dtype: Any = leafwise.static_field()


def _matrix_shape(shape) -> tuple[int, int]:
  return leafwise.size_of(shape[:-1]), int(shape[-1])


def _takes(min_size):
  return lambda shape, dtype: (len(shape) >= 2 and leafwise.is_float(dtype)
                               and leafwise.size_of(shape) >= min_size)


def _decode(p: LowRankPayload):
  m = jnp.matmul(p.left, p.right.T, precision=_HIGHEST)
  return m.reshape(p.shape).astype(p.dtype)


def _check_rank(rank):
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f'rank must be an int >= 1, got {rank!r}')
  return int(rank)


def svd(rank: int, *, min_size: int = leafwise.DEFAULT_MIN_SIZE) -> Compressor:
  """Best rank-``r`` approximation of each matrix leaf (truncated SVD).

  Args:
    rank: kept singular triplets (clipped to ``min(m, n)``).
    min_size: matrix leaves with fewer elements are sent raw.

  Returns:
    A :class:`Compressor`; payload ``left = U[:, :r] * S[:r]``, ``right = V[:, :r]``.
  """
  rank = _check_rank(rank)
  min_size = leafwise.check_min_size(min_size)

  def encode(key, x, state):
    del key
    m, n = _matrix_shape(x.shape)
    r = min(rank, m, n)
    u, s, vt = jnp.linalg.svd(x.reshape(m, n).astype(jnp.float32), full_matrices=False)
    payload = LowRankPayload(u[:, :r] * s[None, :r], vt[:r].T, tuple(x.shape), np.dtype(x.dtype))
    return payload, state

  return leafwise.leafwise(leafwise.LeafCodec(_takes(min_size), None, encode, _decode))


def _orthonormalize(p):
  """Orthonormal basis of the columns of ``p[m, r]`` (reduced QR; zero-safe)."""
  q, _ = jnp.linalg.qr(p, mode='reduced')
  return q


def powersgd(rank: int, *, num_iters: int = 1, seed: int = 0,
             min_size: int = leafwise.DEFAULT_MIN_SIZE) -> Compressor:
  """PowerSGD (Vogels et al. 2019): warm-started power iteration per matrix leaf.

  Per leaf and step, ``num_iters`` times: ``P = M Q``; ``P = orth(P)``;
  ``Q = M^T P``. Sends ``P[m, r]`` and ``Q[n, r]``; the server rebuilds
  ``P Q^T`` (the projection of ``M`` onto ``span(P)``). The new ``Q`` is the
  client's state for the next round.

  Args:
    rank: ``r`` (clipped to ``min(m, n)``).
    num_iters: power iterations per encode (>= 1).
    seed: seed of the initial ``Q`` (standard normal), the same for every client.
    min_size: matrix leaves with fewer elements are sent raw.

  Returns:
    A :class:`Compressor` whose state holds ``Q[n, r]`` per matrix leaf.
  """
  rank = _check_rank(rank)
  if isinstance(num_iters, bool) or not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
    raise ValueError(f'num_iters must be an int >= 1, got {num_iters!r}')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f'seed must be an int, got {seed!r}')
  min_size = leafwise.check_min_size(min_size)

  def init(shape, dtype, index):
    del dtype
    m, n = _matrix_shape(shape)
    r = min(rank, m, n)
    key = jax.random.fold_in(jax.random.key(seed), index)
    return jax.random.normal(key, (n, r), jnp.float32)

  def encode(key, x, q):
    del key
    m, n = _matrix_shape(x.shape)
    mat = x.reshape(m, n).astype(jnp.float32)
    p = None
    for _ in range(num_iters):
      p = _orthonormalize(jnp.matmul(mat, q, precision=_HIGHEST))
      q = jnp.matmul(mat.T, p, precision=_HIGHEST)
    return LowRankPayload(p, q, tuple(x.shape), np.dtype(x.dtype)), q

  codec = leafwise.LeafCodec(_takes(min_size), init, encode, _decode, stateful=True)
  return leafwise.leafwise(codec)


def _spec(shape, dtype, rank, min_size):
  if not _takes(leafwise.check_min_size(min_size))(tuple(shape), dtype):
    return leafwise.raw_spec(shape, dtype)
  m, n = _matrix_shape(shape)
  r = min(_check_rank(rank), m, n)
  return [((m, r), np.dtype(np.float32)), ((n, r), np.dtype(np.float32))]


def svd_spec(shape, dtype, rank, *, min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`svd`."""
  del unused
  return _spec(shape, dtype, rank, min_size)


def powersgd_spec(shape, dtype, rank, *, min_size=leafwise.DEFAULT_MIN_SIZE, **unused):
  """Payload arrays of one leaf under :func:`powersgd`."""
  del unused
  return _spec(shape, dtype, rank, min_size)
