"""The aggregator contract: one interface, two execution kinds.

Every aggregator turns the clients' decoded updates (deltas, stacked on a
leading clients axis) and their weights into one aggregate delta and a dict of
diagnostics, ``(delta, info)``. How it sees the clients is its *kind*:

* **streaming** (sum-decomposable: weighted mean, norm-bounded mean, the LoRA
  modes): the engine folds clients, chunks of clients, or devices into an
  accumulator and finalizes once, so the ``chunked`` and ``sharded`` strategies
  keep memory O(chunk)::

    zero(params) -> acc                                # a pytree whose leaves add (psum)
    accumulate(acc, updates [K, ...], weights [K], params) -> acc
    finalize(acc, params) -> (delta, info)

* **whole-round** (median, trimmed mean, Krum, geometric median, secure sum):
  the rule needs every update at once, so the engine collects ``[C, ...]``
  (memory O(C))::

    aggregate(updates [C, ...], weights [C], params, *, context) -> (delta, info)

  ``context`` (`RoundContext`) carries the round's key and the clients' global
  ids, for rules that need fresh randomness per round (secure aggregation masks).

``params`` is the global trainable tree the clients started from (most rules
ignore it; the LoRA modes need it to form ``A_i = A + dA_i``). Clients with
weight ``<= 0`` never contribute. ``info`` holds scalars (e.g. ``total_weight``)
the round reports as metrics, and, for an aggregator that changes the frozen base
(`BaseMerge`), the increment under ``info['base_delta']``.

`reduce` runs either kind on stacked updates, the same way the engine does.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp


class BaseMerge(NamedTuple):
  """How an aggregator moves the frozen base (FLoRA-style stacking).

  The round keeps ``ServerState.base_delta`` (``init(params)``; accumulated from
  ``info['base_delta']`` each round, inside the compiled round) and clients
  train on ``apply(frozen, base_delta)``.
  """
  init: Callable[[Any], Any]
  apply: Callable[[Any, Any], Any]


class RoundContext(NamedTuple):
  """What a whole-round aggregator may know of the round besides the updates."""
  key: jax.Array          # a key of this round (fresh every round)
  client_id: jax.Array    # int [C]: the clients' global ids


class Aggregator(NamedTuple):
  """An aggregator of either kind (see the module docstring).

  Build one with `streaming` or `whole_round`; ``is_streaming`` tells them apart.
  """
  zero: Callable[[Any], Any] | None = None
  accumulate: Callable[..., Any] | None = None
  finalize: Callable[..., tuple[Any, dict]] | None = None
  aggregate: Callable[..., tuple[Any, dict]] | None = None
  base: BaseMerge | None = None
  name: str = ''
  # Whether the result is the same for any grouping of the update's entries
  # into leaves (it acts element by element or on the whole update): then a
  # round may keep the layers stacked (`fedjax_fm.stacking`).
  leafwise: bool = False

  @property
  def is_streaming(self) -> bool:
    return self.aggregate is None


def streaming(zero, accumulate, finalize, *, base: BaseMerge | None = None,
              name: str = '', leafwise: bool = False) -> Aggregator:
  """A streaming (sum-decomposable) aggregator.

  Args:
    zero: ``zero(params) -> acc``, the empty accumulator (leaves add across
      chunks and devices).
    accumulate: ``accumulate(acc, updates, weights, params) -> acc`` for a
      chunk of clients stacked on a leading axis.
    finalize: ``finalize(acc, params) -> (delta, info)``.
    base: optional `BaseMerge` for rules that move the frozen base.
    name: a short name for logs.
    leafwise: the result does not depend on how the entries are grouped into
      leaves (element-wise or whole-update operations only).
  """
  return Aggregator(zero=zero, accumulate=accumulate, finalize=finalize, base=base,
                    name=name, leafwise=leafwise)


def whole_round(aggregate, *, name: str = '', leafwise: bool = False) -> Aggregator:
  """A whole-round aggregator.

  Args:
    aggregate: ``aggregate(updates [C, ...], weights [C], params, *, context=None)
      -> (delta, info)``; ``context`` is a `RoundContext`.
    name: a short name for logs.
    leafwise: as for `streaming`.
  """
  return Aggregator(aggregate=aggregate, name=name, leafwise=leafwise)


def reduce(aggregator: Aggregator, updates: Any, weights: jax.Array,
           params: Any = None, context: RoundContext | None = None) -> tuple[Any, dict]:
  """Aggregates stacked updates ``[C, ...]`` with an aggregator of either kind.

  Args:
    aggregator: an `Aggregator`.
    updates: client deltas stacked on a leading clients axis.
    weights: ``[C]`` weights (``<= 0``: ignored).
    params: the global trainable tree (default: zeros shaped like one update).
    context: the round's `RoundContext` for a whole-round aggregator (default:
      ``key(0)`` and client ids ``0..C-1``).

  Returns:
    ``(delta, info)``, as the round would compute them in one chunk.

  Raises:
    AssertionError: (`chex`) when ``weights`` is not ``[C]``, an update leaf
      lacks the leading ``[C]`` axis, or ``delta`` is not shaped like ``params``.
  """
  weights = jnp.asarray(weights, jnp.float32)
  chex.assert_rank(weights, 1)
  chex.assert_tree_shape_prefix(updates, weights.shape)
  if params is None:
    params = jax.tree.map(lambda u: jnp.zeros(u.shape[1:], u.dtype), updates)
  if aggregator.is_streaming:
    acc = aggregator.accumulate(aggregator.zero(params), updates, weights, params)
    delta, info = aggregator.finalize(acc, params)
  else:
    if context is None:
      context = RoundContext(jax.random.key(0), jnp.arange(weights.shape[0]))
    delta, info = aggregator.aggregate(updates, weights, params, context=context)
  # Shapes only: a delta may be float32 where the params are another dtype.
  chex.assert_trees_all_equal_shapes(delta, params)
  return delta, info
