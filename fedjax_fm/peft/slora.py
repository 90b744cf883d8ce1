"""SLoRA-style two-stage federated PEFT: sparse fine-tuning, then LoRA.

Stage 1 fine-tunes the full weights of the targeted layers, restricted to a
fixed random sparse mask of density ``d`` shared by all clients; stage 2
starts LoRA from the truncated SVD of the accumulated sparse update, with the
base weights left at their pre-trained values, so that
``W0 + s A B = W0 + truncated_r(Delta)`` at the start of stage 2::

  split1 = slora.sparse_split(model, ('query', 'value'),
                              extra_trainable=('classifier',))
  masks = slora.sparse_masks(split1.trainable, density=0.05, seed=0,
                             keep_dense=('classifier',))
  client_opt = optax.chain(optax.adam(1e-3), slora.mask_updates(masks))
  # ... federated rounds on split1 (engine unchanged) -> trainable t1 ...
  acc = jax.tree.map(jnp.subtract, t1, split1.trainable)   # sparse update
  model = peft.merge(split1)                               # back to W0
  slora.slora_stage2(model, acc, rank=8, alpha=16.0,
                     target_modules=('query', 'value'))
  split2 = peft.split_model(model, 'lora', extra_trainable=('classifier',))

Chaining :func:`mask_updates` *after* the client optimizer keeps every
client's trajectory, hence its delta and the aggregate, inside the mask
(the trainable is effectively the masked dense delta). :func:`masked_update`
applies the mask to any delta (e.g. as a compressor step).

References:
  * Babakniya, Elkordy, Ezzeldin, Liu, Song, El-Khamy, Avestimehr 2023,
    "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models",
    https://arxiv.org/abs/2308.06522
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_fm.peft.surgery import normalize_patterns
from fedjax_fm.peft.lora import LoRALinear
from fedjax_fm.peft.lora import apply_lora
from fedjax_fm.peft.surgery import path_matches
from fedjax_fm.peft.lora_aggregation import balanced_factors
from fedjax_fm.peft.split import Split
from fedjax_fm.peft.split import extra_filter

__all__ = [
    'lora_init_from_update',
    'mask_updates',
    'masked_update',
    'slora_stage2',
    'sparse_masks',
    'sparse_split',
]


def _keypath(keypath) -> tuple[Any, ...]:
  return tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in keypath)


def sparse_masks(
    params_like: Any,
    density: float,
    seed: int,
    *,
    keep_dense: Sequence[str] = (),
) -> Any:
  """Fixed random sparse masks, one per leaf, with exactly the given density.

  Each leaf gets ``max(1, round(density * size))`` True entries drawn
  uniformly without replacement (NumPy, seeded: the same on every host and
  for every client).

  Args:
    params_like: a pytree of arrays or ``ShapeDtypeStruct``s (e.g. the
      stage-1 trainable dict).
    density: fraction of entries kept, in ``(0, 1]``.
    seed: integer seed.
    keep_dense: names or regexes of leaves kept fully trainable (all-True
      mask), matched like ``split_model``'s ``extra_trainable`` (any path
      component, or a fullmatch of the dotted leaf or module path), e.g.
      ``('classifier',)``.

  Returns:
    A pytree of bool arrays with the structure and shapes of ``params_like``.

  Raises:
    ValueError: if ``density`` is not in ``(0, 1]``.
  """
  if not 0.0 < density <= 1.0:
    raise ValueError(f'density must be in (0, 1], got {density!r}')
  if isinstance(keep_dense, str):
    keep_dense = (keep_dense,)
  dense = extra_filter(tuple(keep_dense))
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params_like)
  masks = []
  for keypath, leaf in flat:
    shape = tuple(leaf.shape)
    size = int(np.prod(shape, dtype=np.int64))
    if keep_dense and dense(_keypath(keypath), leaf):
      masks.append(jnp.ones(shape, bool))
      continue
    k = min(size, max(1, int(round(density * size))))
    mask = np.zeros(size, bool)
    mask[rng.choice(size, size=k, replace=False)] = True
    masks.append(jnp.asarray(mask.reshape(shape)))
  return jax.tree_util.tree_unflatten(treedef, masks)


def masked_update(delta: Any, masks: Any) -> Any:
  """Zeroes the entries of ``delta`` outside ``masks`` (leafwise)."""
  return jax.tree.map(
      lambda d, m: jnp.where(m, d, jnp.zeros_like(d)), delta, masks
  )


def mask_updates(masks: Any) -> optax.GradientTransformation:
  """An optax transformation that zeroes updates outside ``masks``.

  Chain it last, ``optax.chain(optimizer, mask_updates(masks))``, so the
  params (and thus the client deltas) never leave the sparse support, also
  with weight decay or momentum.

  Args:
    masks: bool pytree with the structure of the params.

  Returns:
    A stateless ``optax.GradientTransformation``.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return masked_update(updates, masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def sparse_split(
    model: nnx.Module,
    target_modules: Sequence[str],
    extra_trainable: Sequence[str] = (),
) -> Split:
  """Stage-1 split: trainable = kernels of the targeted ``nnx.Linear`` layers.

  Args:
    model: the (pre-trained) model, without LoRA on the targeted layers.
    target_modules: names or regexes of the layers to fine-tune sparsely,
      matched as in ``apply_lora``.
    extra_trainable: extra params to train (e.g. ``('classifier',)``).

  Returns:
    A ``peft.Split`` of pure dicts.

  Raises:
    ValueError: if no ``nnx.Linear`` matches ``target_modules``.
  """
  target_modules = normalize_patterns(target_modules, 'target_modules')
  if isinstance(extra_trainable, str):
    extra_trainable = (extra_trainable,)
  layers = {
      tuple(path) for path, mod in nnx.iter_modules(model)
      if isinstance(mod, nnx.Linear)
      and any(path_matches(tuple(path), t) for t in target_modules)
  }
  if not layers:
    raise ValueError(
        f'target_modules={target_modules!r} matched no nnx.Linear layer'
    )

  def is_target_kernel(path, value):
    del value
    return bool(path) and path[-1] == 'kernel' and tuple(path[:-1]) in layers

  trainable_filter = nnx.All(
      nnx.Param,
      nnx.Any(is_target_kernel, extra_filter(tuple(extra_trainable))),
  )
  graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
  return Split(graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen))


def lora_init_from_update(
    delta_w: jax.Array, rank: int
) -> tuple[jax.Array, jax.Array]:
  """Balanced rank-``rank`` factors of a dense update by truncated SVD.

  With ``delta_w = U S V^T``: ``A = U_r sqrt(S_r)`` ``[in, r]`` and
  ``B = sqrt(S_r) V_r^T`` ``[r, out]``, so ``A @ B`` is the best rank-r
  approximation of ``delta_w`` (zero components pad ``r > min(in, out)``).

  Args:
    delta_w: ``[..., in, out]`` update (leading axes are batched).
    rank: target rank (>= 1).

  Returns:
    ``(A, B)`` in float32.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f'rank must be an int >= 1, got {rank!r}')
  u, s, vt = jnp.linalg.svd(
      jnp.asarray(delta_w, jnp.float32), full_matrices=False)
  return balanced_factors(u, s, vt, rank)


def _get_module(model, path):
  mod = model
  for key in path:
    mod = mod[key] if isinstance(mod, (nnx.List, list, nnx.Dict, dict)) else (
        getattr(mod, key))
  return mod


def slora_stage2(
    model: nnx.Module,
    accumulated_deltas: Any,
    rank: int,
    alpha: float,
    *,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
    merge_rest: bool = True,
    rngs: nnx.Rngs | None = None,
) -> list[str]:
  """Applies LoRA initialised from the stage-1 update, in place.

  Every ``kernel`` delta of an ``nnx.Linear`` in ``accumulated_deltas`` (at
  the same path as in the model's state, e.g.
  ``{'layers': {0: {'query': {'kernel': D}}}}``; restricted to
  ``target_modules`` if given) becomes a :class:`~fedjax_fm.peft.LoRALinear`
  with ``A = U_r sqrt(S_r / s)``, ``B = sqrt(S_r / s) V_r^T`` where
  ``s = alpha / rank`` is the layer's scaling, so that
  ``x @ A @ B * s = x @ truncated_r(D)``. The base kernels are not changed:
  ``model`` should hold the pre-trained weights ``W0``.

  Args:
    model: the model with the pre-trained weights (modified in place).
    accumulated_deltas: pure dict of stage-1 deltas (``t1 - t0``).
    rank: LoRA rank (>= 1).
    alpha: LoRA alpha (> 0).
    target_modules: optional names or regexes restricting which layers get
      LoRA; other deltas are handled by ``merge_rest``.
    dropout: LoRA dropout rate.
    merge_rest: add the deltas that do not become LoRA (e.g. a classifier
      head trained densely in stage 1, biases) to the model's params;
      otherwise they are ignored.
    rngs: rngs for ``LoRALinear`` (its random init is overwritten).

  Returns:
    The dotted paths of the layers that received LoRA.

  Raises:
    ValueError: if no delta corresponds to a (targeted) ``nnx.Linear``
      kernel, or a delta's path or shape does not fit the model.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f'rank must be an int >= 1, got {rank!r}')
  if target_modules is not None:
    target_modules = normalize_patterns(target_modules, 'target_modules')
  rngs = nnx.Rngs(0) if rngs is None else rngs
  lora_deltas, rest = {}, []
  for keypath, delta in jax.tree_util.tree_flatten_with_path(
      accumulated_deltas)[0]:
    path = _keypath(keypath)
    try:
      owner = _get_module(model, path[:-1])
    except (AttributeError, KeyError, IndexError, TypeError):
      raise ValueError(
          f"accumulated_deltas path {'.'.join(map(str, path))} is not in "
          'the model'
      ) from None
    is_lora = (
        path[-1] == 'kernel' and isinstance(owner, nnx.Linear)
        and (target_modules is None
             or any(path_matches(path[:-1], t) for t in target_modules))
    )
    if is_lora:
      lora_deltas[path[:-1]] = delta
    else:
      rest.append((path, owner, delta))
  if not lora_deltas:
    raise ValueError(
        'slora_stage2 found no nnx.Linear kernel delta'
        + ('' if target_modules is None
           else f' matching target_modules={target_modules!r}')
    )
  for path, owner, delta in rest:
    if not merge_rest:
      continue
    var = getattr(owner, path[-1])
    if tuple(var.shape) != tuple(delta.shape):
      raise ValueError(
          f"delta at {'.'.join(map(str, path))} has shape "
          f'{tuple(delta.shape)}, the param {tuple(var.shape)}'
      )
    old = var[...]
    var.set_value((old + jnp.asarray(delta)).astype(old.dtype))

  patterns = tuple(
      re.escape('.'.join(map(str, p))) for p in lora_deltas
  )
  replaced = apply_lora(model, rank=rank, alpha=alpha, dropout=dropout,
                        target_modules=patterns, rngs=rngs)
  for path, delta in lora_deltas.items():
    layer = _get_module(model, path)
    assert isinstance(layer, LoRALinear)
    if tuple(delta.shape) != tuple(layer.base.kernel.shape):
      raise ValueError(
          f"delta at {'.'.join(map(str, path))}.kernel has shape "
          f'{tuple(delta.shape)}, the kernel {tuple(layer.base.kernel.shape)}'
      )
    a, b = lora_init_from_update(delta, rank)
    root = 1.0 / np.sqrt(layer.scaling)
    dtype = layer.lora_a[...].dtype
    layer.lora_a.set_value((a * root).astype(dtype))
    layer.lora_b.set_value((b * root).astype(dtype))
  return replaced
