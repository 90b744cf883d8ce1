"""Aggregator contracts.

Streaming aggregators are sum-decomposable: the engine folds clients (or chunks
of clients, or devices) into an accumulator and finalizes once. This is what
lets the ``chunked`` and ``sharded`` strategies run in memory O(chunk).

  zero(params_like) -> acc
  accumulate(acc, updates, weights) -> acc   # updates: pytree stacked on a leading [K] axis
  finalize(acc) -> (aggregate, info)

Accumulators must be pytrees whose leaves add across devices (``psum``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple


class StreamingAggregator(NamedTuple):
  zero: Callable[[Any], Any]
  accumulate: Callable[[Any, Any, Any], Any]
  finalize: Callable[[Any], tuple[Any, dict]]
