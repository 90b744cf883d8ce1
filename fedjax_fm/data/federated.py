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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray, inplace: bool = False) -> np.ndarray:
  """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic).

  With ``inplace=True``, ``x`` (a uint64 array) is overwritten and returned.
  """
  x = x if inplace else np.array(x, dtype=np.uint64)
  t = np.empty_like(x)
  with np.errstate(over='ignore'):
    x += _GOLDEN
    np.right_shift(x, np.uint64(30), out=t)
    x ^= t
    x *= _MIX1
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= _MIX2
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t
  return x


def _client_epoch_hash(seed: int, round_idx: int, client_id: np.ndarray,
                       epoch: np.ndarray) -> np.ndarray:
  """The hash of ``(seed, round_idx, client_id, epoch)`` that starts each key."""
  with np.errstate(over='ignore'):
    h = _splitmix64(np.asarray([int(seed) & _MASK64], dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(int(round_idx) & _MASK64))
    h = _splitmix64(h ^ np.asarray(client_id).astype(np.uint64))
    return _splitmix64(h ^ np.asarray(epoch).astype(np.uint64))


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
  h = _client_epoch_hash(seed, round_idx, client_id, epoch)
  with np.errstate(over='ignore'):
    return _splitmix64(h ^ np.asarray(position).astype(np.uint64))


def _width_classes(lengths: np.ndarray) -> np.ndarray:
  """The least of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... that is >= each length."""
  _, exponent = np.frexp(np.maximum(lengths - 1, 0).astype(np.float64))
  power = np.left_shift(1, exponent.astype(np.int64))  # 2 ** bit_length(n - 1)
  three_quarters = (power >> 2) * 3
  return np.where(three_quarters >= lengths, three_quarters, power)


# A width class of segments is sorted with the next wider class when that pads
# fewer elements than this (the cost of a sort call, in elements).
_MERGE_PADDING = 2000


def _shuffled_rows(client_id: np.ndarray, sizes: np.ndarray,
                   first_row: np.ndarray, used: np.ndarray, slots: int,
                   rows: np.ndarray, seed: int, round_idx: int) -> None:
  """Writes the store rows of each client's first ``used`` shuffled draws.

  Client ``c`` draws its ``sizes[c]`` positions epoch after epoch, each epoch
  ordered by :func:`shuffle_keys` (ties by position); its ``s``-th draw, at
  position ``p``, is store row ``first_row[c] + p`` and goes to
  ``rows[c * slots + s]``.

  Each (client, epoch) segment is one row of a ``[segments, width]`` array
  (segments grouped by width class, so padding is bounded) holding its keys'
  high bits above the position bits, sorted as plain uint64 values: one sort
  call per group instead of a lexsort over all draws. Rows whose high key bits
  tie (for two draws, a chance of 2**-(64 - position bits)) are re-sorted by
  the full keys, so the order is exactly that of ``(key, position)``.

  Args:
    client_id: int64 ``[C]`` client ids.
    sizes: int64 ``[C]`` examples per client.
    first_row: int64 ``[C]`` store row of each client's first example.
    used: int64 ``[C]`` draws per client, ``<= sizes * max_epochs``.
    slots: Slots per client in ``rows``.
    rows: int64 ``[>= C * slots]`` array to write into.
    seed: Integer seed.
    round_idx: Round index.
  """
  epochs = np.where(sizes > 0, -(-used // np.maximum(sizes, 1)), 0)
  seg_client = np.repeat(np.arange(client_id.size, dtype=np.int64), epochs)
  if seg_client.size == 0:
    return
  seg_epoch = _segment_arange(epochs)
  seg_len = sizes[seg_client]
  seg_take = np.minimum(seg_len, used[seg_client] - seg_epoch * seg_len)
  seg_hash = _client_epoch_hash(seed, round_idx, client_id[seg_client],
                                seg_epoch)
  width = _width_classes(seg_len)
  by_width = np.argsort(width, kind='stable')
  sorted_width = width[by_width]
  ends = np.append(np.flatnonzero(sorted_width[1:] != sorted_width[:-1]) + 1,
                   by_width.size).tolist()
  class_width = sorted_width[np.asarray(ends) - 1].tolist()
  # A class joins the next wider one while the padding that adds is small:
  # fewer, larger sorts. groups: (width, first, end) in `by_width`.
  groups, lo = [], 0
  for i, end in enumerate(ends):
    if (i + 1 == len(ends) or
        (end - lo) * (class_width[i + 1] - class_width[i]) >= _MERGE_PADDING):
      groups.append((class_width[i], lo, end))
      lo = end
  bits = np.uint64((class_width[-1] - 1).bit_length())  # position bits
  low = (np.uint64(1) << bits) - np.uint64(1)
  drawn, before_cut, at_cut, kept = [], [], [], []
  for w, lo, hi in groups:
    sel = by_width[lo:hi]
    cols = np.arange(w, dtype=np.uint64)
    packed = _splitmix64(seg_hash[sel][:, None] ^ cols, inplace=True)
    packed &= ~low
    packed |= cols
    lens, take = seg_len[sel], seg_take[sel]
    rank = np.arange(w)
    if lens.min() < w:  # some rows are padded
      np.copyto(packed, np.uint64(_MASK64), where=rank >= lens[:, None])
    if w > 1:
      packed.sort(axis=1)  # padding (all ones) sorts after a row's draws
    taken = rank < take[:, None]
    drawn.append(packed[taken])
    cut = np.flatnonzero(take < lens)  # the first draw not taken matters too
    if cut.size:
      before_cut.append(packed[cut, take[cut] - 1])
      at_cut.append(packed[cut, take[cut]])
    kept.append((packed, sel, lens, taken))
  # Draws run segment by segment in `by_width` order; a tie of adjacent draws
  # (or of a false pair across segments) sends every group to the exact path.
  vals = np.concatenate(drawn)
  tie = bool(np.any((vals[1:] ^ vals[:-1]) <= low))
  if before_cut and not tie:
    tie = bool(np.any((np.concatenate(before_cut) ^ np.concatenate(at_cut)) <= low))
  if tie:
    for i, (packed, sel, lens, taken) in enumerate(kept):
      _resort_ties(packed, seg_hash[sel], lens, bits)
      drawn[i] = packed[taken]
    vals = np.concatenate(drawn)
  vals &= low
  take = seg_take[by_width]
  seg_dest = (seg_client * slots + seg_epoch * seg_len)[by_width]
  seg_dest -= np.cumsum(take) - take
  rows[np.arange(vals.size) + np.repeat(seg_dest, take)] = (
      vals.view(np.int64) + np.repeat(first_row[seg_client[by_width]], take))


def _resort_ties(packed: np.ndarray, seg_hash: np.ndarray, lens: np.ndarray,
                 bits: np.uint64) -> None:
  """Rewrites, in place, rows whose high key bits tie as exact positions."""
  for r in range(packed.shape[0]):
    n = int(lens[r])
    high = packed[r, :n] >> bits
    if np.any(high[1:] == high[:-1]):
      keys = _splitmix64(seg_hash[r] ^ np.arange(n, dtype=np.uint64),
                         inplace=True)
      packed[r, :n] = np.lexsort((np.arange(n), keys))


def _take_with_zero_row(arr: np.ndarray, index: np.ndarray) -> np.ndarray:
  """``arr[index]`` followed by one row set to 0, in a new C-contiguous array."""
  out = np.empty((index.size + 1,) + arr.shape[1:], dtype=arr.dtype)
  if index.size:
    np.take(arr, index, axis=0, out=out[:-1], mode='clip')  # checked in range
  out[-1] = 0
  return out


def _gather_rows(arr: np.ndarray, rows: np.ndarray, pad: np.ndarray,
                 out: np.ndarray) -> None:
  """``out[:] = arr[rows]``, then ``out[pad] = 0``, for ``out`` C-contiguous.

  Rows of a C-contiguous numeric array of rank > 1 (whose zero is all zero
  bytes) are moved as single opaque items, which makes zeroing a padded row
  one contiguous write.
  """
  row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
  if (arr.ndim > 1 and arr.flags.c_contiguous and arr.dtype.kind in 'biufc'
      and row_bytes > 0):
    item = np.dtype((np.void, row_bytes))
    src = arr.reshape(arr.shape[0], -1).view(item).reshape(arr.shape[0])
    dst = out.reshape(out.shape[0], -1).view(item).reshape(out.shape[0])
    np.take(src, rows, out=dst, mode='clip')  # rows are in range: no checks
    if pad.size:
      dst[pad] = np.zeros((), item)
  else:
    np.take(arr, rows, axis=0, out=out, mode='clip')
    if pad.size:
      out[pad] = 0


def _common_dtype(key: str, arrays: list[tuple[str, np.ndarray]],
                  lists: list[tuple[str, np.ndarray]]) -> np.dtype:
  """The dtype of ``key`` over clients (see :meth:`FederatedDataset.from_clients`).

  Args:
    key: The key, for error messages.
    arrays: ``(client, values)`` of the clients that gave a non-empty ndarray;
      they must share one dtype (strings may differ in length).
    lists: ``(client, values)`` of the clients that gave non-empty lists,
      converted by NumPy; they must cast to the arrays' dtype within their
      kind or upwards (int to float) and, for integers, fit its range.

  Returns:
    The dtype of the stored array.
  """
  def is_str(dt: np.dtype) -> bool:
    return dt.kind in 'US'

  if arrays:
    where0, first = arrays[0]
    dtype = first.dtype
    for where, arr in arrays[1:]:
      if is_str(dtype) and arr.dtype.kind == dtype.kind:
        dtype = np.promote_types(dtype, arr.dtype)
      elif arr.dtype != dtype:
        raise ValueError(
            f'{where}[{key!r}] has dtype {arr.dtype} but {where0}[{key!r}] has '
            f'{first.dtype}: give every client\'s {key!r} the same dtype.')
  else:
    where0, first = lists[0]
    dtype = first.dtype
    for where, arr in lists[1:]:
      if is_str(arr.dtype) != is_str(dtype):
        raise ValueError(
            f'{where}[{key!r}] holds {arr.dtype} values but {where0}[{key!r}] '
            f'holds {first.dtype}.')
      dtype = np.promote_types(dtype, arr.dtype)
    return dtype
  for where, arr in lists:
    fits = (np.can_cast(arr.dtype, dtype, casting='same_kind')
            and is_str(arr.dtype) == is_str(dtype))
    if fits and dtype.kind in 'iu' and arr.dtype.kind in 'iu':
      info = np.iinfo(dtype)
      fits = info.min <= arr.min() and arr.max() <= info.max
    if not fits:
      raise ValueError(
          f'{where}[{key!r}] holds {arr.dtype} values that do not convert to '
          f'the dtype {dtype} of {where0}[{key!r}].')
    if is_str(dtype):
      dtype = np.promote_types(dtype, arr.dtype)
  return dtype


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
    # Per key, the store followed by one zero row, when the dataset built its
    # own copy of the arrays: padding slots then gather that row.
    self._zero_row_stores: dict[str, np.ndarray] = {}

  @classmethod
  def _from_zero_row_stores(cls, stores: Mapping[str, np.ndarray],
                            offsets: np.ndarray) -> FederatedDataset:
    """A dataset over ``stores`` (each with one trailing zero row) less that row."""
    ds = cls({k: v[:-1] for k, v in stores.items()}, offsets)
    ds._zero_row_stores = dict(stores)
    return ds

  def _zero_row_store(self, key: str) -> np.ndarray | None:
    """The store of ``key`` with its trailing zero row, if ``arrays[key]`` is still its view."""
    store = self._zero_row_stores.get(key)
    arr = self.arrays[key]
    if (store is None or arr.base is not store or arr.shape[0] + 1 != store.shape[0]
        or arr.__array_interface__['data'][0] != store.__array_interface__['data'][0]):
      return None
    return store

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
    return cls._from_zero_row_stores(
        {k: _take_with_zero_row(np.asarray(v), order) for k, v in arrays.items()},
        offsets)

  @classmethod
  def from_clients(
      cls,
      clients: Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]],
  ) -> FederatedDataset:
    """Builds a dataset from the arrays of each client.

    Args:
      clients: A sequence of per-client dicts, or a mapping from client name
        to such a dict (client ``j`` is then its ``j``-th entry). Every dict
        has the same string keys; each value is an array (or nested list)
        whose leading axis runs over the client's examples, with the same
        leading length for all keys of a client. For each key, the trailing
        shape is the same across clients, arrays share one dtype (strings
        may differ in length) and lists are converted to it; an empty list
        stands for a client without examples.

    Returns:
      A :class:`FederatedDataset` whose client ``j`` holds the rows of
      ``clients[j]``, in the given order.

    Raises:
      ValueError: Naming the client and key, on an empty ``clients``, keys
        that differ between clients, values without a leading axis, leading
        lengths that differ within a client, or trailing shapes or dtypes that
        differ between clients.
    """
    if isinstance(clients, Mapping):
      names = list(clients)
      entries = [clients[k] for k in names]
    elif isinstance(clients, Sequence) and not isinstance(clients, (str, bytes)):
      names = list(range(len(clients)))
      entries = list(clients)
    else:
      raise ValueError(
          '`clients` must be a sequence of dicts or a mapping of client -> '
          f'dict, got {type(clients).__name__}.')
    if not entries:
      raise ValueError('`clients` must hold at least one client.')
    where = [f'clients[{n!r}]' for n in names]
    keys = None
    for w, entry in zip(where, entries):
      if not isinstance(entry, Mapping) or not entry:
        raise ValueError(
            f'{w} must be a non-empty dict of str -> array, got '
            f'{type(entry).__name__}.')
      bad = [k for k in entry if not isinstance(k, str)]
      if bad:
        raise ValueError(f'{w} keys must be str, got {bad[0]!r}.')
      if keys is None:
        keys = list(entry)
      elif set(entry) != set(keys):
        missing = sorted(set(keys) - set(entry))
        extra = sorted(set(entry) - set(keys))
        raise ValueError(
            f'{w} has keys {sorted(entry)} but {where[0]} has {sorted(keys)}'
            f' (missing {missing}, extra {extra}).')

    # values[key][j]: the array of client j; None for an empty list (typeless).
    values: dict[str, list[np.ndarray | None]] = {k: [] for k in keys}
    given: dict[str, list[bool]] = {k: [] for k in keys}  # an array, not a list
    lengths = np.zeros(len(entries), dtype=np.int64)
    for j, (w, entry) in enumerate(zip(where, entries)):
      length = None
      for key in keys:
        raw = entry[key]
        if isinstance(raw, (list, tuple)) and len(raw) == 0:
          arr = None
          n = 0
        else:
          try:
            arr = np.asarray(raw)
          except ValueError as e:
            raise ValueError(f'{w}[{key!r}] is not a rectangular array: {e}') from e
          if arr.ndim == 0:
            raise ValueError(
                f'{w}[{key!r}] must have a leading example axis, got a scalar.')
          if arr.dtype.hasobject:
            raise ValueError(
                f'{w}[{key!r}] has dtype object: the values must form a '
                'rectangular numeric or string array.')
          n = arr.shape[0]
        if length is None:
          length = n
        elif n != length:
          raise ValueError(
              f'{w} has {n} examples in {key!r} but {length} in {keys[0]!r}: '
              'all keys of a client need the same leading length.')
        values[key].append(arr)
        given[key].append(hasattr(raw, 'dtype'))
      lengths[j] = length

    arrays = {}
    for key in keys:
      arrs, is_array = values[key], given[key]
      shaped = [j for j, a in enumerate(arrs) if a is not None]
      if not shaped:  # every client gave an empty list
        arrays[key] = _take_with_zero_row(np.zeros((0,), np.float32),
                                          np.zeros(0, np.int64))
        continue
      ref = shaped[0]
      trailing = arrs[ref].shape[1:]
      for j in shaped:
        if arrs[j].shape[1:] != trailing:
          raise ValueError(
              f'{where[j]}[{key!r}] has examples of shape {arrs[j].shape[1:]} '
              f'but {where[ref]}[{key!r}] has {trailing}.')
      # Clients without examples take part in the shape check only.
      typed = [j for j in shaped if arrs[j].shape[0]]
      if not typed:
        dtype = arrs[ref].dtype
      else:
        dtype = _common_dtype(
            key, [(where[j], arrs[j]) for j in typed if is_array[j]],
            [(where[j], arrs[j]) for j in typed if not is_array[j]])
      parts = [a for a in arrs if a is not None and a.shape[0]]
      store = np.empty((int(lengths.sum()) + 1,) + trailing, dtype)
      if parts:  # the casts were checked above
        np.concatenate(parts, axis=0, out=store[:-1], casting='unsafe')
      store[-1] = 0
      arrays[key] = store
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return cls._from_zero_row_stores(arrays, offsets)

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
    return FederatedDataset._from_zero_row_stores(
        {k: _take_with_zero_row(v, rows) for k, v in self.arrays.items()},
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
      shuffle: bool = True,
  ) -> dict[str, Any]:
    """Assembles one round of padded client data.

    Client ``c`` walks through its examples (reshuffled at every epoch, at
    most ``max_epochs`` passes) and fills up to ``num_steps * batch_size``
    slots in order, so it uses ``u = min(n_c * max_epochs, num_steps *
    batch_size)`` examples. Slots beyond ``u`` are padding: masked out and
    filled with zeros.

    Shuffles come from a counter-based hash of ``(seed, round_idx, client_id,
    epoch, position)`` (see :func:`shuffle_keys`), so a client's batches are
    deterministic and independent of which other clients are in the round.
    With ``shuffle=False`` every epoch walks the client's examples in stored
    order (slot ``s`` holds example ``s mod n_c``), whatever the seed and
    round.

    Args:
      client_ids: 1-D sequence of ``C`` client indices (repeats allowed).
      num_steps: Number of local steps ``S >= 1``.
      batch_size: Local batch size ``B >= 1``.
      seed: Integer seed.
      round_idx: Round index, mixed into the shuffle.
      max_epochs: Maximum passes ``>= 1`` over a client's data.
      pad_clients_to: If given, ``P >= C`` and ``P - C`` padding clients
        (client id 0, all masks False, weight 0) are appended.
      shuffle: Shuffle each epoch (True) or keep the stored order (False).

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
    if not isinstance(shuffle, (bool, np.bool_)):
      raise ValueError(f'`shuffle` must be True or False, got {shuffle!r}.')
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
    # Slot s < used[c] of client c holds its s-th draw; the used slots of each
    # client are a prefix. Padding slots read row N: the zero row after a
    # store that has one, else (clipped) row N - 1, then zeroed.
    mask = np.zeros((num_total, slots), dtype=bool)
    mask[:num_real] = np.arange(slots) < used[:, None]
    flat_mask = mask.reshape(-1)
    rows = np.full(num_total * slots, self.num_examples, dtype=np.int64)
    if shuffle:
      _shuffled_rows(ids, sizes, self.offsets[ids], used, slots, rows, seed,
                     round_idx)
    else:
      rows[flat_mask] = (np.repeat(self.offsets[ids], used) +
                         _segment_arange(used) % np.repeat(sizes, used))
    pad = None

    batch = {}
    for key, arr in self.arrays.items():
      store = self._zero_row_store(key)
      if store is not None:
        data = np.take(store, rows, axis=0, mode='clip')
      else:
        data = np.empty((rows.size,) + arr.shape[1:], dtype=arr.dtype)
        if arr.shape[0] == 0:
          data[...] = 0
        else:
          if pad is None:
            pad = np.flatnonzero(~flat_mask)
          _gather_rows(arr, rows, pad, data)
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
        'step_mask': mask[:, ::batch_size].copy(),  # a step's first slot is used
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
  producer after its current item and closes a generator source.

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

  source = iter(iterable)

  def worker() -> None:
    try:
      for item in source:
        if not put((_ITEM, item)):
          return
      put((_END, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((_ERROR, e))
    finally:  # a consumer that stopped early also ends a generator source
      close = getattr(source, 'close', None)
      if close is not None:
        try:
          close()
        except Exception:  # pylint: disable=broad-except
          pass

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
