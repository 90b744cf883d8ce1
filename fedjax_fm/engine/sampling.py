"""Client sampling for federated rounds."""

from __future__ import annotations

from typing import Any

import numpy as np


def _check_range(value: Any, name: str, low: int,
                 high: int | None = None) -> int:
  """Returns ``int(value)`` or raises if it is not an int in [low, high]."""
  allowed = f'>= {low}' if high is None else f'in [{low}, {high}]'
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'`{name}` must be an int {allowed}, got {value!r}.')
  if value < low or (high is not None and value > high):
    raise ValueError(f'`{name}` must be {allowed}, got {value}.')
  return int(value)


def sample_clients(
    num_clients: int,
    clients_per_round: int,
    *,
    seed: int,
    round_idx: int,
) -> np.ndarray:
  """Samples clients uniformly without replacement for one round.

  The draw uses ``np.random.default_rng([seed, round_idx])``, so it is a
  deterministic function of ``(seed, round_idx)`` and rounds can be replayed
  or skipped in any order.

  Args:
    num_clients: Total number of clients ``>= 1``.
    clients_per_round: Number of clients to draw, in ``[1, num_clients]``.
    seed: Non-negative integer seed.
    round_idx: Non-negative round index.

  Returns:
    Sorted int32 array of ``clients_per_round`` distinct client ids.

  Raises:
    ValueError: If an argument is out of its allowed range.
  """
  num_clients = _check_range(num_clients, 'num_clients', 1)
  clients_per_round = _check_range(clients_per_round, 'clients_per_round', 1,
                                   num_clients)
  seed = _check_range(seed, 'seed', 0)
  round_idx = _check_range(round_idx, 'round_idx', 0)
  rng = np.random.default_rng([seed, round_idx])
  chosen = rng.choice(num_clients, size=clients_per_round, replace=False)
  return np.sort(chosen).astype(np.int32)
