"""Leaf-wise compressors: one tensor codec mapped over a pytree.

Every operator in ``fedjax_fm.compress`` (sparsifiers, quantizers, low-rank)
acts on one tensor at a time. :func:`leafwise` turns a :class:`LeafCodec` into a
:class:`~fedjax_fm.compress.base.Compressor` over whole pytrees:

* the payload has the structure of the input tree; each leaf is either the raw
  tensor (a leaf the codec does not take, e.g. biases and norms below
  ``min_size``: sent uncompressed in its own dtype) or a :class:`Payload` node;
* a :class:`Payload` node is a frozen dataclass registered as a pytree node: its
  array fields are the children (the wire bytes) and its static fields (the
  original shape and dtype, bit width, ...) are tree metadata, so ``decode``
  needs nothing but the payload, under ``jit``, ``vmap``, ``scan`` and
  ``shard_map`` alike;
* the state is ``()`` when the codec is stateless, else the input tree's
  structure with the per-leaf state (``()`` for leaves the codec does not take);
* leaf ``i`` gets the key ``fold_in(key, i)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.compress.base import Compressor

Spec = list  # list of (shape tuple, numpy dtype): the arrays of one leaf's payload

DEFAULT_MIN_SIZE = 256   # leaves with fewer elements (biases, norms) are sent raw


class Payload:
  """Base class of the per-leaf payload nodes (see :func:`payload_node`)."""


def payload_node(cls):
  """Class decorator: a frozen dataclass whose ``static`` fields are metadata.

  Fields declared with ``dataclasses.field(metadata={'static': True})`` become
  pytree metadata (must be hashable); the others are children (arrays).
  """
  cls = dataclasses.dataclass(frozen=True)(cls)
  fields = dataclasses.fields(cls)
  data = [f.name for f in fields if not f.metadata.get('static', False)]
  meta = [f.name for f in fields if f.metadata.get('static', False)]
  return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static_field():
  return dataclasses.field(metadata={'static': True})


def is_payload(x) -> bool:
  return isinstance(x, Payload)


class LeafCodec(NamedTuple):
  """A compressor of one tensor.

  Attributes:
    takes: ``takes(shape, dtype) -> bool``, static: whether the codec compresses
      this leaf (others are sent raw).
    init: ``init(shape, dtype, index) -> state`` for a taken leaf (``()`` if
      stateless); ``index`` is the leaf's position in the flattened tree.
    encode: ``encode(key, x, state) -> (Payload, state)``.
    decode: ``decode(payload) -> x`` with the original shape and dtype.
    stateful: whether ``init`` returns arrays.
  """
  takes: Callable[[tuple, Any], bool]
  init: Callable[[tuple, Any, int], Any]
  encode: Callable[[jax.Array, jax.Array, Any], tuple[Payload, Any]]
  decode: Callable[[Payload], jax.Array]
  stateful: bool = False


def leafwise(codec: LeafCodec) -> Compressor:
  """Maps a :class:`LeafCodec` over the leaves of a pytree."""

  def init(params_like):
    if not codec.stateful:
      return ()
    leaves, treedef = jax.tree.flatten(params_like)
    states = [codec.init(tuple(x.shape), x.dtype, i) if codec.takes(tuple(x.shape), x.dtype)
              else () for i, x in enumerate(leaves)]
    return treedef.unflatten(states)

  def encode(key, tree, state):
    leaves, treedef = jax.tree.flatten(tree)
    states = treedef.flatten_up_to(state) if codec.stateful else [()] * len(leaves)
    payloads, new_states = [], []
    for i, (x, s) in enumerate(zip(leaves, states)):
      if codec.takes(tuple(x.shape), x.dtype):
        p, s = codec.encode(jax.random.fold_in(key, i), jnp.asarray(x), s)
      else:
        p = x
      payloads.append(p)
      new_states.append(s)
    new_state = treedef.unflatten(new_states) if codec.stateful else ()
    return treedef.unflatten(payloads), new_state

  def decode(payload):
    return jax.tree.map(lambda p: codec.decode(p) if is_payload(p) else p, payload,
                        is_leaf=is_payload)

  return Compressor(init, encode, decode)


def size_of(shape) -> int:
  return int(np.prod(shape, dtype=np.int64))


def check_min_size(min_size) -> int:
  if not isinstance(min_size, (int, np.integer)) or isinstance(min_size, bool) or min_size < 1:
    raise ValueError(f'min_size must be an int >= 1, got {min_size!r}')
  return int(min_size)


def is_float(dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


def raw_spec(shape, dtype) -> Spec:
  """Payload spec of a leaf sent uncompressed."""
  return [(tuple(shape), np.dtype(dtype))]


def index_dtype(n: int):
  """uint16 indices when every position fits (``n <= 65536``), else uint32."""
  return np.dtype(np.uint16) if n <= (1 << 16) else np.dtype(np.uint32)


def spec_nbytes(spec: Spec) -> int:
  return sum(size_of(s) * np.dtype(d).itemsize for s, d in spec)


def takes_float(min_size: int):
  """``takes`` rule of the element-wise codecs: float leaves with >= min_size elements."""
  return lambda shape, dtype: is_float(dtype) and size_of(shape) >= min_size


def check_fraction_or_k(fraction_or_k, name='fraction_or_k'):
  """A float in (0, 1] (fraction of the elements) or an int >= 1 (count)."""
  if isinstance(fraction_or_k, bool):
    raise ValueError(f'{name} must be a float in (0, 1] or an int >= 1, got {fraction_or_k!r}')
  if isinstance(fraction_or_k, (int, np.integer)):
    if fraction_or_k < 1:
      raise ValueError(f'{name} as a count must be >= 1, got {fraction_or_k!r}')
    return int(fraction_or_k)
  if isinstance(fraction_or_k, (float, np.floating)):
    if not 0.0 < fraction_or_k <= 1.0:
      raise ValueError(f'{name} as a fraction must be in (0, 1], got {fraction_or_k!r}')
    return float(fraction_or_k)
  raise ValueError(f'{name} must be a float in (0, 1] or an int >= 1, got {fraction_or_k!r}')


def resolve_k(fraction_or_k, n: int) -> int:
  """Elements kept out of ``n``: ``min(k, n)``, or ``ceil(fraction * n)`` (at least 1)."""
  if isinstance(fraction_or_k, int):
    return min(fraction_or_k, n)
  return min(n, max(1, math.ceil(round(fraction_or_k * n, 6))))


def check_use_kernel(use_kernel):
  if use_kernel is not None and not isinstance(use_kernel, bool):
    raise ValueError(f'use_kernel must be None, True or False, got {use_kernel!r}')


def kernel_mode(use_kernel) -> tuple[bool, bool]:
  """``(use the Pallas kernel, run it interpreted)`` for a ``use_kernel`` switch.

  ``None``: the kernel where the backend has one (``gpu``, ``tpu``), ``jnp``
  otherwise. ``True``: always the kernel (interpreted on other backends, for
  tests). ``False``: always ``jnp``.
  """
  check_use_kernel(use_kernel)
  accelerated = jax.default_backend() in ('gpu', 'tpu')
  if use_kernel is None:
    return accelerated, False
  return bool(use_kernel), not accelerated
