"""(IA)^3: learned rescaling vectors on keys, values and FFN activations.

(IA)^3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations")
multiplies selected activations element-wise by learned vectors initialised
to ones:

* keys and values: the *output* of ``k_proj``/``v_proj`` (Decoder) or
  ``key``/``value`` (Encoder) is rescaled, ``l_k * (W_k x + b_k)``;
* the FFN intermediate activation: the *input* of the FFN output projection
  (``down_proj`` in the Decoder, ``output`` in the Encoder) is rescaled, i.e.
  ``W_2 (l_ff * act(W_1 x))``.

:class:`IA3Linear` wraps a linear layer and does one of the two; its vector is
an :class:`IA3Param` (a subclass of ``nnx.Param``) selected by
``peft.split_model(model, 'ia3')``. At initialisation the model is unchanged.

References:
  * Liu, Tam, Muqeeth, Mohta, Huang, Bansal, Raffel 2022, "Few-Shot
    Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning", https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.layers import linear_apply
from fedjax_fm.peft.surgery import dotted
from fedjax_fm.peft.surgery import innermost_linear
from fedjax_fm.peft.surgery import linear_like_paths
from fedjax_fm.peft.surgery import matching_linear_paths
from fedjax_fm.peft.surgery import normalize_patterns
from fedjax_fm.peft.surgery import path_matches
from fedjax_fm.peft.surgery import wrap_linears

__all__ = [
    'DEFAULT_IA3_FEEDFORWARD',
    'DEFAULT_IA3_TARGETS',
    'IA3Linear',
    'IA3Param',
    'apply_ia3',
]

# Keys, values and FFN output projections of the Decoder and the Encoder.
DEFAULT_IA3_TARGETS = (
    'k_proj', 'v_proj', 'down_proj', 'key', 'value', 'output'
)
# The subset of targets whose *input* is rescaled (FFN intermediate).
DEFAULT_IA3_FEEDFORWARD = ('down_proj', 'output')


class IA3Param(nnx.Param):
  """Trainable (IA)^3 rescaling vector (``split_model(.., 'ia3')``)."""


class IA3Linear(nnx.Module):
  """A linear layer whose output (or input) is rescaled element-wise.

  Attributes:
    base: the wrapped layer (an ``nnx.Linear`` or another linear wrapper).
    ia3_scale: :class:`IA3Param` of ones, ``[in_features]`` if
      ``feedforward`` else ``[out_features]``.
    feedforward: ``True`` rescales the input (FFN intermediate activation),
      ``False`` the output (keys, values).
  """

  def __init__(
      self, base: Any, *, feedforward: bool, rngs: nnx.Rngs | None = None
  ):
    """Wraps ``base``.

    Args:
      base: the layer to rescale.
      feedforward: rescale the input (``True``) or the output (``False``).
      rngs: unused ((IA)^3 vectors are initialised to ones); accepted for
        symmetry with the other PEFT wrappers.
    """
    del rngs
    linear = innermost_linear(base)
    self.base = base
    self.feedforward = bool(feedforward)
    size = base.in_features if self.feedforward else base.out_features
    self.ia3_scale = IA3Param(jnp.ones((size,), linear.param_dtype))

  @property
  def in_features(self) -> int:
    return self.base.in_features

  @property
  def out_features(self) -> int:
    return self.base.out_features

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Returns ``base(l * x)`` (feedforward) or ``l * base(x)``.

    Args:
      x: inputs ``[..., in_features]``.
      rngs: call-time rngs, passed on to the wrapped layer.
    """
    scale = self.ia3_scale[...]
    if self.feedforward:
      return linear_apply(self.base, x * scale.astype(x.dtype), rngs)
    y = linear_apply(self.base, x, rngs)
    return y * scale.astype(y.dtype)


def apply_ia3(
    model: nnx.Module,
    *,
    target_modules: Sequence[str] = DEFAULT_IA3_TARGETS,
    feedforward_modules: Sequence[str] = DEFAULT_IA3_FEEDFORWARD,
    rngs: nnx.Rngs | None = None,
) -> list[str]:
  """Wraps matching linear layers of ``model`` with :class:`IA3Linear`.

  Layers are matched as in :func:`fedjax_fm.peft.apply_lora` (a pattern equals
  the last path component or ``re.fullmatch``-es the dotted path). Every
  layer matched by ``target_modules`` is wrapped; those also matched by
  ``feedforward_modules`` get input scaling, the others output scaling. As in
  HF peft, the feed-forward layers must be a subset of the targets. The
  defaults fit both the Decoder (``k_proj``, ``v_proj``, ``down_proj``) and
  the Encoder (``key``, ``value``, ``output``).

  Args:
    model: the model to adapt (modified in place).
    target_modules: names or regexes of all the layers to rescale.
    feedforward_modules: names or regexes of the FFN output projections whose
      input is rescaled. May be empty.
    rngs: unused (the vectors start at ones); accepted for API symmetry.

  Returns:
    The dotted paths of the wrapped layers, in traversal order.

  Raises:
    ValueError: if no layer matched ``target_modules``, or a layer matched
      by ``feedforward_modules`` is not matched by ``target_modules``.
  """
  del rngs
  target_modules = normalize_patterns(target_modules, 'target_modules')
  if isinstance(feedforward_modules, str):
    feedforward_modules = (feedforward_modules,)
  feedforward_modules = tuple(feedforward_modules)
  if not all(isinstance(p, str) for p in feedforward_modules):
    raise ValueError(
        f'feedforward_modules must be names or regexes, got '
        f'{feedforward_modules!r}'
    )
  is_ff = lambda p: any(path_matches(p, t) for t in feedforward_modules)
  stray = [
      dotted(p) for p in linear_like_paths(model)
      if is_ff(p) and not any(path_matches(p, t) for t in target_modules)
  ]
  if stray:
    raise ValueError(
        f'feedforward_modules={feedforward_modules!r} must be a subset of '
        f'target_modules={target_modules!r}; not targeted: {stray}'
    )
  paths = matching_linear_paths(model, target_modules)
  return wrap_linears(
      model, paths,
      lambda path, layer: IA3Linear(layer, feedforward=is_ff(path)),
  )
