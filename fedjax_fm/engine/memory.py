"""Memory of a compiled round, and the chunk size that fits a budget.

Under the ``chunked`` strategy the temporary memory of a round is
``base + per_client * chunk_size`` and does not depend on the clients per
round (tested with XLA's own memory analysis of the compiled program). Two
compilations (chunk sizes 1 and 2) give the two coefficients; the largest
chunk size that fits the budget and divides the clients is then chosen.
"""

from __future__ import annotations

from typing import Any, Callable

import jax


def round_memory(fed_round, state_like, frozen, round_data_like) -> dict[str, int]:
  """XLA's memory analysis of the compiled round (bytes).

  All arguments may be ``jax.ShapeDtypeStruct`` trees; nothing runs.
  """
  compiled = fed_round.apply.lower(state_like, frozen, round_data_like).compile()
  ma = compiled.memory_analysis()
  return {'temp': int(ma.temp_size_in_bytes), 'argument': int(ma.argument_size_in_bytes),
          'output': int(ma.output_size_in_bytes)}


def choose_chunk_size(build: Callable[[int], Any], state_like, frozen, round_data_like,
                      budget_bytes: int, *, clients_per_device: int | None = None) -> int:
  """Largest chunk size whose compiled round fits ``budget_bytes`` of temporaries.

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
  m1 = round_memory(build(1), state_like, frozen, round_data_like)['temp']
  if clients == 1:
    return 1
  m2 = round_memory(build(2), state_like, frozen, round_data_like)['temp']
  per_client = max(m2 - m1, 1)
  base = m1 - per_client
  best = 1
  for k in range(1, clients + 1):
    if clients % k == 0 and base + per_client * k <= budget_bytes:
      best = k
  return best


def shapes_of(tree):
  """``jax.ShapeDtypeStruct`` of every leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
