"""Small pytree helpers shared by the engine and the ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def tree_zeros_like(tree):
  """Zeros with the shape and dtype of every leaf."""
  return jax.tree.map(jnp.zeros_like, tree)


def tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a, b):
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(tree, s):
  return jax.tree.map(lambda x: x * s, tree)


def tree_vdot(a, b):
  """Sum over leaves of <a, b> in float32."""
  parts = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b))
  return sum(parts) if parts else jnp.float32(0.0)


def tree_norm(tree):
  """Global L2 norm of a pytree (float32)."""
  return jnp.sqrt(tree_vdot(tree, tree))


def tree_select(pred, on_true, on_false):
  """Leafwise `where(pred, on_true, on_false)` for a scalar predicate."""
  return jax.tree.map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def tree_nbytes(tree) -> int:
  """Bytes of every leaf of a pytree of arrays or ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def tree_size(tree) -> int:
  """Number of scalars in a pytree."""
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


def tree_all_finite(tree):
  """Scalar bool: every entry of every leaf is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
