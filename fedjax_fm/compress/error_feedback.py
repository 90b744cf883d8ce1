"""Error feedback: carry what the compressor dropped into the next round.

``error_feedback(inner)`` keeps a per-client residual ``e`` (float32, shaped
like the update) in the compressor state::

  c = x + e                       # corrected update (float32)
  payload = inner.encode(c)       # sent
  e' = c - inner.decode(payload)  # what was lost, added back next round

so the sum of everything decoded over rounds trails the sum of the inputs by
exactly the current residual, which stays bounded for a contractive ``inner``
(top-k, scaled sign, PowerSGD, ...). The inner compressor sees ``c`` cast back
to each leaf's own dtype, so a bf16 update stays bf16 on the wire and the
rounding to bf16 is fed back too. The payload is the inner payload: error
feedback costs no bytes, only client memory.

References:
  Seide et al. 2014, "1-Bit Stochastic Gradient Descent and its Application
  to Data-Parallel Distributed Training of Speech DNNs",
  https://www.isca-archive.org/interspeech_2014/seide14_interspeech.html.
  Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
  Compression Schemes", https://arxiv.org/abs/1901.09847.
  Stich et al. 2018, "Sparsified SGD with Memory", https://arxiv.org/abs/1809.07599.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_fm.compress.base import Compressor


class ErrorFeedbackState(NamedTuple):
  residual: Any      # float32 tree shaped like the update
  inner: Any         # the inner compressor's state


def error_feedback(inner: Compressor) -> Compressor:
  """Wraps ``inner`` with a per-client float32 residual (Seide et al. 2014).

  Args:
    inner: any :class:`Compressor`.

  Returns:
    A :class:`Compressor` with the same payload as ``inner`` and state
    :class:`ErrorFeedbackState`.
  """
  if not isinstance(inner, Compressor):
    raise ValueError(f'inner must be a Compressor, got {type(inner).__name__}')

  def init(params_like):
    residual = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params_like)
    return ErrorFeedbackState(residual, inner.init(params_like))

  def encode(key, tree, state):
    corrected = jax.tree.map(lambda x, e: x.astype(jnp.float32) + e, tree, state.residual)
    sent = jax.tree.map(lambda c, x: c.astype(x.dtype), corrected, tree)
    payload, inner_state = inner.encode(key, sent, state.inner)
    decoded = inner.decode(payload)
    residual = jax.tree.map(lambda c, d: c - d.astype(jnp.float32), corrected, decoded)
    return payload, ErrorFeedbackState(residual, inner_state)

  return Compressor(init, encode, inner.decode)
