"""Applying a stack of transformer layers: one ``lax.scan``, or a Python loop.

The models keep one module per layer (``layers.{i}`` parameter paths), so
that checkpoint import/export, PEFT surgery and per-leaf operations see every
layer on its own. Only the forward pass stacks them: when every layer has the
same NNX graph (the same ``graphdef`` after ``nnx.split``: e.g. LoRA, a
quantized base or prefix-tuning hooks on all layers alike) and the same leaf
shapes and dtypes, :func:`scan_layers` stacks the layers' states leaf-wise
and runs one ``jax.lax.scan`` whose body rebuilds a layer from the shared
``graphdef`` and its slice of the stacked state. The layer is traced and
compiled once, whatever the depth; what still grows with the depth is the
handling of the per-layer leaves themselves (stacking the states, unstacking
their gradients, and whatever the caller does with each leaf), unless the
caller keeps its params stacked (`fedjax_fm.stacking`): leaves that are slices
recorded in `fedjax_fm.stacking.stacked_views` are scanned as the stacks they
came from. Otherwise the layers run in a Python loop; both give the same
numbers.

What differs between layers is data scanned alongside the states (``xs``,
e.g. the index of a layer's attention mask), and each layer gets its own
dropout key, drawn once from the call-time ``rngs`` and split, in both
modes.

Rematerialisation (:data:`REMAT_POLICIES`) wraps the layer body in
``jax.checkpoint``: ``'layer'`` saves nothing inside a layer (its input is
kept, everything else is recomputed in the backward pass), ``'dots'`` keeps
the results of the matmuls without batch dimensions (the projections) and
recomputes the rest (attention scores, norms, activations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm import stacking

__all__ = [
    'REMAT_POLICIES',
    'check_remat',
    'check_scan_fields',
    'layer_keys',
    'same_structure',
    'scan_layers',
]

# Rematerialisation policies of a layer (``remat`` of the model configs).
REMAT_POLICIES = ('none', 'layer', 'dots')

# ``body(layer, carry, x, rngs) -> carry``.
Body = Callable[[nnx.Module, Any, Any, 'nnx.Rngs | None'], Any]


def check_remat(remat: Any) -> str:
  """Returns ``remat`` if it names one of :data:`REMAT_POLICIES`.

  Raises:
    ValueError: naming the field ``remat`` and the allowed values.
  """
  if not isinstance(remat, str) or remat not in REMAT_POLICIES:
    raise ValueError(
        f'remat must be one of {REMAT_POLICIES}, got {remat!r}'
    )
  return remat


def check_scan_fields(cfg: Any) -> None:
  """Validates the ``scan_layers`` and ``remat`` fields of a model config.

  Raises:
    ValueError: naming the field and its allowed values.
  """
  if not isinstance(cfg.scan_layers, bool):
    raise ValueError(
        f'scan_layers must be a bool (True or False), got '
        f'{cfg.scan_layers!r}'
    )
  check_remat(cfg.remat)


def _checkpoint(fn: Callable, remat: str, prevent_cse: bool) -> Callable:
  if remat == 'none':
    return fn
  if remat == 'layer':
    policy = jax.checkpoint_policies.nothing_saveable
  else:
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def layer_keys(rngs: nnx.Rngs | None, num_layers: int) -> jax.Array | None:
  """One dropout key per layer, ``[num_layers]``, or ``None`` (deterministic).

  The keys split one key drawn from the ``dropout`` stream of ``rngs`` (or
  its default stream). Rngs without either stream cannot drive dropout, as
  :func:`~fedjax_fm.models.layers.dropout` needs it: then ``None``.
  """
  if rngs is None:
    return None
  try:
    key = rngs.dropout()
  except AttributeError:   # no dropout (nor default) stream
    return None
  return jax.random.split(key, num_layers)


def _layer_rngs(key: jax.Array | None) -> nnx.Rngs | None:
  return None if key is None else nnx.Rngs(dropout=key)


def _signature(state: Any) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
  leaves, treedef = jax.tree_util.tree_flatten(state)
  return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def same_structure(splits: Sequence[tuple[Any, Any]]) -> bool:
  """Whether ``nnx.split`` results share the graphdef and leaf shapes/dtypes."""
  if not splits:
    return False
  graphdef, state = splits[0]
  signature = _signature(state)
  return all(g == graphdef and _signature(s) == signature
             for g, s in splits[1:])


def _stack_leaves(*leaves: Any) -> jax.Array:
  stacked = stacking.already_stacked(leaves)
  return _stack(leaves) if stacked is None else stacked


def _index(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda a: a[i], tree)


@jax.custom_vjp
def _stack(leaves: tuple[jax.Array, ...]) -> jax.Array:
  """``jnp.stack(leaves)``, whose gradient is unstacked by dynamic indexing.

  The plain transpose of a stack is one static slice per layer, which XLA
  fuses with what consumes each layer's gradient (e.g. an optimizer update),
  one distinct kernel per layer and leaf. Dynamic indices (behind an
  optimization barrier, so that they are not folded into static slices
  first) compile faster at depth in a training step; ``scripts/
  bench_depth.py`` measures the compile time of a round.
  """
  return jnp.stack(leaves)


def _stack_fwd(leaves):
  return jnp.stack(leaves), len(leaves)


def _stack_bwd(num, g):
  index = jax.lax.optimization_barrier(
      tuple(jnp.int32(i) for i in range(num)))
  return (tuple(jax.lax.dynamic_index_in_dim(g, i, keepdims=False)
                for i in index),)


_stack.defvjp(_stack_fwd, _stack_bwd)


def scan_layers(
    layers: Sequence[nnx.Module],
    body: Body,
    carry: Any,
    xs: Any = None,
    *,
    scan: bool = True,
    remat: str = 'none',
    rngs: nnx.Rngs | None = None,
) -> Any:
  """Applies ``carry = body(layer, carry, x, layer_rngs)`` over ``layers``.

  Args:
    layers: the layers, in order (e.g. a model's ``nnx.List``). They are
      read, never changed: ``body`` must not update their variables.
    body: applies one layer: ``body(layer, carry, x, rngs) -> carry``, where
      ``x`` is the layer's slice of ``xs`` and ``rngs`` the layer's own
      ``nnx.Rngs`` (a ``dropout`` stream), or ``None`` without ``rngs``.
      The carry keeps its shapes and dtypes.
    carry: the input of the first layer (a pytree of arrays).
    xs: per-layer data, a pytree of arrays with a leading ``[num_layers]``
      axis (NumPy arrays stay static in the loop), or ``None``.
    scan: scan over the stacked layers when they share one structure;
      ``False`` always runs the Python loop.
    remat: one of :data:`REMAT_POLICIES`.
    rngs: call-time rngs (dropout), or ``None`` for a deterministic pass.

  Returns:
    The carry after the last layer.

  Raises:
    ValueError: on an unknown ``remat``.
  """
  check_remat(remat)
  n = len(layers)
  if n == 0:
    return carry
  keys = layer_keys(rngs, n)
  splits = None
  if scan and n > 1:
    splits = [nnx.split(layer) for layer in layers]
    if not same_structure(splits):
      splits = None
  if splits is not None:
    graphdef = splits[0][0]

    def apply(state, c, x, key):
      return body(nnx.merge(graphdef, state), c, x, _layer_rngs(key))

    first = (splits[0][1], carry, _index(xs, 0), _index(keys, 0))
    out = jax.eval_shape(apply, *first)
    if _signature(out) == _signature(carry):
      stacked = jax.tree.map(_stack_leaves, *[state for _, state in splits])
      step = _checkpoint(apply, remat, prevent_cse=False)

      def scan_step(c, sliced):
        return step(sliced[0], c, *sliced[1:]), None

      carry, _ = jax.lax.scan(scan_step, carry, (stacked, xs, keys))
      return carry
    # The body changes the carry's dtype (mixed dtypes): run the loop.
  for i, layer in enumerate(layers):
    x = _index(xs, i)
    key = _index(keys, i)
    if remat == 'none':
      carry = body(layer, carry, x, _layer_rngs(key))
      continue
    graphdef, state = nnx.split(layer)

    def apply_one(state, c, key, graphdef=graphdef, x=x):
      return body(nnx.merge(graphdef, state), c, x, _layer_rngs(key))

    carry = _checkpoint(apply_one, remat, prevent_cse=True)(state, carry, key)
  return carry
