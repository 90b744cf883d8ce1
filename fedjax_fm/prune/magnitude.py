"""Server-side global magnitude pruning, its schedule, and prune-and-regrow.

The server keeps a boolean mask per parameter (``True`` = kept). Eligible
leaves are float tensors with ``ndim >= 2`` and at least ``min_size`` elements;
biases, norms and small tensors are never pruned (their mask is all ``True``).
Pruning is global: one magnitude threshold over all eligible leaves, so layers
end up with different sparsities. Everything is pure ``jnp`` and jit-able; the
target sparsity may be a traced value (e.g. the schedule at a traced round).

A changed mask must reach the clients: :func:`mask_nbytes` counts it at 1 bit
per element (bit-packed in uint32 words, :func:`pack_masks`).

References:
  Zhu & Gupta 2017, "To prune, or not to prune: exploring the efficacy of
  pruning for model compression", https://arxiv.org/abs/1710.01878 (gradual
  polynomial schedule).
  Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
  Networks", https://arxiv.org/abs/1506.02626 (magnitude pruning).
  Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners",
  https://arxiv.org/abs/1911.11134 (drop and regrow, regrown weights at zero).
  Jiang et al. 2022, "Model Pruning Enables Efficient Federated Learning on
  Edge Devices" (PruneFL), https://arxiv.org/abs/1909.12326.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.compress import bitpack

DEFAULT_MIN_SIZE = 256


def _eligible(x, min_size: int) -> bool:
  return (x.ndim >= 2 and int(np.prod(x.shape, dtype=np.int64)) >= min_size
          and bool(jnp.issubdtype(x.dtype, jnp.floating)))


def _check_min_size(min_size):
  if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
    raise ValueError(f'min_size must be an int >= 1, got {min_size!r}')
  return int(min_size)


def _check_sparsity(sparsity, name='sparsity'):
  if isinstance(sparsity, (int, float, np.number)) and not isinstance(sparsity, bool):
    if not 0.0 <= float(sparsity) < 1.0:
      raise ValueError(f'{name} must be in [0, 1), got {sparsity!r}')


def global_magnitude_masks(params, sparsity, *, min_size: int = DEFAULT_MIN_SIZE):
  """Masks keeping the largest-magnitude weights over all eligible leaves.

  Exactly ``floor(sparsity * N)`` of the ``N`` eligible weights are pruned
  (ties broken by position), so the achieved sparsity matches the target up to
  rounding.

  Args:
    params: pytree of arrays.
    sparsity: fraction of the eligible weights to prune, in [0, 1); may be traced.
    min_size: leaves with fewer elements (or ``ndim < 2``) are never pruned.

  Returns:
    A pytree of bool arrays shaped like ``params``.
  """
  _check_sparsity(sparsity)
  min_size = _check_min_size(min_size)
  leaves, treedef = jax.tree.flatten(params)
  eligible = [i for i, x in enumerate(leaves) if _eligible(x, min_size)]
  masks = [jnp.ones(x.shape, bool) for x in leaves]
  if eligible:
    mags = jnp.concatenate([jnp.abs(leaves[i]).reshape(-1).astype(jnp.float32)
                            for i in eligible])
    total = mags.shape[0]
    num_pruned = jnp.floor(jnp.asarray(sparsity, jnp.float32) * total).astype(jnp.int32)
    order = jnp.argsort(mags, stable=True)
    keep = jnp.zeros((total,), bool).at[order].set(jnp.arange(total) >= num_pruned)
    offset = 0
    for i in eligible:
      size = leaves[i].size
      masks[i] = keep[offset:offset + size].reshape(leaves[i].shape)
      offset += size
  return treedef.unflatten(masks)


def polynomial_schedule(initial: float, final: float, begin_round: int, end_round: int,
                        power: float = 3):
  """Gradual pruning schedule of Zhu & Gupta (2017).

  ``s(t) = final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power``
  for ``begin <= t <= end``; ``initial`` before ``begin``, ``final`` after ``end``.

  Args:
    initial: sparsity at ``begin_round``, in [0, 1).
    final: sparsity from ``end_round`` on, in [0, 1).
    begin_round: first round of the ramp.
    end_round: last round of the ramp, > ``begin_round``.
    power: exponent (3 in the paper), > 0.

  Returns:
    ``fn(round) -> sparsity`` (float32; jit-able, round may be traced).
  """
  _check_sparsity(initial, 'initial')
  _check_sparsity(final, 'final')
  if not (isinstance(begin_round, (int, np.integer)) and isinstance(end_round, (int, np.integer))
          and 0 <= begin_round < end_round):
    raise ValueError(f'need ints 0 <= begin_round < end_round, got begin_round={begin_round!r}, '
                     f'end_round={end_round!r}')
  if not power > 0:
    raise ValueError(f'power must be > 0, got {power!r}')

  def schedule(round_):
    t = jnp.asarray(round_, jnp.float32)
    progress = jnp.clip((t - begin_round) / (end_round - begin_round), 0.0, 1.0)
    return jnp.float32(final) + jnp.float32(initial - final) * (1.0 - progress) ** power

  return schedule


def apply_masks(params, masks):
  """Zeroes the pruned weights: ``where(mask, param, 0)`` per leaf."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def mask_updates(grads, masks):
  """Zeroes updates (gradients, deltas) of pruned weights so they stay zero."""
  return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, masks)


def _rank_select(priority, count):
  """Bool mask of the ``count`` entries of smallest ``priority`` (ties by position)."""
  flat = priority.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  chosen = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.shape[0]) < count)
  return chosen.reshape(priority.shape)


def prune_and_regrow(params, masks, scores, regrow_fraction: float):
  """Drops the weakest active weights and regrows as many inactive ones (RigL-style).

  Per leaf: ``n = min(floor(regrow_fraction * active), inactive)``; the ``n``
  active weights of smallest ``|param|`` are pruned and the ``n`` previously
  inactive weights of largest ``|score|`` (e.g. the aggregated update or a
  gradient) are regrown, starting at zero. The number of active weights per
  leaf is unchanged. Leaves whose mask is all ``True`` have ``n = 0``.

  Args:
    params: pytree of arrays.
    masks: bool pytree shaped like ``params``.
    scores: pytree shaped like ``params``; larger ``|score|`` regrows first.
    regrow_fraction: fraction of the active weights swapped, in [0, 1]; may be traced.

  Returns:
    ``(params, masks)`` after the swap; pruned and regrown weights are 0.
  """
  if isinstance(regrow_fraction, (int, float, np.number)) and not 0.0 <= regrow_fraction <= 1.0:
    raise ValueError(f'regrow_fraction must be in [0, 1], got {regrow_fraction!r}')

  def leaf(p, m, s):
    active = jnp.sum(m.astype(jnp.int32))
    inactive = m.size - active
    n = jnp.minimum(jnp.floor(regrow_fraction * active.astype(jnp.float32)).astype(jnp.int32),
                    inactive)
    mag = jnp.abs(p.astype(jnp.float32))
    drop = _rank_select(jnp.where(m, mag, jnp.inf), n) & m
    grow = _rank_select(jnp.where(m, jnp.inf, -jnp.abs(s.astype(jnp.float32))), n) & ~m
    new_mask = (m & ~drop) | grow
    new_p = jnp.where(new_mask & ~grow, p, jnp.zeros_like(p))
    return new_p, new_mask

  leaves_p, treedef = jax.tree.flatten(params)
  out = [leaf(p, m, s) for p, m, s in zip(leaves_p, treedef.flatten_up_to(masks),
                                           treedef.flatten_up_to(scores))]
  return treedef.unflatten([o[0] for o in out]), treedef.unflatten([o[1] for o in out])


def pack_masks(masks):
  """Masks as bit-packed uint32 words (1 bit per element): what goes downlink."""
  return jax.tree.map(lambda m: bitpack.pack_bits(m.reshape(-1).astype(jnp.uint32), 1), masks)


def mask_nbytes(masks) -> int:
  """Downlink bytes of the masks at 1 bit per element (``4 * ceil(size / 32)`` per leaf)."""
  return sum(4 * bitpack.num_words(int(np.prod(m.shape, dtype=np.int64)), 1)
             for m in jax.tree.leaves(masks))


def masks_changed(old, new):
  """Scalar bool array: whether any element of any mask differs."""
  diffs = [jnp.any(a != b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))]
  return jnp.any(jnp.stack(diffs)) if diffs else jnp.array(False)


def sparsity_of(masks, params=None, *, min_size: int = DEFAULT_MIN_SIZE):
  """Fraction of pruned elements over the eligible leaves (all leaves if no params)."""
  ms = jax.tree.leaves(masks)
  if params is not None:
    ms = [m for m, p in zip(ms, jax.tree.leaves(params)) if _eligible(p, min_size)]
  total = sum(m.size for m in ms)
  if not total:
    return jnp.float32(0.0)
  return sum(jnp.sum(~m) for m in ms).astype(jnp.float32) / total
