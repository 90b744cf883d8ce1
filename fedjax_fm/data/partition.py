"""Partitioning a centralised dataset into federated clients.

Every function returns a list with one sorted int64 array of example indices
per client. Unless documented otherwise, every example lands in exactly one
client. Feed the result to :meth:`FederatedDataset.from_partition`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class MinSizeError(ValueError):
  """A random partition could not give every client its minimum size.

  Attributes:
    min_size: the minimum asked for.
    smallest: the smallest client of the last draw.
    attempts: the number of draws made.
  """

  def __init__(self, message: str, *, min_size: int, smallest: int, attempts: int):
    super().__init__(message)
    self.min_size = min_size
    self.smallest = smallest
    self.attempts = attempts


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'`{name}` must be an int >= {minimum}, got {value!r}.')
  if value < minimum:
    raise ValueError(f'`{name}` must be >= {minimum}, got {value}.')
  return int(value)


def _check_clients(num_clients: Any, num_examples: int) -> int:
  num_clients = _check_int(num_clients, 'num_clients', 1)
  if num_clients > num_examples:
    raise ValueError(
        f'`num_clients` must be in [1, num_examples={num_examples}], got '
        f'{num_clients}.')
  return num_clients


def _check_labels(labels: Any) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(
        f'`labels` must be a non-empty 1-D array, got shape {labels.shape}.')
  return labels


def _split_sorted(perm: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
  """Splits ``perm`` into consecutive chunks of ``sizes``, each sorted."""
  bounds = np.cumsum(sizes)[:-1]
  return [np.sort(c).astype(np.int64) for c in np.split(perm, bounds)]


def _group(client_of: np.ndarray, num_clients: int) -> list[np.ndarray]:
  """Groups example indices by their client assignment, sorted."""
  order = np.argsort(client_of, kind='stable').astype(np.int64)
  sizes = np.bincount(client_of, minlength=num_clients)
  return np.split(order, np.cumsum(sizes)[:-1])


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Uniformly random partition into clients of (almost) equal size.

  Args:
    num_examples: Number of examples ``N >= 1``.
    num_clients: Number of clients in ``[1, N]``.
    seed: Seed of the shuffle.

  Returns:
    Per-client sorted index arrays; sizes differ by at most one.
  """
  num_examples = _check_int(num_examples, 'num_examples', 1)
  num_clients = _check_clients(num_clients, num_examples)
  perm = np.random.default_rng(seed).permutation(num_examples)
  sizes = np.full(num_clients, num_examples // num_clients)
  sizes[:num_examples % num_clients] += 1
  return _split_sorted(perm, sizes)


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 0,
    max_attempts: int = 100,
) -> list[np.ndarray]:
  """Label-skewed partition with Dirichlet client proportions.

  For every label, the shares of its examples going to each client are drawn
  from ``Dir(alpha * 1)``; smaller ``alpha`` concentrates each label on fewer
  clients. The whole draw is repeated until every client holds at least
  ``min_size`` examples.

  Args:
    labels: 1-D array of ``N`` labels (any sortable dtype).
    num_clients: Number of clients in ``[1, N]``.
    alpha: Dirichlet concentration, ``> 0``.
    seed: Seed of the draws.
    min_size: Minimum number of examples per client, ``>= 0``.
    max_attempts: Number of draws before giving up, ``>= 1``.

  Returns:
    Per-client sorted index arrays.

  Raises:
    ValueError: On bad arguments.
    MinSizeError: (a ValueError) If ``min_size`` is not met after
      ``max_attempts`` draws.
  """
  labels = _check_labels(labels)
  num_clients = _check_clients(num_clients, labels.size)
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f'`alpha` must be a finite float > 0, got {alpha}.')
  min_size = _check_int(min_size, 'min_size', 0)
  max_attempts = _check_int(max_attempts, 'max_attempts', 1)
  if min_size * num_clients > labels.size:
    raise ValueError(
        f'`min_size` * num_clients = {min_size * num_clients} exceeds the '
        f'number of examples {labels.size}.')
  rng = np.random.default_rng(seed)
  _, label_ids = np.unique(labels, return_inverse=True)
  label_ids = label_ids.reshape(-1)
  num_labels = int(label_ids.max()) + 1
  by_label = np.argsort(label_ids, kind='stable')
  label_counts = np.bincount(label_ids, minlength=num_labels)
  sizes = np.zeros(num_clients, dtype=np.int64)
  for _ in range(max_attempts):
    # Shuffle within each label: sort by (label, random key).
    order = by_label[np.lexsort((rng.random(labels.size),
                                 label_ids[by_label]))]
    props = rng.dirichlet(np.full(num_clients, float(alpha)), size=num_labels)
    # Cut points of each label's (shuffled) examples, shape [L, clients + 1].
    cuts = np.concatenate(
        [np.zeros((num_labels, 1)), np.cumsum(props, axis=1)], axis=1)
    cuts = np.rint(cuts * label_counts[:, None]).astype(np.int64)
    cuts[:, -1] = label_counts
    cuts = np.maximum.accumulate(cuts, axis=1)
    counts = np.diff(cuts, axis=1)  # [L, clients]
    sizes = counts.sum(axis=0)
    if sizes.min() >= min_size:
      client_of_sorted = np.repeat(
          np.tile(np.arange(num_clients), num_labels), counts.reshape(-1))
      client_of = np.empty(labels.size, dtype=np.int64)
      client_of[order] = client_of_sorted
      return _group(client_of, num_clients)
  raise MinSizeError(
      f'dirichlet: could not give every client >= min_size={min_size} '
      f'examples in {max_attempts} attempts (alpha={alpha}, '
      f'num_clients={num_clients}, last smallest client {sizes.min()}); '
      'lower `min_size`, raise `alpha` or raise `max_attempts`.',
      min_size=min_size, smallest=int(sizes.min()), attempts=max_attempts)


def shards(
    labels: np.ndarray,
    num_clients: int,
    labels_per_client: int,
    seed: int,
) -> list[np.ndarray]:
  """Pathological non-IID partition by label shards (McMahan et al., 2017).

  Examples are sorted by label (random order within a label), cut into
  ``num_clients * labels_per_client`` contiguous shards of (almost) equal
  size, and each client receives ``labels_per_client`` random shards. When
  shard boundaries align with label boundaries (e.g. equally many examples
  per label, and a number of shards that is a multiple of the number of
  labels), each client sees at most ``labels_per_client`` distinct labels;
  otherwise at most ``2 * labels_per_client``.

  Args:
    labels: 1-D array of ``N`` labels.
    num_clients: Number of clients ``>= 1``.
    labels_per_client: Shards per client, ``>= 1``, with
      ``num_clients * labels_per_client <= N``.
    seed: Seed of the shuffles.

  Returns:
    Per-client sorted index arrays.
  """
  labels = _check_labels(labels)
  num_clients = _check_clients(num_clients, labels.size)
  labels_per_client = _check_int(labels_per_client, 'labels_per_client', 1)
  num_shards = num_clients * labels_per_client
  if num_shards > labels.size:
    raise ValueError(
        f'`num_clients` * `labels_per_client` = {num_shards} shards exceed '
        f'the number of examples {labels.size}.')
  rng = np.random.default_rng(seed)
  perm = rng.permutation(labels.size)
  order = perm[np.argsort(labels[perm], kind='stable')]
  shard_sizes = np.full(num_shards, labels.size // num_shards)
  shard_sizes[:labels.size % num_shards] += 1
  shard_of_sorted = np.repeat(np.arange(num_shards), shard_sizes)
  client_of_shard = np.empty(num_shards, dtype=np.int64)
  client_of_shard[rng.permutation(num_shards)] = np.repeat(
      np.arange(num_clients), labels_per_client)
  client_of = np.empty(labels.size, dtype=np.int64)
  client_of[order] = client_of_shard[shard_of_sorted]
  return _group(client_of, num_clients)


def quantity_skew(
    num_examples: int,
    num_clients: int,
    sigma: float,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
  """IID content with log-normally distributed client sizes.

  Client sizes are ``min_size`` plus a share of the remaining examples
  proportional to ``LogNormal(0, sigma)`` draws (rounded with the largest
  remainder method), so ``log(size)`` has standard deviation about ``sigma``
  when clients are large. ``sigma = 0`` gives sizes differing by at most one.

  Args:
    num_examples: Number of examples ``N >= 1``.
    num_clients: Number of clients in ``[1, N]``.
    sigma: Standard deviation of the log-normal, ``>= 0``.
    seed: Seed of the draws.
    min_size: Minimum client size ``>= 0``, with
      ``min_size * num_clients <= N``.

  Returns:
    Per-client sorted index arrays.
  """
  num_examples = _check_int(num_examples, 'num_examples', 1)
  num_clients = _check_clients(num_clients, num_examples)
  if not np.isfinite(sigma) or sigma < 0:
    raise ValueError(f'`sigma` must be a finite float >= 0, got {sigma}.')
  min_size = _check_int(min_size, 'min_size', 0)
  if min_size * num_clients > num_examples:
    raise ValueError(
        f'`min_size` * num_clients = {min_size * num_clients} exceeds '
        f'num_examples={num_examples}.')
  rng = np.random.default_rng(seed)
  weights = rng.lognormal(0.0, float(sigma), size=num_clients)
  rest = num_examples - min_size * num_clients
  raw = weights / weights.sum() * rest
  extra = np.floor(raw).astype(np.int64)
  short = rest - int(extra.sum())
  if short:
    # Largest remainders first; ties broken by client index (stable).
    extra[np.argsort(-(raw - extra), kind='stable')[:short]] += 1
  sizes = min_size + extra
  return _split_sorted(rng.permutation(num_examples), sizes)


def natural(keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
  """One client per distinct key value (e.g. author or module name).

  Args:
    keys: 1-D array of ``N`` sortable keys.

  Returns:
    ``(client_indices, unique_keys)``: client ``i`` holds the examples whose
    key equals ``unique_keys[i]``; keys are in sorted order.
  """
  keys = np.asarray(keys)
  if keys.ndim != 1 or keys.size == 0:
    raise ValueError(
        f'`keys` must be a non-empty 1-D array, got shape {keys.shape}.')
  try:
    unique_keys, client_of = np.unique(keys, return_inverse=True)
  except TypeError as e:
    raise ValueError(f'`keys` must be mutually sortable: {e}') from e
  return _group(client_of.reshape(-1), unique_keys.size), unique_keys


def _natural_indices(keys: np.ndarray) -> list[np.ndarray]:
  return natural(keys)[0]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    'iid': iid,
    'dirichlet': dirichlet,
    'shards': shards,
    'quantity_skew': quantity_skew,
    'natural': _natural_indices,
}


def partition(name: str, **kwargs: Any) -> list[np.ndarray]:
  """Dispatches to a partitioner by name.

  Args:
    name: One of ``'iid'``, ``'dirichlet'``, ``'shards'``,
      ``'quantity_skew'``, ``'natural'``.
    **kwargs: Arguments of the chosen partitioner.

  Returns:
    Per-client sorted index arrays. For ``'natural'`` only the index list is
    returned; call :func:`natural` directly to also get the keys.

  Raises:
    ValueError: If ``name`` is unknown.
  """
  if name not in PARTITIONERS:
    raise ValueError(
        f'Unknown partition `name` {name!r}; allowed: {sorted(PARTITIONERS)}.')
  return PARTITIONERS[name](**kwargs)
