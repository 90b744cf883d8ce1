"""Device meshes, logical axis rules and multi-host start.

Code names logical axes only; one table (`LOGICAL_AXIS_RULES`) maps them to the
axes of a 2-D mesh ``('clients', 'model')``:

=========  ==========  ==================================================
logical    mesh axis   what is split
=========  ==========  ==================================================
clients    clients     the clients of a round (the `sharded` strategy)
fsdp       model       the frozen base's weights, FSDP-style
batch      (none)      examples inside a client
=========  ==========  ==================================================

The ``sharded`` strategy maps its clients over ``clients`` with
``jax.shard_map`` (manual over that axis only), while ``model`` stays an
automatic axis: frozen weights placed with `shard_frozen` are gathered by XLA
where a layer needs them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

CLIENTS = 'clients'
MODEL = 'model'

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ('clients', CLIENTS),
    ('fsdp', MODEL),
    ('batch', None),
)


def logical_to_spec(logical: Sequence[str | None],
                    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for an array whose dimensions carry these logical names."""
  table = dict(rules)
  out = []
  for name in logical:
    if name is not None and name not in table:
      raise ValueError(f'logical axis {name!r} has no rule; known: {sorted(table)}')
    out.append(None if name is None else table[name])
  return P(*out)


def make_mesh(clients: int | None = None, model: int = 1, devices=None) -> Mesh:
  """A ``(clients, model)`` mesh over the given (default: all) devices.

  Args:
    clients: size of the clients axis (default: devices // model).
    model: size of the model axis (FSDP of the frozen base).
    devices: devices to use (default ``jax.devices()``).
  """
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ValueError(f'model={model} must be >= 1 and divide the {len(devices)} devices')
  clients = len(devices) // model if clients is None else clients
  if clients * model != len(devices):
    raise ValueError(f'clients x model = {clients} x {model} must equal the number of '
                     f'devices ({len(devices)})')
  return Mesh(np.asarray(devices).reshape(clients, model), (CLIENTS, MODEL))


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int = 1024) -> P:
  """Shards the largest dimension divisible by the model axis (FSDP-style).

  Small arrays (fewer than ``min_size`` elements) stay replicated.
  """
  size = mesh.shape.get(MODEL, 1)
  if size == 1 or int(np.prod(shape)) < min_size:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % size == 0:
      logical = [None] * len(shape)
      logical[d] = 'fsdp'
      return logical_to_spec(logical)
  return P()


def shard_frozen(frozen: Any, mesh: Mesh, min_size: int = 1024) -> Any:
  """Places the frozen base on the mesh: FSDP over ``model``, replicated over clients."""
  return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, fsdp_spec(x.shape, mesh, min_size))),
      frozen)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """The same value on every device of the mesh (every process passes it)."""
  sharding = NamedSharding(mesh, P())

  def one(x):
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = np.asarray(jax.random.key_data(x))
      arr = jax.make_array_from_callback(data.shape, sharding, lambda i: data[i])
      return jax.random.wrap_key_data(arr, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])
  return jax.tree.map(one, tree)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts multi-host JAX when asked to; returns True if it did.

  Arguments default to the environment (``FEDJAX_FM_COORDINATOR``,
  ``FEDJAX_FM_NUM_PROCESSES``, ``FEDJAX_FM_PROCESS_ID``); with neither, this
  is a single-process run and nothing happens. On Cloud TPU and SLURM,
  ``jax.distributed.initialize()`` without arguments also works.
  """
  coordinator_address = coordinator_address or os.environ.get('FEDJAX_FM_COORDINATOR')
  if num_processes is None and 'FEDJAX_FM_NUM_PROCESSES' in os.environ:
    num_processes = int(os.environ['FEDJAX_FM_NUM_PROCESSES'])
  if process_id is None and 'FEDJAX_FM_PROCESS_ID' in os.environ:
    process_id = int(os.environ['FEDJAX_FM_PROCESS_ID'])
  if not coordinator_address:
    return False
  if num_processes is None or process_id is None:
    raise ValueError('multi-host needs num_processes and process_id (flags or '
                     'FEDJAX_FM_NUM_PROCESSES / FEDJAX_FM_PROCESS_ID)')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def is_main_process() -> bool:
  return jax.process_index() == 0


def global_clients_array(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assembles each process's block of clients into one global array.

  Every process holds the rows (clients) of its own devices, in process order;
  the result is sharded over ``clients`` on its leading axis.
  """
  sharding = NamedSharding(mesh, P(CLIENTS))
  return jax.make_array_from_process_local_data(sharding, local)


def global_round_data(round_data: Any, mesh: Mesh) -> Any:
  """Global arrays, sharded over ``clients``, from a round every process knows.

  Each process copies only the clients of its own devices to them (the round
  itself is derived from the seed on every host, cheaply, with NumPy).
  """
  sharding = NamedSharding(mesh, P(CLIENTS))

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, round_data)


def to_host(tree: Any) -> Any:
  """NumPy copies of (possibly multi-process) arrays, the same on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)
