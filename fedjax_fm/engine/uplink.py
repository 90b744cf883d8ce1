"""The per-client uplink path: a chain of pure steps between training and aggregation.

After local training, each client's delta goes through a chain of steps, the
optax way: every step is a pair of pure functions, and `chain` composes them::

  init(params_like) -> state                       # per-client state, kept in the store
  apply(key, update, weight, state, inputs)
      -> (update, weight, state, metrics)          # one client (the engine vmaps it)

``inputs`` holds the per-client round inputs a step may read (``clip_norm``,
``attacker``, ``shared_key``). The default chain of `fedjax_fm.engine.build_round` is::

  clip (DP) -> compress (encode, decode; the payload is what crosses the wire)
            -> attack (simulated malicious clients) -> non-finite guard (weight 0)

With a distributed DP mechanism (`fedjax_fm.privacy.distributed`) it is::

  clip (DP) -> attack -> distributed_encode (noised b-bit integers: the payload)

The last step of a chain may *encode* (``UplinkStep.encodes``): it returns the
wire payload (other shapes and dtypes) instead of an update shaped like the
input, for a whole-round aggregator that decodes it (the secure sum).

A step's state (e.g. a compressor's error-feedback residual) lives in
``ServerState.client_store``, gathered and scattered by client id inside the
compiled round.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax import custom_batching

from fedjax_fm.aggregate import attacks as attacks_lib
from fedjax_fm.compress import base as compress_base


class UplinkStep(NamedTuple):
  """One pure step of the uplink path (see the module docstring).

  ``encodes``: the step turns the update into its wire payload, whose structure
  and shapes differ from the update's; only the last step of a chain may.
  """
  init: Callable[[Any], Any]
  apply: Callable[..., tuple[Any, jax.Array, Any, dict]]
  name: str = ''
  encodes: bool = False


def flatten(tree) -> jax.Array:
  """Every entry of every leaf in one vector, in the leaves' common dtype."""
  leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  dtype = jnp.result_type(*leaves)
  leaves = [x.astype(dtype) for x in leaves]
  return leaves[0] if len(leaves) == 1 else jnp.concatenate(leaves)


def _stats_of(v: jax.Array, axis: int):
  """``(sum of squares in float32, largest magnitude)`` of ``v`` along ``axis``."""
  sq = jnp.sum(jnp.square(v.astype(jnp.float32)), axis=axis)
  return sq, jnp.max(jnp.abs(v), axis=axis)


@custom_batching.custom_vmap
def _tree_stats(leaves: list) -> tuple[jax.Array, jax.Array]:
  return _stats_of(flatten(leaves), 0)


@_tree_stats.def_vmap
def _tree_stats_vmap(axis_size, in_batched, leaves):
  # Mapped over clients, the entries are laid out [entries, clients]: the
  # concatenate is then along the major axis and XLA fuses it (with whatever
  # computes the leaves, e.g. local - global) into the two reductions.
  dtype = jnp.result_type(*leaves)
  columns = []
  for x, batched in zip(leaves, in_batched[0]):
    x = x.astype(dtype)
    if batched:
      columns.append(jnp.moveaxis(x, 0, -1).reshape(-1, axis_size))
    else:
      columns.append(jnp.broadcast_to(x.reshape(-1, 1), (x.size, axis_size)))
  v = columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=0)
  return _stats_of(v, 0), (True, True)


def tree_stats(tree) -> tuple[jax.Array, jax.Array]:
  """``(squared L2 norm in float32, largest magnitude)`` of a pytree, in one pass.

  Written leaf by leaf, a reduction over a pytree compiles to a kernel or two
  per leaf; here it is one fused concatenate-and-reduce for any number of
  leaves (also under ``vmap``, where the flattened entries are laid out with
  the mapped axis minor), which keeps the compile time of the round flat in
  the number of trainable leaves. Two calls on the same tree are one
  computation after XLA's common-subexpression elimination.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves or not sum(x.size for x in leaves):
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  return _tree_stats(leaves)


def tree_norm(tree) -> jax.Array:
  """Global L2 norm (float32): `fedjax_fm.tree_util.tree_norm` as one reduction."""
  return jnp.sqrt(tree_stats(tree)[0])


def tree_norms(*trees) -> list[jax.Array]:
  """Global L2 norms (float32) of trees; one reduction when their sizes agree."""
  flats = [flatten(t).astype(jnp.float32) for t in trees]
  if len({v.size for v in flats}) != 1:
    return [jnp.sqrt(jnp.sum(v * v)) for v in flats]
  v = jnp.stack(flats)
  return list(jnp.sqrt(jnp.sum(v * v, axis=1)))


def tree_all_finite(tree) -> jax.Array:
  """Scalar bool: no entry of the tree is NaN or infinite.

  One reduction (`tree_stats`): the largest magnitude is finite exactly when
  every entry is (``max`` propagates NaN, and unlike a sum of squares it
  cannot overflow).
  """
  return jnp.isfinite(tree_stats(tree)[1])


def _no_state(params_like):
  del params_like
  return ()


def clip(privacy, *, name: str = 'clip', report: bool = True) -> UplinkStep:
  """Client-level DP clipping to ``inputs['clip_norm']`` (``privacy.clip``).

  Args:
    privacy: the mechanism whose ``clip`` bounds the update.
    name: the step's name in the chain.
    report: report ``unclipped`` (the update's norm was within the bound).
  """

  def apply(key, update, weight, state, inputs):
    del key
    update, norm = privacy.clip(update, clip_norm=inputs['clip_norm'])
    metrics = {'unclipped': norm <= inputs['clip_norm']} if report else {}
    return update, weight, state, metrics

  return UplinkStep(_no_state, apply, name)


def compress(compressor: compress_base.Compressor) -> UplinkStep:
  """Encodes the update into its wire payload and decodes what the server receives.

  The compressor's state (error feedback, warm starts) is the step's state.
  """

  def apply(key, update, weight, state, inputs):
    del inputs
    payload, state = compressor.encode(key, update, state)
    return compressor.decode(payload), weight, state, {}

  return UplinkStep(compressor.init, apply, 'compress')


def attack(kind: str, scale: float) -> UplinkStep:
  """Simulated malicious clients: where ``inputs['attacker']`` is set the update is
  corrupted (`fedjax_fm.aggregate.apply_attack`), with key ``fold_in(key, 1)``."""

  def apply(key, update, weight, state, inputs):
    bad = attacks_lib.apply_attack(jax.tree.map(lambda u: u[None], update),
                                   inputs['attacker'][None], kind, scale=scale,
                                   key=jax.random.fold_in(key, 1))
    return jax.tree.map(lambda u: u[0], bad), weight, state, {}

  return UplinkStep(_no_state, apply, 'attack')


def guard_nonfinite(keep_weight: bool = False) -> UplinkStep:
  """Drops a client whose update has a NaN or an Inf: update zeroed, weight 0.

  Args:
    keep_weight: keep the client's weight (its update still zeroed). Under DP
      the mean divides by the expected number of clients and the noise is
      calibrated to it: a weight of 0 would shrink the denominator and raise
      every other client's sensitivity.

  Reports ``finite``. The check is one reduction over the whole update
  (`tree_all_finite`), and the zeroing is elementwise, so it fuses with what
  reads the update next (the aggregator).
  """

  def apply(key, update, weight, state, inputs):
    del key, inputs
    finite = tree_all_finite(update)
    update = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), update)
    if not keep_weight:
      weight = jnp.where(finite, weight, 0.0)
    return update, weight, state, {'finite': finite}

  return UplinkStep(_no_state, apply, 'guard_nonfinite')


def distributed_encode(mechanism) -> UplinkStep:
  """The client side of a distributed DP mechanism: its noised integer payload.

  ``mechanism.encode(key, update, inputs['shared_key']) -> (payload, metrics)``
  (`fedjax_fm.privacy.distributed.DistributedMechanism`): the update becomes
  the wire payload (``b``-bit integers in ``uint32`` words), so this step
  encodes and ends the chain. The weight is kept: a client whose update is not
  finite sends zeros with its noise share (reported as ``finite``).
  """

  def apply(key, update, weight, state, inputs):
    payload, metrics = mechanism.encode(key, update, inputs['shared_key'])
    return payload, weight, state, metrics

  return UplinkStep(_no_state, apply, 'distributed_encode', encodes=True)


def chain(*steps: UplinkStep) -> UplinkStep:
  """Composes steps left to right.

  The state is a dict ``{step name: state}`` (e.g. ``{'compress': ...}``) of
  the steps that have one. Every step receives the same key (a step derives its
  own stream from it), and must return an update of the structure and shapes it
  received (asserted with `chex`, at trace time), except an encoding last step.
  The chain encodes when its last step does.
  """
  names = [step.name or f'step_{i}' for i, step in enumerate(steps)]
  if len(set(names)) != len(names):
    raise ValueError(f'uplink steps need distinct names, got {names}')
  early = [n for n, step in zip(names[:-1], steps[:-1]) if step.encodes]
  if early:
    raise ValueError(f'only the last uplink step may encode the payload; got {early} '
                     f'before {names[-1]!r}')

  def init(params_like):
    states = {n: step.init(params_like) for n, step in zip(names, steps)}
    return {n: s for n, s in states.items() if jax.tree.leaves(s)}

  def apply(key, update, weight, state, inputs):
    new_state, metrics = {}, {}
    for n, step in zip(names, steps):
      s = state.get(n, ())
      received = update
      update, weight, s, m = step.apply(key, update, weight, s, inputs)
      if not step.encodes:
        chex.assert_trees_all_equal_shapes(
            update, received,
            custom_message=f'uplink step {n!r} changed the update\'s structure or shapes')
      if n in state:
        new_state[n] = s
      metrics.update(m)
    return update, weight, new_state, metrics

  return UplinkStep(init, apply, 'chain', encodes=bool(steps) and steps[-1].encodes)
