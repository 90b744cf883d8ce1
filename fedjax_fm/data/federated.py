"""Federated datasets: many clients over one array store in CSR layout.

A :class:`FederatedDataset` keeps every example of every client in a single
dict of numpy arrays sharing a leading dimension ``N``. Client ``i`` owns rows
``offsets[i]:offsets[i + 1]``. :meth:`FederatedDataset.round_batch` assembles
the padded ``[clients, steps, batch, ...]`` tensors of one training round with
vectorised numpy, ready to be fed to a compiled round function in which
clients are an array axis.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar('T')

_MASK64 = (1 << 64) - 1


def _as_int_array(x: Any, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.size == 0:
    return arr.astype(np.int64).reshape(arr.shape)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f'`{name}` must hold integers, got dtype {arr.dtype}.')
  return arr.astype(np.int64)


def _segment_arange(lengths: np.ndarray) -> np.ndarray:
  """Returns ``concatenate([arange(n) for n in lengths])``, vectorised."""
  lengths = np.asarray(lengths, dtype=np.int64)
  total = int(lengths.sum())
  starts = np.cumsum(lengths) - lengths
  return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def shuffle_keys(seed: int, round_idx: int, client_id: np.ndarray,
                 epoch: np.ndarray, position: np.ndarray) -> np.ndarray:
  """Counter-based random sort keys for per-client shuffles.

  The key of an example is a hash of ``(seed, round_idx, client_id, epoch,
  position)`` only, so a client's shuffle never depends on which other clients
  take part in a round.

  Args:
    seed: Integer seed.
    round_idx: Round index.
    client_id: Client id of each example (broadcastable integer array).
    epoch: Epoch (pass over the client's data) of each example.
    position: Position of each example within its client.

  Returns:
    A uint64 array of pseudo-random keys.
  """
  with np.errstate(over='ignore'):
    h = _splitmix64(np.asarray([int(seed) & _MASK64], dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(int(round_idx) & _MASK64))
    h = _splitmix64(h ^ np.asarray(client_id).astype(np.uint64))
    h = _splitmix64(h ^ np.asarray(epoch).astype(np.uint64))
    return _splitmix64(h ^ np.asarray(position).astype(np.uint64))


class FederatedDataset:
  """Many clients over one array store in CSR layout.

  Attributes:
    arrays: Dict of arrays sharing the leading dimension ``num_examples``.
    offsets: int64 array ``[num_clients + 1]``; client ``i`` owns rows
      ``offsets[i]:offsets[i + 1]`` of every array.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], offsets: np.ndarray):
    """Creates a federated dataset.

    Args:
      arrays: Non-empty mapping from string keys to arrays that share their
        leading dimension ``N``.
      offsets: Integer array of length ``num_clients + 1`` (at least 2),
        non-decreasing, with ``offsets[0] == 0`` and ``offsets[-1] == N``.

    Raises:
      ValueError: If the arrays or offsets are inconsistent.
    """
    if not isinstance(arrays, Mapping) or not arrays:
      raise ValueError('`arrays` must be a non-empty mapping of str -> array.')
    store = {}
    num_examples = None
    for key, value in arrays.items():
      if not isinstance(key, str):
        raise ValueError(f'`arrays` keys must be str, got {key!r}.')
      value = np.asarray(value)
      if value.ndim == 0:
        raise ValueError(f'`arrays[{key!r}]` must have a leading dimension.')
      if num_examples is None:
        num_examples = value.shape[0]
      elif value.shape[0] != num_examples:
        shapes = {k: np.shape(v) for k, v in arrays.items()}
        raise ValueError(
            f'All `arrays` must share the leading dimension, got {shapes}.')
      store[key] = value
    offsets = _as_int_array(offsets, 'offsets')
    if offsets.ndim != 1 or offsets.shape[0] < 2:
      raise ValueError(
          '`offsets` must be 1-D with length num_clients + 1 >= 2, got shape '
          f'{offsets.shape}.')
    if offsets[0] != 0:
      raise ValueError(f'`offsets[0]` must be 0, got {offsets[0]}.')
    if offsets[-1] != num_examples:
      raise ValueError(
          f'`offsets[-1]` must equal the number of examples {num_examples}, '
          f'got {offsets[-1]}.')
    if np.any(np.diff(offsets) < 0):
      bad = int(np.argmax(np.diff(offsets) < 0))
      raise ValueError(
          f'`offsets` must be non-decreasing, but offsets[{bad}]='
          f'{offsets[bad]} > offsets[{bad + 1}]={offsets[bad + 1]}.')
    self.arrays: dict[str, np.ndarray] = store
    self.offsets: np.ndarray = offsets

  @classmethod
  def from_partition(
      cls,
      arrays: Mapping[str, np.ndarray],
      client_indices: Sequence[np.ndarray],
  ) -> FederatedDataset:
    """Builds a dataset from per-client example indices.

    The store is reordered so that each client's examples are contiguous, in
    the order given. Examples assigned to no client are dropped.

    Args:
      arrays: Mapping of arrays sharing the leading dimension ``N``.
      client_indices: One integer index array per client, with values in
        ``[0, N)``. An example may be assigned to at most one client.

    Returns:
      A :class:`FederatedDataset`.

    Raises:
      ValueError: On out-of-range or duplicate indices.
    """
    if not isinstance(arrays, Mapping) or not arrays:
      raise ValueError('`arrays` must be a non-empty mapping of str -> array.')
    if len(client_indices) == 0:
      raise ValueError('`client_indices` must list at least one client.')
    lengths = {k: np.shape(v)[0] if np.ndim(v) else None
               for k, v in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
      raise ValueError(
          f'All `arrays` must share the leading dimension, got {lengths}.')
    n = next(iter(lengths.values()))
    parts = []
    for i, idx in enumerate(client_indices):
      idx = _as_int_array(idx, f'client_indices[{i}]')
      if idx.ndim != 1:
        raise ValueError(
            f'`client_indices[{i}]` must be 1-D, got shape {idx.shape}.')
      if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(
            f'`client_indices[{i}]` has indices outside [0, {n}): '
            f'min {idx.min()}, max {idx.max()}.')
      parts.append(idx)
    order = np.concatenate(parts)
    counts = np.bincount(order, minlength=n)
    if np.any(counts > 1):
      dup = int(np.argmax(counts > 1))
      owners = [i for i, p in enumerate(parts) if np.any(p == dup)]
      raise ValueError(
          f'Example {dup} is assigned more than once in `client_indices` '
          f'(clients {owners}); each example may belong to one client only.')
    sizes = np.asarray([p.size for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return cls({k: np.asarray(v)[order] for k, v in arrays.items()}, offsets)

  @property
  def num_clients(self) -> int:
    """Number of clients."""
    return self.offsets.shape[0] - 1

  @property
  def num_examples(self) -> int:
    """Total number of examples over all clients."""
    return int(self.offsets[-1])

  @property
  def client_sizes(self) -> np.ndarray:
    """int64 array ``[num_clients]`` of per-client example counts."""
    return np.diff(self.offsets)

  @property
  def keys(self) -> list[str]:
    """Names of the stored arrays."""
    return list(self.arrays)

  def __repr__(self) -> str:
    return (f'FederatedDataset(num_clients={self.num_clients}, '
            f'num_examples={self.num_examples}, keys={self.keys})')

  def _check_client_ids(self, client_ids: Any, name: str) -> np.ndarray:
    ids = _as_int_array(client_ids, name)
    if ids.ndim != 1:
      raise ValueError(f'`{name}` must be 1-D, got shape {ids.shape}.')
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_clients):
      raise ValueError(
          f'`{name}` must lie in [0, {self.num_clients}), got min '
          f'{ids.min()}, max {ids.max()}.')
    return ids

  def client_arrays(self, i: int) -> dict[str, np.ndarray]:
    """Returns the arrays (views) of client ``i``.

    Args:
      i: Client index in ``[0, num_clients)``.

    Returns:
      Dict mapping each key to the client's rows.
    """
    if not 0 <= int(i) < self.num_clients:
      raise ValueError(
          f'Client index `i` must lie in [0, {self.num_clients}), got {i}.')
    lo, hi = self.offsets[i], self.offsets[i + 1]
    return {k: v[lo:hi] for k, v in self.arrays.items()}

  def subset(self, client_ids: Sequence[int]) -> FederatedDataset:
    """Returns a new dataset holding only ``client_ids``, in that order.

    Args:
      client_ids: Non-empty sequence of client indices, without duplicates.

    Returns:
      A :class:`FederatedDataset` whose client ``j`` is client
      ``client_ids[j]`` of this dataset.
    """
    ids = self._check_client_ids(client_ids, 'client_ids')
    if ids.size == 0:
      raise ValueError('`client_ids` must name at least one client.')
    if np.unique(ids).size != ids.size:
      raise ValueError(f'`client_ids` must not repeat clients, got {ids}.')
    sizes = self.client_sizes[ids]
    rows = np.repeat(self.offsets[ids], sizes) + _segment_arange(sizes)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return FederatedDataset({k: v[rows] for k, v in self.arrays.items()},
                            offsets)

  def round_batch(
      self,
      client_ids: Sequence[int],
      num_steps: int,
      batch_size: int,
      *,
      seed: int,
      round_idx: int = 0,
      max_epochs: int = 1,
      pad_clients_to: int | None = None,
  ) -> dict[str, Any]:
    """Assembles one round of padded client data.

    Client ``c`` walks through its examples in a shuffled order (reshuffled
    at every epoch, at most ``max_epochs`` passes) and fills up to
    ``num_steps * batch_size`` slots in order, so it uses
    ``u = min(n_c * max_epochs, num_steps * batch_size)`` examples. Slots
    beyond ``u`` are padding: masked out and filled with zeros.

    Shuffles come from a counter-based hash of ``(seed, round_idx, client_id,
    epoch, position)`` (see :func:`shuffle_keys`), so a client's batches are
    deterministic and independent of which other clients are in the round.

    Args:
      client_ids: 1-D sequence of ``C`` client indices (repeats allowed).
      num_steps: Number of local steps ``S >= 1``.
      batch_size: Local batch size ``B >= 1``.
      seed: Integer seed.
      round_idx: Round index, mixed into the shuffle.
      max_epochs: Maximum passes ``>= 1`` over a client's data.
      pad_clients_to: If given, ``P >= C`` and ``P - C`` padding clients
        (client id 0, all masks False, weight 0) are appended.

    Returns:
      A dict with ``batch`` (``{key: [C, S, B, ...]}``), ``example_mask``
      (bool ``[C, S, B]``), ``step_mask`` (bool ``[C, S]``), ``weight``
      (float32 ``[C]``, number of real examples used), ``client_id`` (int32
      ``[C]``) and ``client_mask`` (bool ``[C]``); ``C`` becomes ``P`` when
      padding clients are requested.

    Raises:
      ValueError: On invalid arguments.
    """
    ids = self._check_client_ids(client_ids, 'client_ids')
    for name, value in (('num_steps', num_steps), ('batch_size', batch_size),
                        ('max_epochs', max_epochs)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'`{name}` must be an int >= 1, got {value!r}.')
      if value < 1:
        raise ValueError(f'`{name}` must be >= 1, got {value}.')
    num_real = ids.shape[0]
    if pad_clients_to is not None and (
        isinstance(pad_clients_to, bool) or
        not isinstance(pad_clients_to, (int, np.integer))):
      raise ValueError(
          f'`pad_clients_to` must be None or an int >= len(client_ids)='
          f'{num_real}, got {pad_clients_to!r}.')
    num_total = num_real if pad_clients_to is None else int(pad_clients_to)
    if num_total < num_real:
      raise ValueError(
          f'`pad_clients_to` must be None or >= len(client_ids)={num_real}, '
          f'got {pad_clients_to}.')
    if num_total < 1:
      raise ValueError('`client_ids` must name at least one client, or '
                       '`pad_clients_to` must be >= 1.')
    slots = int(num_steps) * int(batch_size)

    sizes = self.client_sizes[ids]
    used = np.minimum(sizes * int(max_epochs), slots)
    # Epochs actually needed per client: ceil(used / n_c), 0 for empty clients.
    epochs = np.where(sizes > 0, -(-used // np.maximum(sizes, 1)), 0)
    # One segment per (client, epoch); one item per example in each segment.
    seg_client = np.repeat(np.arange(num_real, dtype=np.int64), epochs)
    seg_epoch = _segment_arange(epochs)
    seg_len = sizes[seg_client]
    item_seg = np.repeat(np.arange(seg_client.size, dtype=np.int64), seg_len)
    item_pos = _segment_arange(seg_len)
    item_client = seg_client[item_seg]
    keys = shuffle_keys(seed, round_idx, ids[item_client], seg_epoch[item_seg],
                        item_pos)
    order = np.lexsort((item_pos, keys, item_seg))
    # Sorting by segment first keeps items grouped; within each segment the
    # positions are now a random permutation.
    shuffled_pos = item_pos[order]
    slot = _segment_arange(sizes * epochs)  # slot index within each client
    keep = slot < used[item_client]
    rows = np.full((num_total, slots), -1, dtype=np.int64)
    rows[item_client[keep], slot[keep]] = (
        self.offsets[ids][item_client[keep]] + shuffled_pos[keep])

    mask = rows >= 0
    flat_rows = np.maximum(rows.reshape(-1), 0)
    flat_pad = ~mask.reshape(-1)
    batch = {}
    for key, arr in self.arrays.items():
      if arr.shape[0] == 0:
        data = np.zeros((flat_rows.size,) + arr.shape[1:], dtype=arr.dtype)
      else:
        data = arr[flat_rows]
        data[flat_pad] = 0
      batch[key] = data.reshape((num_total, num_steps, batch_size) +
                                arr.shape[1:])
    example_mask = mask.reshape(num_total, num_steps, batch_size)
    weight = np.zeros(num_total, dtype=np.float32)
    weight[:num_real] = used
    client_id = np.zeros(num_total, dtype=np.int32)
    client_id[:num_real] = ids
    client_mask = np.zeros(num_total, dtype=bool)
    client_mask[:num_real] = True
    return {
        'batch': batch,
        'example_mask': example_mask,
        'step_mask': example_mask.any(axis=2),
        'weight': weight,
        'client_id': client_id,
        'client_mask': client_mask,
    }


_ITEM, _END, _ERROR = object(), object(), object()


def prefetch(iterable: Iterable[T], buffer_size: int = 1) -> Iterator[T]:
  """Produces the items of ``iterable`` from a background thread, in order.

  The producer runs in a daemon thread and stays at most ``buffer_size``
  items ahead. Exceptions raised by the producer are re-raised in the
  consumer. Closing the returned generator (or dropping it) stops the
  producer after its current item.

  Args:
    iterable: Source of items (e.g. a generator of round batches).
    buffer_size: Maximum number of items produced ahead, ``>= 1``.

  Returns:
    A generator over the items of ``iterable``.

  Raises:
    ValueError: If ``buffer_size < 1``.
  """
  if isinstance(buffer_size, bool) or not isinstance(
      buffer_size, (int, np.integer)) or buffer_size < 1:
    raise ValueError(f'`buffer_size` must be an int >= 1, got {buffer_size!r}.')
  return _prefetch(iterable, int(buffer_size))


def _prefetch(iterable: Iterable[T], buffer_size: int) -> Iterator[T]:
  buf: queue.Queue = queue.Queue(maxsize=buffer_size)
  stop = threading.Event()

  def put(item: tuple[object, Any]) -> bool:
    while not stop.is_set():
      try:
        buf.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def worker() -> None:
    try:
      for item in iterable:
        if not put((_ITEM, item)):
          return
      put((_END, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((_ERROR, e))

  thread = threading.Thread(target=worker, name='fedjax_fm-prefetch',
                            daemon=True)
  thread.start()
  try:
    while True:
      kind, value = buf.get()
      if kind is _END:
        return
      if kind is _ERROR:
        raise value
      yield value
  finally:
    stop.set()
