"""Execution strategies for the clients axis.

Every strategy maps ``per_client(broadcast, frozen, x) -> (contrib, outputs)``
over the leading clients axis of ``xs`` and folds the contributions into a
`Reducer`'s accumulator (e.g. an aggregator's running sums). They differ only
in how the axis is executed:

* ``vmap``: all clients at once (memory O(C)).
* ``chunked``: a ``lax.scan`` over chunks of K clients, each chunk vmapped,
  carrying the accumulator (memory O(K)). K defaults to the automatic size
  (`fedjax_fm.engine.memory.auto_chunk_size`: a measured sweet spot).
* ``sharded``: ``jax.shard_map`` over the ``clients`` axis of a device mesh;
  each device runs ``chunked`` on its clients, then the accumulators are
  ``psum``-ed.

All three return the same result up to float reassociation. ``outputs`` (small
per-client metrics, or the updates themselves for a whole-round aggregator) are
returned stacked ``[C, ...]``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fedjax_fm.engine import memory


class Reducer(NamedTuple):
  """How per-client contributions fold into one accumulator.

  Attributes:
    zero: the initial accumulator (a pytree whose leaves add across devices).
    accumulate: ``accumulate(acc, contribs [K, ...], broadcast) -> acc``.
  """
  zero: Any
  accumulate: Callable[[Any, Any, Any], Any]


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


def _vmapped_chunk(per_client, reducer: Reducer, broadcast, frozen):
  def body(acc, xs_chunk):
    contribs, outs = jax.vmap(per_client, in_axes=(None, None, 0))(
        broadcast, frozen, xs_chunk)
    return reducer.accumulate(acc, contribs, broadcast), outs
  return body


def run_vmap(per_client, reducer: Reducer, broadcast, frozen, xs):
  return _vmapped_chunk(per_client, reducer, broadcast, frozen)(reducer.zero, xs)


def run_chunked(per_client, reducer: Reducer, broadcast, frozen, xs, chunk_size: int):
  num_clients = xs['weight'].shape[0]
  if num_clients % chunk_size:
    raise ValueError(f'chunk_size={chunk_size} must divide the clients per round '
                     f'({num_clients}); pad the round with padding clients')
  num_chunks = num_clients // chunk_size
  body = _vmapped_chunk(per_client, reducer, broadcast, frozen)
  xs = _split_leading(xs, num_chunks, chunk_size)
  acc, outs = jax.lax.scan(body, reducer.zero, xs)
  return acc, _merge_leading(outs)


def run_sharded(per_client, reducer: Reducer, broadcast, frozen, xs, chunk_size: int,
                mesh: Mesh):
  num_devices = mesh.shape[CLIENTS_AXIS]
  num_clients = xs['weight'].shape[0]
  if num_clients % (num_devices * chunk_size):
    raise ValueError(
        f'clients per round ({num_clients}) must be a multiple of devices x chunk_size '
        f'({num_devices} x {chunk_size}); pad the round with padding clients')

  def local(broadcast, frozen, xs):
    acc, outs = run_chunked(per_client, reducer, broadcast, frozen, xs, chunk_size)
    return jax.lax.psum(acc, CLIENTS_AXIS), outs

  # Manual over `clients` only: other mesh axes (e.g. `model`, over which the
  # frozen base may be sharded FSDP-style) stay automatic.
  fn = jax.shard_map(local, mesh=mesh, axis_names=frozenset({CLIENTS_AXIS}),
                     in_specs=(P(), P(), P(CLIENTS_AXIS)),
                     out_specs=(P(), P(CLIENTS_AXIS)),
                     # Per-client carries start replicated and become per-device;
                     # the psum above makes the accumulator replicated again.
                     check_vma=False)
  return fn(broadcast, frozen, xs)


def resolve_chunk_size(chunk_size: int | str | None, clients: int, platform: str) -> int:
  """The chunk size a strategy runs: ``chunk_size``, or the automatic one.

  ``None``, ``0`` and ``'auto'`` select `fedjax_fm.engine.memory.auto_chunk_size`
  for ``clients`` (per device) on ``platform``, as a divisor of ``clients``
  (the round is not padded here).
  """
  if chunk_size is None or chunk_size == 0 or chunk_size == 'auto':
    return memory.auto_chunk_size(max(clients, 1), platform=platform, divides=True)
  if isinstance(chunk_size, str) or int(chunk_size) < 1:
    raise ValueError(f'chunk_size={chunk_size!r} is invalid: a positive number of clients, '
                     f'or 0 / None / "auto" for the automatic size')
  return int(chunk_size)


def run_clients(strategy: str, per_client: Callable, reducer: Reducer, broadcast, frozen,
                xs: Any, *, chunk_size: int | str | None = None, mesh: Mesh | None = None):
  """Runs ``per_client`` over the clients axis with the named strategy.

  Args:
    strategy: ``vmap``, ``chunked`` or ``sharded``.
    per_client: ``per_client(broadcast, frozen, x) -> (contrib, outputs)``.
    reducer: folds the contributions (see `Reducer`).
    broadcast: what every client receives (replicated).
    frozen: the frozen base (replicated, or sharded over other mesh axes).
    xs: per-client inputs with a leading clients axis (``xs['weight']`` sizes it).
    chunk_size: clients per vmapped chunk (``chunked``; per device for
      ``sharded``); ``None``, ``0`` or ``'auto'``: `resolve_chunk_size`.
    mesh: a mesh with a ``clients`` axis for ``sharded`` (default: local devices).

  Returns:
    ``(accumulator, outputs)``: the reducer's accumulator and the per-client
    outputs stacked on a leading ``[C]`` axis.
  """
  num_clients = xs['weight'].shape[0]
  if strategy == 'vmap':
    return run_vmap(per_client, reducer, broadcast, frozen, xs)
  if strategy == 'chunked':
    return run_chunked(per_client, reducer, broadcast, frozen, xs,
                       resolve_chunk_size(chunk_size, num_clients, jax.default_backend()))
  if strategy == 'sharded':
    mesh = mesh if mesh is not None else clients_mesh()
    local_clients = num_clients // mesh.shape[CLIENTS_AXIS]
    platform = mesh.devices.flat[0].platform
    return run_sharded(per_client, reducer, broadcast, frozen, xs,
                       resolve_chunk_size(chunk_size, local_clients, platform), mesh)
  raise ValueError(f'strategy {strategy!r} is unknown; allowed: {STRATEGIES}')
