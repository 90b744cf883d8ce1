"""Low-rank adaptation (LoRA) of ``nnx.Linear`` layers.

:class:`LoRALinear` wraps an existing ``nnx.Linear`` and adds a trainable
low-rank update::

  y = base(x) + (dropout(x) @ lora_a @ lora_b) * (alpha / rank)

``lora_a`` is initialised like HF peft (``kaiming_uniform(a=sqrt(5))`` on the
torch ``[rank, in]`` weight, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``) and
``lora_b`` with zeros, so a freshly wrapped layer computes exactly ``base(x)``.
The LoRA factors are ``nnx.LoRAParam`` variables while the base weights stay
``nnx.Param``, which is what :func:`fedjax_fm.peft.split_model` uses to
separate trainable from frozen state.

:func:`apply_lora` replaces, in place, every ``nnx.Linear`` of a model whose
attribute path matches one of the given patterns (see
:mod:`fedjax_fm.peft.surgery`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.layers import dropout
from fedjax_fm.peft.surgery import is_linear_leaf
from fedjax_fm.peft.surgery import match_paths
from fedjax_fm.peft.surgery import normalize_patterns

from fedjax_fm.peft.surgery import wrap_linears

__all__ = [
    'LoRALinear',
    'apply_lora',
    'linear_paths',
]


class LoRALinear(nnx.Module):
  """An ``nnx.Linear`` with an additive low-rank update.

  Attributes:
    base: the wrapped ``nnx.Linear`` (its ``kernel``/``bias`` stay
      ``nnx.Param``).
    lora_a: ``nnx.LoRAParam`` of shape ``[in_features, rank]``.
    lora_b: ``nnx.LoRAParam`` of shape ``[rank, out_features]``.
    scaling: ``alpha / rank``.
    dropout_rate: dropout on the LoRA input path (only with call-time rngs).
  """

  def __init__(
      self,
      base: nnx.Linear,
      *,
      rank: int,
      alpha: float,
      dropout: float = 0.0,
      rngs: nnx.Rngs,
  ):
    """Wraps ``base``.

    Args:
      base: the linear layer to adapt.
      rank: LoRA rank ``r >= 1``.
      alpha: LoRA scale numerator (> 0); the update is scaled by
        ``alpha / rank``.
      dropout: dropout rate on the LoRA input path, in ``[0, 1)``.
      rngs: used to initialise ``lora_a`` (``rngs.params()``).
    """
    _check_hparams(rank, alpha, dropout)
    if not is_linear_leaf(base):
      raise TypeError('base must be an nnx.Linear or a QuantizedLinear, got '
                      f'{type(base).__name__}')
    self.base = base
    self.rank = int(rank)
    self.alpha = float(alpha)
    self.scaling = float(alpha) / int(rank)
    self.dropout_rate = float(dropout)
    in_f, out_f = base.in_features, base.out_features
    bound = 1.0 / math.sqrt(in_f)
    param_dtype = base.param_dtype
    self.lora_a = nnx.LoRAParam(
        jax.random.uniform(
            rngs.params(), (in_f, rank), param_dtype, -bound, bound
        )
    )
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_f), param_dtype))

  @property
  def in_features(self) -> int:
    return self.base.in_features

  @property
  def out_features(self) -> int:
    return self.base.out_features

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Returns ``base(x) + dropout(x) @ A @ B * scaling``.

    Args:
      x: inputs ``[..., in_features]``.
      rngs: call-time rngs for LoRA dropout; ``None`` means no dropout.
    """
    y = self.base(x)
    dtype = self.base.dtype or y.dtype
    h = dropout(x, self.dropout_rate, rngs).astype(dtype)
    a = self.lora_a[...].astype(dtype)
    b = self.lora_b[...].astype(dtype)
    return y + ((h @ a) @ b * self.scaling).astype(y.dtype)


def _check_hparams(rank, alpha, dropout_rate):
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f'rank must be an int >= 1, got {rank!r}')
  if not alpha > 0:
    raise ValueError(f'alpha must be > 0, got {alpha!r}')
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout must be in [0, 1), got {dropout_rate!r}')


def linear_paths(model: nnx.Module) -> list[tuple[Any, ...]]:
  """Paths of all plain ``nnx.Linear`` layers not already wrapped by LoRA."""
  wrapped = set()
  out = []
  modules = list(nnx.iter_modules(model))
  for _, mod in modules:
    if isinstance(mod, LoRALinear):
      wrapped.add(id(mod.base))
  for path, mod in modules:
    if is_linear_leaf(mod) and id(mod) not in wrapped:
      out.append(tuple(path))
  return out


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str],
    rngs: nnx.Rngs,
) -> list[str]:
  """Wraps matching ``nnx.Linear`` layers of ``model`` with :class:`LoRALinear`.

  The model is modified in place. A layer at dotted attribute path ``p`` (e.g.
  ``layers.0.attn.q_proj``) is replaced if any pattern in ``target_modules``
  equals the last component of ``p`` or ``re.fullmatch``-es ``p``.

  Args:
    model: the model to adapt.
    rank: LoRA rank (>= 1).
    alpha: LoRA alpha (> 0); scaling is ``alpha / rank``.
    dropout: LoRA dropout rate in ``[0, 1)``.
    target_modules: names or regexes of the layers to adapt, e.g.
      ``('query', 'value')`` or ``(r'layers\\.\\d+\\.attn\\.[qv]_proj',)``.
    rngs: rngs for the ``lora_a`` initialisation.

  Returns:
    The dotted paths of the replaced layers, in traversal order.

  Raises:
    ValueError: on invalid hyper-parameters or if no layer matched.
  """
  _check_hparams(rank, alpha, dropout)
  target_modules = normalize_patterns(target_modules, 'target_modules')
  paths = match_paths(linear_paths(model), target_modules, what='nnx.Linear')
  return wrap_linears(
      model,
      paths,
      lambda path, base: LoRALinear(
          base, rank=rank, alpha=alpha, dropout=dropout, rngs=rngs
      ),
  )
