"""Heterogeneous LoRA ranks in one compiled round.

Every client trains the same max-rank factors ``lora_a [in, r_max]`` and
``lora_b [r_max, out]`` (so the clients stay one array axis), restricted by a
*rank mask* to its own rank ``r_i <= r_max``: the first ``r_i`` columns of
``lora_a`` and rows of ``lora_b``. With ``build_round(..., client_masks=fn)``
(``fn = client_masks_fn(...)``) a client

1. starts from the global factors truncated to its rank (HetLoRA's
   "distribution via truncation");
2. trains only its rank's components (no gradient, no optimizer update
   outside; they stay exactly 0);
3. sends only its rank's components (``uplink_bytes`` counts
   ``r_i (in + out)`` values per pair plus the other leaves), and the server
   reads the rest as 0 (zero padding): the aggregator sees the client's
   zero-padded local factors.

The aggregation modes for heterogeneous ranks (``peft.lora_aggregation``):

=========  ==============================================================
fedit      zero padding, data-weighted mean of the padded factors
hetlora    zero padding, sparsity-weighted mean (HetLoRA, `sparsity_weighted`)
stack      exact mean of the clients' products ``A_i B_i`` merged into the
           base (FLoRA-style stacking, any ranks)
product    exact mean product re-factorised by SVD to ``r_max``; a client of
           rank ``r`` receives its first ``r`` components, the best rank-r
           approximation of the mean product (SVD truncation per tier)
=========  ==============================================================

``ffa`` is not a mode here: it freezes ``lora_a`` in the base, outside the
rank masks (`fedjax_fm.config.validate` rejects the combination).

All are streaming (memory flat in the clients; ``chunked`` and ``sharded``).

Ranks come from a distribution that is a pure function of ``(seed,
client_id)`` (`client_rank`). With ``client_masks_fn`` a client keeps that rank
for the whole run; with `rank_store` (HetLoRA's rank self-pruning) it is only
the initial rank: every client's current rank lives in the per-client store
``ServerState.client_store['hetlora_rank']`` (int32, gathered and scattered by
client id inside the round, checkpointed with the state).

HetLoRA (Cho, Liu, Xu, Fahrezi, Joshi 2024, "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", https://arxiv.org/abs/2401.06432)
is the three steps of the paper:

* distribution via truncation: a client of rank ``r_k`` starts from the first
  ``r_k`` components of the global factors;
* local training with rank self-pruning: the local objective gets
  ``lambda sum_modules ||A_{:, g:r}||_F ||B_{g:r, :}||_F`` with ``g = floor(gamma
  r_k)`` (`self_pruning_penalty`), and at the end of local training a client
  whose penalised tail ``sum_modules ||A_{:, g:r}|| ||B_{g:r, :}||``
  (`tail_norm`) is smaller than at the start of its local training (the factors
  it received) prunes its rank to ``floor(gamma r_k)``, sends its factors at
  the pruned rank (the pruned components are dropped, the server reads them as
  0) and keeps that rank in the later rounds it is sampled
  (`prune_client_rank`, wired into the round by `rank_store`);
* zero padding and sparsity-weighted aggregation: the padded factors are
  averaged with weights ``||A_k B_k||_F`` per LoRA module (`sparsity_weighted`).

Choices where the paper leaves a detail open (deviations, named): "the tail
decreased" is measured over the client's local training (end against start,
the start being the truncated global factors it received); one rank per
client for every LoRA module, so the pruning test sums the tails over the
modules (the regulariser's value divided by lambda); a rank never drops below
1 (``floor(gamma r)`` is 0 for ``r < 1 / gamma``: such a client keeps rank 1);
layers stacked on a leading axis (``model.scan_layers``) count as one module in
the norms; a client whose update does not arrive (weight 0 after the uplink,
e.g. non-finite) keeps its rank; the layers keep one scaling ``alpha / r_max``
for every client (the factors are ``r_max`` wide). The paper's
``floor(gamma r)`` is computed exactly (from a host-side table, not in float32).
Zero padding pads both factors, so components beyond the rank of every client
of a round average to exactly 0 in ``lora_a`` and ``lora_b``; such a tail gets
no gradient (the loss and the penalty see it through the product), stays 0,
and a client whose whole tail is 0 keeps its rank (the rule needs a strict
decrease).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.aggregate.base import Aggregator
from fedjax_fm.aggregate.base import streaming
from fedjax_fm.aggregate.mean import weighted_mean
from fedjax_fm.peft.lora_aggregation import lora_pair_paths

__all__ = [
    'DISTRIBUTIONS',
    'STORE_KEY',
    'RankStore',
    'client_masks_fn',
    'client_rank',
    'prune_client_rank',
    'pruned_rank',
    'rank_masks',
    'rank_store',
    'self_pruning_penalty',
    'sparsity_weighted',
    'tail_norm',
    'uplink_nbytes',
    'zero_pad',
]

DISTRIBUTIONS = ('none', 'uniform', 'tiers')
_A, _B = 'lora_a', 'lora_b'
_RANK_STREAM = 0x4E7A   # folded into the seed's key: ranks draw from their own stream
STORE_KEY = 'hetlora_rank'   # the current ranks' entry in ServerState.client_store


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _map_with_pairs(fn_pair: Callable, fn_other: Callable, tree: Any) -> Any:
  """Rebuilds a pure dict: ``fn_pair(name, leaf)`` for LoRA factors, else ``fn_other``."""

  def walk(node):
    if isinstance(node, Mapping):
      pair = _B in node
      return {k: (fn_pair(k, v) if pair and k in (_A, _B) else walk(v))
              for k, v in node.items()}
    return jax.tree.map(fn_other, node)

  return walk(tree)


# --------------------------------------------------------------------------
# Ranks and masks.


def client_rank(seed: int, client_id: Any, ranks: Sequence[int],
                fractions: Sequence[float] | None = None) -> jax.Array:
  """The LoRA rank of a client: a pure function of ``(seed, client_id)``.

  Args:
    seed: the run's seed.
    client_id: int client id(s) (any shape; traced or not).
    ranks: the ranks of the tiers.
    fractions: the expected fraction of clients in each tier (summing to 1);
      None: uniform over ``ranks``.

  Returns:
    int32 ranks shaped like ``client_id``.
  """
  ranks = np.asarray(ranks, np.int32)
  if ranks.ndim != 1 or ranks.size == 0 or (ranks < 1).any():
    raise ValueError(f'ranks must be a non-empty sequence of ints >= 1, got {ranks!r}')
  if fractions is None:
    fractions = np.full(ranks.size, 1.0 / ranks.size)
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != ranks.shape or (fractions <= 0).any() or abs(fractions.sum() - 1) > 1e-6:
    raise ValueError(f'fractions must be {ranks.size} positive numbers summing to 1, '
                     f'got {tuple(fractions)}')
  edges = jnp.asarray(np.cumsum(fractions)[:-1], jnp.float32)
  key = jax.random.fold_in(jax.random.key(seed), _RANK_STREAM)
  ids = jnp.asarray(client_id, jnp.int32)
  u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(ids.reshape(-1))
  tier = jnp.searchsorted(edges, u, side='right')
  return jnp.asarray(ranks)[tier].reshape(ids.shape)


def rank_masks(params: Any, rank: Any) -> Any:
  """Bool mask tree of one client of rank ``rank``.

  True on the first ``rank`` columns of every ``lora_a`` (``[..., in, r]``) and
  rows of every ``lora_b`` (``[..., r, out]``; leading axes such as stacked
  layers are allowed), and on every other leaf.
  """
  rank = jnp.asarray(rank)

  def pair(name, leaf):
    axis = -1 if name == _A else -2
    r = leaf.shape[axis]
    keep = jnp.arange(r) < rank
    shape = [1] * len(leaf.shape)
    shape[axis] = r
    return jnp.broadcast_to(keep.reshape(shape), leaf.shape)

  return _map_with_pairs(pair, lambda x: jnp.ones(jnp.shape(x), bool), params)


def client_masks_fn(params: Any, seed: int, ranks: Sequence[int],
                    fractions: Sequence[float] | None = None) -> Callable[[Any], Any]:
  """``fn(client_id) -> rank_masks(params, client_rank(seed, client_id, ...))``.

  The ``client_masks`` hook of `fedjax_fm.engine.build_round`.
  """
  shapes = jax.eval_shape(lambda p: p, params)
  max_rank = [_get(shapes, p)[_B].shape[-2] for p in lora_pair_paths(shapes)]
  if not max_rank:
    raise ValueError('heterogeneous ranks need LoRA pairs (lora_b) in the trainable params')
  if max(ranks) > min(max_rank):
    raise ValueError(f'ranks {tuple(ranks)} exceed the LoRA rank {min(max_rank)} of the '
                     'factors (peft.rank is the maximum rank)')
  client_rank(seed, 0, ranks, fractions)   # validates

  def fn(client_id):
    return rank_masks(shapes, client_rank(seed, client_id, ranks, fractions))

  return fn


def zero_pad(update: Any, mask: Any, params: Any) -> Any:
  """The server's view of a client's update: ``where(mask, update, -params)``.

  ``update`` is the client's delta from its truncated start; what it did not
  send reads as 0, so ``params + zero_pad(...)`` is its zero-padded local model.
  """
  return jax.tree.map(lambda u, m, p: jnp.where(m, u, -jnp.asarray(p, u.dtype)),
                      update, mask, params)


def uplink_nbytes(params: Any, rank: int) -> int:
  """Bytes a client of rank ``rank`` sends (its masked entries, params' dtypes)."""
  masks = rank_masks(jax.eval_shape(lambda p: p, params), rank)
  return int(sum(int(np.sum(np.asarray(m))) * np.dtype(p.dtype).itemsize
                 for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params))))


# --------------------------------------------------------------------------
# HetLoRA: rank self-pruning and sparsity-weighted aggregation.


def _safe_norm(x):
  """Frobenius norm whose gradient at 0 is 0 (the subgradient), not NaN."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _floor_gamma(gamma: float, n: int) -> jax.Array:
  """``[n + 1]`` int32 table of ``floor(gamma r)`` for ``r = 0..n`` (exact, host side)."""
  return jnp.asarray(np.floor(float(gamma) * np.arange(n + 1)).astype(np.int32))


def _tail_of_rank(rank, n, gamma):
  """``[n]`` float mask of the components ``floor(gamma r) <= j < r`` (``r = rank``)."""
  r = jnp.clip(jnp.asarray(rank, jnp.int32), 0, n)
  start = _floor_gamma(gamma, n)[r]
  j = jnp.arange(n)
  return ((j >= start) & (j < r)).astype(jnp.float32)


def _tail(keep, gamma):
  """``[r]`` float mask of the components ``floor(gamma r_i) <= j < r_i``.

  ``keep`` is the client's ``[r]`` bool rank mask (True on its first ``r_i``).
  """
  return _tail_of_rank(jnp.sum(keep.astype(jnp.int32)), keep.shape[0], gamma)


def self_pruning_penalty(gamma: float, lam: float) -> Callable[[Any, Any], jax.Array]:
  """HetLoRA's rank self-pruning regulariser, ``regularizer(params, masks)``.

  ``lam * sum_pairs ||A_{:, g:r}||_F ||B_{g:r, :}||_F`` with ``r`` the client's
  rank (read from the ``lora_b`` mask) and ``g = floor(gamma r)``. The norm's
  gradient at 0 is taken as 0. Pass it as ``build_round(...,
  client_regularizer=...)``.

  Args:
    gamma: the decay factor in (0, 1).
    lam: the regularisation strength (>= 0).
  """
  if not 0.0 < gamma < 1.0:
    raise ValueError(f'gamma must be in (0, 1), got {gamma!r}')
  if lam < 0:
    raise ValueError(f'lam must be >= 0, got {lam!r}')

  def regularizer(params, masks):
    total = jnp.zeros((), jnp.float32)
    for path in lora_pair_paths(params):
      node, mnode = _get(params, path), _get(masks, path)
      a, b = node[_A], node[_B]
      mb = mnode[_B]
      # The rank axis: rows of B (the first row of every stacked layer is alike).
      keep = mb[(0,) * (mb.ndim - 2)][:, 0] if mb.ndim > 2 else mb[:, 0]
      tail = _tail(keep, gamma)
      total = total + (_safe_norm(a * tail) * _safe_norm(b * tail[:, None]))
    return lam * total

  return regularizer


def _pair_tail_norm(a, b, tail):
  return _safe_norm(a * tail) * _safe_norm(b * tail[:, None])


def pruned_rank(a: jax.Array, b: jax.Array, a_start: jax.Array, b_start: jax.Array,
                rank: Any, gamma: float, min_rank: int = 1) -> jax.Array:
  """HetLoRA's pruning rule for one LoRA module (`prune_client_rank` for a model).

  After local training the client keeps rank ``max(floor(gamma r), min_rank)``
  when the norm of the regularised tail, ``||A_{:, g:r}|| ||B_{g:r, :}||``, is
  smaller than at the start of local training; else ``r``.
  """
  tail = _tail_of_rank(rank, b.shape[-2], gamma)
  shrink = _pair_tail_norm(a, b, tail) < _pair_tail_norm(a_start, b_start, tail)
  return _prune(shrink, rank, b.shape[-2], gamma, min_rank)


def _prune(shrink, rank, n, gamma, min_rank):
  rank = jnp.asarray(rank, jnp.int32)
  g = jnp.maximum(_floor_gamma(gamma, n)[jnp.clip(rank, 0, n)], min_rank)
  return jnp.where(shrink & (g < rank), g, rank)


def tail_norm(params: Any, rank: Any, gamma: float) -> jax.Array:
  """``sum_modules ||A_{:, g:r}||_F ||B_{g:r, :}||_F``, ``g = floor(gamma r)``.

  The self-pruning penalty divided by lambda, for a client of rank ``rank``
  (one rank for every LoRA pair of ``params``).
  """
  total = jnp.zeros((), jnp.float32)
  for path in lora_pair_paths(params):
    node = _get(params, path)
    tail = _tail_of_rank(rank, node[_B].shape[-2], gamma)
    total = total + _pair_tail_norm(node[_A], node[_B], tail)
  return total


def prune_client_rank(local: Any, start: Any, rank: Any, gamma: float,
                      min_rank: int = 1) -> jax.Array:
  """HetLoRA's rank self-pruning rule for one client (pure).

  Args:
    local: the client's trainable params at the end of local training.
    start: its params at the start of local training (the global factors
      truncated to its rank).
    rank: its rank this round (int, traced or not).
    gamma: the decay factor in (0, 1).
    min_rank: the rank never drops below this.

  Returns:
    int32: ``max(floor(gamma rank), min_rank)`` when ``tail_norm(local) <
    tail_norm(start)`` (the penalised tail shrank over local training), else
    ``rank``.
  """
  n = min(_get(local, p)[_B].shape[-2] for p in lora_pair_paths(local))
  shrink = tail_norm(local, rank, gamma) < tail_norm(start, rank, gamma)
  return _prune(shrink, rank, n, gamma, min_rank)


class RankStore(NamedTuple):
  """A ``client_masks`` hook whose ranks live in the per-client store.

  `fedjax_fm.engine.build_round` recognises it by ``store_key``: ``init`` fills
  ``client_store[store_key]`` (``num_clients -> int32 [num_clients]``), a client's
  mask is ``masks(its stored rank)``, and after local training
  ``after_training(rank, start, delta) -> (new rank, mask of what it sends)``
  gives the rank written back to the store (a client whose update does not
  arrive keeps its rank).
  """
  init: Callable[[int], jax.Array]
  masks: Callable[[jax.Array], Any]
  after_training: Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]
  store_key: str = STORE_KEY


def rank_store(params: Any, seed: int, ranks: Sequence[int],
               fractions: Sequence[float] | None = None, *,
               prune_gamma: float | None = None, min_rank: int = 1) -> RankStore:
  """Per-client ranks in the store, initialised by `client_rank`, optionally pruned.

  Args:
    params: the trainable params (or their shapes) with LoRA pairs.
    seed, ranks, fractions: the initial ranks (`client_rank`).
    prune_gamma: HetLoRA's rank self-pruning (`prune_client_rank` with this
      gamma) at the end of every client's local training; the client sends its
      factors at the new rank. None: ranks stay at their initial values (the
      same masks as `client_masks_fn`).
    min_rank: the smallest rank pruning reaches.

  Returns:
    A `RankStore` for ``build_round(client_masks=...)``.
  """
  if prune_gamma is not None and not 0.0 < prune_gamma < 1.0:
    raise ValueError(f'prune_gamma must be in (0, 1), got {prune_gamma!r}')
  if min_rank < 1:
    raise ValueError(f'min_rank must be >= 1, got {min_rank!r}')
  client_masks_fn(params, seed, ranks, fractions)   # validates the ranks against the factors
  shapes = jax.eval_shape(lambda p: p, params)

  def init(num_clients):
    return client_rank(seed, np.arange(num_clients), ranks, fractions).astype(jnp.int32)

  def masks(rank):
    return rank_masks(shapes, rank)

  def after_training(rank, start, delta):
    if prune_gamma is None:
      return rank, masks(rank)
    local = jax.tree.map(jnp.add, start, delta)
    new = prune_client_rank(local, start, rank, prune_gamma, min_rank)
    return new, masks(new)

  return RankStore(init, masks, after_training)


def sparsity_weighted() -> Aggregator:
  """HetLoRA's sparsity-weighted aggregation of zero-padded LoRA modules.

  For every LoRA module the clients' zero-padded local factors are averaged
  with weights ``||A_i B_i||_F / sum_j ||A_j B_j||_F`` (the Frobenius norm of
  the client's reconstructed update; clients with weight ``<= 0`` are left
  out); other leaves (e.g. a classifier head) get the usual weighted mean.
  When every valid client's product is 0 the module falls back to the weighted
  mean. Layers stacked on a leading axis (``model.scan_layers``) share one
  weight per stack. Streaming: the accumulator holds ``sum_i s_i A_i``, ``sum_i s_i B_i``
  (the local factors, not the deltas: a component no client sent averages to
  exactly 0, so the rank self-pruning rule later sees an exact 0 tail there)
  and ``sum_i s_i`` per module.

  Returns:
    A streaming `fedjax_fm.aggregate.Aggregator` (``params`` is the global
    trainable tree; the updates are zero-padded, `zero_pad`).
  """
  mean = weighted_mean()

  def zero(params):
    sums = {}
    for i, path in enumerate(lora_pair_paths(params)):
      node = _get(params, path)
      sums[i] = (jnp.zeros(jnp.shape(node[_A]), jnp.float32),
                 jnp.zeros(jnp.shape(node[_B]), jnp.float32), jnp.zeros((), jnp.float32))
    return mean.zero(params), sums

  def accumulate(acc, updates, weights, params):
    macc, sums = acc
    weights = jnp.asarray(weights, jnp.float32)
    valid = weights > 0
    out = {}
    for i, path in enumerate(lora_pair_paths(params)):
      node, unode = _get(params, path), _get(updates, path)
      da = jnp.where(valid.reshape((-1,) + (1,) * (unode[_A].ndim - 1)),
                     unode[_A].astype(jnp.float32), 0.0)
      db = jnp.where(valid.reshape((-1,) + (1,) * (unode[_B].ndim - 1)),
                     unode[_B].astype(jnp.float32), 0.0)
      a_i = jnp.asarray(node[_A], jnp.float32) + da
      b_i = jnp.asarray(node[_B], jnp.float32) + db
      # ||A B||_F^2 = sum((A^T A) * (B B^T)): r x r Gram matrices, no [in, out] product.
      ga = jnp.einsum('k...ir,k...is->krs', a_i, a_i)
      gb = jnp.einsum('k...ro,k...so->krs', b_i, b_i)
      s = jnp.sqrt(jnp.maximum(jnp.sum(ga * gb, axis=(1, 2)), 0.0))
      s = jnp.where(valid, s, 0.0)
      sa, sb, st = sums[i]
      out[i] = (sa + jnp.tensordot(s, a_i, axes=1), sb + jnp.tensordot(s, b_i, axes=1),
                st + jnp.sum(s))
    return mean.accumulate(macc, updates, weights), out

  def finalize(acc, params):
    macc, sums = acc
    delta, info = mean.finalize(macc)
    smallest = jnp.asarray(jnp.inf, jnp.float32)
    for i, path in enumerate(lora_pair_paths(params)):
      sa, sb, st = sums[i]
      node, pnode = _get(delta, path), _get(params, path)
      ok = st > 0
      safe = jnp.where(ok, st, 1.0)
      for name, total in ((_A, sa), (_B, sb)):
        new = total / safe - jnp.asarray(pnode[name], jnp.float32)
        node[name] = jnp.where(ok, new, node[name]).astype(node[name].dtype)
      smallest = jnp.minimum(smallest, st)
    return delta, dict(info, hetlora_norm_sum=jnp.where(jnp.isfinite(smallest), smallest, 0.0))

  return streaming(zero, accumulate, finalize, name='hetlora')
