"""Server-side aggregation of LoRA factors in a federated round.

Clients train LoRA pairs ``lora_a`` ``[in, r]`` and ``lora_b`` ``[r, out]``
(siblings in the trainable pure dict; our layer computes ``x @ A @ B``, so the
adapted weight is ``W + s A B`` with ``s = alpha / r``) and send deltas
``dA_i = A_i - A``, ``dB_i = B_i - B`` relative to the global pair ``(A, B)``.
Averaging the factors separately (FedIT) is *not* the average of the clients'
weight updates: ``mean_i(A_i B_i) != mean(A_i) mean(B_i)``. The modes here
trade exactness, communication and engine support:

========  ==================================  ==================  ====================
mode      server result                       exact mean of AB?   accumulator per pair
========  ==================================  ==================  ====================
fedit     ``mean(A_i)``, ``mean(B_i)``        no                  ``[in, P]`` probes
ffa       A frozen (shared), ``mean(B_i)``    yes                 none
product   rank-r SVD of ``mean(A_i B_i)``     if rank <= r        ``[in, out]``
stack     ``mean(A_i B_i)`` merged into W     yes (any rank)      ``[in, out]``
========  ==================================  ==================  ====================

Every mode is a *streaming* :class:`~fedjax_fm.aggregate.Aggregator`: the
server's memory does not grow with the number of clients per round, so the
``chunked`` and ``sharded`` strategies keep their memory bound. Leaves outside
LoRA pairs (e.g. a classifier head) are always averaged with the weights.
Clients with weight ``<= 0`` are ignored (their content, NaNs included, never
reaches the result); with no valid client the aggregate is zero. Each mode
reports ``lora_aggregation_error`` (``sum_pairs ||mean_i(A_i B_i) - A'B'||_F``)
in its ``info``: a random-probe estimate with a standard error for ``fedit``,
exact for the others.

Engine wiring: ``build_round(..., aggregator=lora_aggregator(mode, ...))``.
The delta is applied by the server optimizer; ``product`` and ``stack`` land on
the intended factors only with FedAvg at server learning rate 1 (the config
validation enforces it). For ``ffa`` first call ``split = freeze_lora_a(split)``
so ``lora_a`` sits in the frozen dict. ``stack`` moves the frozen base: a
fixed-shape round cannot grow the rank to ``sum_i r_i``, so the exact mean
product is merged into the base weights (FLoRA's "merge and re-initialise"):
the round keeps the merged total in ``ServerState.base_delta`` and clients
train on ``merge_into_base(frozen, base_delta, alpha / rank)``.

Heterogeneous client ranks are zero-padded to a common ``r`` and described by
a ``[C, r]`` mask (:func:`rank_mask`, passed as ``rank_mask=`` to
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

import functools
import inspect
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.aggregate.base import Aggregator
from fedjax_fm.aggregate.base import BaseMerge
from fedjax_fm.aggregate.base import streaming
from fedjax_fm.aggregate.mean import weighted_mean
from fedjax_fm.stacking import STACKED
from fedjax_fm.stacking import canonical_path
from fedjax_fm.peft.split import Split

__all__ = [
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
_ERROR_MODES = ('probe', 'exact', 'none')


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
  return balanced_factors(u, s, vt, rank)


def balanced_factors(u, s, vt, rank):
  """``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T`` from an SVD, zero-padded to ``rank``."""
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
# Aggregators (streaming: memory flat in the number of clients).


def _pair_leaves(params):
  """``[(path, A [in, r], B [r, out])]`` of the trainable tree's LoRA pairs.

  In a tree whose layers are stacked (`fedjax_fm.stacking`: a path through
  `fedjax_fm.stacking.STACKED`), ``A [L, in, r]`` and ``B [L, r, out]`` hold
  the ``L`` layers' pairs.
  """
  return [(path, _get(params, path)[_A], _get(params, path)[_B])
          for path in lora_pair_paths(params)]


def _client_factors(params, updates, path, valid):
  """Clients' local factors ``A_i [K, in, r]``, ``B_i [K, r, out]`` (f32, invalid: 0)."""
  p, u = _get(params, path), _get(updates, path)
  a_i = jnp.asarray(p[_A], jnp.float32) + u[_A].astype(jnp.float32)
  b_i = jnp.asarray(p[_B], jnp.float32) + u[_B].astype(jnp.float32)
  a_i = jnp.where(_bcast(valid, a_i), a_i, 0.0)
  b_i = jnp.where(_bcast(valid, b_i), b_i, 0.0)
  return a_i, b_i


def _valid_weights(weights):
  weights = jnp.asarray(weights, jnp.float32)
  valid = weights > 0
  return valid, jnp.where(valid, weights, 0.0)


@functools.lru_cache(maxsize=None)
def _probe_matrix(path, dout, probes):
  """Fixed Gaussian probes ``Z [out, P]`` of a pair.

  Drawn once on the host from a seed of the pair's path (crc32, not ``hash()``:
  the same probes in every process and on every device), so the round embeds them
  as a constant instead of drawing them again for every chunk.
  """
  seed = zlib.crc32('/'.join(map(str, path)).encode())
  return np.random.default_rng(seed).standard_normal((dout, probes)).astype(np.float32)


def _pair_probes(path, b, probes):
  """`_probe_matrix` of a pair, or ``[L, out, P]``, one per layer, of a stacked pair."""
  if STACKED not in path:
    return _probe_matrix(path, b.shape[-1], probes)
  return np.stack([
      _probe_matrix(canonical_path(path, i), b.shape[-1], probes)
      for i in range(b.shape[0])])


def _pair_norms(m):
  """Frobenius norms of the ``[..., in, out]`` matrices of ``m``."""
  return jnp.sqrt(jnp.sum(jnp.square(m), axis=(-2, -1)))


def _dense_sums(params):
  out = {}
  for path, a, b in _pair_leaves(params):
    _set_in(out, path, jnp.zeros(a.shape[:-1] + b.shape[-1:], jnp.float32))
  return out


def _add_dense(sums, updates, valid, w, params):
  out = {}
  for path, _, _ in _pair_leaves(params):
    a_i, b_i = _client_factors(params, updates, path, valid)
    _set_in(out, path, _get(sums, path) + jnp.einsum('k,k...ir,k...ro->...io', w, a_i, b_i))
  return out


def _finalize_mean_products(mean, acc):
  """``(mean delta, info, {pair path: mean_i(A_i B_i)}, total weight)`` of an accumulator
  of `_mean_and_dense_products` (the product means are 0 when no client is valid)."""
  macc, sums = acc
  out, info = mean.finalize(macc)
  wsum = info['total_weight']
  safe = jnp.where(wsum > 0, wsum, 1.0)
  products = jax.tree.map(lambda x: jnp.where(wsum > 0, x / safe, 0.0), sums)
  return out, info, products, wsum


def _mean_and_dense_products(mean):
  """``zero`` and ``accumulate`` of (the weighted mean, dense ``sum_i w_i A_i B_i``)."""

  def zero(params):
    return mean.zero(params), _dense_sums(params)

  def accumulate(acc, updates, weights, params):
    macc, sums = acc
    valid, w = _valid_weights(weights)
    return (mean.accumulate(macc, updates, weights),
            _add_dense(sums, updates, valid, w, params))

  return zero, accumulate


def fedit(error: str = 'probe', probes: int = 16) -> Aggregator:
  """FedIT: weighted mean of ``lora_a`` and ``lora_b`` separately.

  The delta is the weighted mean of every trainable leaf, streamed (chunked,
  sharded). Its distance from the exact mean of the clients' products,
  ``sum_pairs ||mean_i(A_i B_i) - mean(A_i) mean(B_i)||_F``
  (:func:`aggregation_error`), is reported in ``info`` without collecting the
  clients:

  * ``error='probe'``: an unbiased random-probe estimate. With fixed Gaussian
    probes ``Z [out, P]`` the accumulator keeps ``sum_i w_i A_i (B_i Z)``
    (``[in, P]`` per pair); at the end ``||M z_p||^2`` estimates ``||M||_F^2``
    (Hutchinson), reported as ``lora_aggregation_error`` with its standard error
    ``lora_aggregation_error_se`` (delta method, summed over pairs).
  * ``error='exact'``: dense ``sum_i w_i A_i B_i`` accumulators (``[in, out]``
    per pair; memory of the adapted kernels, still flat in clients).
  * ``error='none'``: nothing beyond the mean.

  Args:
    error: ``'probe'``, ``'exact'`` or ``'none'``.
    probes: number of probe vectors ``P`` for ``'probe'``.

  Returns:
    A streaming :class:`~fedjax_fm.aggregate.Aggregator`.
  """
  if error not in _ERROR_MODES:
    raise ValueError(f'error must be one of {_ERROR_MODES}, got {error!r}')
  if not isinstance(probes, int) or probes < 2:
    raise ValueError(f'probes must be an int >= 2, got {probes!r}')
  mean = weighted_mean()

  def zero(params):
    if error == 'none':
      return mean.zero(params), {}
    if error == 'exact':
      return mean.zero(params), _dense_sums(params)
    sums = {}
    for path, a, _ in _pair_leaves(params):
      _set_in(sums, path, jnp.zeros(a.shape[:-1] + (probes,), jnp.float32))
    return mean.zero(params), sums

  def accumulate(acc, updates, weights, params):
    macc, sums = acc
    macc = mean.accumulate(macc, updates, weights)
    if error == 'none':
      return macc, sums
    valid, w = _valid_weights(weights)
    if error == 'exact':
      return macc, _add_dense(sums, updates, valid, w, params)
    out = {}
    for path, _, b in _pair_leaves(params):
      a_i, b_i = _client_factors(params, updates, path, valid)
      z = _pair_probes(path, b, probes)
      _set_in(out, path, _get(sums, path) + jnp.einsum(
          'k,k...ir,k...rp->...ip', w, a_i, jnp.einsum('k...ro,...op->k...rp', b_i, z)))
    return macc, out

  def finalize(acc, params):
    macc, sums = acc
    delta, info = mean.finalize(macc)
    if error == 'none':
      return delta, info
    wsum = info['total_weight']
    safe = jnp.where(wsum > 0, wsum, 1.0)
    err = jnp.zeros((), jnp.float32)
    se = jnp.zeros((), jnp.float32)
    for path, a, b in _pair_leaves(params):
      node = _get(delta, path)
      a_new = jnp.asarray(a, jnp.float32) + node[_A]
      b_new = jnp.asarray(b, jnp.float32) + node[_B]
      if error == 'exact':   # (stacked layers: a norm per layer)
        m = _get(sums, path) / safe - a_new @ b_new
        err = err + jnp.where(wsum > 0, jnp.sum(_pair_norms(m)), 0.0)
        continue
      z = _pair_probes(path, b, probes)
      mz = _get(sums, path) / safe - a_new @ (b_new @ z)
      sq = jnp.sum(jnp.square(mz), axis=-2)                # [..., P]: ||M z_p||^2
      est = jnp.mean(sq, axis=-1)
      est_se = jnp.std(sq, axis=-1, ddof=1) / jnp.sqrt(float(probes))
      root = jnp.sqrt(jnp.maximum(est, 0.0))
      err = err + jnp.where(wsum > 0, jnp.sum(root), 0.0)
      se = se + jnp.where(wsum > 0, jnp.sum(est_se / (2.0 * jnp.maximum(root, 1e-30))), 0.0)
    info = dict(info, lora_aggregation_error=err)
    if error == 'probe':
      info['lora_aggregation_error_se'] = se
    return delta, info

  # Element-wise means; the error terms take stacked layers pair by pair.
  return streaming(zero, accumulate, finalize, name='fedit', leafwise=True)


def _has_key(tree: Any, name: str) -> bool:
  if isinstance(tree, Mapping):
    return any(k == name or _has_key(v, name) for k, v in tree.items())
  return False


def ffa() -> Aggregator:
  """FFA-LoRA: weighted mean of ``lora_b`` with ``lora_a`` frozen.

  With ``A`` shared and fixed, ``mean_i(A B_i) = A mean_i(B_i)``: averaging
  ``B`` is the exact average of the products (``lora_aggregation_error`` is 0).
  Use :func:`freeze_lora_a` on the split first; ``zero`` raises otherwise.

  Returns:
    A streaming :class:`~fedjax_fm.aggregate.Aggregator`.
  """
  mean = weighted_mean()

  def zero(params):
    if _has_key(params, _A):
      raise ValueError(
          "lora aggregation mode 'ffa' needs lora_a frozen; call "
          'split = peft.freeze_lora_a(split) before building the round.'
      )
    if not _has_key(params, _B):
      raise ValueError(
          "lora aggregation mode 'ffa' found no lora_b in the trainable params"
      )
    return mean.zero(params)

  def finalize(acc, params=None):
    delta, info = mean.finalize(acc)
    return delta, dict(info, lora_aggregation_error=jnp.zeros((), jnp.float32))

  return streaming(zero, mean.accumulate, finalize, name='ffa', leafwise=True)


def _dense_factors(m, rank):
  """Balanced rank-``rank`` factors of dense ``m [..., in, out]`` (truncated SVD)."""
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  return balanced_factors(u, s, vt, rank)


def product() -> Aggregator:
  """Exact product averaging re-factorised to rank ``r`` by truncated SVD.

  The accumulator keeps, per pair, the dense ``sum_i w_i A_i B_i`` (``[in, out]``,
  flat in the number of clients). At the end the server forms
  ``M = mean_i(A_i B_i)`` and returns the delta to ``A' = U_r sqrt(S_r)``,
  ``B' = sqrt(S_r) V_r^T`` (``M = U S V^T``), so FedAvg at learning rate 1 lands
  exactly on ``(A', B')``: ``A' B' = M`` when ``rank(M) <= r``, else its best
  rank-r approximation, whose distance ``||M - A'B'||_F`` (summed over pairs) is
  reported exactly as ``lora_aggregation_error``. Pairs of the same shape are
  factorised in one batched SVD.

  Returns:
    A streaming :class:`~fedjax_fm.aggregate.Aggregator`.
  """
  mean = weighted_mean()
  zero, accumulate = _mean_and_dense_products(mean)

  def finalize(acc, params):
    out, info, products, wsum = _finalize_mean_products(mean, acc)
    pairs = _pair_leaves(params)
    groups: dict[Any, list[int]] = {}
    for i, (_, a, b) in enumerate(pairs):
      groups.setdefault((a.shape, b.shape), []).append(i)
    err = jnp.zeros((), jnp.float32)
    for (a_shape, _), idx in groups.items():
      ms = jnp.stack([_get(products, pairs[i][0]) for i in idx])
      new_a, new_b = _dense_factors(ms, a_shape[-1])
      err = err + jnp.sum(jnp.linalg.norm(ms - new_a @ new_b, axis=(-2, -1)))
      for j, i in enumerate(idx):
        path, a, b = pairs[i]
        node = _get(out, path)
        for name, new, old in ((_A, new_a[j], a), (_B, new_b[j], b)):
          node[name] = jnp.where(wsum > 0, new - jnp.asarray(old, jnp.float32), 0.0)
    return out, dict(info, lora_aggregation_error=jnp.where(wsum > 0, err, 0.0))

  return streaming(zero, accumulate, finalize, name='product')


def stack(scaling: float) -> Aggregator:
  """FLoRA-style stacking: the exact product mean merged into the frozen base.

  The accumulator keeps, per pair, the dense ``sum_i w_i A_i B_i`` (flat in the
  number of clients); at the end ``info['base_delta']`` holds
  ``M = mean_i(A_i B_i)`` and the delta averages the non-LoRA leaves, leaves
  ``lora_a`` and resets ``lora_b`` to zero (delta ``-B``). The round adds ``M``
  to ``ServerState.base_delta`` and clients train on
  ``W + scaling * base_delta`` (:func:`merge_into_base`, inside the compiled
  round, so a checkpoint of the state resumes bit-identically): the adapted
  weight after the round is the exact weighted mean of the clients' adapted
  weights, whatever the rank. When no client is valid nothing changes.

  Args:
    scaling: the LoRA scaling ``alpha / rank`` of the layers.

  Returns:
    A streaming :class:`~fedjax_fm.aggregate.Aggregator` with a ``base``
    (:class:`~fedjax_fm.aggregate.BaseMerge`).
  """
  mean = weighted_mean()
  zero, accumulate = _mean_and_dense_products(mean)

  def finalize(acc, params):
    out, info, products, wsum = _finalize_mean_products(mean, acc)
    base_delta = {}
    for path, _, b in _pair_leaves(params):
      node = _get(out, path)
      node[_A] = jnp.zeros_like(node[_A])
      node[_B] = jnp.where(wsum > 0, -jnp.asarray(b, jnp.float32), 0.0)
      _set_in(base_delta, path, _get(products, path))
    return out, dict(info, base_delta=base_delta)

  def merge(frozen, base_delta):
    return merge_into_base(frozen, base_delta, scaling=scaling)

  return streaming(zero, accumulate, finalize, name='stack',
                   base=BaseMerge(init=_dense_sums, apply=merge))


_FACTORIES = {'fedit': fedit, 'ffa': ffa, 'product': product, 'stack': stack}


def lora_aggregator(mode: str, **kwargs: Any) -> Aggregator:
  """Builds the aggregator of a LoRA aggregation mode.

  Args:
    mode: one of :data:`MODES` (``'fedit'``, ``'ffa'``, ``'product'``,
      ``'stack'``).
    **kwargs: options of the mode's factory (``fedit``: ``error``, ``probes``;
      ``stack``: ``scaling``).

  Returns:
    A streaming :class:`~fedjax_fm.aggregate.Aggregator`.

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
