"""Weighted mean of client updates (FedAvg aggregation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_fm.aggregate.base import StreamingAggregator


def weighted_mean() -> StreamingAggregator:
  """Streaming weighted mean ``sum_i w_i u_i / sum_i w_i``.

  Sums are kept in float32 whatever the update dtype. When the total weight is
  zero (no client contributed) the aggregate is zero.

  Returns:
    A `StreamingAggregator`.
  """

  def zero(params_like):
    return (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params_like),
            jnp.zeros((), jnp.float32))

  def accumulate(acc, updates, weights):
    total, wsum = acc
    weights = weights.astype(jnp.float32)
    total = jax.tree.map(
        lambda t, u: t + jnp.tensordot(weights, u.astype(jnp.float32), axes=1),
        total, updates)
    return total, wsum + jnp.sum(weights)

  def finalize(acc):
    total, wsum = acc
    safe = jnp.where(wsum > 0, wsum, 1.0)
    mean = jax.tree.map(lambda t: t / safe, total)
    return mean, {'total_weight': wsum}

  return StreamingAggregator(zero, accumulate, finalize)
