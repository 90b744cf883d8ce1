"""Server-side aggregation of LoRA factors in a federated round.

Clients train LoRA pairs ``lora_a`` ``[in, r]`` and ``lora_b`` ``[r, out]``
(siblings in the trainable pure dict; our layer computes ``x @ A @ B``, so the
adapted weight is ``W + s A B`` with ``s = alpha / r``) and send deltas
``dA_i = A_i - A``, ``dB_i = B_i - B`` relative to the global pair ``(A, B)``.
Averaging the factors separately (FedIT) is *not* the average of the clients'
weight updates: ``mean_i(A_i B_i) != mean(A_i) mean(B_i)``. The modes here
trade exactness, communication and engine support:

========  ==================================  ==================  ================
mode      server result                       exact mean of AB?   contract
========  ==================================  ==================  ================
fedit     ``mean(A_i)``, ``mean(B_i)``        no                  streaming
ffa       A frozen (shared), ``mean(B_i)``    yes                 streaming
product   rank-r SVD of ``mean(A_i B_i)``     if rank <= r        stacked + params
stack     ``mean(A_i B_i)`` merged into W     yes (any rank)      stacked + params
========  ==================================  ==================  ================

Leaves outside LoRA pairs (e.g. a classifier head) are always averaged with
the weights. Clients with weight ``<= 0`` are ignored (their content, NaNs
included, never reaches the result); with no valid client the aggregate is
zero.

Engine wiring (``fedjax_fm/engine/round.py``):

* ``fedit``, ``ffa``: :class:`~fedjax_fm.aggregate.StreamingAggregator`; pass
  as ``build_round(..., aggregator=lora_aggregator('fedit'))``; works with every
  strategy and server optimizer. For ``ffa`` first call
  ``split = freeze_lora_a(split)`` so ``lora_a`` sits in the frozen dict.
* ``product``, ``stack``: :class:`LoRAAggregator` whose
  ``aggregate(updates, weights, params)`` also needs the current global
  trainable params (the deltas alone do not determine the products). The
  stacked branch of ``apply`` must call::

    if getattr(aggregator, 'needs_params', False):
      mean_delta = aggregator.aggregate(updates, weights, state.params)
    else:
      mean_delta = aggregator.aggregate(updates, weights)

  The result is a delta: with FedAvg at server learning rate 1
  (``optax.sgd(1.0)``) the new params are exactly the intended ones; other
  server optimizers move towards them.
* ``stack`` additionally changes the frozen base, which the round currently
  treats as a constant input. A fixed-shape round cannot grow the rank to
  ``sum_i r_i``, so the stacked modules are multiplied out and merged into the
  base weights instead (FLoRA's "merge and re-initialise"). ``apply`` must
  then return the new frozen dict (e.g. carry ``frozen`` in the server
  state)::

    delta_w = aggregator.products(updates, weights, state.params)
    frozen = merge_into_base(frozen, delta_w, scaling=alpha / rank)
    # aggregator.aggregate resets lora_b to 0 (delta -B), so that
    # W' + s A B' = W + s mean_i(A_i B_i) exactly.

  Heterogeneous client ranks are zero-padded to a common ``r`` and described
  by a ``[C, r]`` mask (:func:`rank_mask`, passed as ``rank_mask=`` to
  :func:`stack_products`); the clients must then keep their padded rank
  components at zero (e.g. mask their optimizer updates).

References:
  * Zhang, Vahidian, Kuo, Li, Ruan, Zhang, Chen, Chen 2023, "Towards Building
    the Federated GPT: Federated Instruction Tuning" (FedIT),
    https://arxiv.org/abs/2305.05644
  * Sun, Li, Ding, Huang, Pan 2024, "Improving LoRA in Privacy-preserving
    Federated Learning" (FFA-LoRA), https://arxiv.org/abs/2403.12313
  * Wang, Shen, Wu, Tang, Zhou, Tang, Hu, Zhu 2024, "FLoRA: Federated
    Fine-Tuning Large Language Models with Heterogeneous Low-Rank
    Adaptations", https://arxiv.org/abs/2409.05976
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_fm.aggregate.base import StreamingAggregator
from fedjax_fm.aggregate.mean import weighted_mean
from fedjax_fm.peft.split import Split

__all__ = [
    'LoRAAggregator',
    'MODES',
    'aggregation_error',
    'fedit',
    'ffa',
    'freeze_lora_a',
    'lora_aggregator',
    'lora_pair_paths',
    'low_rank_factors',
    'mean_lora_product',
    'merge_into_base',
    'product',
    'rank_mask',
    'stack',
    'stack_factors',
    'stack_products',
]

MODES = ('fedit', 'ffa', 'product', 'stack')
_A, _B = 'lora_a', 'lora_b'
_SVD_METHODS = ('auto', 'dense', 'qr')


class LoRAAggregator(NamedTuple):
  """A stacked aggregator that also reads the global trainable params.

  Attributes:
    aggregate: ``aggregate(updates, weights, params) -> delta tree``; updates
      are stacked ``[C, ...]`` deltas, weights ``[C]``, params the current
      global trainable tree. The result has the structure of ``params``.
    needs_params: always ``True``; tells the engine to pass ``params``.
    products: for ``stack`` only, ``products(updates, weights, params) ->``
      dense ``mean_i(A_i B_i)`` per pair (see :func:`stack_products`), to be
      merged into the frozen base with :func:`merge_into_base`.
  """

  aggregate: Callable[[Any, jax.Array, Any], Any]
  needs_params: bool = True
  products: Callable[[Any, jax.Array, Any], Any] | None = None


# --------------------------------------------------------------------------
# Pure-dict helpers.


def _is_pair(node: Any, frozen_node: Any = None) -> bool:
  if not isinstance(node, Mapping) or _B not in node:
    return False
  return _A in node or (isinstance(frozen_node, Mapping) and _A in frozen_node)


def _child(node: Any, key: Any) -> Any:
  return node.get(key) if isinstance(node, Mapping) else None


def lora_pair_paths(tree: Any, frozen: Any = None) -> list[tuple[Any, ...]]:
  """Paths of the LoRA pairs of a pure dict, in traversal order.

  A pair is a dict holding ``lora_b`` and ``lora_a``; with ``frozen`` given,
  ``lora_a`` may instead sit at the same path in the frozen dict (FFA-LoRA).
  """
  out = []

  def walk(node, fnode, path):
    if not isinstance(node, Mapping):
      return
    if _is_pair(node, fnode):
      out.append(path)
    for key, value in node.items():
      if key in (_A, _B):
        continue
      walk(value, _child(fnode, key), path + (key,))

  walk(tree, frozen, ())
  return out


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _copy_dicts(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _set_in(tree: dict, path: tuple[Any, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _dotted(path: tuple[Any, ...]) -> str:
  return '.'.join(str(p) for p in path)


def freeze_lora_a(split: Split) -> Split:
  """Moves every ``lora_a`` from the trainable to the frozen dict (FFA-LoRA).

  FFA-LoRA keeps ``A`` at its shared random initialisation and trains only
  ``B``; the product of the averaged ``B`` with the common ``A`` is then the
  exact average of the clients' products. The graphdef is unchanged
  (``nnx.merge`` accepts a variable from either dict).

  Args:
    split: a ``peft.Split`` (e.g. from ``split_model(model, 'lora')``).

  Returns:
    A new :class:`~fedjax_fm.peft.Split`; the input is not modified.

  Raises:
    ValueError: if the trainable dict has no ``lora_a``.
  """
  trainable = _copy_dicts(split.trainable)
  frozen = _copy_dicts(split.frozen)
  paths = lora_pair_paths(trainable)
  if not paths:
    raise ValueError(
        'freeze_lora_a found no LoRA pair (lora_a/lora_b) in the trainable '
        "dict; use split_model(model, 'lora') after apply_lora."
    )
  for path in paths:
    node = _get(trainable, path)
    _set_in(frozen, path + (_A,), node.pop(_A))
  return Split(split.graphdef, trainable, frozen)


def rank_mask(ranks: Any, max_rank: int) -> jax.Array:
  """``[C, max_rank]`` float mask, 1 on the first ``ranks[i]`` components.

  Args:
    ranks: ``[C]`` int ranks of the clients (``0 <= ranks[i] <= max_rank``).
    max_rank: the padded rank ``r`` of the LoRA factors.
  """
  if not isinstance(max_rank, int) or max_rank < 1:
    raise ValueError(f'max_rank must be an int >= 1, got {max_rank!r}')
  ranks = jnp.asarray(ranks)
  return (jnp.arange(max_rank)[None, :] < ranks[:, None]).astype(jnp.float32)


# --------------------------------------------------------------------------
# Numerics.


def _normalized_weights(weights):
  weights = jnp.asarray(weights, jnp.float32)
  valid = weights > 0
  w = jnp.where(valid, weights, 0.0)
  total = jnp.sum(w)
  return valid, w / jnp.where(total > 0, total, 1.0), total


def _bcast(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _weighted_mean_leaf(u, valid, wn):
  u32 = jnp.where(_bcast(valid, u), u.astype(jnp.float32), 0.0)
  return jnp.tensordot(wn, u32, axes=1)


def _mean_tree(updates, valid, wn):
  return jax.tree.map(
      lambda u: _weighted_mean_leaf(u, valid, wn).astype(u.dtype), updates
  )


class _Pair(NamedTuple):
  path: tuple[Any, ...]
  a: jax.Array          # global A [in, r] (float32)
  b: jax.Array          # global B [r, out] (float32)
  da: jax.Array | None  # client deltas [C, in, r] or None (A frozen)
  db: jax.Array         # [C, r, out]


def _pairs(updates, params, frozen):
  out = []
  for path in lora_pair_paths(params, frozen):
    pnode = _get(params, path)
    unode = _get(updates, path)
    if _A in pnode:
      a = pnode[_A]
      da = unode[_A]
    else:
      a = _get(frozen, path)[_A]
      da = unode.get(_A) if isinstance(unode, Mapping) else None
    out.append(_Pair(
        path, jnp.asarray(a, jnp.float32),
        jnp.asarray(pnode[_B], jnp.float32),
        None if da is None else jnp.asarray(da),
        jnp.asarray(unode[_B]),
    ))
  return out


def _stacked_factors(pair: _Pair, valid, wn, mask=None):
  """``P [in, C r]``, ``Q [C r, out]`` with ``P @ Q = sum_i wn_i A_i m_i B_i``."""
  c = pair.db.shape[0]
  a_i = jnp.broadcast_to(pair.a, (c,) + pair.a.shape)
  if pair.da is not None:
    a_i = a_i + pair.da.astype(jnp.float32)
  b_i = pair.b + pair.db.astype(jnp.float32)
  a_i = jnp.where(_bcast(valid, a_i), a_i, 0.0)
  b_i = jnp.where(_bcast(valid, b_i), b_i, 0.0) * wn[:, None, None]
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != (c, a_i.shape[-1]):
      raise ValueError(
          f'rank_mask has shape {mask.shape}; the LoRA pair at '
          f'{_dotted(pair.path)} needs (clients, rank) = '
          f'{(c, a_i.shape[-1])}'
      )
    a_i = a_i * mask[:, None, :]
  _, din, r = a_i.shape
  p = jnp.transpose(a_i, (1, 0, 2)).reshape(din, c * r)
  q = b_i.reshape(c * r, b_i.shape[-1])
  return p, q


def _mean_factors(pair: _Pair, valid, wn):
  """``(mean A_i, mean B_i)`` over the valid clients (FedIT)."""
  a = pair.a
  if pair.da is not None:
    a = a + _weighted_mean_leaf(pair.da, valid, wn)
  return a, pair.b + _weighted_mean_leaf(pair.db, valid, wn)


def low_rank_factors(
    p: jax.Array, q: jax.Array, rank: int, method: str = 'auto'
) -> tuple[jax.Array, jax.Array]:
  """Balanced rank-``rank`` factors of ``p @ q`` by truncated SVD (batched).

  With ``p @ q = U S V^T``, returns ``A = U_r sqrt(S_r)`` and
  ``B = sqrt(S_r) V_r^T``, the best rank-r approximation (Eckart-Young).
  Components beyond the rank of ``p @ q`` come out as zeros.

  Args:
    p: ``[..., m, k]``.
    q: ``[..., k, n]``.
    rank: target rank ``r >= 1`` (padded with zero components if
      ``r > min(m, n)``).
    method: ``'dense'`` (SVD of the ``m x n`` product), ``'qr'`` (QR of both
      factors then an SVD of the ``k x k`` core, cheaper when ``k`` is small)
      or ``'auto'`` (``'qr'`` iff ``k < min(m, n)``).

  Returns:
    ``A [..., m, r]`` and ``B [..., r, n]`` in float32.
  """
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f'rank must be an int >= 1, got {rank!r}')
  if method not in _SVD_METHODS:
    raise ValueError(f'method must be one of {_SVD_METHODS}, got {method!r}')
  p = jnp.asarray(p, jnp.float32)
  q = jnp.asarray(q, jnp.float32)
  m, k = p.shape[-2:]
  n = q.shape[-1]
  if method == 'auto':
    method = 'qr' if k < min(m, n) else 'dense'
  t = lambda x: jnp.swapaxes(x, -1, -2)
  if method == 'qr':
    qp, rp = jnp.linalg.qr(p)        # [m, k'], [k', k]
    qq, rq = jnp.linalg.qr(t(q))     # [n, k'], [k', k]
    u, s, vt = jnp.linalg.svd(rp @ t(rq), full_matrices=False)
    u, vt = qp @ u, vt @ t(qq)
  else:
    u, s, vt = jnp.linalg.svd(p @ q, full_matrices=False)
  return _balanced(u, s, vt, rank)


def _balanced(u, s, vt, rank):
  kept = min(rank, s.shape[-1])
  root = jnp.sqrt(jnp.maximum(s[..., :kept], 0.0))
  a = u[..., :, :kept] * root[..., None, :]
  b = root[..., :, None] * vt[..., :kept, :]
  if kept < rank:
    pad = rank - kept
    a = jnp.concatenate(
        [a, jnp.zeros(a.shape[:-1] + (pad,), a.dtype)], axis=-1)
    b = jnp.concatenate(
        [b, jnp.zeros(b.shape[:-2] + (pad, b.shape[-1]), b.dtype)], axis=-2)
  return a, b


# --------------------------------------------------------------------------
# Public functions.


def mean_lora_product(
    updates: Any,
    weights: jax.Array,
    params: Any,
    *,
    rank_mask: jax.Array | None = None,
    frozen: Any = None,
) -> dict:
  """Exact weighted mean of the clients' products, ``mean_i(A_i B_i)``.

  Args:
    updates: stacked client deltas ``[C, ...]`` of the trainable tree.
    weights: ``[C]`` aggregation weights (``<= 0``: ignored).
    params: the global trainable tree (``A``, ``B`` before the round).
    rank_mask: optional ``[C, r]`` mask; client ``i`` contributes
      ``A_i diag(m_i) B_i``.
    frozen: the frozen dict, needed when ``lora_a`` is frozen (FFA-LoRA).

  Returns:
    A nested dict holding, at each pair's path, the dense ``[in, out]``
    float32 mean product (``A B`` when no client is valid).
  """
  valid, wn, total = _normalized_weights(weights)
  out = {}
  for pair in _pairs(updates, params, frozen):
    p, q = _stacked_factors(pair, valid, wn, rank_mask)
    out_w = jnp.where(total > 0, p @ q, pair.a @ pair.b)
    _set_in(out, pair.path, out_w)
  return out


def aggregation_error(
    updates: Any,
    weights: jax.Array,
    params: Any,
    *,
    aggregate: Any = None,
    frozen: Any = None,
) -> jax.Array:
  """``sum_pairs ||mean_i(A_i B_i) - A' B'||_F`` of an aggregation.

  ``A_i = A + dA_i`` and ``B_i = B + dB_i`` are the clients' local factors.
  By default ``(A', B') = (mean A_i, mean B_i)``, the FedIT average, so this is
  how far averaging the factors separately is from averaging the weight
  updates. It is 0 for FFA-LoRA (``dA_i = 0``). With ``aggregate`` (the delta
  tree returned by an aggregator, as applied with server learning rate 1),
  ``A' = A + aggregate.lora_a`` and ``B' = B + aggregate.lora_b`` instead:
  e.g. 0 (up to float error) for ``product`` when ``rank(mean) <= r``.

  Args:
    updates: stacked client deltas ``[C, ...]`` of the trainable tree.
    weights: ``[C]`` weights; clients with weight ``<= 0`` are ignored.
    params: the global trainable tree.
    aggregate: optional aggregate delta tree (structure of ``params``).
    frozen: the frozen dict, needed when ``lora_a`` is frozen.

  Returns:
    A float32 scalar (0 if there are no pairs).
  """
  valid, wn, _ = _normalized_weights(weights)
  err = jnp.zeros((), jnp.float32)
  for pair in _pairs(updates, params, frozen):
    p, q = _stacked_factors(pair, valid, wn)
    if aggregate is None:
      a, b = _mean_factors(pair, valid, wn)
    else:
      node = _get(aggregate, pair.path)
      a = pair.a + (jnp.asarray(node[_A], jnp.float32) if _A in node else 0.0)
      b = pair.b + jnp.asarray(node[_B], jnp.float32)
    err = err + jnp.linalg.norm(p @ q - a @ b)
  return err


def stack_factors(
    updates: Any,
    weights: jax.Array,
    params: Any,
    *,
    rank_mask: jax.Array | None = None,
    frozen: Any = None,
) -> dict:
  """FLoRA stacked modules: ``A_s = [A_1 .. A_C]``, ``B_s = [w_1 B_1; ..]``.

  ``A_s [in, C r] @ B_s [C r, out] = sum_i w_i A_i diag(m_i) B_i`` with the
  normalised weights ``w``: the exact weighted mean of the clients' products,
  of rank up to ``sum_i r_i``. This is what FLoRA sends back to the clients.

  Args:
    updates: stacked client deltas ``[C, ...]``.
    weights: ``[C]`` weights (``<= 0``: ignored, their blocks are zero).
    params: the global trainable tree.
    rank_mask: optional ``[C, r]`` mask for heterogeneous (zero-padded)
      client ranks; see :func:`rank_mask`.
    frozen: the frozen dict, needed when ``lora_a`` is frozen.

  Returns:
    A nested dict with ``{'lora_a': A_s, 'lora_b': B_s}`` at each pair path.
  """
  valid, wn, _ = _normalized_weights(weights)
  out = {}
  for pair in _pairs(updates, params, frozen):
    p, q = _stacked_factors(pair, valid, wn, rank_mask)
    _set_in(out, pair.path, {_A: p, _B: q})
  return out


def stack_products(
    updates: Any,
    weights: jax.Array,
    params: Any,
    *,
    rank_mask: jax.Array | None = None,
    frozen: Any = None,
) -> dict:
  """Dense ``Delta W = A_s @ B_s = mean_i(A_i B_i)`` per LoRA pair (FLoRA).

  Zero for every pair when no client is valid. Merge it into the base with
  :func:`merge_into_base` and reset ``lora_b`` to zero (the ``stack``
  aggregator's delta does this) so that the adapted weight becomes the exact
  weighted mean of the clients' adapted weights.

  Args:
    updates: stacked client deltas ``[C, ...]``.
    weights: ``[C]`` weights.
    params: the global trainable tree.
    rank_mask: optional ``[C, r]`` per-client rank mask.
    frozen: the frozen dict, needed when ``lora_a`` is frozen.

  Returns:
    A nested dict with the float32 ``[in, out]`` product at each pair path.
  """
  _, _, total = _normalized_weights(weights)
  stacked = stack_factors(updates, weights, params, rank_mask=rank_mask,
                          frozen=frozen)
  out = {}
  for path in lora_pair_paths(stacked):
    node = _get(stacked, path)
    _set_in(out, path, jnp.where(total > 0, node[_A] @ node[_B], 0.0))
  return out


def merge_into_base(frozen: Any, delta_w: Any, scaling: Any = 1.0) -> dict:
  """Adds ``scaling * delta_w`` to the base kernels of the LoRA layers.

  Args:
    frozen: the frozen pure dict; the base kernel of the LoRA layer at path
      ``p`` is ``frozen[p]['base']['kernel']`` (``LoRALinear.base``).
    delta_w: nested dict of dense ``[in, out]`` updates at the pair paths (as
      from :func:`stack_products`).
    scaling: the LoRA scaling ``alpha / rank`` (the layer computes
      ``x @ A @ B * scaling``): a float, or a nested dict of floats with the
      structure of ``delta_w``.

  Returns:
    A new frozen dict (the input is not modified); kernels keep their dtype.

  Raises:
    ValueError: if a path of ``delta_w`` has no base kernel in ``frozen``.
  """
  out = _copy_dicts(frozen)
  flat = jax.tree_util.tree_flatten_with_path(delta_w)[0]
  for keypath, dw in flat:
    path = tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in keypath)
    try:
      base = _get(out, path + ('base',))
      kernel = base['kernel']
    except (KeyError, IndexError, TypeError):
      raise ValueError(
          f'merge_into_base: no base kernel at {_dotted(path)}.base.kernel '
          'in the frozen dict'
      ) from None
    s = scaling if not isinstance(scaling, Mapping) else _get(scaling, path)
    if tuple(kernel.shape) != tuple(dw.shape):
      raise ValueError(
          f'merge_into_base: delta_w at {_dotted(path)} has shape '
          f'{tuple(dw.shape)}, the base kernel {tuple(kernel.shape)}'
      )
    base['kernel'] = (
        kernel.astype(jnp.float32) + s * jnp.asarray(dw, jnp.float32)
    ).astype(kernel.dtype)
  return out


# --------------------------------------------------------------------------
# Aggregators.


def fedit() -> StreamingAggregator:
  """FedIT: weighted mean of ``lora_a`` and ``lora_b`` separately.

  Simply the weighted mean of every trainable leaf, so it streams (chunked,
  sharded). Its inexactness is measured by :func:`aggregation_error`.

  Returns:
    A :class:`~fedjax_fm.aggregate.StreamingAggregator`.
  """
  return weighted_mean()


def _has_key(tree: Any, name: str) -> bool:
  if isinstance(tree, Mapping):
    return any(k == name or _has_key(v, name) for k, v in tree.items())
  return False


def ffa() -> StreamingAggregator:
  """FFA-LoRA: weighted mean of ``lora_b`` with ``lora_a`` frozen.

  With ``A`` shared and fixed, ``mean_i(A B_i) = A mean_i(B_i)``: averaging
  ``B`` is the exact average of the products. Use
  :func:`freeze_lora_a` on the split first; ``zero`` raises otherwise.

  Returns:
    A :class:`~fedjax_fm.aggregate.StreamingAggregator`.
  """
  mean = weighted_mean()

  def zero(params_like):
    if _has_key(params_like, _A):
      raise ValueError(
          "lora aggregation mode 'ffa' needs lora_a frozen; call "
          'split = peft.freeze_lora_a(split) before building the round.'
      )
    if not _has_key(params_like, _B):
      raise ValueError(
          "lora aggregation mode 'ffa' found no lora_b in the trainable params"
      )
    return mean.zero(params_like)

  return StreamingAggregator(zero, mean.accumulate, mean.finalize)


def product(method: str = 'auto') -> LoRAAggregator:
  """Exact product averaging re-factorised to rank ``r`` by truncated SVD.

  For each pair the server forms ``M = mean_i(A_i B_i)`` and returns the delta
  to ``A' = U_r sqrt(S_r)``, ``B' = sqrt(S_r) V_r^T`` (``M = U S V^T``), so
  FedAvg at learning rate 1 lands exactly on ``(A', B')``: ``A' B' = M`` when
  ``rank(M) <= r``, else its best rank-r approximation. Pairs of the same
  shape are factorised in one batched SVD.

  Args:
    method: SVD route of :func:`low_rank_factors` (``'auto'``, ``'dense'``,
      ``'qr'``).

  Returns:
    A :class:`LoRAAggregator`.
  """
  if method not in _SVD_METHODS:
    raise ValueError(f'method must be one of {_SVD_METHODS}, got {method!r}')

  def aggregate(updates, weights, params):
    valid, wn, total = _normalized_weights(weights)
    out = _mean_tree(updates, valid, wn)
    pairs = _pairs(updates, params, None)
    groups: dict[Any, list[int]] = {}
    for i, pair in enumerate(pairs):
      groups.setdefault((pair.a.shape, pair.b.shape), []).append(i)
    for (a_shape, _), idx in groups.items():
      ps, qs = zip(*(_stacked_factors(pairs[i], valid, wn) for i in idx))
      new_a, new_b = low_rank_factors(
          jnp.stack(ps), jnp.stack(qs), a_shape[-1], method)
      for j, i in enumerate(idx):
        pair = pairs[i]
        node = _get(out, pair.path)
        for name, new, old in ((_A, new_a[j], pair.a), (_B, new_b[j], pair.b)):
          delta = jnp.where(total > 0, new - old, 0.0)
          node[name] = delta.astype(node[name].dtype)
    return out

  return LoRAAggregator(aggregate)


def stack() -> LoRAAggregator:
  """FLoRA-style stacking: exact product mean merged into the base.

  ``aggregate`` averages the non-LoRA leaves, leaves ``lora_a`` and resets
  ``lora_b`` to zero (delta ``-B``); ``products`` (:func:`stack_products`)
  gives the dense ``mean_i(A_i B_i)`` to merge into the frozen base with
  :func:`merge_into_base` (see the module docstring for the engine wiring).
  When no client is valid nothing changes.

  Returns:
    A :class:`LoRAAggregator` with ``products`` set.
  """

  def aggregate(updates, weights, params):
    valid, wn, total = _normalized_weights(weights)
    out = _mean_tree(updates, valid, wn)
    for path in lora_pair_paths(params):
      node = _get(out, path)
      b = _get(params, path)[_B]
      node[_A] = jnp.zeros_like(node[_A])
      node[_B] = jnp.where(total > 0, -b, 0.0).astype(node[_B].dtype)
    return out

  def products(updates, weights, params, *, rank_mask=None, frozen=None):
    return stack_products(updates, weights, params, rank_mask=rank_mask,
                          frozen=frozen)

  return LoRAAggregator(aggregate, products=products)


_FACTORIES = {'fedit': fedit, 'ffa': ffa, 'product': product, 'stack': stack}


def lora_aggregator(mode: str, **kwargs: Any):
  """Builds the aggregator of a LoRA aggregation mode.

  Args:
    mode: one of :data:`MODES` (``'fedit'``, ``'ffa'``, ``'product'``,
      ``'stack'``).
    **kwargs: options of the mode's factory (``product``: ``method``).

  Returns:
    A ``StreamingAggregator`` (fedit, ffa) or a :class:`LoRAAggregator`
    (product, stack).

  Raises:
    ValueError: for an unknown mode or option.
  """
  if mode not in _FACTORIES:
    raise ValueError(
        f'LoRA aggregation mode must be one of {MODES}, got {mode!r}'
    )
  factory = _FACTORIES[mode]
  allowed = tuple(inspect.signature(factory).parameters)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(
        f'LoRA aggregation mode {mode!r} got unknown options {unknown}; '
        f'allowed: {allowed or "none"}'
    )
  return factory(**kwargs)
