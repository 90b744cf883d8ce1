"""Execution strategies for the clients axis.

Every strategy maps ``per_client(params, frozen, x) -> (update, weight, outputs)``
over the leading clients axis of ``xs`` and folds the weighted updates into a
streaming aggregator (a client's weight may differ from ``x['weight']``, e.g. 0
when its update is not finite). They differ only in how the axis is executed:

* ``vmap``: all clients at once (memory O(C)).
* ``chunked``: a ``lax.scan`` over chunks of K clients, each chunk vmapped,
  carrying the aggregator's running sums (memory O(K)).
* ``sharded``: ``jax.shard_map`` over the ``clients`` axis of a device mesh;
  each device runs ``chunked`` on its clients, then the sums are ``psum``-ed.

All three return the same aggregate up to float reassociation.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fedjax_fm.aggregate.base import StreamingAggregator

STRATEGIES = ('vmap', 'chunked', 'sharded')
CLIENTS_AXIS = 'clients'


def clients_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis ``clients`` over the given (default: local) devices."""
  devices = jax.local_devices() if devices is None else devices
  return Mesh(np.asarray(devices), (CLIENTS_AXIS,))


def _split_leading(tree, num_chunks, chunk_size):
  return jax.tree.map(lambda x: x.reshape((num_chunks, chunk_size) + x.shape[1:]), tree)


def _merge_leading(tree):
  return jax.tree.map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def _vmapped_chunk(per_client, aggregator, params, frozen):
  def body(acc, xs_chunk):
    updates, weights, outs = jax.vmap(per_client, in_axes=(None, None, 0))(
        params, frozen, xs_chunk)
    acc = aggregator.accumulate(acc, updates, weights)
    return acc, outs
  return body


def run_vmap(per_client, aggregator: StreamingAggregator, params, frozen, xs,
             update_like=None):
  body = _vmapped_chunk(per_client, aggregator, params, frozen)
  return body(aggregator.zero(params if update_like is None else update_like), xs)


def run_chunked(per_client, aggregator: StreamingAggregator, params, frozen, xs,
                chunk_size: int, update_like=None):
  num_clients = xs['weight'].shape[0]
  if num_clients % chunk_size:
    raise ValueError(f'chunk_size={chunk_size} must divide the clients per round '
                     f'({num_clients}); pad the round with padding clients')
  num_chunks = num_clients // chunk_size
  body = _vmapped_chunk(per_client, aggregator, params, frozen)
  xs = _split_leading(xs, num_chunks, chunk_size)
  zero = aggregator.zero(params if update_like is None else update_like)
  acc, outs = jax.lax.scan(body, zero, xs)
  return acc, _merge_leading(outs)


def run_sharded(per_client, aggregator: StreamingAggregator, params, frozen, xs,
                chunk_size: int, mesh: Mesh, update_like=None):
  num_devices = mesh.shape[CLIENTS_AXIS]
  num_clients = xs['weight'].shape[0]
  if num_clients % (num_devices * chunk_size):
    raise ValueError(
        f'clients per round ({num_clients}) must be a multiple of devices x chunk_size '
        f'({num_devices} x {chunk_size}); pad the round with padding clients')

  def local(params, frozen, xs):
    acc, outs = run_chunked(per_client, aggregator, params, frozen, xs, chunk_size,
                            update_like)
    return jax.lax.psum(acc, CLIENTS_AXIS), outs

  # Manual over `clients` only: other mesh axes (e.g. `model`, over which the
  # frozen base may be sharded FSDP-style) stay automatic.
  fn = jax.shard_map(local, mesh=mesh, axis_names=frozenset({CLIENTS_AXIS}),
                     in_specs=(P(), P(), P(CLIENTS_AXIS)),
                     out_specs=(P(), P(CLIENTS_AXIS)),
                     # Per-client carries start replicated and become per-device;
                     # the psum above makes the accumulator replicated again.
                     check_vma=False)
  return fn(params, frozen, xs)


def run_clients(strategy: str, per_client: Callable, aggregator: StreamingAggregator,
                params, frozen, xs: Any, *, chunk_size: int | None = None,
                mesh: Mesh | None = None, update_like=None):
  """Runs ``per_client`` over the clients axis with the named strategy.

  ``params`` is whatever every client receives (broadcast); ``update_like``
  (default: ``params``) shapes the aggregator's accumulator.

  Returns:
    ``(accumulator, outputs)``: the aggregator's accumulated sums and the
    per-client outputs stacked on a leading ``[C]`` axis.
  """
  num_clients = xs['weight'].shape[0]
  if strategy == 'vmap':
    return run_vmap(per_client, aggregator, params, frozen, xs, update_like)
  if strategy == 'chunked':
    return run_chunked(per_client, aggregator, params, frozen, xs,
                       chunk_size or num_clients, update_like)
  if strategy == 'sharded':
    mesh = mesh if mesh is not None else clients_mesh()
    local_clients = num_clients // mesh.shape[CLIENTS_AXIS]
    return run_sharded(per_client, aggregator, params, frozen, xs,
                       chunk_size or max(local_clients, 1), mesh, update_like)
  raise ValueError(f'strategy {strategy!r} is unknown; allowed: {STRATEGIES}')
