"""The trainable params with their layers stacked: leaves ``[num_layers, ...]``.

A transformer's params hold one subtree per layer (``layers.{i}``), so every
per-leaf operation of a round (the client optimizer, the update, its norm and
guard, the aggregation) is repeated for each layer, and the compiled round
grows with the depth even when the model scans its layers
(`fedjax_fm.models.scan`). `LayerStack` maps such a tree to one whose
per-layer subtrees are stacked leaf-wise under the key `STACKED`::

  {'layers': {0: {'q': {'lora_a': [in, r]}}, 1: {...}}}
  -> {'layers': {'*': {'q': {'lora_a': [num_layers, in, r]}}}}

A mapping is stacked when its keys are the integers ``0..n-1`` (``n >= 2``)
and its values share one structure and their leaves' shapes and dtypes;
everything else stays as it is. `LayerStack.unstack` maps back;
`LayerStack.wrap_loss` hands a loss the canonical tree as slices recorded in
`stacked_views`, so a model that scans its layers takes the stacked arrays
themselves: the loss, its gradient and everything a round does per leaf then
work on a number of leaves that does not grow with the depth.

Stacking changes nothing for what acts element by element or on the whole
tree (SGD and Adam steps, weighted means, global norms and clipping, the
non-finite guard). What acts per leaf (a top-k or a quantization scale per
tensor, per-layer clipping, LoRA products) would see a whole stack as one
tensor: `fedjax_fm.engine.build_round` rejects those with ``stack_layers=True``
and keeps the canonical layout with ``'auto'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ['STACKED', 'LayerStack', 'Stacked', 'already_stacked', 'canonical_path', 'layer_stack',
           'stacked_views']

# The key that stands for the layer indices in a params tree whose layers are
# stacked: ``layers.*.q.kernel`` is ``[L, ...]``.
STACKED = '*'

# Slices of arrays already stacked over the layers (`stacked_views`): the id of
# each slice -> (the stacked array, the layer index, the slice, kept alive).
_VIEWS: list[Mapping[int, tuple[Any, int, Any]]] = []


@contextlib.contextmanager
def stacked_views(views: Mapping[int, tuple[Any, int, Any]]) -> Iterator[None]:
  """Lets `fedjax_fm.models.scan.scan_layers` scan arrays that are already stacked.

  ``views`` maps ``id(s)`` of each slice ``s = stacked[i]`` handed to a model
  (e.g. by `LayerStack.wrap_loss`) to ``(stacked, i, s)``. Inside the context,
  when the ``i``-th layer's leaf is ``stacked[i]`` for every layer, the scan
  takes ``stacked`` itself instead of stacking the slices again: its gradient then flows to ``stacked``
  without one slice per layer. Anything else is stacked as usual.
  """
  _VIEWS.append(views)
  try:
    yield
  finally:
    _VIEWS.pop()


def already_stacked(leaves: Sequence[Any]) -> Any:
  """The array whose slices ``0..n-1`` are ``leaves`` (`stacked_views`), or None."""
  if not _VIEWS:
    return None
  for views in reversed(_VIEWS):
    entry = views.get(id(leaves[0]))
    if entry is None:
      continue
    stacked = entry[0]
    if jnp.shape(stacked)[:1] != (len(leaves),):
      return None
    for i, leaf in enumerate(leaves):
      e = views.get(id(leaf))
      if e is None or e[0] is not stacked or e[1] != i or e[2] is not leaf:
        return None
    return stacked
  return None


def _layer_index(key: Any) -> int | None:
  if isinstance(key, bool):
    return None
  if isinstance(key, int):
    return key
  if isinstance(key, str) and key.isdigit():
    return int(key)
  return None


def _signature(tree: Any):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)


def _stackable(node: Mapping) -> bool:
  if len(node) < 2:
    return False
  indices = [_layer_index(k) for k in node]
  if any(i is None for i in indices) or sorted(indices) != list(range(len(node))):
    return False
  by_index = {_layer_index(k): v for k, v in node.items()}
  first = _signature(by_index[0])
  if not jax.tree_util.tree_leaves(by_index[0]):
    return False
  return all(_signature(by_index[i]) == first for i in range(1, len(node)))


def _skeleton(node: Any) -> Any:
  """The stacked form of a tree of ``ShapeDtypeStruct``s."""
  if not isinstance(node, Mapping):
    return node
  if _stackable(node):
    layers = [v for _, v in sorted(node.items(), key=lambda kv: _layer_index(kv[0]))]
    return {STACKED: jax.tree.map(
        lambda *a: jax.ShapeDtypeStruct((len(a),) + a[0].shape, a[0].dtype), *layers)}
  return {k: _skeleton(v) for k, v in node.items()}


class LayerStack(NamedTuple):
  """A fixed map between a params tree and its layer-stacked form.

  Build it with `layer_stack`. ``num_stacked`` counts the stacked subtrees;
  0 means the map is the identity.
  """
  treedef: Any                  # the canonical tree's structure
  stacked_treedef: Any          # the stacked tree's structure
  # For each leaf of the stacked tree, the canonical leaf indices it holds
  # (one: unchanged; n: stacked in layer order).
  members: tuple[tuple[int, ...], ...]
  stacked: tuple[bool, ...]     # whether each stacked-tree leaf is a stack
  num_stacked: int

  def stack(self, tree: Any) -> Any:
    """The canonical ``tree`` with its layers stacked."""
    leaves = self.treedef.flatten_up_to(tree)
    out = [jnp.stack([leaves[j] for j in m]) if s else leaves[m[0]]
           for m, s in zip(self.members, self.stacked)]
    return jax.tree_util.tree_unflatten(self.stacked_treedef, out)

  def _slices(self, tree: Any) -> tuple[list[Any], dict[int, tuple[Any, int, Any]]]:
    leaves = self.stacked_treedef.flatten_up_to(tree)
    out: list[Any] = [None] * self.treedef.num_leaves
    views: dict[int, tuple[Any, int, Any]] = {}
    for leaf, m, s in zip(leaves, self.members, self.stacked):
      if not s:
        out[m[0]] = leaf
        continue
      for i, j in enumerate(m):
        piece = leaf[i]
        out[j] = piece
        views[id(piece)] = (leaf, i, piece)
    return out, views

  def unstack(self, tree: Any) -> Any:
    """The canonical tree of a stacked ``tree`` (slices of its stacks)."""
    out, _ = self._slices(tree)
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def views(self, tree: Any, views: dict[int, tuple[Any, int, Any]]) -> Any:
    """The canonical tree of a stacked ``tree``, its slices recorded in ``views``."""
    out, new = self._slices(tree)
    views.update(new)
    return jax.tree_util.tree_unflatten(self.treedef, out)

  def wrap_loss(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``loss_fn(trainable, frozen, ...)`` on stacked trainable params.

    The canonical params it is given are slices of the stacked ones, recorded
    in `stacked_views`: a model scanning its layers takes the stacks
    themselves. A ``frozen`` given as `Stacked` is unstacked the same way.
    """
    if not self.num_stacked:
      return loss_fn

    def stacked_loss(trainable, frozen, *args, **kwargs):
      views: dict[int, tuple[Any, int, Any]] = {}
      trainable = self.views(trainable, views)
      if isinstance(frozen, Stacked):
        frozen = frozen.layout.views(frozen.tree, views)
      with stacked_views(views):
        return loss_fn(trainable, frozen, *args, **kwargs)

    return stacked_loss


@jax.tree_util.register_pytree_node_class
class Stacked:
  """A tree in its stacked form beside its `LayerStack` (a pytree; the layout is static)."""

  def __init__(self, layout: LayerStack, tree: Any):
    self.layout = layout
    self.tree = tree

  def tree_flatten(self):
    return (self.tree,), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(layout, children[0])


def _paths(tree: Any) -> list[tuple[Any, ...]]:
  return [tuple(_key(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _key(k: Any) -> Any:
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def layer_stack(params_like: Any) -> LayerStack:
  """The `LayerStack` of a params tree (arrays or ``ShapeDtypeStruct``s).

  Nested mappings only (pure dicts, as `fedjax_fm.peft.split` makes): a
  mapping keyed ``0..n-1`` whose values share structure, shapes and dtypes
  becomes one subtree under `STACKED` with leaves ``[n, ...]``.
  """
  shapes = jax.eval_shape(lambda p: p, params_like)
  canon = {path: j for j, path in enumerate(_paths(shapes))}
  skeleton = _skeleton(shapes)
  members: list[tuple[int, ...]] = []
  stacks = set()   # the paths of the stacked mappings
  for path in _paths(skeleton):   # in the stacked tree's leaf order
    if STACKED not in path:
      members.append((canon[path],))
      continue
    at = path.index(STACKED)
    node = shapes
    for key in path[:at]:
      node = node[key]
    stacks.add(path[:at])
    members.append(tuple(canon[canonical_path(path, key)]
                         for key in sorted(node, key=_layer_index)))
  return LayerStack(jax.tree_util.tree_structure(shapes),
                    jax.tree_util.tree_structure(skeleton), tuple(members),
                    tuple(STACKED in path for path in _paths(skeleton)), len(stacks))


def canonical_path(path: tuple[Any, ...], index: Any) -> tuple[Any, ...]:
  """The canonical path of layer ``index`` (its key) of a stacked tree's ``path``."""
  return tuple(index if k == STACKED else k for k in path)
