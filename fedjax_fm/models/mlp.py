"""A small MLP classifier over feature vectors."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from fedjax_fm.models.layers import activation
from fedjax_fm.models.layers import dropout
from fedjax_fm.models.layers import linear_apply

__all__ = ['MLPClassifier']


class MLPClassifier(nnx.Module):
  """ReLU MLP: ``x -> [Linear -> relu -> dropout]* -> classifier``.

  Attributes:
    layers: ``nnx.List`` of hidden ``nnx.Linear`` layers (paths ``layers.0``,
      ``layers.1``, ...).
    classifier: the output ``nnx.Linear`` (``hidden[-1] -> num_classes``).
  """

  def __init__(
      self,
      in_dim: int,
      hidden: Sequence[int],
      num_classes: int,
      *,
      dropout: float = 0.0,
      rngs: nnx.Rngs,
  ):
    """Builds the MLP.

    Args:
      in_dim: input feature size.
      hidden: sizes of the hidden layers (may be empty: a linear model).
      num_classes: number of output logits.
      dropout: dropout rate after each hidden activation (only with call-time
        rngs), in ``[0, 1)``.
      rngs: parameter initialisation rngs.
    """
    if in_dim < 1:
      raise ValueError(f'in_dim must be >= 1, got {in_dim}')
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}')
    if any(h < 1 for h in hidden):
      raise ValueError(f'hidden sizes must be >= 1, got {tuple(hidden)}')
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1), got {dropout}')
    dims = [in_dim, *hidden]
    self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
    )
    self.classifier = nnx.Linear(dims[-1], num_classes, rngs=rngs)
    self.dropout = float(dropout)

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Returns logits ``[..., num_classes]``; dropout only if ``rngs``."""
    relu = activation('relu')
    for layer in self.layers:
      x = relu(linear_apply(layer, x, rngs))
      x = dropout(x, self.dropout, rngs)
    return linear_apply(self.classifier, x, rngs)
