"""Quantile-based adaptive clipping (Andrew et al. 2021).

Instead of a hand-tuned clip bound, the server tracks the ``target_quantile``
(``gamma``) of the clients' update norms. Each round every participating client
reports one bit ``b_i = [||u_i|| <= C]`` (alongside its clipped update); the
server estimates the fraction of unclipped clients ``b_mean`` and takes a
geometric step

  ``C <- C * exp(-eta_C * (b_mean - gamma))``,

which shrinks ``C`` when more than a ``gamma`` fraction of the clients fit
inside it and grows it otherwise, so that ``C`` converges to the ``gamma``
quantile of the norm distribution.

Privacy of the bits: with ``clipped_count_stddev = sigma_b > 0`` the count is
released with Gaussian noise. Following the paper, the bits are centred
(``b_i - 1/2``, sensitivity 1/2 under adding or removing one client) and the
fraction uses the *expected* number of clients ``m`` as denominator::

  b_mean = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2

The count query is then a Gaussian mechanism with noise multiplier
``2 sigma_b``; composed with the update query of multiplier ``z_delta`` it is
equivalent to one Gaussian mechanism of multiplier
``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2`` (the paper's Theorem 1).
`update_noise_multiplier` turns a total budget ``z`` into the ``z_delta`` to use
for the updates, so the accountant can keep using ``z``. The paper's defaults
are ``gamma = 0.5``, ``eta_C = 0.2`` and ``sigma_b = m / 20``.

References:
  * Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
    with Adaptive Clipping", https://arxiv.org/abs/1905.03871
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class AdaptiveClipState(NamedTuple):
  """State of quantile-based adaptive clipping.

  Attributes:
    clip_norm: Current clip bound ``C`` (float32 scalar).
  """
  clip_norm: jax.Array


class AdaptiveClip(NamedTuple):
  """Pure functions of `quantile_adaptive_clip`.

  Attributes:
    init: ``init(initial_clip) -> AdaptiveClipState``.
    update: ``update(state, clipped_bits [C], weights [C], key=None) -> state``.
      ``clipped_bits[i]`` is ``norm_i <= C`` (bool or 0/1) for client ``i``;
      only clients with ``weights > 0`` are counted, each as one (the weights are
      a participation mask, see the module docstring). ``key`` is required when
      ``clipped_count_stddev > 0``.
    clipped_bits: ``clipped_bits(norms [C], state) -> bool [C]``, the bit each
      client reports, ``norms <= state.clip_norm``.
  """
  init: Callable[[float], AdaptiveClipState]
  update: Callable[..., AdaptiveClipState]
  clipped_bits: Callable[[jax.Array, AdaptiveClipState], jax.Array]


def quantile_adaptive_clip(target_quantile: float = 0.5,
                           learning_rate: float = 0.2,
                           clipped_count_stddev: float = 0.0,
                           expected_clients: Optional[float] = None
                           ) -> AdaptiveClip:
  """Geometric quantile tracking of the client update norms (Andrew et al. 2021).

  Args:
    target_quantile: ``gamma`` in [0, 1], the quantile of the update norms to
      track (0.5: the median norm).
    learning_rate: ``eta_C > 0`` of the geometric update.
    clipped_count_stddev: ``sigma_b >= 0``, standard deviation of the Gaussian
      noise on the (centred) count of unclipped clients; 0 for no noise.
    expected_clients: Denominator ``m`` of the fraction; required when
      ``clipped_count_stddev > 0`` (the realised count is private under Poisson
      sampling). ``None`` uses the realised number of participating clients.

  Returns:
    An `AdaptiveClip`.

  Raises:
    ValueError: naming the offending argument.

  References:
    Andrew et al. 2021, https://arxiv.org/abs/1905.03871
  """
  if not 0.0 <= target_quantile <= 1.0:
    raise ValueError(
        f'target_quantile must be in [0, 1]; got {target_quantile!r}.')
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0; got {learning_rate!r}.')
  if not clipped_count_stddev >= 0:
    raise ValueError(
        f'clipped_count_stddev must be >= 0; got {clipped_count_stddev!r}.')
  if expected_clients is not None and not expected_clients > 0:
    raise ValueError(
        f'expected_clients must be > 0 or None; got {expected_clients!r}.')
  if clipped_count_stddev > 0 and expected_clients is None:
    raise ValueError(
        'expected_clients is required when clipped_count_stddev > 0 (the '
        'fraction must not divide by the private realised count).')

  def init(initial_clip):
    if isinstance(initial_clip, (int, float)) and not initial_clip > 0:
      raise ValueError(f'initial_clip must be > 0; got {initial_clip!r}.')
    return AdaptiveClipState(clip_norm=jnp.asarray(initial_clip, jnp.float32))

  def clipped_bits(norms, state):
    return jnp.asarray(norms) <= state.clip_norm

  def update(state, clipped_bits_, weights, key=None):
    live = (jnp.asarray(weights) > 0).astype(jnp.float32)
    bits = jnp.asarray(clipped_bits_).astype(jnp.float32)
    centred = jnp.sum(live * (bits - 0.5))
    if clipped_count_stddev > 0:
      if key is None:
        raise ValueError('key is required when clipped_count_stddev > 0.')
      centred = centred + clipped_count_stddev * jax.random.normal(
          key, (), jnp.float32)
    if expected_clients is None:
      denom = jnp.sum(live)
    else:
      denom = jnp.float32(expected_clients)
    safe = jnp.where(denom > 0, denom, 1.0)
    b_mean = centred / safe + 0.5
    new_clip = state.clip_norm * jnp.exp(
        -learning_rate * (b_mean - target_quantile))
    new_clip = jnp.where(denom > 0, new_clip, state.clip_norm)
    return AdaptiveClipState(clip_norm=new_clip.astype(jnp.float32))

  return AdaptiveClip(init=init, update=update, clipped_bits=clipped_bits)


def update_noise_multiplier(noise_multiplier: float,
                            clipped_count_stddev: float) -> float:
  """Noise multiplier for the updates given a total budget (Andrew et al. Thm 1).

  Solves ``z^-2 = z_delta^-2 + (2 sigma_b)^-2`` for ``z_delta``: using
  ``z_delta`` for the updates and ``sigma_b`` for the clipped count costs the
  same privacy as one Gaussian mechanism with multiplier ``z``, which is what the
  accountant should be given.

  Args:
    noise_multiplier: Total ``z > 0``.
    clipped_count_stddev: ``sigma_b >= 0`` (0: all budget to the updates).

  Returns:
    ``z_delta >= z``.

  Raises:
    ValueError: if the arguments are out of range or ``2 sigma_b <= z`` (the
      count alone would use up the budget).
  """
  if not noise_multiplier > 0:
    raise ValueError(
        f'noise_multiplier must be > 0; got {noise_multiplier!r}.')
  if not clipped_count_stddev >= 0:
    raise ValueError(
        f'clipped_count_stddev must be >= 0; got {clipped_count_stddev!r}.')
  if clipped_count_stddev == 0:
    return float(noise_multiplier)
  if not 2.0 * clipped_count_stddev > noise_multiplier:
    raise ValueError(
        'clipped_count_stddev must exceed noise_multiplier / 2 '
        f'(got clipped_count_stddev={clipped_count_stddev!r}, '
        f'noise_multiplier={noise_multiplier!r}).')
  inv = noise_multiplier ** -2 - (2.0 * clipped_count_stddev) ** -2
  return float(1.0 / math.sqrt(inv))
