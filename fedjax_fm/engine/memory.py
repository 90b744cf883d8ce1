"""Memory of a compiled round, and the chunk size: a measured sweet spot within a budget.

Under the ``chunked`` strategy the temporary memory of a round is
``base + per_client * chunk_size`` and does not depend on the clients per
round (tested with XLA's own memory analysis of the compiled program). Two
compilations (chunk sizes 1 and 2) give the two coefficients
(`memory_coefficients`); `client_bytes_bound` bounds ``per_client`` from above
without compiling (the sum of every intermediate of one client's local
training, which XLA's fusion only shrinks).

The automatic chunk size (``chunk_size=0``, the default of ``fl.chunk_size``,
and ``None`` / ``0`` / ``'auto'`` in `fedjax_fm.engine.build_round`) is
`auto_chunk_size`: the largest chunk that is at most the backend's measured
sweet spot and fits the memory budget, made divisor-friendly (a divisor of
the clients per device when one is more than half that size, else the fewest
chunks evened out, the round padded with fewer padding clients than chunks).

The sweet spot (``python scripts/bench_chunk.py``, and with ``--batch 2``,
``--batch 32``, ``--models lora_transformer_big``; CPU, 2 cores: 1 MiB L2 per
core, 32 MiB L3; 5 local steps of SGD; time per round over the sweep's best;
``work``: `client_bytes_bound` of one client):

==========================================  =====  ====  ====  ====  ====  ====  ====  =======  ===========
problem (work), clients per round, batch     K=1   K=2   K=5   K=10  K=20  K=50  all   best K   default K
==========================================  =====  ====  ====  ====  ====  ====  ====  =======  ===========
MLP 32-128-128-10 (1.0 MiB), 100, 2          2.38  1.65  1.20  1.00  1.17  1.71  2.42  10       10 (1.00)
MLP (1.1 MiB), 100, 8                        2.83  1.42  1.18  1.00  1.19  2.17  2.75  10       10 (1.00)
MLP (1.3 MiB), 100, 32                       1.51  1.26  1.14  1.00  1.06  1.14  1.38  10       10 (1.00)
MLP (1.1 MiB), 500, 8                        1.96  1.53  1.31  1.08  1.00  1.86  3.56  20       10 (1.08)
LoRA d64 L2 seq32 (18 MiB), 100, 8           1.40  1.22  1.00  1.05  1.11  1.28  1.42  5        10 (1.05)
LoRA d64 L2 seq32 (18 MiB), 500, 8           1.37  1.17  1.03  1.00  1.07  1.20  1.27  10       10 (1.00)
LoRA d128 L4 seq64 (94 MiB), 100, 8          1.14  1.01  1.07  1.24  1.18  1.27  1.48  4        5 (1.07)
==========================================  =====  ====  ====  ====  ====  ====  ====  =======  ===========

Small chunks pay the per-iteration cost of the chunk loop (a few hundred
kernel launches) for little work; large chunks spill the caches. For light
clients the best chunk is 10 to 20 clients whatever the batch (2 to 32
examples: it is not a number of examples per chunk); heavier clients reach it
with fewer (4 for the 94 MiB client, where 10 costs 1.24). Hence the rule on
CPU: at most `SWEET_SPOT_CLIENTS` clients, and at most
`SWEET_SPOT_CHUNK_BYTES` of ``work`` per chunk. ``sharded`` with its former
default (all of a device's clients in one chunk, 2 forced host devices) took
2.34x (MLP, 100 clients), 3.30x (MLP, 500), 1.23x and 1.41x (LoRA, 100 and
500) the time of the automatic chunk. On accelerators the sweet spot was not
measured here; there a chunk is bounded by the memory budget only
(throughput grows with the chunk until the device is full).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

# The sweet spot per backend (measured on CPU, see the module docstring): at
# most this many clients per chunk, and at most this many bytes of
# `client_bytes_bound` per chunk. A backend not listed has no such bound.
SWEET_SPOT_CLIENTS = {'cpu': 16}
SWEET_SPOT_CHUNK_BYTES = {'cpu': 512 * 2**20}


def round_memory(fed_round, state_like, frozen, round_data_like) -> dict[str, int]:
  """XLA's memory analysis of the compiled round (bytes).

  All arguments may be ``jax.ShapeDtypeStruct`` trees; nothing runs.
  """
  compiled = fed_round.apply.lower(state_like, frozen, round_data_like).compile()
  ma = compiled.memory_analysis()
  return {'temp': int(ma.temp_size_in_bytes), 'argument': int(ma.argument_size_in_bytes),
          'output': int(ma.output_size_in_bytes)}


def memory_coefficients(build: Callable[[int], Any], state_like, frozen,
                        round_data_like) -> tuple[int, int]:
  """``(base, per_client)`` bytes of temporaries of the chunked round (two compilations).

  Args:
    build: ``chunk_size -> FederatedRound`` (the same round, chunked).
    state_like: server state (or its shapes).
    frozen: frozen params (or their shapes).
    round_data_like: round data (or its shapes) with an even number of clients.
  """
  m1 = round_memory(build(1), state_like, frozen, round_data_like)['temp']
  m2 = round_memory(build(2), state_like, frozen, round_data_like)['temp']
  per_client = max(m2 - m1, 1)
  return m1 - per_client, per_client


def sweet_spot(platform: str, work_bytes: float = 0) -> int | None:
  """The most clients per chunk worth running on ``platform`` (None: no bound).

  Args:
    platform: the backend (``jax.default_backend()``).
    work_bytes: `client_bytes_bound` of one client (0: unknown); heavy clients
      reach the sweet spot with fewer of them per chunk.
  """
  spot = SWEET_SPOT_CLIENTS.get(platform)
  chunk_bytes = SWEET_SPOT_CHUNK_BYTES.get(platform)
  if spot is not None and chunk_bytes and work_bytes > 0:
    spot = min(spot, max(1, int(chunk_bytes // work_bytes)))
  return spot


def largest_divisor(n: int, at_most: int) -> int:
  """The largest divisor of ``n`` that is at most ``at_most`` (at least 1)."""
  return max(k for k in range(1, max(min(n, at_most), 1) + 1) if n % k == 0)


def auto_chunk_size(clients: int, *, platform: str = 'cpu', work_bytes: float = 0,
                    per_client_bytes: float = 0, base_bytes: float = 0,
                    budget_bytes: float = 0, divides: bool = False) -> int:
  """The automatic chunk size (the rule; see the module docstring).

  Args:
    clients: clients per device (all clients per round for ``chunked``).
    platform: the backend (``jax.default_backend()``): its `sweet_spot` caps
      the chunk.
    work_bytes: `client_bytes_bound` of one client, for the sweet spot (0:
      unknown, the client count alone).
    per_client_bytes: temporary memory each client of a chunk adds (0:
      unknown, no memory bound).
    base_bytes: temporary memory of the round that does not grow with the chunk.
    budget_bytes: temporary memory allowed on one device (0: no bound).
    divides: the chunk must divide ``clients`` (the round cannot be padded).

  Returns:
    The chunk size ``k``, at least 1. Unless ``divides``, ``clients`` may
    need padding to a multiple of ``k``; it is then fewer than
    ``ceil(clients / k)`` padding clients.
  """
  if clients < 1:
    raise ValueError(f'clients must be >= 1, got {clients}')
  cap = clients
  spot = sweet_spot(platform, work_bytes)
  if spot is not None:
    cap = min(cap, spot)
  if per_client_bytes > 0 and budget_bytes > 0:
    cap = min(cap, max(1, int((budget_bytes - base_bytes) // per_client_bytes)))
  divisor = largest_divisor(clients, cap)
  if divides or 2 * divisor > cap:
    return divisor
  return math.ceil(clients / math.ceil(clients / cap))   # fewest chunks, evened out


def client_bytes_bound(client_fn: Callable, *args) -> int:
  """Bytes of every intermediate of ``client_fn(*args)``: a bound on one client's memory.

  Traces ``client_fn`` (one client's local training, say) on the given
  arrays or ``jax.ShapeDtypeStruct`` s and adds up the outputs of every
  operation, those inside loops once (their buffers are reused across
  iterations). Nothing is compiled. XLA keeps far less alive (it fuses
  elementwise chains and reuses buffers): 3 to 5 times less on the problems
  of ``scripts/bench_chunk.py``.
  """
  closed = jax.make_jaxpr(client_fn)(*args)
  return _jaxpr_bytes(closed.jaxpr)


def _aval_bytes(aval) -> int:
  shape = getattr(aval, 'shape', None)
  if shape is None:
    return 0
  try:
    itemsize = np.dtype(aval.dtype).itemsize
  except TypeError:   # extended dtypes (PRNG keys)
    itemsize = 8
  return int(np.prod(shape, dtype=np.int64)) * itemsize


def _sub_jaxprs(params):
  for value in params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      if hasattr(v, 'eqns'):
        yield v
      elif hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
        yield v.jaxpr


def _jaxpr_bytes(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += sum(_aval_bytes(v.aval) for v in eqn.outvars)
    total += sum(_jaxpr_bytes(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def choose_chunk_size(build: Callable[[int], Any], state_like, frozen, round_data_like,
                      budget_bytes: int, *, clients_per_device: int | None = None) -> int:
  """Largest chunk size dividing the clients whose compiled round fits ``budget_bytes``.

  Args:
    build: ``chunk_size -> FederatedRound`` (the same round, chunked).
    state_like: server state (or its shapes).
    frozen: frozen params (or their shapes).
    round_data_like: round data (or its shapes).
    budget_bytes: temporary memory allowed for the round on one device.
    clients_per_device: clients each device runs (default: all clients in the round).

  Returns:
    A chunk size that divides ``clients_per_device``; at least 1.
  """
  clients = clients_per_device or int(round_data_like['weight'].shape[0])
  if clients == 1:
    return 1
  base, per_client = memory_coefficients(build, state_like, frozen, round_data_like)
  best = 1
  for k in range(1, clients + 1):
    if clients % k == 0 and base + per_client * k <= budget_bytes:
      best = k
  return best


def shapes_of(tree):
  """``jax.ShapeDtypeStruct`` of every leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
