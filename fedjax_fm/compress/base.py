"""The Compressor contract and the identity compressor.

A compressor is a pair of pure functions over pytrees, built by a factory
(optax style)::

  init(params_like) -> state                     # per-client state (e.g. residuals)
  encode(key, tree, state) -> (payload, state)   # payload: what crosses the network
  decode(payload) -> tree

The payload is a pytree of fixed-shape arrays whose ``nbytes`` are exactly the
bytes that would be sent, so the engine measures uplink traffic from the
payload itself rather than from a formula.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from fedjax_fm import tree_util


class Compressor(NamedTuple):
  """Encode/decode pair; see the module docstring for the contract."""
  init: Callable[[Any], Any]
  encode: Callable[[jax.Array, Any, Any], tuple[Any, Any]]
  decode: Callable[[Any], Any]


def identity() -> Compressor:
  """No compression: the payload is the update itself (f32 bytes on the wire)."""

  def init(params_like):
    del params_like
    return ()

  def encode(key, tree, state):
    del key
    return tree, state

  def decode(payload):
    return payload

  return Compressor(init, encode, decode)


def payload_nbytes(compressor: Compressor, params_like) -> int:
  """Wire bytes of one client's payload, read off the payload's own arrays."""
  state = jax.eval_shape(compressor.init, params_like)
  key = jax.eval_shape(lambda: jax.random.key(0))
  payload, _ = jax.eval_shape(compressor.encode, key, params_like, state)
  return tree_util.tree_nbytes(payload)
