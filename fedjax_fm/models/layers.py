"""Building blocks shared by the models and the PEFT wrappers.

* :func:`linear`, :func:`embed` and :func:`layer_norm` build the ``nnx``
  layers of the models with their common initialisation;
  :class:`RMSNorm` is the Llama-style norm (Gemma-style with
  ``scale_offset=1``).
* :func:`activation` maps an activation name to its function (one table for
  every model and adapter).
* :func:`dropout` is inverted dropout driven by call-time ``rngs``.
* :func:`linear_apply` calls a projection. Models call every projection
  through it, so that a PEFT wrapper installed in place of an ``nnx.Linear``
  (LoRA, adapters, (IA)^3, ...) receives the call-time ``rngs`` without the
  model knowing about PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    'ACTIVATIONS',
    'INIT',
    'RMSNorm',
    'activation',
    'dropout',
    'embed',
    'layer_norm',
    'linear',
    'linear_apply',
]

# Initialiser of the model kernels and embeddings (as HF BERT/GPT-2/Llama).
INIT = nnx.initializers.normal(stddev=0.02)

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'tanh': jnp.tanh,
}
# Names accepted by :func:`activation`: ``'gelu'`` is the exact (erf) GELU,
# ``'gelu_new'`` its tanh approximation (HF naming).
ACTIVATIONS = tuple(_ACTIVATIONS)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation function called ``name``.

  Args:
    name: one of :data:`ACTIVATIONS`.

  Returns:
    An element-wise function of one array.

  Raises:
    ValueError: for an unknown name.
  """
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f'activation must be one of {ACTIVATIONS}, got {name!r}'
    ) from None


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout driven by call-time ``rngs``.

  Args:
    x: input array.
    rate: drop probability in ``[0, 1)``.
    rngs: ``nnx.Rngs`` with a ``dropout`` stream (or a default stream). ``None``
      means deterministic: ``x`` is returned unchanged.

  Returns:
    ``x`` with elements zeroed with probability ``rate`` and the rest scaled
    by ``1 / (1 - rate)``.
  """
  if rngs is None or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x)).astype(x.dtype)


def linear_apply(layer: Any, x: jax.Array, rngs: nnx.Rngs | None = None):
  """Calls a projection, passing ``rngs`` to layers that accept it.

  A plain ``nnx.Linear`` is called as ``layer(x)``. Anything else in its
  place is a wrapper of a linear layer (e.g. ``peft.LoRALinear``, which may
  use dropout) and is called as ``layer(x, rngs=rngs)``.

  Args:
    layer: an ``nnx.Linear`` or a linear wrapper.
    x: inputs ``[..., in_features]``.
    rngs: call-time rngs, or ``None`` (deterministic).

  Returns:
    The layer output ``[..., out_features]``.
  """
  if isinstance(layer, nnx.Linear):
    return layer(x)
  return layer(x, rngs=rngs)


def linear(
    din: int,
    dout: int,
    *,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  """An ``nnx.Linear`` with the model kernel initialiser :data:`INIT`."""
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=INIT, rngs=rngs,
  )


def embed(
    num: int,
    dim: int,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Embed:
  """An ``nnx.Embed`` of ``num`` rows initialised with :data:`INIT`."""
  return nnx.Embed(
      num, dim, dtype=dtype, param_dtype=param_dtype, embedding_init=INIT,
      rngs=rngs,
  )


def layer_norm(
    dim: int,
    *,
    eps: float,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
  """An ``nnx.LayerNorm`` with the two-pass variance of HF/torch."""
  return nnx.LayerNorm(
      dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False, rngs=rngs,
  )


class RMSNorm(nnx.Module):
  """``x / sqrt(mean(x**2) + eps) * (scale_offset + scale)``, in float32.

  ``scale_offset=0`` is the Llama norm (``scale`` starts at 1);
  ``scale_offset=1`` is the Gemma norm, which stores ``scale`` as an offset
  from 1 (``scale`` starts at 0).
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, scale_offset: float = 0.0):
    self.scale = nnx.Param(
        jnp.full((dim,), 1.0 - scale_offset, param_dtype) if scale_offset
        else jnp.ones((dim,), param_dtype)
    )
    self.eps = eps
    self.dtype = dtype
    self.scale_offset = float(scale_offset)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.scale_offset:
      scale = scale + self.scale_offset
    return (y * scale).astype(dtype)
