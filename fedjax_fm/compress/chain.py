"""Chaining compressors, and the payload size formulas of every operator.

``chain(c1, c2, ..., cK)`` compresses with ``c1``, then hands the **floating
point arrays of c1's payload** to ``c2`` as a flat list (one tensor per array,
in the payload's flattening order), and so on; integer arrays (indices, packed
words, seeds) go on the wire as they are. So::

  chain(top_k(0.01), stochastic_uniform(4))

sends, per compressed leaf, the top-k ``indices`` plus the top-k ``values``
quantized to 4 bits with their scale(s). Raw float leaves of ``c1`` (e.g.
biases below ``c1``'s ``min_size``) are float arrays too and also reach ``c2``,
whose own ``min_size`` decides whether it compresses them. Decoding runs in
reverse: ``cK`` restores its float arrays, they are put back into ``c(K-1)``'s
payload, and so on down to ``c1``. Keys are split per stage; the state is the
tuple of the stages' states (stage ``j`` is initialised on the shapes of stage
``j-1``'s float arrays).

:func:`nbytes_formula` gives the expected wire bytes of one client's payload in
pure Python from the leaf shapes, for one operator or a chain of them, using
the per-operator ``*_spec`` functions (each returns the ``(shape, dtype)`` of
the arrays a leaf turns into). Tests check it against the real payload.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fedjax_fm.compress import leafwise
from fedjax_fm.compress import lowrank
from fedjax_fm.compress import quantize
from fedjax_fm.compress import sparsify
from fedjax_fm.compress.base import Compressor


@leafwise.payload_node
class ChainPayload:
  """Payload of ``chain(first, rest)``: first's non-float arrays + rest's payload."""
  kept: Any                 # list: the non-float arrays of the first stage's payload
  inner: Any                # payload of the next stage(s) for the float arrays
  treedef: Any = leafwise.static_field()         # structure of the first stage's payload
  float_positions: tuple = leafwise.static_field()


def _is_float_array(x) -> bool:
  return leafwise.is_float(x.dtype)


def _then(first: Compressor, second: Compressor) -> Compressor:
  """``first`` whose payload's float arrays are compressed by ``second``."""

  def init(params_like):
    state1 = first.init(params_like)
    payload = jax.eval_shape(first.encode, jax.random.key(0), params_like, state1)[0]
    floats = [x for x in jax.tree.leaves(payload) if _is_float_array(x)]
    return (state1, second.init(floats))

  def encode(key, tree, state):
    if not jax.tree.leaves(state):   # stateless stages: the engine keeps no state for them
      state = init(tree)
    key1, key2 = jax.random.split(key)
    payload1, state1 = first.encode(key1, tree, state[0])
    leaves, treedef = jax.tree.flatten(payload1)
    pos = tuple(i for i, x in enumerate(leaves) if _is_float_array(x))
    kept = [x for i, x in enumerate(leaves) if i not in pos]
    payload2, state2 = second.encode(key2, [leaves[i] for i in pos], state[1])
    return ChainPayload(kept, payload2, treedef, pos), (state1, state2)

  def decode(payload: ChainPayload):
    floats = iter(second.decode(payload.inner))
    kept = iter(payload.kept)
    n = payload.treedef.num_leaves
    leaves = [next(floats) if i in payload.float_positions else next(kept) for i in range(n)]
    return first.decode(payload.treedef.unflatten(leaves))

  return Compressor(init, encode, decode)


def chain(*compressors: Compressor) -> Compressor:
  """Composes compressors: each compresses the float arrays of the previous payload.

  Args:
    *compressors: one or more :class:`Compressor`; ``chain(c)`` is ``c``.

  Returns:
    A :class:`Compressor`; see the module docstring for the payload and state.
  """
  if not compressors:
    raise ValueError('chain needs at least one compressor')
  for i, c in enumerate(compressors):
    if not isinstance(c, Compressor):
      raise ValueError(f'compressors[{i}] must be a Compressor, got {type(c).__name__}')
  out = compressors[-1]
  for c in reversed(compressors[:-1]):
    out = _then(c, out)
  return out


# ------------------------------------------------------------------ size formulas


def _identity_spec(shape, dtype, **unused):
  del unused
  return leafwise.raw_spec(shape, dtype)


LEAF_SPECS = {
    'identity': _identity_spec,
    'top_k': sparsify.top_k_spec,
    'random_k': sparsify.random_k_spec,
    'threshold': sparsify.threshold_spec,
    'stochastic_uniform': quantize.stochastic_uniform_spec,
    'qsgd': quantize.qsgd_spec,
    'deterministic': quantize.deterministic_spec,
    'sign': quantize.sign_spec,
    'ternary': quantize.ternary_spec,
    'svd': lowrank.svd_spec,
    'powersgd': lowrank.powersgd_spec,
}


def _stage(stage):
  if isinstance(stage, str):
    name, kwargs = stage, {}
  elif isinstance(stage, (tuple, list)) and len(stage) == 2 and isinstance(stage[1], dict):
    name, kwargs = stage
  else:
    raise ValueError(f'a stage must be a name or a (name, kwargs) pair, got {stage!r}')
  if name not in LEAF_SPECS:
    raise ValueError(f'unknown compressor {name!r}; allowed: {sorted(LEAF_SPECS)}')
  return LEAF_SPECS[name], kwargs


def nbytes_formula(params_like, *stages) -> int:
  """Expected payload bytes of one client, computed from shapes alone.

  Args:
    params_like: pytree of arrays or ``jax.ShapeDtypeStruct`` (shapes/dtypes).
    *stages: one stage per chained operator, each a registry name or a
      ``(name, kwargs)`` pair with the factory's arguments, e.g.
      ``('top_k', {'fraction_or_k': 0.01})``, ``('stochastic_uniform', {'bits': 4})``.
      ``error_feedback`` adds no bytes: give its inner compressor's stage.
      No stage means identity.

  Returns:
    Bytes, equal to ``payload_nbytes`` of the same (chained) compressor.
  """
  spec = [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(params_like)]
  final = 0
  for stage in stages or ('identity',):
    fn, kwargs = _stage(stage)
    out = [a for shape, dtype in spec for a in fn(shape, dtype, **kwargs)]
    # Integer arrays (indices, packed words, seeds) are final; the next stage
    # sees the float arrays only.
    final += leafwise.spec_nbytes([a for a in out if not leafwise.is_float(a[1])])
    spec = [a for a in out if leafwise.is_float(a[1])]
  return final + leafwise.spec_nbytes(spec)
