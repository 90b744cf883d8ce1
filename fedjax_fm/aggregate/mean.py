"""Weighted mean of client updates (FedAvg aggregation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_fm.aggregate.base import Aggregator
from fedjax_fm.aggregate.base import streaming


def weighted_mean() -> Aggregator:
  """Streaming weighted mean ``sum_i w_i u_i / sum_i w_i``.

  Sums are kept in float32 whatever the update dtype. Clients with weight
  ``<= 0`` are masked out (their content, NaNs included, never reaches the sum).
  When the total weight is zero (no client contributed) the aggregate is zero.

  Returns:
    A streaming `Aggregator`.
  """

  def zero(params):
    return (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32))

  def accumulate(acc, updates, weights, params=None):
    del params
    total, wsum = acc
    weights = weights.astype(jnp.float32)
    valid = weights > 0
    weights = jnp.where(valid, weights, 0.0)

    def add(t, u):   # a client with weight <= 0 never contributes, NaNs included
      u = jnp.where(valid.reshape((-1,) + (1,) * (u.ndim - 1)), u.astype(jnp.float32), 0.0)
      return t + jnp.tensordot(weights, u, axes=1)

    return jax.tree.map(add, total, updates), wsum + jnp.sum(weights)

  def finalize(acc, params=None):
    del params
    total, wsum = acc
    safe = jnp.where(wsum > 0, wsum, 1.0)
    mean = jax.tree.map(lambda t: t / safe, total)
    return mean, {'total_weight': wsum}

  return streaming(zero, accumulate, finalize, name='mean', leafwise=True)
