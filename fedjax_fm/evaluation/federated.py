"""Federated evaluation: every client scored on its own local test data.

The clients are an array axis, as in training: each client's examples are
padded into ``[K, nb, B, ...]`` with a mask, one jitted program ``jax.vmap``\\ s
the model over the ``K`` clients of a chunk and ``lax.scan``\\ s over the
``nb`` batches, and the host walks over chunks of ``K`` clients (the next
chunk is assembled in a background thread while the current one runs), so
memory is bounded by the chunk, not the number of clients::

  eval_fn = models.make_eval_fn(split.graphdef, task)
  train_ds, test_ds = split_clients(dataset, test_fraction=0.2, seed=0)
  per_client = per_client_eval(eval_fn, trainable, split.frozen, test_ds,
                               batch_size=32)
  summary = distribution(per_client['accuracy'], per_client['num_examples'])

:func:`distribution` summarises per-client values the way an average does
not: the 10th percentile, the worst and best client, the spread.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.data.federated import FederatedDataset
from fedjax_fm.data.federated import prefetch
from fedjax_fm.data.federated import shuffle_keys

__all__ = [
    'DEFAULT_CHUNK_SIZE',
    'client_eval_batches',
    'client_metric_sums',
    'distribution',
    'finalize_client_sums',
    'higher_is_better',
    'num_eval_batches',
    'per_client_eval',
    'split_clients',
    'summarize',
]

# eval_fn(trainable, frozen, batch) -> {name: per-example [B]}
EvalFn = Callable[[Any, Any, Any], Mapping[str, jax.Array]]

DEFAULT_CHUNK_SIZE = 64

# -------------------------------------------------------------- splitting


def check_int(value: Any, name: str, minimum: int) -> int:
  """``value`` as an int, or a ValueError naming ``name`` and the minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'`{name}` must be an int >= {minimum}, got {value!r}.')
  if value < minimum:
    raise ValueError(f'`{name}` must be >= {minimum}, got {value}.')
  return int(value)


def split_clients(
    dataset: FederatedDataset, test_fraction: float, seed: int
) -> tuple[FederatedDataset, FederatedDataset]:
  """Splits each client's examples into local train and test parts.

  Client ``c`` with ``n`` examples gets ``round(test_fraction * n)`` test
  examples, clipped to ``[1, n - 1]`` when ``n >= 2`` (every such client has
  both train and test data); a client with one example keeps it for training
  and one with none stays empty on both sides. The test examples are a random
  subset drawn from ``(seed, client)`` alone; both parts keep the original
  example order.

  Args:
    dataset: the federated dataset.
    test_fraction: fraction in ``(0, 1)`` of each client's examples to hold
      out.
    seed: integer seed of the split.

  Returns:
    ``(train_ds, test_ds)``, both with ``dataset.num_clients`` clients.

  Raises:
    ValueError: on a fraction outside ``(0, 1)`` or a non-int seed.
  """
  if not isinstance(dataset, FederatedDataset):
    raise ValueError(
        f'`dataset` must be a FederatedDataset, got {type(dataset).__name__}.')
  if isinstance(test_fraction, bool) or not isinstance(
      test_fraction, (int, float, np.floating, np.integer)) or not (
          0.0 < float(test_fraction) < 1.0):
    raise ValueError(
        f'`test_fraction` must be a float in (0, 1), got {test_fraction!r}.')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f'`seed` must be an int, got {seed!r}.')
  sizes = dataset.client_sizes
  n_test = np.floor(float(test_fraction) * sizes + 0.5).astype(np.int64)
  n_test = np.where(sizes >= 2, np.clip(n_test, 1, np.maximum(sizes - 1, 1)),
                    0)
  client = np.repeat(np.arange(dataset.num_clients, dtype=np.int64), sizes)
  pos = np.arange(dataset.num_examples, dtype=np.int64) - dataset.offsets[client]
  keys = shuffle_keys(seed, 0, client, 0, pos)
  # Rank of each example within its client under a random permutation.
  order = np.lexsort((pos, keys, client))
  rank = np.empty_like(pos)
  rank[order] = pos  # `order` lists each client's rows contiguously.
  is_test = rank < n_test[client]

  def part(select: np.ndarray) -> FederatedDataset:
    counts = np.bincount(client[select], minlength=dataset.num_clients)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return FederatedDataset({k: v[select] for k, v in dataset.arrays.items()},
                            offsets)

  return part(~is_test), part(is_test)


# ------------------------------------------------------------- batching


def num_eval_batches(dataset: FederatedDataset, batch_size: int,
                     max_batches: int | None = None) -> int:
  """Batches per client that cover the largest client (at least 1).

  Args:
    dataset: the federated dataset.
    batch_size: examples per batch.
    max_batches: optional cap on the batches per client.

  Returns:
    ``min(ceil(max_c n_c / batch_size), max_batches)``, at least 1.
  """
  batch_size = check_int(batch_size, 'batch_size', 1)
  largest = int(dataset.client_sizes.max()) if dataset.num_clients else 0
  nb = max(-(-largest // batch_size), 1)
  if max_batches is not None:
    nb = min(nb, check_int(max_batches, 'max_batches', 1))
  return nb


def client_eval_batches(
    dataset: FederatedDataset,
    client_ids: Sequence[int],
    num_batches: int,
    batch_size: int,
    pad_clients_to: int | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Pads clients' examples, in order, into evaluation batches.

  Client ``c`` fills its first ``min(n_c, num_batches * batch_size)``
  examples into consecutive slots; the remaining slots are zeros, masked out.

  Args:
    dataset: the federated dataset.
    client_ids: ``C`` client indices.
    num_batches: batches per client ``nb``.
    batch_size: examples per batch ``B``.
    pad_clients_to: optional ``P >= C``; ``P - C`` all-masked clients are
      appended.

  Returns:
    ``(batch, mask)``: ``{key: [P, nb, B, ...]}`` and bool ``[P, nb, B]``.
  """
  ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= dataset.num_clients):
    raise ValueError(
        f'`client_ids` must lie in [0, {dataset.num_clients}), got {ids}.')
  nb = check_int(num_batches, 'num_batches', 1)
  bs = check_int(batch_size, 'batch_size', 1)
  total = ids.size if pad_clients_to is None else int(pad_clients_to)
  if total < ids.size:
    raise ValueError(
        f'`pad_clients_to` must be >= len(client_ids)={ids.size}, got '
        f'{pad_clients_to}.')
  slots = nb * bs
  used = np.zeros(total, np.int64)
  starts = np.zeros(total, np.int64)
  used[:ids.size] = np.minimum(dataset.client_sizes[ids], slots)
  starts[:ids.size] = dataset.offsets[ids]
  slot = np.arange(slots, dtype=np.int64)
  mask = slot[None, :] < used[:, None]
  rows = np.where(mask, starts[:, None] + slot[None, :], 0).reshape(-1)
  flat_mask = mask.reshape(-1)
  batch = {}
  for key, arr in dataset.arrays.items():
    if arr.shape[0] == 0:
      data = np.zeros((rows.size,) + arr.shape[1:], arr.dtype)
    else:
      data = arr[rows]
      data[~flat_mask] = 0
    batch[key] = data.reshape((total, nb, bs) + arr.shape[1:])
  return batch, mask.reshape(total, nb, bs)


# ------------------------------------------------------------ device side


def client_metric_sums(eval_fn: EvalFn, trainable: Any, frozen: Any,
                       batches: Any, mask: jax.Array) -> dict[str, jax.Array]:
  """One client's metric sums over its batches (jittable, vmappable).

  Args:
    eval_fn: ``eval_fn(trainable, frozen, batch) -> {name: [B]}``.
    trainable: the client's trainable params.
    frozen: frozen params.
    batches: pytree of ``[nb, B, ...]`` leaves.
    mask: bool ``[nb, B]`` of real examples.

  Returns:
    ``{name: sum over real examples}`` (float32 scalars) plus ``'count'``.

  Raises:
    ValueError: (at trace time) if a metric is not per-example ``[B]``.
  """
  first = jax.tree.map(lambda x: x[0], batches)
  out_shape = jax.eval_shape(eval_fn, trainable, frozen, first)
  bs = mask.shape[-1]
  if not isinstance(out_shape, Mapping):
    raise ValueError('`eval_fn` must return a dict of per-example metrics.')
  for name, leaf in out_shape.items():
    if tuple(leaf.shape) != (bs,):
      raise ValueError(
          f'`eval_fn` metric {name!r} must be per-example with shape '
          f'[{bs}], got {tuple(leaf.shape)}.')
  zeros = {name: jnp.zeros((), jnp.float32) for name in out_shape}

  def body(sums, xs):
    batch, m = xs
    out = eval_fn(trainable, frozen, batch)
    new = {name: sums[name] + jnp.sum(
        jnp.where(m, out[name].astype(jnp.float32), 0.0)) for name in sums}
    return new, None

  sums, _ = jax.lax.scan(body, zeros, (batches, mask))
  sums['count'] = jnp.sum(mask.astype(jnp.float32))
  return sums


@functools.lru_cache(maxsize=64)
def _chunk_eval(eval_fn: EvalFn, client_axis: bool):
  """Jitted ``(trainable, frozen, batch [K,nb,B,..], mask) -> sums [K]``."""

  def run(trainable, frozen, batch, mask):
    per_client = functools.partial(client_metric_sums, eval_fn)
    return jax.vmap(per_client, in_axes=(0 if client_axis else None, None, 0, 0))(
        trainable, frozen, batch, mask)

  return jax.jit(run)


def finalize_client_sums(sums: Mapping[str, np.ndarray],
                         counts: np.ndarray) -> dict[str, np.ndarray]:
  """Turns per-client metric sums into per-client means.

  Args:
    sums: ``{name: [C]}`` sums over each client's examples.
    counts: ``[C]`` example counts.

  Returns:
    ``{name: [C]}`` float64 means (NaN for clients without examples), plus
    ``'num_examples'`` (int64 ``[C]``); ``'accuracy'`` (the mean of
    ``'correct'``) when the metrics have ``'correct'`` and no ``'accuracy'``;
    ``'token_loss'`` and ``'perplexity'`` (token-weighted, per client) when
    they have ``'nll_sum'`` and ``'num_tokens'``.
  """
  counts = np.asarray(counts, np.int64)
  denom = np.where(counts > 0, counts, 1).astype(np.float64)
  out = {}
  for name, s in sums.items():
    out[name] = np.where(counts > 0, np.asarray(s, np.float64) / denom, np.nan)
  if 'correct' in sums and 'accuracy' not in sums:
    out['accuracy'] = out['correct']
  if 'nll_sum' in sums and 'num_tokens' in sums:
    tokens = np.asarray(sums['num_tokens'], np.float64)
    token_loss = np.asarray(sums['nll_sum'], np.float64) / np.maximum(tokens, 1)
    with np.errstate(over='ignore'):
      ppl = np.exp(token_loss)
    out['token_loss'] = np.where(tokens > 0, token_loss, np.nan)
    out['perplexity'] = np.where(tokens > 0, ppl, np.nan)
  out['num_examples'] = counts
  return out


def client_chunks(num_clients: int, chunk_size: int | None) -> tuple[int, list]:
  """``(chunk size, [client ids of each chunk])`` for chunked per-client work."""
  if chunk_size is None:
    chunk_size = DEFAULT_CHUNK_SIZE
  chunk_size = check_int(chunk_size, 'chunk_size', 1)
  k = min(chunk_size, max(num_clients, 1))
  return k, [np.arange(s, min(s + k, num_clients))
             for s in range(0, num_clients, k)]


def per_client_eval(
    eval_fn: EvalFn,
    trainable: Any,
    frozen: Any,
    dataset: FederatedDataset,
    *,
    batch_size: int,
    max_batches: int | None = None,
    chunk_size: int | None = None,
    client_axis: bool = False,
) -> dict[str, np.ndarray]:
  """Evaluates a model on every client's local data.

  Every client sees the same ``nb = num_eval_batches(dataset, batch_size,
  max_batches)`` padded batches (its first ``nb * batch_size`` examples, in
  order); chunks of ``chunk_size`` clients run as one jitted
  ``vmap``-over-clients / ``scan``-over-batches program (compiled once: the
  last chunk is padded with empty clients).

  Args:
    eval_fn: ``eval_fn(trainable, frozen, batch) -> {name: [B]}`` per-example
      metrics, e.g. from :func:`fedjax_fm.models.make_eval_fn`.
    trainable: trainable params; one model for all clients, or with
      ``client_axis`` a leading ``[num_clients]`` axis on every leaf (client
      ``c`` is scored with its own model, e.g. after personalisation).
    frozen: frozen params, shared by all clients.
    dataset: the clients' evaluation data.
    batch_size: examples per batch.
    max_batches: optional cap on the batches per client.
    chunk_size: clients per jitted chunk (default
      :data:`DEFAULT_CHUNK_SIZE`), bounding device memory.
    client_axis: whether ``trainable`` has a leading clients axis.

  Returns:
    Per-client arrays ``{name: [C]}``: example-weighted means of each metric
    (NaN for clients without examples), ``'num_examples'`` (examples
    scored), plus the derived metrics of :func:`finalize_client_sums`.

  Raises:
    ValueError: on invalid sizes or a ``trainable`` whose clients axis does
      not match ``dataset.num_clients``.
  """
  if not isinstance(dataset, FederatedDataset):
    raise ValueError(
        f'`dataset` must be a FederatedDataset, got {type(dataset).__name__}.')
  nb = num_eval_batches(dataset, batch_size, max_batches)
  num_clients = dataset.num_clients
  if client_axis:
    for leaf in jax.tree.leaves(trainable):
      if np.ndim(leaf) == 0 or np.shape(leaf)[0] != num_clients:
        raise ValueError(
            '`client_axis=True` needs a leading axis of size num_clients='
            f'{num_clients} on every trainable leaf, got shape '
            f'{np.shape(leaf)}.')
  k, chunks = client_chunks(num_clients, chunk_size)
  run = _chunk_eval(eval_fn, bool(client_axis))

  def host_chunks():
    for ids in chunks:
      yield ids, client_eval_batches(dataset, ids, nb, batch_size,
                                     pad_clients_to=k)

  sums: dict[str, list[np.ndarray]] = {}
  for ids, (batch, mask) in prefetch(host_chunks()):
    tr = trainable
    if client_axis:
      tr = jax.tree.map(lambda x, ids=ids: _take_padded(x, ids, k), trainable)
    out = jax.device_get(run(tr, frozen, batch, mask))
    for name, value in out.items():
      sums.setdefault(name, []).append(np.asarray(value)[:ids.size])
  sums = {name: np.concatenate(v) for name, v in sums.items()}
  counts = np.rint(sums.pop('count')).astype(np.int64)
  return finalize_client_sums(sums, counts)


def _take_padded(x: Any, ids: np.ndarray, size: int):
  """Rows ``ids`` of ``x``, repeated from the first to ``size`` rows."""
  idx = np.concatenate([ids, np.full(size - ids.size, ids[0], ids.dtype)])
  return jnp.asarray(x)[idx]


# ---------------------------------------------------------- distributions

_LOWER_IS_BETTER = ('loss', 'perplexity', 'error', 'nll')


def higher_is_better(name: str) -> bool:
  """False for loss-like metric names (loss, perplexity, error, nll)."""
  return not any(tag in name.lower() for tag in _LOWER_IS_BETTER)


def distribution(values: Any, weights: Any = None, *,
                 higher_is_better: bool = True) -> dict[str, float]:  # pylint: disable=redefined-outer-name
  """Summarises a metric across clients (the fairness view).

  Clients whose value is NaN (e.g. no evaluation data) or whose weight is 0
  are left out.

  Args:
    values: ``[C]`` per-client values.
    weights: optional non-negative ``[C]`` weights (e.g. example counts) for
      ``weighted_mean``; all other statistics weigh clients equally.
    higher_is_better: direction of the metric: ``worst`` is the min (and
      ``best`` the max) when True, as for accuracy; the reverse for losses.

  Returns:
    ``{'mean', 'weighted_mean', 'p10', 'median', 'p90', 'worst', 'best',
    'std', 'num_clients'}``; ``p10``/``p90`` are the 10th/90th percentiles of
    the values (linear interpolation), ``std`` the population standard
    deviation. All NaN (and ``num_clients`` 0) when no client is left.

  Raises:
    ValueError: on non-1-D inputs, mismatched shapes or negative weights.
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 1:
    raise ValueError(f'`values` must be 1-D [num_clients], got {v.shape}.')
  if weights is None:
    w = np.ones_like(v)
  else:
    w = np.asarray(weights, np.float64)
    if w.shape != v.shape:
      raise ValueError(
          f'`weights` {w.shape} must have the shape of `values` {v.shape}.')
    if np.any(w < 0) or not np.all(np.isfinite(w)):
      raise ValueError('`weights` must be finite and non-negative.')
  keep = ~np.isnan(v) & (w > 0)
  v, w = v[keep], w[keep]
  if v.size == 0:
    nan = float('nan')
    return {'mean': nan, 'weighted_mean': nan, 'p10': nan, 'median': nan,
            'p90': nan, 'worst': nan, 'best': nan, 'std': nan,
            'num_clients': 0}
  lo, hi = float(v.min()), float(v.max())
  return {
      'mean': float(v.mean()),
      'weighted_mean': float(np.sum(w * v) / np.sum(w)),
      'p10': float(np.percentile(v, 10)),
      'median': float(np.median(v)),
      'p90': float(np.percentile(v, 90)),
      'worst': lo if higher_is_better else hi,
      'best': hi if higher_is_better else lo,
      'std': float(v.std()),
      'num_clients': int(v.size),
  }


def summarize(per_client: Mapping[str, np.ndarray],
              weight_key: str = 'num_examples') -> dict[str, dict[str, float]]:
  """:func:`distribution` of every metric of a :func:`per_client_eval` result.

  Args:
    per_client: ``{name: [C]}`` per-client metrics.
    weight_key: entry used as the weights (and not summarised itself).

  Returns:
    ``{name: distribution}``, with the direction from
    :func:`higher_is_better`.
  """
  weights = per_client.get(weight_key)
  return {
      name: distribution(v, weights, higher_is_better=higher_is_better(name))
      for name, v in per_client.items() if name != weight_key
  }
