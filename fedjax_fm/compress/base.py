"""The Compressor contract and the identity compressor.

A compressor is a pair of pure functions over pytrees, built by a factory
(optax style)::

  init(params_like) -> state                     # per-client state (e.g. residuals)
  encode(key, tree, state) -> (payload, state)   # payload: what crosses the network
  decode(payload) -> tree

The payload is a pytree of fixed-shape arrays whose ``nbytes`` are exactly the
bytes that would be sent, so the engine measures uplink traffic from the
payload itself rather than from a formula.

`checked` wraps a compressor with `chex` assertions of this contract (the decoded
tree has the input's structure, shapes and dtypes; the new state has the old
state's); `check_roundtrip` runs one checked round trip. The assertions are on
static shapes, so under ``jit`` they run once, at trace time.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
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


def _assert_contract(compressor: Compressor, tree, state, payload, new_state):
  """Asserts the contract on one ``encode`` call (shapes only: trace-time)."""
  decoded = jax.eval_shape(compressor.decode, payload)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      decoded, tree, custom_message='decode(encode(x)) must match x in structure, '
      'shapes and dtypes')
  chex.assert_trees_all_equal_shapes_and_dtypes(
      new_state, state, custom_message='encode must return a state shaped like the '
      'state it received')


def checked(compressor: Compressor) -> Compressor:
  """Wraps a compressor with `chex` assertions of its contract.

  Every ``encode`` asserts that ``decode`` of its payload has the structure,
  shapes and dtypes of the input tree (checked abstractly, with
  ``jax.eval_shape``), and that the returned state has the structure, shapes and
  dtypes of the state passed in. The checks read static shapes only, so a jitted
  ``encode`` pays for them once, when it is traced. ``init`` and ``decode`` are
  the wrapped compressor's own.

  Args:
    compressor: any `Compressor`.

  Returns:
    A `Compressor` with the same ``init``, ``decode`` and results.
  """

  def encode(key, tree, state):
    payload, new_state = compressor.encode(key, tree, state)
    _assert_contract(compressor, tree, state, payload, new_state)
    return payload, new_state

  return Compressor(compressor.init, encode, compressor.decode)


def check_roundtrip(compressor: Compressor, tree, key: jax.Array | None = None,
                    state=None):
  """Runs ``decode(encode(key, tree, state))`` with the contract asserted.

  Besides the checks of `checked`, asserts that ``init(tree)`` gives a state of
  the structure, shapes and dtypes ``encode`` expects, and that the decoded
  arrays have the shapes and dtypes that ``jax.eval_shape`` promised. ``tree``
  may hold arrays or ``jax.ShapeDtypeStruct`` leaves; with the latter nothing is
  computed and the abstract results are returned.

  Args:
    compressor: any `Compressor`.
    tree: the update to compress (a pytree of arrays or shape structs).
    key: PRNG key (default ``jax.random.key(0)``).
    state: the compressor state (default ``compressor.init(tree)``).

  Returns:
    ``(payload, decoded, new_state)``.

  Raises:
    AssertionError: when the compressor breaks its contract.
  """
  if key is None:
    key = jax.random.key(0)
  abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))
  if state is None:
    state = (jax.eval_shape(compressor.init, tree) if abstract
             else compressor.init(tree))
  chex.assert_trees_all_equal_shapes_and_dtypes(
      jax.eval_shape(compressor.init, tree), state,
      custom_message='state must be shaped like init(tree)')
  c = checked(compressor)
  if abstract:
    payload, new_state = jax.eval_shape(c.encode, key, tree, state)
    decoded = jax.eval_shape(c.decode, payload)
    return payload, decoded, new_state
  payload, new_state = c.encode(key, tree, state)
  decoded = c.decode(payload)
  chex.assert_trees_all_equal_shapes_and_dtypes(decoded, tree)
  return payload, decoded, new_state
