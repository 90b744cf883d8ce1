"""Model surgery shared by the PEFT methods: finding and replacing layers.

Every PEFT method here edits a model in place: it finds layers by attribute
path (``layers.0.attn.q_proj``), matches those paths against user patterns
and swaps the layers for wrappers (LoRA, adapters, (IA)^3) or installs new
modules in the hooks the models provide (prompt and prefix tuning).

A pattern matches a path if it equals the last path component or if
``re.fullmatch(pattern, dotted_path)`` succeeds (:func:`path_matches`).

A *linear wrapper* is a module that replaces an ``nnx.Linear`` and keeps it
(or another wrapper) as its ``base`` child, exposing ``in_features`` and
``out_features``. Models call their projections through
:func:`fedjax_fm.models.layers.linear_apply`, so a wrapper needs no model
change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from flax import nnx

__all__ = [
    'dotted',
    'get_child',
    'innermost_linear',
    'is_linear_leaf',
    'is_linear_wrapper',
    'linear_like_paths',
    'match_paths',
    'matching_linear_paths',
    'normalize_patterns',
    'path_matches',
    'set_child',
    'wrap_linears',
]


def dotted(path: Sequence[Any]) -> str:
  """Joins path components with ``'.'`` (``('layers', 0, 'q')`` -> ``'layers.0.q'``)."""
  return '.'.join(str(p) for p in path)


def path_matches(path: Sequence[Any], pattern: str, *, any_component=False):
  """Whether a module/variable path matches a pattern.

  Args:
    path: the path components.
    pattern: a name or a regex.
    any_component: match a name against every component, not only the last.

  Returns:
    ``True`` if ``pattern`` equals the last path component (or any
    component, with ``any_component=True``) or ``re.fullmatch(pattern,
    dotted_path)`` succeeds, where ``dotted_path`` joins the components with
    ``'.'`` (e.g. ``layers.0.attn.q_proj``). An invalid regex only matches by
    name.
  """
  parts = [str(p) for p in path]
  if not parts:
    return False
  if any_component:
    if pattern in parts:
      return True
  elif parts[-1] == pattern:
    return True
  try:
    return re.fullmatch(pattern, '.'.join(parts)) is not None
  except re.error:
    return False


def normalize_patterns(patterns: Sequence[str] | str, field: str) -> tuple:
  """Returns ``patterns`` as a non-empty tuple of strings.

  Args:
    patterns: one pattern or a sequence of them.
    field: the argument name, for the error message.

  Raises:
    ValueError: if there is no pattern or one is not a string.
  """
  if isinstance(patterns, str):
    patterns = (patterns,)
  patterns = tuple(patterns)
  if not patterns or not all(isinstance(p, str) for p in patterns):
    raise ValueError(
        f'{field} must be a non-empty sequence of names or regexes, got '
        f'{patterns!r}'
    )
  return patterns


def get_child(parent: Any, key: Any) -> Any:
  """The child ``key`` of a module, list or dict node."""
  if isinstance(parent, (nnx.List, list, nnx.Dict, dict)):
    return parent[key]
  return getattr(parent, key)


def set_child(parent: Any, key: Any, value: Any) -> None:
  """Replaces the child ``key`` of a module, list or dict node."""
  if isinstance(parent, (nnx.List, list, nnx.Dict, dict)):
    parent[key] = value
  else:
    setattr(parent, key, value)


def is_linear_leaf(module: Any) -> bool:
  """Whether ``module`` is a linear layer itself, not a wrapper of one.

  An ``nnx.Linear``, or a layer standing in for one that says so with a true
  class attribute ``is_linear_leaf`` (``peft.qbase.QuantizedLinear``).
  """
  return isinstance(module, nnx.Linear) or bool(
      getattr(type(module), 'is_linear_leaf', False))


def is_linear_wrapper(module: Any) -> bool:
  """Whether ``module`` wraps a linear layer (has a ``base`` module and features)."""
  return (
      not is_linear_leaf(module)
      and isinstance(getattr(module, 'base', None), nnx.Module)
      and hasattr(module, 'in_features')
      and hasattr(module, 'out_features')
  )


def innermost_linear(layer: Any) -> nnx.Linear:
  """Follows ``.base`` through wrappers down to the wrapped ``nnx.Linear``.

  Raises:
    TypeError: if ``layer`` is neither an ``nnx.Linear`` nor a wrapper.
  """
  while not is_linear_leaf(layer):
    if not is_linear_wrapper(layer):
      raise TypeError(
          f'expected an nnx.Linear or a linear wrapper, got '
          f'{type(layer).__name__}'
      )
    layer = layer.base
  return layer


def linear_like_paths(model: nnx.Module) -> list[tuple[Any, ...]]:
  """Paths of the outermost linear layers of ``model``.

  A linear layer is an ``nnx.Linear`` or a wrapper of one (``LoRALinear``,
  ``AdapterLinear``, ``IA3Linear``, ...). Modules inside a wrapper (its
  ``base`` and anything below) are not listed, so a layer is never wrapped
  twice by accident.
  """
  found = []
  for path, mod in nnx.iter_modules(model):
    if is_linear_leaf(mod) or is_linear_wrapper(mod):
      found.append(tuple(path))
  found_set = set(found)
  return [
      path for path in found
      if not any(path[:i] in found_set for i in range(len(path)))
  ]


def match_paths(
    candidates: Sequence[tuple[Any, ...]],
    patterns: Sequence[str],
    *,
    field: str = 'target_modules',
    what: str = 'linear',
) -> list[tuple[Any, ...]]:
  """The ``candidates`` that match one of ``patterns``, in order.

  Args:
    candidates: paths to choose from.
    patterns: names or regexes (see :func:`path_matches`).
    field: the argument name, for the error message.
    what: what the candidates are (``'linear'``, ``'nnx.Linear'``), for the
      error message.

  Raises:
    ValueError: if nothing matches (the message lists the candidates).
  """
  matched = [
      p for p in candidates if any(path_matches(p, t) for t in patterns)
  ]
  if not matched:
    available = ', '.join(dotted(p) for p in candidates) or '(none)'
    raise ValueError(
        f'{field}={tuple(patterns)!r} matched no {what} layer. Available '
        f'{what} paths: {available}'
    )
  return matched


def matching_linear_paths(
    model: nnx.Module, patterns: Sequence[str], field: str = 'target_modules'
) -> list[tuple[Any, ...]]:
  """Outermost linear layers whose path matches one of ``patterns``.

  Raises:
    ValueError: if no layer matches (the message lists the available paths).
  """
  return match_paths(linear_like_paths(model), patterns, field=field)


def wrap_linears(
    model: nnx.Module,
    paths: Sequence[tuple[Any, ...]],
    make_wrapper: Callable[[tuple[Any, ...], Any], nnx.Module],
) -> list[str]:
  """Replaces, in place, the layer at each path by ``make_wrapper(path, layer)``.

  Args:
    model: the model to modify.
    paths: attribute paths (as from :func:`linear_like_paths`).
    make_wrapper: builds the replacement module from the path and the layer.

  Returns:
    The dotted paths of the replaced layers, in the given order.

  Raises:
    ValueError: for the empty path (the root module cannot be replaced).
  """
  replaced = []
  for path in paths:
    if not path:
      raise ValueError('cannot wrap the root module itself')
    parent = model
    for key in path[:-1]:
      parent = get_child(parent, key)
    layer = get_child(parent, path[-1])
    set_child(parent, path[-1], make_wrapper(path, layer))
    replaced.append(dotted(path))
  return replaced
