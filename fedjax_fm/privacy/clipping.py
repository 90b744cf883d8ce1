"""L2 clipping of client updates, over the whole pytree or leaf by leaf.

Clipping bounds each client's contribution to the aggregate, which is what gives
the Gaussian mechanism a finite sensitivity (Abadi et al. 2016; McMahan et al.
2018). Both functions are pure, work on one client's update (call them inside
``vmap`` for a stack of clients), compute norms in float32 and return leaves in
their original dtype.

References:
  * Abadi et al. 2016, "Deep Learning with Differential Privacy",
    https://arxiv.org/abs/1607.00133
  * McMahan et al. 2018, "Learning Differentially Private Recurrent Language
    Models", https://arxiv.org/abs/1710.06963 (flat and per-layer clipping,
    Section 3).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def _leaf_sq_norm(x):
  x = x.astype(jnp.float32)
  return jnp.sum(x * x)


def _clip_factor(norm, clip_norm):
  """``min(1, clip_norm / norm)``; 1 when ``norm == 0``."""
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  return clip_norm / jnp.maximum(norm, clip_norm)


def _scale(x, factor):
  return (x.astype(jnp.float32) * factor).astype(x.dtype)


def global_norm(tree) -> jax.Array:
  """Global L2 norm of a pytree, computed in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.float32(0.0)
  return jnp.sqrt(sum(_leaf_sq_norm(x) for x in leaves))


def clip_flat(tree, clip_norm) -> tuple[Any, jax.Array]:
  """Scales a pytree so that its global L2 norm is at most ``clip_norm``.

  ``clipped = tree * min(1, clip_norm / ||tree||)`` with ``||.||`` the L2 norm of
  all leaves concatenated. Updates already inside the ball are returned
  unchanged (factor exactly 1).

  A non-finite update yields a non-finite result: filter such clients first
  (`fedjax_fm.aggregate.finite_mask`).

  Args:
    tree: One client's update (pytree of float arrays).
    clip_norm: Positive clip bound ``C`` (Python float or traced scalar; a traced
      value is what adaptive clipping passes).

  Returns:
    ``(clipped, norm)``: the clipped pytree (leaf dtypes kept) and the float32
    global norm of ``tree`` before clipping.

  Raises:
    ValueError: if ``clip_norm`` is a Python number that is not positive.
  """
  _check_positive_static(clip_norm, 'clip_norm')
  norm = global_norm(tree)
  factor = _clip_factor(norm, clip_norm)
  return jax.tree.map(lambda x: _scale(x, factor), tree), norm


def clip_per_layer(tree, clip_norms) -> tuple[Any, Any]:
  """Clips every leaf of a pytree to its own L2 bound.

  When ``clip_norms`` is a single number ``C`` it is the *total* bound: with
  ``L`` leaves each leaf is clipped to ``C / sqrt(L)``, so that the clipped
  update's global norm is at most ``sqrt(L * (C / sqrt(L))**2) = C`` and the
  sensitivity (hence the noise calibration of `gaussian_dp`) is the same as for
  `clip_flat` with ``C``. When ``clip_norms`` is a pytree with the structure of
  ``tree`` each leaf uses its own bound and the total bound is
  ``sqrt(sum_l C_l**2)``.

  Args:
    tree: One client's update (pytree of float arrays).
    clip_norms: Total bound (float or traced scalar), or a pytree of per-leaf
      bounds with the structure of ``tree``.

  Returns:
    ``(clipped, norms)``: the clipped pytree and a pytree (structure of
    ``tree``) of each leaf's float32 L2 norm before clipping.

  Raises:
    ValueError: if a Python-number bound is not positive, or a pytree of bounds
      does not match the structure of ``tree``.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(clip_norms)):
    _check_positive_static(clip_norms, 'clip_norms')
    per_leaf = (jnp.asarray(clip_norms, jnp.float32) /
                math.sqrt(max(len(leaves), 1)))
    bounds = [per_leaf] * len(leaves)
  else:
    bound_leaves, bound_def = jax.tree.flatten(clip_norms)
    if bound_def != treedef:
      raise ValueError(
          'clip_norms must be a number (total bound) or a pytree with the '
          f'structure of the update; got structure {bound_def}, expected '
          f'{treedef}.')
    for b in bound_leaves:
      _check_positive_static(b, 'clip_norms')
    bounds = bound_leaves
  norms = [jnp.sqrt(_leaf_sq_norm(x)) for x in leaves]
  clipped = [_scale(x, _clip_factor(n, b))
             for x, n, b in zip(leaves, norms, bounds)]
  return (jax.tree.unflatten(treedef, clipped),
          jax.tree.unflatten(treedef, norms))


def _check_positive_static(value, name):
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f'{name} must be a positive number; got {value!r}.')
