"""Houlsby bottleneck adapters as wrappers of linear output projections.

A Houlsby adapter is a small residual bottleneck MLP inserted after a
transformer sub-layer has been projected back to the model width and before
the skip connection is added. We implement it as a wrapper of that output
projection (``o_proj``/``down_proj`` in the Llama-style
:class:`~fedjax_fm.models.Decoder`, ``attn_out``/``output`` in the BERT-style
:class:`~fedjax_fm.models.Encoder`)::

  y   = base(x)                                  # W x (+ b)
  out = y + act(y @ down_kernel + down_bias) @ up_kernel + up_bias

``up_kernel``/``up_bias`` start at zero, so a freshly wrapped layer computes
exactly ``base(x)``. The four adapter arrays are :class:`AdapterParam`
variables (a subclass of ``nnx.Param``), which is what
``peft.split_model(model, 'adapter')`` selects as trainable.

Because the models call their projections through
:func:`fedjax_fm.peft.linear_apply`, :func:`apply_adapters` needs no model
change. The same machinery (:func:`wrap_linears`) is used by
:mod:`fedjax_fm.peft.ia3`. Wrappers may wrap plain ``nnx.Linear`` layers or
other linear wrappers (e.g. a :class:`~fedjax_fm.peft.LoRALinear`, so LoRA and
adapters compose when LoRA is applied first).

References:
  * Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo,
    Attariyan, Gelly 2019, "Parameter-Efficient Transfer Learning for NLP",
    https://arxiv.org/abs/1902.00751
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.peft.lora import linear_apply
from fedjax_fm.peft.lora import path_matches

__all__ = [
    'ACTIVATIONS',
    'AdapterLinear',
    'AdapterParam',
    'DEFAULT_ADAPTER_TARGETS',
    'apply_adapters',
    'innermost_linear',
    'is_linear_wrapper',
    'linear_like_paths',
    'wrap_linears',
]

ACTIVATIONS = ('gelu', 'gelu_new', 'relu', 'silu', 'tanh')

# Attention and MLP output projections of the Decoder and of the Encoder.
DEFAULT_ADAPTER_TARGETS = ('o_proj', 'down_proj', 'attn_out', 'output')


class AdapterParam(nnx.Param):
  """Trainable parameter of a bottleneck adapter (``split_model(.., 'adapter')``)."""


def is_linear_wrapper(module: Any) -> bool:
  """Whether ``module`` wraps a linear layer (has a ``base`` module and features)."""
  return (
      not isinstance(module, nnx.Linear)
      and isinstance(getattr(module, 'base', None), nnx.Module)
      and hasattr(module, 'in_features')
      and hasattr(module, 'out_features')
  )


def innermost_linear(layer: Any) -> nnx.Linear:
  """Follows ``.base`` through wrappers down to the wrapped ``nnx.Linear``."""
  while not isinstance(layer, nnx.Linear):
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
  :class:`AdapterLinear`, ``IA3Linear``, ...). Modules inside a wrapper (its
  ``base`` and anything below) are not listed, so a layer is never wrapped
  twice by accident.
  """
  found = []
  for path, mod in nnx.iter_modules(model):
    path = tuple(path)
    if not (isinstance(mod, nnx.Linear) or is_linear_wrapper(mod)):
      continue
    found.append(path)
  found_set = set(found)
  out = []
  for path in found:
    inside = any(path[:i] in found_set for i in range(len(path)))
    if not inside:
      out.append(path)
  return out


def _dotted(path: Sequence[Any]) -> str:
  return '.'.join(str(p) for p in path)


def _get_child(parent: Any, key: Any) -> Any:
  if isinstance(parent, (nnx.List, list, nnx.Dict, dict)):
    return parent[key]
  return getattr(parent, key)


def _set_child(parent: Any, key: Any, value: Any) -> None:
  if isinstance(parent, (nnx.List, list, nnx.Dict, dict)):
    parent[key] = value
  else:
    setattr(parent, key, value)


def normalize_patterns(patterns: Sequence[str] | str, field: str) -> tuple:
  """Returns ``patterns`` as a non-empty tuple of strings."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  patterns = tuple(patterns)
  if not patterns or not all(isinstance(p, str) for p in patterns):
    raise ValueError(
        f'{field} must be a non-empty sequence of names or regexes, got '
        f'{patterns!r}'
    )
  return patterns


def matching_linear_paths(
    model: nnx.Module, patterns: Sequence[str], field: str = 'target_modules'
) -> list[tuple[Any, ...]]:
  """Outermost linear layers whose path matches one of ``patterns``.

  Raises:
    ValueError: if no layer matches (the message lists the available paths).
  """
  candidates = linear_like_paths(model)
  matched = [
      p for p in candidates if any(path_matches(p, t) for t in patterns)
  ]
  if not matched:
    available = ', '.join(_dotted(p) for p in candidates) or '(none)'
    raise ValueError(
        f'{field}={tuple(patterns)!r} matched no linear layer. Available '
        f'linear paths: {available}'
    )
  return matched


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
  """
  replaced = []
  for path in paths:
    if not path:
      raise ValueError('cannot wrap the root module itself')
    parent = model
    for key in path[:-1]:
      parent = _get_child(parent, key)
    layer = _get_child(parent, path[-1])
    _set_child(parent, path[-1], make_wrapper(path, layer))
    replaced.append(_dotted(path))
  return replaced


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == 'gelu':
    return jax.nn.gelu(x, approximate=False)
  if name == 'gelu_new':
    return jax.nn.gelu(x, approximate=True)
  if name == 'relu':
    return jax.nn.relu(x)
  if name == 'silu':
    return jax.nn.silu(x)
  return jnp.tanh(x)


def _check_hparams(bottleneck, activation, init_std):
  if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or (
      bottleneck < 1):
    raise ValueError(f'bottleneck must be an int >= 1, got {bottleneck!r}')
  if activation not in ACTIVATIONS:
    raise ValueError(
        f'activation must be one of {ACTIVATIONS}, got {activation!r}'
    )
  if not init_std >= 0:
    raise ValueError(f'init_std must be >= 0, got {init_std!r}')


class AdapterLinear(nnx.Module):
  """A linear layer followed by a residual Houlsby bottleneck adapter.

  Attributes:
    base: the wrapped layer (an ``nnx.Linear`` or another linear wrapper).
    down_kernel: :class:`AdapterParam` ``[out_features, bottleneck]``.
    down_bias: :class:`AdapterParam` ``[bottleneck]``.
    up_kernel: :class:`AdapterParam` ``[bottleneck, out_features]`` (zeros).
    up_bias: :class:`AdapterParam` ``[out_features]`` (zeros).
    activation: name of the bottleneck non-linearity.
  """

  def __init__(
      self,
      base: Any,
      *,
      bottleneck: int,
      activation: str = 'gelu',
      init_std: float = 1e-2,
      rngs: nnx.Rngs,
  ):
    """Wraps ``base``.

    Args:
      base: the layer whose output is adapted.
      bottleneck: adapter hidden size ``m >= 1``.
      activation: one of :data:`ACTIVATIONS`.
      init_std: standard deviation of the (truncated at 2 std) normal
        initialisation of ``down_kernel`` (Houlsby et al.: near-identity,
        ``1e-2``).
      rngs: used to initialise ``down_kernel`` (``rngs.params()``).
    """
    _check_hparams(bottleneck, activation, init_std)
    linear = innermost_linear(base)
    self.base = base
    self.bottleneck = int(bottleneck)
    self.activation = activation
    out_f = base.out_features
    dtype = linear.param_dtype
    down = jax.random.truncated_normal(
        rngs.params(), -2.0, 2.0, (out_f, bottleneck), dtype
    ) * jnp.asarray(init_std, dtype)
    self.down_kernel = AdapterParam(down)
    self.down_bias = AdapterParam(jnp.zeros((bottleneck,), dtype))
    self.up_kernel = AdapterParam(jnp.zeros((bottleneck, out_f), dtype))
    self.up_bias = AdapterParam(jnp.zeros((out_f,), dtype))

  @property
  def in_features(self) -> int:
    return self.base.in_features

  @property
  def out_features(self) -> int:
    return self.base.out_features

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Returns ``y + up(act(down(y)))`` with ``y = base(x)``.

    Args:
      x: inputs ``[..., in_features]``.
      rngs: call-time rngs, passed on to the wrapped layer.
    """
    y = linear_apply(self.base, x, rngs)
    dtype = y.dtype
    h = y @ self.down_kernel[...].astype(dtype) + self.down_bias[...].astype(
        dtype)
    h = _activation(self.activation, h)
    return y + (h @ self.up_kernel[...].astype(dtype)
                + self.up_bias[...].astype(dtype))


def apply_adapters(
    model: nnx.Module,
    *,
    bottleneck: int,
    target_modules: Sequence[str] = DEFAULT_ADAPTER_TARGETS,
    activation: str = 'gelu',
    init_std: float = 1e-2,
    rngs: nnx.Rngs,
) -> list[str]:
  """Inserts Houlsby adapters after the matching linear layers, in place.

  A layer at dotted path ``p`` (e.g. ``layers.0.attn.o_proj``) is wrapped if a
  pattern of ``target_modules`` equals its last component or
  ``re.fullmatch``-es ``p``. The defaults target the attention and MLP output
  projections of both the Decoder (``o_proj``, ``down_proj``) and the Encoder
  (``attn_out``, ``output``): the two adapters per block of Houlsby et al.
  Houlsby et al. also train the layer norms; add them to the split with
  ``extra_trainable`` (e.g. ``(r'.*norm',)``).

  Args:
    model: the model to adapt.
    bottleneck: adapter hidden size (>= 1).
    target_modules: names or regexes of the layers to wrap.
    activation: one of :data:`ACTIVATIONS`.
    init_std: std of the ``down_kernel`` initialisation (>= 0).
    rngs: rngs for the ``down_kernel`` initialisation.

  Returns:
    The dotted paths of the wrapped layers, in traversal order.

  Raises:
    ValueError: on invalid hyper-parameters or if no layer matched.
  """
  _check_hparams(bottleneck, activation, init_std)
  target_modules = normalize_patterns(target_modules, 'target_modules')
  paths = matching_linear_paths(model, target_modules)
  return wrap_linears(
      model,
      paths,
      lambda path, layer: AdapterLinear(
          layer, bottleneck=bottleneck, activation=activation,
          init_std=init_std, rngs=rngs,
      ),
  )
