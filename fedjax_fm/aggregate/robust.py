"""Byzantine-robust aggregation of stacked client updates.

Robust rules need every update at once, so they are *whole-round* aggregators
(`fedjax_fm.aggregate.base`)::

  aggregate(updates, weights, params) -> (aggregate, info)
    updates: pytree whose leaves have a leading clients axis [C, ...]
    weights: float [C]; 0 marks padding or dropped clients
    aggregate: pytree without the clients axis (leaf dtypes kept)

Clients with zero (or negative, or NaN) weight are **ignored**, not merely
down-weighted: they are masked out under fixed shapes (``+inf`` fill before
sorting for the median and trimmed mean, infinite distances for Krum, zero
Weiszfeld weight for the geometric median), so every rule is jit-able and a
padding client's content, NaNs included, never reaches the result. With no
valid client the aggregate is zero.

Weights act as a participation mask only for the median, the trimmed mean and
(Multi-)Krum, which are unweighted robust statistics as in their papers (a
Byzantine client could also lie about its example count). The geometric median
uses the weights as in RFA.

`norm_bounded_mean` is a streaming aggregator (clip then weighted mean) and
`finite_mask` flags clients whose update has a NaN or an infinity, for the engine
to zero their weights.

References:
  * Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates" (coordinate-wise median and
    trimmed mean), https://arxiv.org/abs/1803.01498
  * Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent" (Krum, Multi-Krum),
    https://papers.nips.cc/paper/6617
  * Pillutla, Kakade, Harchaoui 2019, "Robust Aggregation for Federated
    Learning" (RFA, smoothed Weiszfeld), https://arxiv.org/abs/1912.13445
  * Sun, Kairouz, Suresh, McMahan 2019, "Can You Really Backdoor Federated
    Learning?" (norm bounding), https://arxiv.org/abs/1911.07963
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from fedjax_fm.aggregate.base import Aggregator
from fedjax_fm.aggregate.base import streaming
from fedjax_fm.aggregate.base import whole_round


def _rule(fn: Callable[[Any, jax.Array], Any], name: str) -> Aggregator:
  """A whole-round `Aggregator` from ``fn(updates [C, ...], weights [C]) -> tree``."""

  def aggregate(updates, weights, params=None, *, context=None):
    del params, context
    weights = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(jnp.where(weights > 0, weights, 0.0))
    return fn(updates, weights), {'total_weight': total}

  return whole_round(aggregate, name=name, leafwise=True)   # element-wise or whole-update rules


def _valid(weights):
  return jnp.asarray(weights) > 0


def _bcast(mask, x):
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _masked_f32(x, valid, fill=0.0):
  return jnp.where(_bcast(valid, x), x.astype(jnp.float32), fill)


def _per_client_sq_norms(leaves):
  """``[C]`` squared L2 norms over all leaves (float32)."""
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32)),
                     axis=tuple(range(1, x.ndim))) for x in leaves)


def _pairwise_sq_dists(leaves):
  """``[C, C]`` squared distances between flattened updates (exact differences).

  Rows are computed one at a time (`lax.map`) so memory stays ``O(C * D)``;
  differences, not the Gram trick, keep small distances accurate next to huge
  (attacker) vectors.
  """
  num = leaves[0].shape[0]

  def row(i):
    return sum(jnp.sum(jnp.square(x - x[i]), axis=tuple(range(1, x.ndim)))
               for x in leaves)

  return jax.lax.map(row, jnp.arange(num))


def coordinate_median() -> Aggregator:
  """Coordinate-wise median over the valid clients (Yin et al. 2018).

  For each coordinate, the median of the valid clients' values (the mean of the
  two middle values for an even count, as ``np.median``). Invalid clients are
  filled with ``+inf`` and sorted to the end; the middle indices depend on the
  traced number of valid clients.

  Returns:
    A whole-round `Aggregator`.

  References:
    Yin et al. 2018, https://arxiv.org/abs/1803.01498
  """

  def aggregate(updates, weights):
    valid = _valid(weights)
    n = jnp.sum(valid.astype(jnp.int32))
    lo = jnp.maximum((n - 1) // 2, 0)
    hi = jnp.maximum(n // 2, 0)

    def leaf(x):
      s = jnp.sort(_masked_f32(x, valid, jnp.inf), axis=0)
      a = jax.lax.dynamic_index_in_dim(s, lo, 0, keepdims=False)
      b = jax.lax.dynamic_index_in_dim(s, hi, 0, keepdims=False)
      med = jnp.where(n > 0, 0.5 * (a + b), 0.0)
      return med.astype(x.dtype)

    return jax.tree.map(leaf, updates)

  return _rule(aggregate, 'coordinate_median')


def trimmed_mean(trim_fraction: float) -> Aggregator:
  """Coordinate-wise trimmed mean over the valid clients (Yin et al. 2018).

  With ``n`` valid clients, ``k = floor(trim_fraction * n)`` smallest and ``k``
  largest values of every coordinate are dropped and the remaining ``n - 2k``
  averaged (as ``scipy.stats.trim_mean``).

  Args:
    trim_fraction: ``beta`` in [0, 0.5), fraction trimmed from each end.

  Returns:
    A whole-round `Aggregator`.

  Raises:
    ValueError: if ``trim_fraction`` is not in [0, 0.5).

  References:
    Yin et al. 2018, https://arxiv.org/abs/1803.01498
  """
  if not 0.0 <= trim_fraction < 0.5:
    raise ValueError(
        f'trim_fraction must be in [0, 0.5); got {trim_fraction!r}.')

  def aggregate(updates, weights):
    valid = _valid(weights)
    n = jnp.sum(valid.astype(jnp.int32))
    k = jnp.floor(trim_fraction * n.astype(jnp.float32)).astype(jnp.int32)
    count = jnp.maximum(n - 2 * k, 1).astype(jnp.float32)

    def leaf(x):
      s = jnp.sort(_masked_f32(x, valid, jnp.inf), axis=0)
      idx = jnp.arange(s.shape[0])
      keep = _bcast((idx >= k) & (idx < n - k), s)
      mean = jnp.sum(jnp.where(keep, s, 0.0), axis=0) / count
      return jnp.where(n > 0, mean, 0.0).astype(x.dtype)

    return jax.tree.map(leaf, updates)

  return _rule(aggregate, 'trimmed_mean')


def _krum_scores(leaves, valid, num_byzantine):
  """Krum score of each client; ``+inf`` for invalid clients."""
  num = valid.shape[0]
  n = jnp.sum(valid.astype(jnp.int32))
  d = _pairwise_sq_dists(leaves)
  eye = jnp.eye(num, dtype=bool)
  d = jnp.where(valid[:, None] & valid[None, :] & ~eye, d, jnp.inf)
  s = jnp.sort(d, axis=1)
  k = jnp.clip(n - num_byzantine - 2, 1, max(num - 1, 1))
  take = (jnp.arange(num)[None, :] < k) & jnp.isfinite(s)
  scores = jnp.sum(jnp.where(take, s, 0.0), axis=1)
  return jnp.where(valid, scores, jnp.inf)


def multi_krum(num_byzantine: int, m: Optional[int] = None) -> Aggregator:
  """Multi-Krum (Blanchard et al. 2017): mean of the ``m`` best-scored updates.

  Each valid client's score is the sum of squared distances (over the whole
  flattened pytree) to its ``n - f - 2`` nearest valid neighbours, ``n`` being
  the number of valid clients and ``f = num_byzantine`` (clamped to at least one
  neighbour when ``n <= f + 2``; Krum's guarantee needs ``n > 2 f + 2``). The
  ``m`` valid clients with the lowest scores are averaged with equal weights.

  Args:
    num_byzantine: ``f >= 0``, assumed number of Byzantine clients.
    m: Number of selected updates (>= 1), capped by the number of valid
      clients; ``None`` selects ``n - f`` (at least 1).

  Returns:
    A whole-round `Aggregator`.

  Raises:
    ValueError: naming the offending argument.

  References:
    Blanchard et al. 2017, https://papers.nips.cc/paper/6617
  """
  if int(num_byzantine) != num_byzantine or num_byzantine < 0:
    raise ValueError(
        f'num_byzantine must be a non-negative integer; got {num_byzantine!r}.')
  if m is not None and (int(m) != m or m < 1):
    raise ValueError(f'm must be a positive integer or None; got {m!r}.')

  def aggregate(updates, weights):
    valid = _valid(weights)
    leaves, treedef = jax.tree.flatten(updates)
    masked = [_masked_f32(x, valid) for x in leaves]
    scores = _krum_scores(masked, valid, num_byzantine)
    n = jnp.sum(valid.astype(jnp.int32))
    count = (jnp.maximum(n - num_byzantine, 1) if m is None
             else jnp.minimum(n, m))
    rank = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    chosen = valid & (rank < count)
    c = chosen.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(c), 1.0)
    out = [(jnp.tensordot(c, x, axes=1) / denom).astype(orig.dtype)
           for x, orig in zip(masked, leaves)]
    return jax.tree.unflatten(treedef, out)

  return _rule(aggregate, 'multi_krum')


def krum(num_byzantine: int) -> Aggregator:
  """Krum (Blanchard et al. 2017): the single valid update with the best score.

  See `multi_krum` for the score. The output is exactly one client's update.

  Args:
    num_byzantine: ``f >= 0``, assumed number of Byzantine clients.

  Returns:
    A whole-round `Aggregator`.

  Raises:
    ValueError: if ``num_byzantine`` is not a non-negative integer.

  References:
    Blanchard et al. 2017, https://papers.nips.cc/paper/6617
  """
  if int(num_byzantine) != num_byzantine or num_byzantine < 0:
    raise ValueError(
        f'num_byzantine must be a non-negative integer; got {num_byzantine!r}.')

  def aggregate(updates, weights):
    valid = _valid(weights)
    leaves, treedef = jax.tree.flatten(updates)
    masked = [_masked_f32(x, valid) for x in leaves]
    scores = _krum_scores(masked, valid, num_byzantine)
    best = jnp.argmin(scores)
    any_valid = jnp.any(valid)
    out = [jnp.where(any_valid, x[best], 0.0).astype(orig.dtype)
           for x, orig in zip(masked, leaves)]
    return jax.tree.unflatten(treedef, out)

  return _rule(aggregate, 'krum')


def geometric_median(num_iters: int = 32, eps: float = 1e-6) -> Aggregator:
  """Weighted geometric median by the smoothed Weiszfeld algorithm (RFA).

  Minimizes ``sum_i alpha_i max(eps, ||z - u_i||)`` over ``z`` (norms over the
  whole flattened pytree), ``alpha_i`` the weights of the valid clients,
  starting from the weighted mean and iterating ``num_iters`` times
  ``z <- sum_i beta_i u_i / sum_i beta_i`` with
  ``beta_i = alpha_i / max(eps, ||z - u_i||)`` (Pillutla et al. 2019,
  Algorithm 2). Its breakdown point is 1/2: a minority of arbitrarily bad
  updates moves it by a bounded amount. For data symmetric about a point, that
  point (the mean) is the geometric median.

  Args:
    num_iters: Weiszfeld iterations (>= 0; a fixed count keeps it jit-able).
    eps: Smoothing ``nu > 0`` guarding the division near a data point.

  Returns:
    A whole-round `Aggregator`.

  Raises:
    ValueError: naming the offending argument.

  References:
    Pillutla, Kakade, Harchaoui 2019, https://arxiv.org/abs/1912.13445
  """
  if int(num_iters) != num_iters or num_iters < 0:
    raise ValueError(
        f'num_iters must be a non-negative integer; got {num_iters!r}.')
  if not eps > 0:
    raise ValueError(f'eps must be > 0; got {eps!r}.')

  def aggregate(updates, weights):
    valid = _valid(weights)
    alpha = jnp.where(valid, jnp.asarray(weights, jnp.float32), 0.0)
    leaves, treedef = jax.tree.flatten(updates)
    masked = [_masked_f32(x, valid) for x in leaves]

    def weighted_avg(beta):
      total = jnp.maximum(jnp.sum(beta), 1e-30)
      return [jnp.tensordot(beta, x, axes=1) / total for x in masked]

    def step(_, z):
      dist = jnp.sqrt(_per_client_sq_norms(
          [x - zl[None] for x, zl in zip(masked, z)]))
      beta = alpha / jnp.maximum(dist, eps)
      return weighted_avg(beta)

    z = jax.lax.fori_loop(0, int(num_iters), step, weighted_avg(alpha))
    out = [zl.astype(orig.dtype) for zl, orig in zip(z, leaves)]
    return jax.tree.unflatten(treedef, out)

  return _rule(aggregate, 'geometric_median')


def norm_bounded_mean(max_norm: float) -> Aggregator:
  """Streaming weighted mean of updates clipped to L2 norm ``max_norm``.

  Each client's update is scaled by ``min(1, max_norm / ||u_i||)`` (global norm
  over the pytree) before the weighted mean ``sum_i w_i u_i / sum_i w_i``; this
  bounds any single client's influence (Sun et al. 2019). Zero-weight clients
  are masked out. The accumulator ``(sums, total_weight, num_clipped,
  num_clients)`` adds across devices.

  Args:
    max_norm: Bound on each update's L2 norm (> 0).

  Returns:
    A streaming `Aggregator`; ``finalize`` reports ``total_weight`` and
    ``clipped_fraction`` (clipped among participating clients).

  Raises:
    ValueError: if ``max_norm <= 0``.

  References:
    Sun et al. 2019, https://arxiv.org/abs/1911.07963
  """
  if not max_norm > 0:
    raise ValueError(f'max_norm must be > 0; got {max_norm!r}.')

  def zero(params):
    return (jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32),
                         params),
            jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32))

  def accumulate(acc, updates, weights, params=None):
    del params
    total, wsum, n_clipped, n_live = acc
    valid = _valid(weights)
    w = jnp.where(valid, jnp.asarray(weights, jnp.float32), 0.0)
    leaves, treedef = jax.tree.flatten(updates)
    masked = [_masked_f32(x, valid) for x in leaves]
    norms = jnp.sqrt(_per_client_sq_norms(masked))
    factor = max_norm / jnp.maximum(norms, max_norm)
    coeff = w * factor
    adds = jax.tree.unflatten(
        treedef, [jnp.tensordot(coeff, x, axes=1) for x in masked])
    total = jax.tree.map(jnp.add, total, adds)
    clipped = (valid & (norms > max_norm)).astype(jnp.float32)
    return (total, wsum + jnp.sum(w), n_clipped + jnp.sum(clipped),
            n_live + jnp.sum(valid.astype(jnp.float32)))

  def finalize(acc, params=None):
    del params
    total, wsum, n_clipped, n_live = acc
    safe = jnp.where(wsum > 0, wsum, 1.0)
    mean = jax.tree.map(lambda t: t / safe, total)
    frac = n_clipped / jnp.maximum(n_live, 1.0)
    return mean, {'total_weight': wsum, 'clipped_fraction': frac}

  return streaming(zero, accumulate, finalize, name='norm_bounded_mean', leafwise=True)


def finite_mask(updates) -> jax.Array:
  """bool ``[C]``: True where every entry of the client's update is finite.

  Integer leaves are always finite. Use it to zero the weights of clients with
  NaN or infinite updates (a crashed or malicious client) before aggregating.

  Args:
    updates: Pytree with a leading clients axis ``[C, ...]``.

  Returns:
    bool ``[C]``.
  """
  leaves = jax.tree.leaves(updates)
  if not leaves:
    raise ValueError('updates must have at least one leaf.')
  out = jnp.ones((leaves[0].shape[0],), bool)
  for x in leaves:
    if jnp.issubdtype(x.dtype, jnp.inexact):
      out = out & jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
  return out
