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
:func:`fedjax_fm.models.layers.linear_apply`, :func:`apply_adapters` needs no
model change; layers are found and wrapped with :mod:`fedjax_fm.peft.surgery`,
as by the other PEFT methods. Wrappers may wrap plain ``nnx.Linear`` layers or
other linear wrappers (e.g. a :class:`~fedjax_fm.peft.LoRALinear`, so LoRA and
adapters compose when LoRA is applied first).

References:
  * Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo,
    Attariyan, Gelly 2019, "Parameter-Efficient Transfer Learning for NLP",
    https://arxiv.org/abs/1902.00751
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fedjax_fm.models.layers import ACTIVATIONS
from fedjax_fm.models.layers import activation as activation_fn
from fedjax_fm.models.layers import linear_apply
from fedjax_fm.peft.surgery import innermost_linear
from fedjax_fm.peft.surgery import matching_linear_paths
from fedjax_fm.peft.surgery import normalize_patterns
from fedjax_fm.peft.surgery import wrap_linears

__all__ = [
    'ACTIVATIONS',
    'AdapterLinear',
    'AdapterParam',
    'DEFAULT_ADAPTER_TARGETS',
    'apply_adapters',
]

# Attention and MLP output projections of the Decoder and of the Encoder.
DEFAULT_ADAPTER_TARGETS = ('o_proj', 'down_proj', 'attn_out', 'output')


class AdapterParam(nnx.Param):
  """Trainable parameter of a bottleneck adapter (``split_model(.., 'adapter')``)."""


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
    h = activation_fn(self.activation)(h)
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
